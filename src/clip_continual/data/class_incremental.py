"""Class-incremental CIFAR-100 as ZSCL runs it: its class order, 10 / 20 / 50 equal steps, its
prompt and training defaults. After step t the model classifies the test images of every class
seen so far among those classes. Plain Python; no Kedro import.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from clip_continual.data.source import SubsetSource
from clip_continual.data.torchvision_sets import load_split

# ZSCL cil/class_orders/cifar100.yaml (class_order), as torchvision / continuum CIFAR-100 label ids.
CIFAR100_CLASS_ORDER = (
    87, 0, 52, 58, 44, 91, 68, 97, 51, 15, 94, 92, 10, 72, 49, 78, 61, 14, 8, 86,
    84, 96, 18, 24, 32, 45, 88, 11, 4, 67, 69, 66, 77, 47, 79, 93, 29, 50, 57, 83,
    17, 81, 41, 12, 37, 59, 25, 20, 80, 73, 1, 28, 6, 46, 62, 82, 53, 9, 31, 75,
    38, 63, 33, 74, 27, 22, 36, 3, 16, 21, 60, 19, 70, 90, 89, 43, 5, 42, 65, 76,
    40, 30, 23, 85, 2, 95, 56, 48, 71, 64, 98, 13, 99, 7, 34, 55, 54, 26, 35, 39,
)
STEP_COUNTS = (10, 20, 50)  # ZSCL cil/configs/class/cifar100_{10-10,5-5,2-2}-*.yaml increments

# ZSCL cil/configs/class/cifar100_10-10-LwF.yaml (the 5-5 and 2-2 files agree): prompt_template.
CIL_TEMPLATE = "a bad photo of a {}."


@dataclass(frozen=True)
class CilTraining:
    """ZSCL's class-incremental defaults.

    One difference on purpose: ZSCL's class-incremental code also evaluates through its train
    transform (cil/continual_clip/models.py keeps the first transform ``clip.load`` returns, the
    train one, and cil/main.py builds the test scenario with it); here evaluation uses the test
    transform (resize, centre crop), as ZSCL's MTIL code does."""

    model: str = "ViT-B-16"  # cil/configs/class/cifar100_*.yaml model_name "ViT-B/16"
    batch_size: int = 64  # cifar100_*.yaml batch_size
    lr: float = 7.1e-6  # cifar100_*.yaml lr
    weight_decay: float = 0.0  # cifar100_*.yaml weight_decay
    label_smoothing: float = 0.2  # cifar100_*.yaml ls
    optimizer: str = "adamw"  # cil/continual_clip/models.py: torch.optim.AdamW
    epochs: int = 1  # cil/continual_clip/models.py: EPOCH = 1 ("hardcoding")
    warmup_iterations: int = 30  # models.py: utils.cosine_lr(optimizer, cfg.lr, 30, total_iterations)
    schedule: str = "cosine"
    train_logit_scale: bool = False  # models.py: exclude_params_name = ["logit_scale"]
    # models.py: lwf-vr adds 5 * loss_ZSCL + 5 * loss_ZSCL_2 (image and transposed terms).
    vr_lwf_zscl_weight: float = 5.0


CIL_TRAINING = CilTraining()


def cifar100_phases(steps: int) -> tuple[tuple[int, ...], ...]:
    """The classes learnt at each step: ZSCL's order cut into ``steps`` equal parts
    (ZSCL cil/continual_clip/utils.py get_class_ids_per_task, initial increment = increment)."""
    if steps not in STEP_COUNTS:
        raise ValueError(f"class-incremental CIFAR-100 runs in {STEP_COUNTS} steps, got {steps}")
    size = len(CIFAR100_CLASS_ORDER) // steps
    return tuple(CIFAR100_CLASS_ORDER[i:i + size] for i in range(0, len(CIFAR100_CLASS_ORDER), size))


def cifar100_source(root: str | Path, split: str, download: bool = False) -> SubsetSource:
    """CIFAR-100 for the class-incremental runs: torchvision's class names as they are, with
    underscores (ZSCL cil/continual_clip/datasets.py takes continuum's ``dataset.classes`` and
    never replaces them, unlike its MTIL code), and ZSCL's one class-incremental prompt."""
    source = load_split("cifar100", root, split, download)
    raw_names = tuple(source.dataset.classes)
    return dataclasses.replace(source, name=f"cifar100_cil_{split}", class_names=raw_names,
                               templates=(CIL_TEMPLATE,))
