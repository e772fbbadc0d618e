"""LwF as ZSCL runs it on MTIL (ZSCL ``mtil/scripts/lwf.sh``: ``--method ZSCL --image_loss
--text_loss --ref-dataset <current dataset>``, the previous checkpoint as ``--ref-model``): not
CL-CLIP's LwF (``lwf``), and compared with ZSCL's own LwF row."""

from __future__ import annotations

import torch
from torch import nn

from clip_continual.methods.base import Batch, TaskContext
from clip_continual.methods.vr_lwf_zscl import ZsclVocabularyReplay


class ZsclLwF(ZsclVocabularyReplay):
    """``L = CE + w * (D(z, z_old) + D(z^T, z_old^T))`` as ``vr_lwf_zscl``, with the texts of
    the current task's class prompts (ZSCL ``finetune.py``: no ``--ref-sentences``, so the
    reference dataset's class names) instead of pseudo-words.

    Differences from ``lwf`` (CL-CLIP ``methods/lwf.py``), each read from the two codes: the
    teacher's text features on both sides (only the image encoder is distilled); the current
    task's classes (not all seen ones); both directions (image -> text and text -> image);
    temperature 2 with the T^2 factor, soft-target cross-entropy (not KL at T=1); weight 1 per
    direction (ZSCL ``args.py``; CL-CLIP: 0.5). Like ``vr_lwf_zscl`` the distillation batch is
    the un-augmented training batch, where ZSCL draws a second batch of the task's images.
    """

    name = "lwf_zscl"
    needs_vocabulary = False
    default_vocabulary_mode = None
    term_prefix = "lwf"

    def before_task(self, task: TaskContext) -> None:
        self._teacher_vocab_text = task.teacher.text_features(task.class_tokens[task.current_classes])

    def after_task(self, task: TaskContext, student: nn.Module) -> None:
        self._teacher_vocab_text = None

    def distillation_texts(self, batch: Batch, task: TaskContext) -> torch.Tensor:
        return self._teacher_vocab_text
