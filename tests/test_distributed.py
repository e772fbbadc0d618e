"""Data-parallel training: 2 or 3 workers compute the 1-process run's gradients and end with its
weights, for every method (one launch of 2 workers runs them all: ``distributed_methods.py``);
failures surface.

The equivalence runs are in float64, so that a tolerance can be both strict and the same on
every CPU. Workers sum their gradients in another order than one process; in float32 that
rounding noise (~1e-7 relative) is amplified by Adam on parameters whose true gradient is
(near) zero (it divides by sqrt(v) + eps), and any tolerance is then tuned to one machine. In
float64 the same noise is ~1e-15 relative. The first step's gradients are compared before the
optimiser can amplify anything, so a gradient that is summed instead of averaged is caught
even where Adam's scale invariance would hide it in the weights. ``test_breakages_are_caught``
puts each kind of data-parallel bug in on purpose (in the same launch) and checks that the
comparison fails.
"""

from __future__ import annotations

import copy
import os

import numpy as np
import pytest
import torch
import torch.distributed as dist

from clip_continual.data.common import ImageSet
from clip_continual.training.distributed import (
    DataParallelReplica, DistributedConfig, DistributedConfigError, WorkerFailedError,
    fine_tune_distributed,
)
from clip_continual.methods import METHODS
from clip_continual.methods.ft import FineTuning
from clip_continual.methods.vocabulary import VocabularyConfig, build_vocabulary
from clip_continual.methods.vr_lwf import VocabularyReplayLwF
from clip_continual.training.augment import augment_crop_flip, augment_zscl
from clip_continual.training.config import TrainingConfig
from clip_continual.training.replica import Replica
from distributed_methods import Case, make_inputs, run_case, run_on_workers

NUM_CLASSES = 4
STEPS = 3
# The first step starts from the same weights on the same images in every layout: its gradients
# and losses differ only by float64 summation order, measured at <= 9e-15 of the step's largest
# gradient element with 2 and 3 workers (float32: ~1e-7). Exact in principle: checked at 1e-12.
FIRST_STEP_TOLERANCE = 1e-12
# From then on the weights differ: Adam moves a weight by lr * g / (|g| + eps), so where a true
# gradient is ~0 a difference d moves it by up to lr * d / eps (1e5 * d here), and the micro
# model's LayerNorms over small embeddings amplify weight differences again in the next
# gradients. Measured over 3 steps with 2 and 3 workers: later gradients within 8.2e-9 of the
# step's largest element, loss terms within 1e-8 of the loss, weights within 9.8e-10. The bounds
# keep a 100x margin over those and stay far below float32's (weights differ by 5.7e-5 there).
LATER_STEP_TOLERANCE = 1e-6
WEIGHT_TOLERANCE = 1e-7


class RecordingVRLwF(VocabularyReplayLwF):
    """vr_lwf that saves every step's gradients (the averaged ones, on rank 0) to ``folder``
    before clipping and the optimiser step."""

    def __init__(self, folder: str | os.PathLike, **options) -> None:
        super().__init__(**options)
        self.folder = str(folder)

    def before_optimizer_step(self, student, batch, task) -> None:
        if dist.is_initialized() and dist.get_rank() != 0:
            return
        gradients = {name: p.grad.detach().clone() for name, p in student.named_parameters() if p.grad is not None}
        torch.save(gradients, os.path.join(self.folder, f"step{batch.step}.pt"))


