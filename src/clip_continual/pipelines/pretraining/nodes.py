"""Nodes that provide the CLIP every continual run starts from."""

from __future__ import annotations

import logging
from typing import Any

import torch

from clip_continual.data.common import ImageSet
from clip_continual.evaluation.retrieval import evaluate_retrieval
from clip_continual.evaluation.zero_shot import zero_shot_accuracy
from clip_continual.model.clip import ClipModel, ModelSpec
from clip_continual.model.sources import build_model, require_architecture
from clip_continual.runtime.tracking import COST_GROUP, PRETRAINING_GROUP, metric_history
from clip_continual.training.pretraining import PretrainingConfig, pretrain

logger = logging.getLogger(__name__)

PAID_HERE = "pretrained_by_this_run"  # model metadata: False when a run reused the checkpoint
COSTS = {"train_seconds": "pretraining_s", "train_cpu_seconds": "pretraining_cpu_s"}


def _spec(model_params: dict[str, Any]) -> ModelSpec:
    return ModelSpec(
        architecture=model_params["architecture"],
        pretrained=model_params.get("pretrained"),
        cache_dir=model_params.get("cache_dir"),
    )


def _source_key(model_params: dict[str, Any], config: PretrainingConfig | None,
                data_params: dict[str, Any]) -> dict[str, Any]:
    """What the starting model is made from; a checkpoint with the same key is reused.
    ``config`` is None when pretraining is disabled (the weights are used as they are)."""
    key = {"architecture": model_params["architecture"], "pretrained": model_params.get("pretrained")}
    if config is not None:  # the fingerprint covers the seed
        corpus = {**data_params["shapes"], "image_size": data_params["image_size"]}
        if (data_params.get("glyphs") or {}).get("count"):  # printed digits change the corpus
            corpus["glyphs"] = dict(data_params["glyphs"])
        key |= {"pretraining": config.fingerprint(), "corpus": corpus}
    return key


def pretrain_clip(
    corpus: ImageSet,
    cached: ClipModel | None,
    model_params: dict[str, Any],
    pretraining_params: dict[str, Any],
    data_params: dict[str, Any],
    seed: int,
) -> ClipModel:
    """Pretrain (or, with pretraining disabled, just load) the starting CLIP.

    A checkpoint already on disk that was made with the same settings is reused as it is.
    """
    params = dict(pretraining_params)
    enabled = params.pop("enabled", True)
    config = PretrainingConfig.from_params({**params, "seed": seed})
    key = _source_key(model_params, config if enabled else None, data_params)
    if cached is not None:  # never reuse nor overwrite a checkpoint of another architecture
        require_architecture(cached.spec.architecture, model_params["architecture"], "the cached start model")
    if cached is not None and cached.metadata.get("source") == key:
        logger.info("Reusing the pretrained model on disk (same settings); delete it to pretrain again.")
        cached.metadata[PAID_HERE] = False  # its seconds were another run's
        return cached
    torch.manual_seed(seed)  # the random initialisation is part of what the seed fixes
    start = build_model(_spec(model_params))
    if not enabled:
        start.metadata["source"] = key
        return start
    model, summary = pretrain(start, corpus, config)
    logger.info("Pretrained in %.0f s, final loss %.3f", summary["train_seconds"], summary["final_loss"])
    model.metadata.update({"source": key, "pretraining": summary, PAID_HERE: True})
    return model


def evaluate_pretrained(
    model: ClipModel,
    zero_shot_set: ImageSet,
    retrieval_set: ImageSet,
    prompts: dict[str, Any],
    evaluation_params: dict[str, Any],
) -> dict[str, float]:
    batch_size, device = evaluation_params["batch_size"], evaluation_params.get("device", "auto")
    metrics = {
        "zs_acc": zero_shot_accuracy(model, zero_shot_set, list(prompts["shapes"]), batch_size, device),
        **evaluate_retrieval(model, retrieval_set, batch_size, device,
                             evaluation_params.get("retrieval_folds", 1)),
    }
    return metrics | paid_costs(model.metadata)


def paid_costs(metadata: dict[str, Any]) -> dict[str, float]:
    """What pretraining cost, for the run that pretrained only (one that reused the checkpoint
    paid nothing; the seconds on the checkpoint are another run's)."""
    summary = (metadata.get("pretraining") or {}) if metadata.get(PAID_HERE) else {}
    return {key: summary[key] for key in COSTS if key in summary}


def pretraining_metrics_for_mlflow(metrics: dict[str, float]) -> dict[str, Any]:
    """The pretrained model's metrics as MLflow metrics ``pretraining/<name>`` at step 0, its
    seconds as ``cost/pretraining_s`` (a node of its own, as the continual steps': a resumed run
    logs them without evaluating again)."""
    costs = {COSTS[key]: value for key, value in metrics.items() if key in COSTS}
    quality = {key: value for key, value in metrics.items() if key not in COSTS}
    return metric_history(quality, PRETRAINING_GROUP, step=0) | metric_history(costs, COST_GROUP, step=0)
