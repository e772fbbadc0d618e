"""MTIL and class-incremental evaluation: ZSCL's metrics against hand-computed values, and each
step's accuracies against independent zero-shot evaluations."""

from __future__ import annotations

import numpy as np
import pytest

from clip_continual.data.common import ImageSet
from clip_continual.evaluation.features import text_features
from clip_continual.evaluation.metrics import avg_accuracy, last_accuracy, transfer
from clip_continual.evaluation.sequences import (
    class_incremental_summary, evaluate_class_incremental_step, evaluate_datasets_step, mtil_partial_metrics,
)
from clip_continual.evaluation.zero_shot import zero_shot_accuracy

ROWS = [
    [0.5, 0.4, 0.3],  # the starting model
    [0.9, 0.35, 0.25],
    [0.8, 0.95, 0.2],
    [0.7, 0.9, 0.85],
]


def test_mtil_metrics_by_hand():
    # Transfer: dataset 2 after task 1 (0.35); dataset 3 after tasks 1, 2 ((0.25 + 0.2) / 2)
    final = mtil_partial_metrics(ROWS)
    assert final["transfer"] == pytest.approx((0.35 + 0.225) / 2)
    assert final["avg"] == pytest.approx(5.9 / 9) and final["last"] == pytest.approx(2.45 / 3)
    # the same numbers as the whole-matrix functions
    assert (transfer(ROWS), avg_accuracy(ROWS), last_accuracy(ROWS)) == pytest.approx(
        (final["transfer"], final["avg"], final["last"]))
    after_one = mtil_partial_metrics(ROWS[:2])
    assert after_one == pytest.approx({"transfer": (0.35 + 0.25) / 2, "avg": 0.5, "last": 0.5})
    assert mtil_partial_metrics(ROWS[:1]) == {"transfer": None, "avg": None, "last": None}


def test_class_incremental_avg_and_last():
    results = [{"step": s, "cil_acc": a} for s, a in [(2, 0.6), (0, 0.9), (1, 0.8)]]
    assert class_incremental_summary(results) == pytest.approx({"avg": 0.7, "last": 0.6})


@pytest.fixture(scope="module")
def sets(micro):
    rng = np.random.default_rng(0)
    size = micro.image_size

    def image_set(classes: int, per_class: int) -> ImageSet:
        labels = np.repeat(np.arange(classes), per_class)
        return ImageSet(rng.integers(0, 256, (len(labels), size, size, 3), dtype=np.uint8), labels,
                        tuple(f"thing {chr(97 + c)}" for c in range(classes)))
    return image_set(3, 4), image_set(2, 5), image_set(6, 3)


def test_mtil_step_scores_each_dataset_among_its_own_classes(micro, sets):
    first, second, _ = sets
    test_sets = {"alpha": (first, ["a photo of a {}.", "a {}"]), "beta": (second, ["a photo of the {}."])}
    step0 = evaluate_datasets_step(micro, 0, "pretrained", test_sets, batch_size=8, device="cpu")
    for name, (images, templates) in test_sets.items():
        assert step0[f"acc/{name}"] == pytest.approx(zero_shot_accuracy(micro, images, templates, 8, "cpu"))
    assert step0["acc_columns"] == ["alpha", "beta"] and step0["acc_rows"] == [step0["acc_row"]]
    assert step0["zs_acc"] == pytest.approx(np.mean(step0["acc_row"])) and step0["transfer"] is None
    step1 = evaluate_datasets_step(micro, 1, "alpha", test_sets, 8, "cpu", previous_rows=step0["acc_rows"])
    assert len(step1["acc_rows"]) == 2 and step1["ut_acc"] == step1["acc/alpha"]
    assert step1["zs_acc"] == step1["acc/beta"] and step1["transfer"] == step1["acc/beta"]
    with pytest.raises(ValueError, match="earlier acc rows"):
        evaluate_datasets_step(micro, 2, "beta", test_sets, 8, "cpu", previous_rows=step0["acc_rows"])


def test_class_incremental_step_classifies_among_the_seen_classes(micro, sets):
    *_, full = sets
    phases = [(4, 1), (0, 5), (2, 3)]
    templates = ["a bad photo of a {}."]
    after_one = evaluate_class_incremental_step(micro, 1, "task_1", full, templates, phases, 8, "cpu",
                                                previous_rows=[[0.0] * 3])
    # the phase-1 images alone, relabelled among the phase-1 classes only
    mask = np.isin(full.labels, phases[0])
    alone = ImageSet(full.images[mask], np.searchsorted([1, 4], full.labels[mask]),
                     (full.class_names[1], full.class_names[4]))
    assert after_one["cil_acc"] == pytest.approx(zero_shot_accuracy(micro, alone, templates, 8, "cpu"))
    assert after_one["acc_row"][0] == after_one["cil_acc"] and after_one["acc_columns"][0] == "phase_1"
    last = evaluate_class_incremental_step(micro, 3, "task_3", full, templates, phases, 8, "cpu",
                                           previous_rows=[[0.0] * 3] * 3)
    assert last["cil_acc"] == pytest.approx(zero_shot_accuracy(micro, full, templates, 8, "cpu"))
    assert last["zs_acc"] is None and len(last["acc_rows"]) == 4


def test_class_prompts_are_tokenized_once_per_architecture(micro, monkeypatch):
    calls = []
    clip = micro.clone()
    original = clip.tokenize
    monkeypatch.setattr(clip, "tokenize", lambda texts: calls.append(len(texts)) or original(texts))
    prompts = [f"a photo of a rare thing {k}." for k in range(5)]
    first = text_features(clip, prompts, batch_size=4, device="cpu")
    again = text_features(clip, prompts, batch_size=4, device="cpu")
    assert calls == [4, 1] and np.allclose(first.numpy(), again.numpy())
