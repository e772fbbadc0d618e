"""RKR: a frozen CLIP whose linear layers learn a low-rank rectification and a scale.

Follows the code of our paper, CL-CLIP ``models/clip_rkr.py`` (``inject_trainable_rkr``,
``LoraInjectedLinear``) and ``main.py`` (which towers for which part; the backbone frozen), trained
with the fine-tuning loss of ``methods/ft.py``. The rectifiers themselves live in
``clip_continual.adapters`` (so checkpoints, freezing and evaluation treat them like any model).
"""

from __future__ import annotations

from torch import nn

from clip_continual.adapters import TOWERS_OF_PARTS, add_adapters
from clip_continual.methods.base import MethodConfigError
from clip_continual.methods.ft import FineTuning


class RectifiedKnowledgeRetention(FineTuning):
    """``L = CE`` as ``ft``, trained only through rectifiers: every ``nn.Linear`` of the residual
    blocks of the adapted towers computes ``(W x + b + U D x) * s`` with W, b frozen,
    rank-``rank`` U, D and a per-output-channel scale s. The rectifiers are added once (task 1)
    and keep learning in later tasks, as CL-CLIP resumes them.
    """

    name = "rkr"

    def __init__(self, rank: int = 4, label_smoothing: float = 0.0) -> None:
        super().__init__(label_smoothing=label_smoothing)
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise MethodConfigError(f"rank must be a positive integer, got {rank!r}")
        self.rank = rank

    def prepare_student(self, student: nn.Module, parts: str) -> None:
        add_adapters(student, {"kind": "rkr", "rank": self.rank, "towers": TOWERS_OF_PARTS[parts]})
