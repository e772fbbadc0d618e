"""Continual-learning methods, one module each (its losses, memory, adapters), and their registry:
name -> class. A new method is one module and one line in ``METHODS`` here."""

from __future__ import annotations

import inspect

from typing import Any

from clip_continual.methods.agem import AveragedGEM
from clip_continual.methods.base import ContinualMethod, MethodConfigError
from clip_continual.methods.condu import ConDULoRA, ContinualDecouplingUnifying
from clip_continual.methods.diki import DIKI
from clip_continual.methods.dpw import DynamicPrefixWeighting
from clip_continual.methods.ewc import ElasticWeightConsolidation
from clip_continual.methods.ft import FineTuning
from clip_continual.methods.gem import GradientEpisodicMemory
from clip_continual.methods.geodl import GeodesicDistillation
from clip_continual.methods.icarl import ICaRL
from clip_continual.methods.imm import MeanIMM
from clip_continual.methods.lora import SequentialLoRA
from clip_continual.methods.lwf import LearningWithoutForgetting
from clip_continual.methods.lwf_zscl import ZsclLwF
from clip_continual.methods.moe_adapters import MoEAdapters
from clip_continual.methods.rail import Rail
from clip_continual.methods.rkr import RectifiedKnowledgeRetention
from clip_continual.methods.vr_lwf import VocabularyReplayLwF
from clip_continual.methods.vr_lwf_zscl import ZsclVocabularyReplay
from clip_continual.methods.wise_ft import WiseFineTuning
from clip_continual.methods.zscl import ZeroShotContinualLearning

METHODS: dict[str, type[ContinualMethod]] = {
    FineTuning.name: FineTuning,
    LearningWithoutForgetting.name: LearningWithoutForgetting,
    ZsclLwF.name: ZsclLwF,
    VocabularyReplayLwF.name: VocabularyReplayLwF,
    ZsclVocabularyReplay.name: ZsclVocabularyReplay,
    GeodesicDistillation.name: GeodesicDistillation,
    MeanIMM.name: MeanIMM,
    WiseFineTuning.name: WiseFineTuning,
    ElasticWeightConsolidation.name: ElasticWeightConsolidation,
    AveragedGEM.name: AveragedGEM,
    GradientEpisodicMemory.name: GradientEpisodicMemory,
    ICaRL.name: ICaRL,
    RectifiedKnowledgeRetention.name: RectifiedKnowledgeRetention,
    MoEAdapters.name: MoEAdapters,
    Rail.name: Rail,
    SequentialLoRA.name: SequentialLoRA,
    ZeroShotContinualLearning.name: ZeroShotContinualLearning,
    ContinualDecouplingUnifying.name: ContinualDecouplingUnifying,
    ConDULoRA.name: ConDULoRA,
    DIKI.name: DIKI,
    DynamicPrefixWeighting.name: DynamicPrefixWeighting,
}


def method_takes_alpha(name: str) -> bool:
    """Whether the method has a distillation weight ``alpha`` (ft has none)."""
    return "alpha" in inspect.signature(method_class(name)).parameters


def effective_alpha(name: str, alpha: float | None) -> float | None:
    """The distillation weight a run of ``name`` uses: None for a method without one (ft),
    the method's own default when ``alpha`` is None."""
    if not method_takes_alpha(name):
        return None
    if alpha is None:
        return inspect.signature(method_class(name)).parameters["alpha"].default
    return alpha


def method_class(name: str) -> type[ContinualMethod]:
    try:
        return METHODS[name]
    except KeyError:
        raise MethodConfigError(
            f"unknown method '{name}'; known methods: {', '.join(sorted(METHODS))}"
        ) from None


def get_method(name: str, **hyper: Any) -> ContinualMethod:
    """Build method ``name`` with its hyper-parameters; None values take the method's default."""
    cls = method_class(name)
    hyper = {key: value for key, value in hyper.items() if value is not None}
    accepted = cls.hyper_parameter_names()
    unknown = sorted(set(hyper) - set(accepted))
    if unknown:
        raise MethodConfigError(
            f"method '{name}' has no hyper-parameter(s) {unknown}; it accepts: "
            f"{', '.join(accepted) or 'none'}"
        )
    return cls(**hyper)


__all__ = ["METHODS", "ContinualMethod", "MethodConfigError", "effective_alpha", "get_method", "method_class",
           "method_takes_alpha"]