def make_task(micro64) -> dict:
    """An MST-like second task (classes 2, 3 learnt now, 0..3 seen) of vr_lwf: CE, the LwF term
    over seen classes and the vocabulary term all non-zero; crop/flip augmentation on. 7 images
    at batch 4: global batches of 4, 3 (the short last batch of the epoch), 4, split 2+2, 2+1,
    2+2 over 2 workers and 2+1+1, 1+1+1, 2+1+1 over 3."""
    rng = np.random.default_rng(0)
    size = micro64.image_size
    train_set = ImageSet(
        images=rng.integers(0, 256, (7, size, size, 3), dtype=np.uint8),
        labels=np.array([2, 3, 2, 3, 2, 3, 2]),
        class_names=tuple(f"thing {i}" for i in range(NUM_CLASSES)),
    )
    return dict(
        train_set=train_set,
        class_prompts=[f"a photo of {name} ." for name in train_set.class_names],
        current_classes=[2, 3], seen_classes=[0, 1, 2, 3], task_index=2,
        vocabulary=build_vocabulary(VocabularyConfig(mode="paper", size=5), micro64.context_length),
        config=TrainingConfig(method="vr_lwf", alpha=1.0, steps=STEPS, epochs=None, batch_size=4,
                              lr=1e-3, device="cpu", progress=False, augment="crop_flip",
                              grad_clip_norm=0.5),
    )


def train(micro64, task, folder, settings=None):
    """One run (one process when ``settings`` is None); its model, summary, logged steps and
    the folder of its recorded gradients."""
    folder.mkdir()
    steps = []
    method = RecordingVRLwF(folder, alpha=1.0)
    model, summary = fine_tune_distributed(settings, micro64, teacher=micro64, method=method,
                                           on_step=lambda s, v: steps.append((s, v)), **task)
    return model, summary, steps, folder


@pytest.fixture(scope="module")
def task(micro64):
    return make_task(micro64)


@pytest.fixture(scope="module")
def one_process(micro64, task, tmp_path_factory):
    return train(micro64, task, tmp_path_factory.mktemp("one") / "gradients")


def step_tolerance(step: int) -> float:
    return FIRST_STEP_TOLERANCE if step == 0 else LATER_STEP_TOLERANCE


def assert_same_gradients(folder, reference_folder) -> None:
    """Every step's gradients equal, relative to the step's largest gradient element."""
    for step in range(STEPS):
        gradients = torch.load(os.path.join(folder, f"step{step}.pt"), weights_only=True)
        reference = torch.load(os.path.join(reference_folder, f"step{step}.pt"), weights_only=True)
        assert sorted(gradients) == sorted(reference)
        scale = max(float(g.abs().max()) for g in reference.values())
        for name, gradient in gradients.items():
            assert gradient.dtype == torch.float64
            torch.testing.assert_close(gradient, reference[name], rtol=0, atol=step_tolerance(step) * scale,
                                       msg=lambda m, step=step, name=name: f"step {step}, gradient of {name}: {m}")


def assert_same_losses(steps, reference_steps) -> None:
    """Every logged loss term equal, relative to the step's loss (at the first step the
    distillation terms are 0 up to rounding: the student is the teacher)."""
    for (step, values), (ref_step, ref_values) in zip(steps, reference_steps, strict=True):
        assert step == ref_step
        tolerance = step_tolerance(step - 1) * abs(ref_values["loss"])
        for name in ("loss", "ce", "lwf", "vr"):
            assert values[name] == pytest.approx(ref_values[name], rel=0, abs=tolerance), (step, name)
    assert reference_steps[-1][1]["lwf"] > 0 and reference_steps[-1][1]["vr"] > 0


def assert_same_run(result, reference, workers: int) -> None:
    model, summary, steps, folder = result
    ref_model, ref_summary, ref_steps, ref_folder = reference
    assert_same_gradients(folder, ref_folder)
    assert_same_losses(steps, ref_steps)
    ref_state = ref_model.model.state_dict()
    for name, value in model.model.state_dict().items():
        torch.testing.assert_close(value, ref_state[name], rtol=0, atol=WEIGHT_TOLERANCE, msg=name)
    assert summary["workers"] == workers and summary["steps"] == ref_summary["steps"] == STEPS


def test_three_gloo_workers_match_one_process(micro64, task, one_process, tmp_path):
    """Three workers: uneven parts and a short batch (Ray's test below runs two)."""
    before = {k: v.clone() for k, v in micro64.model.state_dict().items()}
    result = train(micro64, task, tmp_path / "gradients", {"backend": "torch", "workers": 3})
    assert_same_run(result, one_process, workers=3)
    assert result[1]["backend"] == "torch"
    assert all(torch.equal(v, before[k]) for k, v in micro64.model.state_dict().items())


