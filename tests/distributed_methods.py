"""Every method's short run on 2 gloo workers and in one process: the cases, the run of a case
(shared by the workers and the test process) and what it records. One launch runs them all
(``run_on_workers``); the workers' entry must be importable, hence a module of its own."""

from __future__ import annotations

import contextlib
import dataclasses

import numpy as np
import torch
import torch.distributed as dist

from clip_continual.data.common import ImageSet
from clip_continual.methods import get_method
from clip_continual.methods import dpw as dpw_module
from clip_continual.methods.moe_adapters import AdapterExpert, MixtureOfAdapters
from clip_continual.methods.vocabulary import VocabularyConfig, build_vocabulary
from clip_continual.training.config import TrainingConfig
from clip_continual.training.distributed import DataParallelReplica, DistributedConfig, _launch_torch
from clip_continual.training.loop import train
from clip_continual.training.replica import Replica
from clip_continual.training.task import training_task

NUM_CLASSES = 4
STEPS = 2
PHASES = ([0, 1], [2, 3])
# Each case: the method, its (small) options and the tasks it trains in sequence, each handing
# its model and method state to the next: 2 where the method's distinctive state is made by
# one task and read by the next (EWC's Fisher, A-GEM/GEM's memory, ConDU's unified experts).
# A single "task 2" learns classes 2, 3 of 0..3 seen: the distillation terms over earlier
# classes are on.
SMALL = {
    "geodl": {}, "imm": {}, "wise_ft": {}, "ft": {}, "lwf": {}, "lwf_zscl": {}, "vr_lwf": {}, "vr_lwf_zscl": {},
    "zscl": {"average_every": 1},
    "ewc": {"fisher_samples": 5, "penalty": 1e4},
    "agem": {"per_task_memory": 3}, "gem": {"per_task_memory": 3},
    "icarl": {"per_class": 2},
    "rkr": {"rank": 2}, "lora": {"rank": 2},
    "moe_adapters": {"experts": 3, "top_k": 2, "bottleneck": 4, "ddas": False, "frozen_per_task": 1},
    "diki": {"depth": 1, "length": 2}, "dpw": {"depth": 1, "length": 2, "bottleneck": 4},
    "condu": {}, "condu_lora": {"rank": 2},
    "rail": {"hidden_dim": 16},
}
TASKS = {"ewc": (1, 2), "agem": (1, 2), "gem": (1, 2), "condu": (1, 2), "icarl": (1,), "rail": (1,),
         "imm": (1,), "wise_ft": (1,), "moe_adapters": (1,), "rkr": (1,), "lora": (1,), "diki": (1,),
         "dpw": (1,), "condu_lora": (1,), "ft": (1,)}


@dataclasses.dataclass
class Case:
    """One run to compare: ``method`` over ``tasks``; ``breakage`` names a data-parallel bug put
    in on purpose (the test checks that the comparison then fails)."""

    method: str
    breakage: str | None = None

    @property
    def name(self) -> str:
        return self.method if self.breakage is None else f"{self.method} ({self.breakage})"

    @property
    def tasks(self) -> tuple[int, ...]:
        return TASKS.get(self.method, (2,))


class _GradientsSummed(DataParallelReplica):
    """Gradients summed over the workers instead of averaged."""

    def loss_terms(self, model, method, context):
        wrapped = super().loss_terms(model, method, context)
        wrapped.register_comm_hook(None, lambda state, bucket: dist.all_reduce(
            bucket.buffer(), async_op=True).get_future().then(lambda future: future.value()[0]))
        return wrapped


class _SampleSeenTwice(DataParallelReplica):
    """Worker 1's part of each global batch starts one image early (one image in both parts)."""

    def part(self, global_size):
        part = super().part(global_size)
        return slice(part.start - (self.rank == 1), part.stop)


class _BatchDropped(DataParallelReplica):
    """Worker 1's images contribute nothing to the gradient (its losses are zeroed)."""

    def loss_terms(self, model, method, context):
        wrapped = super().loss_terms(model, method, context)
        if self.rank != 1:
            return wrapped
        return lambda batch: {name: term * 0 for name, term in wrapped(batch).items()}


class _StatisticsNotSummed(DataParallelReplica):
    """Each worker keeps the statistics of its own share (e.g. a Fisher of its images only)."""

    def sum(self, values):
        return values


class _RowsNotGathered(DataParallelReplica):
    """Each worker's batch-wide terms and statistics see its own rows only."""

    def gather(self, rows):
        return rows


BREAKAGES = {"gradients summed": _GradientsSummed, "a sample seen twice": _SampleSeenTwice,
             "a worker's batch dropped": _BatchDropped, "statistics not summed": _StatisticsNotSummed,
             "rows not gathered": _RowsNotGathered}


