"""What a task costs: the loop's measurements, what each method says it keeps, and how compare
sums up a run's per-task costs."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from clip_continual.evaluation.reporting import COST_COLUMNS
from clip_continual.methods.base import module_bytes, tensor_bytes
from clip_continual.runtime.results import RUN_COST_COLUMNS, task_costs
from clip_continual.training.config import TrainingConfig
from clip_continual.training.loop import fine_tune


@pytest.fixture(scope="module")
def train_set(micro, random_image_set):
    return random_image_set(micro, 12, 4)


def _train(micro, train_set, method, **settings):
    config = TrainingConfig(method=method, steps=3, epochs=None, batch_size=4, lr=1e-3, device="cpu",
                            progress=False, **settings)
    return fine_tune(micro, train_set, [f"a photo of {n} ." for n in train_set.class_names], config=config)


def test_ft_costs_its_batches_and_keeps_nothing_beside_the_model(micro, train_set):
    trained, summary = _train(micro, train_set, "ft", parts="io")
    assert summary["images_seen"] == 3 * 4  # steps x batch
    assert summary["trainable_parameters"] == sum(p.numel() for p in micro.model.visual.parameters())
    assert summary["stored_parameters"] == sum(p.numel() for p in trained.model.parameters())
    assert summary["trainable_parameters"] < summary["stored_parameters"]
    assert (summary["forward_passes_per_step"], summary["teacher_forward_passes_per_step"],
            summary["backward_passes_per_step"]) == (1.0, 0.0, 1.0)
    assert summary["extra_storage"] == {} and summary["extra_storage_mib"] == 0.0
    assert summary["device_hours"] == pytest.approx(summary["wall_time_s"] / 3600)
    assert summary["peak_memory_mib"] > 0


def test_a_text_only_run_counts_its_backward_passes_at_the_text_encoder(micro, train_set):
    _, summary = _train(micro, train_set, "ft", parts="to")
    assert summary["forward_passes_per_step"] == 1.0 and summary["backward_passes_per_step"] == 1.0


def test_icarl_keeps_its_teacher_and_its_exemplars(micro, train_set):
    _, summary = _train(micro, train_set, "icarl", method_options={"per_class": 2})
    kept = summary["extra_storage"]
    assert kept["teacher"] == module_bytes(micro.model)
    exemplar = micro.image_size ** 2 * 3 + 2 * 8  # uint8 image, int64 label and task
    assert kept["handed_on"] == 4 * 2 * exemplar  # 2 of each of the 4 classes
    assert summary["extra_storage_mib"] == pytest.approx(sum(kept.values()) / 2**20)
    # Each step replays the exemplars through the student beside its batch.
    assert summary["forward_passes_per_step"] == 2.0 and summary["backward_passes_per_step"] == 2.0


def test_adapters_are_storage_the_method_adds(micro, train_set):
    trained, summary = _train(micro, train_set, "rkr")
    added = summary["stored_parameters"] - sum(p.numel() for p in micro.model.parameters())
    assert summary["extra_storage"] == {"adapters": added * 4}  # float32
    assert summary["trainable_parameters"] == added
    assert tensor_bytes([*trained.model.parameters(), *trained.model.parameters()]) == \
        tensor_bytes(trained.model.parameters())  # a tensor listed twice is counted once


def test_compare_sums_up_a_runs_task_costs_also_from_older_runs():
    histories = {
        "new": {"cost/wall_time_s": [2.0, 4.0], "cost/device_hours": [0.5, 0.25],
                "cost/trainable_parameters": [10, 7], "cost/extra_storage_mib": [0.0, 3.0]},
        "old": {"task/wall_time_s": [6.0], "task/trainable_parameters": [5]},  # before the cost group
    }
    client = SimpleNamespace(get_metric_history=lambda run, name: [
        SimpleNamespace(value=value) for value in histories[run].get(name, [])])
    new, old = task_costs(client, "new"), task_costs(client, "old")
    assert new["wall_time_per_task_s"] == 3.0 and new["device_hours"] == 0.75
    assert new["trainable_parameters"] == 10 and new["extra_storage_mib"] == 3.0
    assert new["peak_memory_mib"] is None
    assert old["wall_time_per_task_s"] == 6.0 and old["trainable_parameters"] == 5
    assert set(RUN_COST_COLUMNS) == set(COST_COLUMNS)  # compare shows every cost it sums up
