"""The layout's promises: the science folders run without Kedro or MLflow, and a new method is
one module plus one line in the registry."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
from torch import nn

import clip_continual
from clip_continual.methods import METHODS
from clip_continual.methods.base import (
    Batch, ContinualMethod, TaskContext, class_cross_entropy, image_features, text_features_together,
)
from clip_continual.training.config import TrainingConfig
from clip_continual.training.loop import fine_tune

PACKAGE = Path(clip_continual.__file__).parent
SCIENCE = ("model", "methods", "training", "evaluation", "data")
# What runs the science: Kedro, MLflow and the package's own folders around them.
RUNTIME = ("kedro", "kedro_datasets", "kedro_mlflow", "kedro_viz", "mlflow", "clip_continual.pipelines",
           "clip_continual.io", "clip_continual.runtime", "clip_continual.settings",
           "clip_continual.pipeline_registry", "clip_continual.cli")


def imported_modules(path: Path) -> set[str]:
    """Every module an import statement of ``path`` names, at any depth of the file."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


@pytest.mark.parametrize("folder", SCIENCE)
def test_science_folders_import_nothing_of_kedro_or_mlflow(folder):
    files = sorted((PACKAGE / folder).rglob("*.py"))
    assert files
    offending = {
        f"{path.relative_to(PACKAGE)}: {module}"
        for path in files for module in imported_modules(path)
        if any(module == name or module.startswith(f"{name}.") for name in RUNTIME)
    }
    assert not offending


class HalfFineTuning(ContinualMethod):
    """A new method as a user writes it: its own module with its loss (here ft's at half weight)."""

    name = "half_ft"

    def __init__(self, weight: float = 0.5, label_smoothing: float = 0.0) -> None:
        super().__init__(label_smoothing=label_smoothing)
        self.weight = float(weight)

    def loss_terms(self, student: nn.Module, batch: Batch, task: TaskContext) -> dict[str, torch.Tensor]:
        image = image_features(student, batch.pixels)
        (text,) = text_features_together(student, task.class_tokens[task.current_classes])
        logits = student.logit_scale.exp() * image @ text.t()
        return {"half_ce": self.weight * class_cross_entropy(logits, batch.labels, task)}


def test_a_new_method_is_one_module_and_one_registry_line(micro, random_image_set, monkeypatch):
    monkeypatch.setitem(METHODS, HalfFineTuning.name, HalfFineTuning)  # the one line in METHODS

    train_set = random_image_set(micro, 8, 2)
    prompts = [f"a photo of {name}" for name in train_set.class_names]
    settings = {"steps": 2, "epochs": None, "batch_size": 4, "lr": 1e-3, "device": "cpu", "progress": False}
    config = TrainingConfig.from_params({**settings, "method": "half_ft", "method_options": {"weight": 0.5}})
    losses, reference_losses = [], []
    model, summary = fine_tune(micro, train_set, prompts, config=config, on_step=lambda s, v: losses.append(v))
    fine_tune(micro, train_set, prompts, config=TrainingConfig(method="ft", **settings),
              on_step=lambda s, v: reference_losses.append(v))

    assert summary["method"] == "half_ft" and summary["hyper_parameters"]["weight"] == 0.5
    assert set(summary["final_losses"]) == {"loss", "half_ce"}
    assert model.metadata["training"][-1]["method"] == "half_ft"
    # The same first step as ft (same seed, same batch), at half the loss.
    assert losses[0]["half_ce"] == pytest.approx(0.5 * reference_losses[0]["ce"], rel=1e-6)