class CrashOnRankOne(FineTuning):
    def loss_terms(self, student, batch, task):
        if dist.get_rank() == 1:
            raise RuntimeError("worker exploded on purpose")
        return super().loss_terms(student, batch, task)


def test_a_crashing_worker_ends_the_run_with_its_error(micro, task):
    steps = []
    with pytest.raises(WorkerFailedError, match="worker 1 of 2: RuntimeError: worker exploded on purpose"):
        fine_tune_distributed({"backend": "torch", "workers": 2}, micro, teacher=micro,
                              method=CrashOnRankOne(), on_step=lambda s, v: steps.append(s), **task)
    assert steps == []  # nothing logged; the node raises, so nothing is saved either


def test_settings_and_shards():
    with pytest.raises(DistributedConfigError, match="backend must be one of none, torch, ray"):
        DistributedConfig.from_params({"backend": "mpi"})
    with pytest.raises(DistributedConfigError, match="workers must be a positive integer"):
        DistributedConfig.from_params({"backend": "torch", "workers": 0})
    with pytest.raises(DistributedConfigError, match="unknown training.distributed setting"):
        DistributedConfig.from_params({"gpus": 2})
    parts = [DataParallelReplica(rank, 3).part(10) for rank in range(3)]
    assert [(p.start, p.stop) for p in parts] == [(0, 4), (4, 7), (7, 10)]
    with pytest.raises(DistributedConfigError, match="cannot be split over 3 workers"):
        DataParallelReplica(0, 3).part(2)


@pytest.mark.parametrize("augment", [augment_crop_flip, augment_zscl])
def test_each_replica_augments_its_part_as_the_global_batch_does(micro, augment):
    images = np.random.default_rng(1).integers(0, 256, (5, 40, 48, 3), dtype=np.uint8)
    draw = lambda part=None: augment(images[part or slice(None)], micro, torch.Generator().manual_seed(3),
                                     torch.device("cpu"), part, None if part is None else len(images))
    parts = torch.cat([draw(slice(0, 3)), draw(slice(3, 5))])
    torch.testing.assert_close(parts, draw(), atol=0, rtol=0)
    assert not torch.equal(parts[0], parts[1])


def test_a_method_that_cannot_train_data_parallel_is_refused_before_any_work(micro, task, monkeypatch):
    from clip_continual.methods import get_method
    from clip_continual.training import distributed

    monkeypatch.setitem(distributed.NOT_DATA_PARALLEL, "ewc", "its reason")
    with pytest.raises(DistributedConfigError, match="method 'ewc' cannot train.*its reason; use backend 'none'"):
        fine_tune_distributed({"backend": "torch", "workers": 2}, micro, teacher=micro,
                              method=get_method("ewc"), **task)


# --- every method: one launch of 2 workers runs each method's short tasks in turn ------------------

CASES = [Case(name) for name in METHODS]
# Each kind of data-parallel bug put in on purpose, on a method it shows in.
BROKEN = [Case("vr_lwf", "gradients summed"), Case("vr_lwf", "a sample seen twice"),
          Case("vr_lwf", "a worker's batch dropped"), Case("ewc", "statistics not summed"),
          Case("rail", "rows not gathered"), Case("vr_lwf_zscl", "rows not gathered")]


@pytest.fixture(scope="module")
def method_inputs(micro64):
    return make_inputs(micro64)


@pytest.fixture(scope="module")
def methods_on_workers(method_inputs):
    return run_on_workers(CASES + BROKEN, method_inputs)


@pytest.fixture(scope="module")
def methods_alone(method_inputs):
    return {case.method: run_case(case, method_inputs, Replica()) for case in CASES}