def make_inputs(micro64) -> dict:
    """Per phase 7 images at batch 4: global batches of 4 and 3, split 2+2 and 2+1."""
    rng = np.random.default_rng(0)
    size = micro64.image_size
    names = tuple(f"thing {i}" for i in range(NUM_CLASSES))
    phases = [ImageSet(rng.integers(0, 256, (7, size, size, 3), dtype=np.uint8),
                       np.array([phase[i % 2] for i in range(7)]), names) for phase in PHASES]
    reference = ImageSet(rng.integers(0, 256, (6, size, size, 3), dtype=np.uint8), np.zeros(6, np.int64), ("pair",),
                         captions=np.array([[f"a picture number {i}"] for i in range(6)]))
    return {"model": micro64, "phases": phases, "reference": reference}


def _recording(method, folder: dict):
    """``method`` that keeps its first step's gradients (as the optimiser takes them, after the
    method's own projection) and starts without random draws in the forward (adapter dropout,
    MoE routing noise: a worker draws them for its own rows, so they are not the same draw)."""

    class Recording(type(method)):
        def prepare_student(self, student, parts):
            super().prepare_student(student, parts)
            for module in student.modules():
                if isinstance(module, AdapterExpert):
                    module.dropout = 0.0

        def before_optimizer_step(self, student, batch, task):
            super().before_optimizer_step(student, batch, task)
            if batch.step == 0:
                folder["gradients"] = {name: p.grad.detach().clone() for name, p in student.named_parameters()
                                       if p.grad is not None}

    recording = Recording.__new__(Recording)
    recording.__dict__.update(method.__dict__)
    return recording


@contextlib.contextmanager
def _no_forward_draws():
    routing, dropout = MixtureOfAdapters.routing, dpw_module.ADAPTER_DROPOUT

    def noiseless(self, first_token):
        training, self.training = self.training, False
        try:
            return routing(self, first_token)
        finally:
            self.training = training

    MixtureOfAdapters.routing, dpw_module.ADAPTER_DROPOUT = noiseless, 0.0
    try:
        yield
    finally:
        MixtureOfAdapters.routing, dpw_module.ADAPTER_DROPOUT = routing, dropout


def training_case_task(case: Case, inputs: dict, task_index: int, start=None, state=None):
    """The case's task ``task_index`` (1 or 2) from ``start`` (default: the model) and the state handed on."""
    model, phase = inputs["model"], inputs["phases"][task_index - 1]
    start = model if start is None else start
    method = get_method(case.method, **SMALL[case.method])
    config = TrainingConfig(method=case.method, steps=STEPS, epochs=None, batch_size=4, lr=1e-3, device="cpu",
                            progress=False, augment="crop_flip", grad_clip_norm=0.5, teacher="previous")
    vocabulary = None
    if method.needs_vocabulary:
        vocabulary = build_vocabulary(VocabularyConfig(mode=method.default_vocabulary_mode, size=5),
                                      model.context_length)
    current = PHASES[task_index - 1]
    return training_task(
        start, phase, [f"a photo of {name} ." for name in phase.class_names], current,
        sorted({c for p in PHASES[:task_index] for c in p}), config, vocabulary=vocabulary, teacher=start,
        task_index=task_index, method=method, previous_state=state,
        extras={"reference_set": inputs["reference"], "pretrained_model": model,
                "prompt_sets": [[f"a photo of {name} ." for name in phase.class_names],
                                [f"an image of {name} ." for name in phase.class_names]]},
    )


def run_case(case: Case, inputs: dict, replica: Replica) -> dict:
    """The case's tasks in sequence: per task its first step's gradients, every step's logged
    numbers, and at the end the weights (buffers included) and the state handed on."""
    start, state, record = inputs["model"], {}, {"tasks": []}
    for task_index in case.tasks:
        task = training_case_task(case, inputs, task_index, start, state)
        folder: dict = {}
        task.method = _recording(task.method, folder)
        steps = []
        with _no_forward_draws():
            start, _ = train(task, on_step=lambda step, values: steps.append(values), replica=replica)
        state = task.method.export_state()
        record["tasks"].append({"gradients": folder.get("gradients", {}), "steps": steps})
    record["weights"] = {name: value.clone() for name, value in start.model.state_dict().items()}
    record["state"] = {name: torch.as_tensor(np.asarray(value)) for name, value in state.items()}
    return record


def run_cases(job: dict, rank: int, world_size: int) -> dict | None:
    """A worker's entry: every case in turn; rank 0 hands back the records."""
    records = {}
    for case in job["cases"]:
        replica = BREAKAGES.get(case.breakage, DataParallelReplica)(rank, world_size)
        records[case.name] = run_case(case, job["inputs"], replica)
        dist.barrier()
    return records if rank == 0 else None


def run_on_workers(cases: list[Case], inputs: dict, workers: int = 2) -> dict:
    return _launch_torch({"cases": cases, "inputs": inputs}, DistributedConfig("torch", workers), entry=run_cases)
