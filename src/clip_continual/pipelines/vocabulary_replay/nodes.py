"""The replayed vocabulary as a catalog artifact."""

from __future__ import annotations

from typing import Any

from clip_continual.models import ClipModel
from clip_continual.replay import ReplayVocabulary, VocabularyConfig, build_vocabulary


def build_replay_vocabulary(model: ClipModel, params: dict[str, Any], seed: int) -> ReplayVocabulary:
    config = VocabularyConfig.from_params({**params, "seed": seed})
    return build_vocabulary(config, model.context_length, model.tokenizer)
