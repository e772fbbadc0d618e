"""The replayed vocabulary as a catalog artifact."""

from __future__ import annotations

from typing import Any

from clip_continual.methods import method_class
from clip_continual.methods.vocabulary import ReplayVocabulary, VocabularyConfig, build_vocabulary
from clip_continual.model.clip import ClipModel


def vocabulary_config(params: dict[str, Any], method: str, seed: int) -> VocabularyConfig:
    """``mode: auto`` takes the vocabulary the method was published with (paper for vr_lwf,
    ZSCL's fixed table for vr_lwf_zscl)."""
    mode = params.get("mode", "auto")
    if mode == "auto":
        mode = method_class(method).default_vocabulary_mode or "paper"
    return VocabularyConfig.from_params({**params, "mode": mode, "seed": seed})


def build_replay_vocabulary(
    model: ClipModel, params: dict[str, Any], method: str, seed: int
) -> ReplayVocabulary:
    config = vocabulary_config(params, method, seed)
    return build_vocabulary(config, model.context_length, model.tokenizer)