def assert_same_record(record, reference) -> None:
    """Each task's first-step gradients (the first task's exact in principle, a later one's from
    weights that already differ by rounding), every logged number, then the final weights
    (buffers too: MoE's usage counts) and the state handed on."""
    for index, (task, ref_task) in enumerate(zip(record["tasks"], reference["tasks"], strict=True)):
        tolerance = FIRST_STEP_TOLERANCE if index == 0 else LATER_STEP_TOLERANCE
        gradients, ref_gradients = task["gradients"], ref_task["gradients"]
        assert sorted(gradients) == sorted(ref_gradients)
        scale = max((float(g.abs().max()) for g in ref_gradients.values()), default=0.0)
        for name, gradient in gradients.items():
            torch.testing.assert_close(gradient, ref_gradients[name], rtol=0, atol=tolerance * scale,
                                       msg=lambda m, index=index, name=name: f"task {index}, gradient of {name}: {m}")
        for step, (values, ref_values) in enumerate(zip(task["steps"], ref_task["steps"], strict=True)):
            assert sorted(values) == sorted(ref_values)
            for name, value in values.items():
                bound = (tolerance if step == 0 else LATER_STEP_TOLERANCE) * max(abs(ref_values["loss"]), 1.0)
                assert value == pytest.approx(ref_values[name], rel=0, abs=bound), (index, step, name)
    assert_close_tensors(masked(record["weights"]), masked(reference["weights"]), WEIGHT_TOLERANCE, "weight")
    assert_close_tensors(record["state"], reference["state"], LATER_STEP_TOLERANCE, "handed-on state")


def masked(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """ConDU's task masks as the experts use them, ``unified * mask``: a mask element follows
    the sign of its task's delta, which is rounding noise where the delta is (near) zero."""
    weights = dict(weights)
    for name in [n for n in weights if ".mask_" in n]:
        prefix, (_, _, part) = name.rsplit(".", 1)[0], name.rsplit("_", 2)
        weights[name] = weights[f"{prefix}.unified_{part}"] * weights[name]
    return weights


def assert_close_tensors(tensors, reference, tolerance, what) -> None:
    assert sorted(tensors) == sorted(reference)
    for name, value in tensors.items():
        scale = max(float(reference[name].abs().max()), 1.0) if reference[name].is_floating_point() else 0
        torch.testing.assert_close(value, reference[name], rtol=0, atol=tolerance * scale,
                                   msg=lambda m, name=name: f"{what} {name}: {m}")


@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_trains_on_two_workers_as_in_one_process(methods_on_workers, methods_alone, method):
    assert_same_record(methods_on_workers[method], methods_alone[method])


@pytest.mark.parametrize("case", BROKEN, ids=lambda case: case.name)
def test_breakages_are_caught(methods_on_workers, methods_alone, case):
    with pytest.raises(AssertionError):
        assert_same_record(methods_on_workers[case.name], methods_alone[case.method])


def test_the_state_handed_on_is_the_first_workers(method_inputs, monkeypatch, tmp_path):
    """The node reads what the method hands on from the method it built (``handed_on``); in a
    data-parallel run the trained copy is the first worker's, whose export comes back with the
    model. A one-worker group in this process stands for the launch."""
    from clip_continual.training import distributed
    from clip_continual.training.loop import train as loop_train
    from distributed_methods import training_case_task

    task = training_case_task(Case("ewc"), method_inputs, 1)
    alone = copy.deepcopy(task)
    loop_train(alone)
    expected = alone.method.export_state()
    # The worker trains its own copy of the task, as a launched process does.
    monkeypatch.setattr(distributed, "_launch_torch",
                        lambda task, settings: distributed._train_rank(copy.deepcopy(task), 0, 1))
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'group'}", rank=0, world_size=1)
    try:
        distributed.train_on({"backend": "torch", "workers": 2}, task)
    finally:
        dist.destroy_process_group()
    assert task.method.export_state() == {}  # this copy did not train
    handed_on = task.method.handed_on()
    assert sorted(handed_on) == sorted(expected) and len(handed_on) > 1
    for name, value in handed_on.items():
        assert isinstance(value, np.ndarray)
        np.testing.assert_allclose(value, expected[name], rtol=0, atol=1e-6 * float(np.abs(expected[name]).max()))
