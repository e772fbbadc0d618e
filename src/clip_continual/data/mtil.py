"""MTIL (multi-domain task-incremental learning, ZSCL): dataset orders, ZSCL's training defaults
per dataset, and the few-shot variant.

Each task of MTIL fine-tunes on one whole dataset, classifying among that dataset's classes;
after every task all eleven test sets are evaluated. Plain Python; no Kedro import.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from clip_continual.data.source import SubsetSource
from clip_continual.data.torchvision_sets import SPECS

# ZSCL mtil/scripts/ZSCL.sh (and lwf.sh, lwf_vr.sh, wc.sh, ...): dataset=(Aircraft Caltech101 ...)
ORDER_I = (
    "aircraft", "caltech101", "cifar100", "dtd", "eurosat", "flowers",
    "food", "mnist", "oxford_pet", "stanford_cars", "sun397",
)
# ZSCL mtil/scripts/ZSCL_minus.sh: dataset=(StanfordCars Food MNIST OxfordPet Flowers SUN397 ...)
ORDER_II = (
    "stanford_cars", "food", "mnist", "oxford_pet", "flowers", "sun397",
    "aircraft", "caltech101", "dtd", "eurosat", "cifar100",
)
ORDERS = {"order1": ORDER_I, "order2": ORDER_II}
# X-TAIL's ten domains, MTIL order I without CIFAR-100, in RAIL's order (Regression-based-Analytic-
# Incremental-Learning configs/analytic_clip.yaml ``datasets``: oxford_flowers, food101 and
# oxford_pets are flowers, food and oxford_pet here).
XTAIL_DOMAINS = tuple(key for key in ORDER_I if key != "cifar100")

# ZSCL mtil/scripts/ZSCL.sh and ZSCL_minus.sh, the lr=(...) array beside the dataset array:
# 5e-5 for Aircraft and MNIST, 1e-5 for every other dataset, in both orders.
LEARNING_RATES = {key: 5e-5 if key in ("aircraft", "mnist") else 1e-5 for key in SPECS}


@dataclass(frozen=True)
class MtilTraining:
    """ZSCL's MTIL training defaults (the same for every task but the learning rate)."""

    model: str = "ViT-B-16"  # mtil/src/args.py --model default "ViT-B/16" (open_clip spells it ViT-B-16)
    optimizer: str = "adamw"  # mtil/src/models/finetune.py: torch.optim.AdamW
    weight_decay: float = 0.0  # mtil/src/args.py --wd default 0.0
    betas: tuple[float, float] = (0.9, 0.999)  # finetune.py betas=(0.9, args.beta2), --beta2 0.999
    warmup_iterations: int = 100  # mtil/src/args.py --warmup_length 100; utils.cosine_lr
    schedule: str = "cosine"  # mtil/src/utils.py cosine_lr: linear warm-up, then cosine to 0
    # (training.schedule.learning_rate_at with schedule "cosine" and warmup_steps computes it)
    batch_size: int = 64  # mtil/src/args.py --batch-size 64
    eval_batch_size: int = 128  # mtil/src/args.py --batch-size-eval 128
    # mtil/scripts/*.sh --iterations 1000. ZSCL's loop (finetune.py) runs
    # range(total_iterations + 1), i.e. 1,001 optimizer steps, the schedule sized for 1,000.
    iterations: int = 1000
    label_smoothing: float = 0.2  # mtil/scripts/*.sh --ls 0.2
    train_logit_scale: bool = False  # finetune.py: exclude_params_name = ["logit_scale"]
    parts: str = "wm"  # mtil/scripts/*.sh --train-mode=whole
    # ZSCL's train transform (mtil/clip/clip.py, _transform(n_px, is_train=True)):
    # RandomResizedCrop(n_px, scale=(0.9, 1.0), bicubic), RGB, ToTensor, CLIP's mean/std.
    # Its test transform: Resize(n_px, bicubic), CenterCrop(n_px), RGB, ToTensor, mean/std.
    train_crop_scale: tuple[float, float] = (0.9, 1.0)


MTIL_TRAINING = MtilTraining()


def order(name: str) -> tuple[str, ...]:
    if name not in ORDERS:
        raise ValueError(f"unknown MTIL order '{name}'; choose from {sorted(ORDERS)}")
    return ORDERS[name]


def task_learning_rates(datasets: tuple[str, ...]) -> tuple[float, ...]:
    """ZSCL's learning rate of each task of a sequence, in the sequence's order."""
    unknown = [key for key in datasets if key not in LEARNING_RATES]
    if unknown:
        raise ValueError(f"no ZSCL learning rate for {unknown}; known: {sorted(LEARNING_RATES)}")
    return tuple(LEARNING_RATES[key] for key in datasets)


def few_shot_positions(labels: np.ndarray, shots: int, seed: int) -> np.ndarray:
    """Positions of ``shots`` examples per class drawn at random (all of a class that has fewer),
    sorted. The few-shot MTIL of later papers trains on 5 images per class (MoE-Adapters
    mtil/scripts/train/train_few_shot_router11_experts22_1000iters.sh ``--few_shot=5``; its
    mtil/src/models/finetune.py keeps the first k per class of a shuffled loader)."""
    if shots < 1:
        raise ValueError(f"few_shot must be a positive number of images per class, got {shots}")
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    chosen = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        chosen.append(rng.choice(members, size=min(shots, len(members)), replace=False))
    return np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, dtype=np.int64)


def few_shot(source: SubsetSource, shots: int | None, seed: int) -> SubsetSource:
    """``shots`` training images per class of ``source`` (None: all of them)."""
    if shots is None:
        return source
    return source.subset(few_shot_positions(source.labels, shots, seed))
