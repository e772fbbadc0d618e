"""Data-parallel fine-tuning of one task on several processes, through torch's elastic launcher
(``backend: torch``, N local workers) or Ray Train (``backend: ray``, a Ray cluster).

Kedro runs a pipeline in one process, so the training node itself starts the workers (wrapping
``kedro run`` in ``torchrun`` would run every node on every rank). The node builds the task once
(``task.TrainingTask``); every worker receives it as it is and runs the one training loop
(``loop.train``) with a ``DataParallelReplica``:

- the start model, the teacher, the replayed vocabulary and the method's per-task state arrive
  identically on every rank and are seeded identically (the loop seeds from the task);
- the batch order is a pure function of (seed, epoch, step), so every rank computes the same
  global batch and keeps its contiguous part (``part``): the DataLoader path reads only those
  indices (the sharded equivalent of a ``DistributedSampler``); augmentation is drawn per
  global batch (in memory) or per (seed, step, example) (lazy sets), so it does not depend on N;
- one global batch size and learning rate: ``workers`` only splits the batch;
- the model is wrapped in ``DistributedDataParallel`` around the method's loss, which averages
  gradients in backward; gradient clipping then acts on that global gradient.

Why every method is exact here. A loss term that is a mean over the rows of the batch
(cross-entropy, KL with ``batchmean``, soft-target CE of image rows) splits: each rank's term on
its part, weighted by its share of the global batch (the loop does this), averages to the global
batch's term, also when a batch does not split evenly. A term computed identically on every rank
(the same value everywhere: an L2 anchor, a penalty on the weights, a term over gathered rows)
is also exact under that weighting, since the shares sum to the number of ranks. What a method
needs beyond its part it asks of ``TaskContext.workers`` (``methods.base.Workers``, here the
``DataParallelReplica``): ``gather`` the global batch's rows (differentiable: each rank's rows
get the gradient of every rank's copy of the term, summed) or ``sum`` a statistic over the
ranks' shares. Per method:

- ``ft``, ``lwf``, ``vr_lwf``, ``wise_ft``, ``imm``, ``rkr``, ``lora``, ``diki``, ``dpw``,
  ``condu``, ``condu_lora``: row means only. What they do before and after the steps (DIKI's and
  DPW's task Gaussians and prefix sizes, DPW's gate statistics, the weight interpolations,
  ConDU's unification and prototypes) reads the whole task on every rank, from identical
  weights: identical everywhere (rank 0's is the one handed back).
- ``vr_lwf_zscl``, ``lwf_zscl``: the text -> image direction is a softmax over the batch's
  images, so both sides' image features are gathered.
- ``zscl``, ``icarl``: the replayed batch (reference images, exemplars) has the global batch's
  size, drawn alike on every rank; each rank encodes its part and the features are gathered.
- ``geodl``: the geodesic flow kernel is spanned by the batch's features: gathered.
- ``agem``, ``gem``: every rank computes the replay gradient of the whole replayed batch (a
  contrastive loss, which does not split) and projects the averaged gradient: the same on all.
- ``ewc``: each rank computes the per-image gradients of its share of the Fisher images; the
  sums are summed over the ranks (``sum``).
- ``moe_adapters``: each rank counts the routes of its part in the image tower; the counts that
  choose the experts to freeze are summed. Not every expert gets a gradient every step, hence
  ``find_unused_parameters``; buffers are not broadcast from rank 0 (the counts would be lost).
- ``rail`` (no gradient steps): each rank encodes its part and the classifier is updated with
  the gathered global batch on every rank.

Random draws inside the forward (adapter dropout in ``moe_adapters`` and ``dpw``, MoE's routing
noise) are each rank's own (``begin_steps``): a data-parallel run of those is an equally likely
draw, not the one-process run's. ``NOT_DATA_PARALLEL`` would name a method that cannot train
here, with the reason; none is left. The teacher's image table is computed on every rank (the
same work N times, once per task), and so is the work a method does once per task.

What a method hands to the next task (``export_state``) is rank 0's: it comes back with the
model, and the node reads it from ``ContinualMethod.handed_on``.

Rank 0 alone hands back the model, the summary and the per-step losses; the node writes the
checkpoint (through the catalog) and the MLflow metrics from them. A worker that fails ends the
node with that worker's error, and nothing is written.

Plain Python and PyTorch; no Kedro import. Ray is optional (``pip install -e ".[ray]"``).
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import tempfile
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, record

from clip_continual.methods.base import Batch, ContinualMethod, TaskContext
from clip_continual.methods.vocabulary import derive_seed
from clip_continual.model.clip import ClipModel, resolve_device
from clip_continual.training.loop import StepCallback, train
from clip_continual.training.replica import LossTerms, Replica
from clip_continual.training.task import TrainingTask, training_task

BACKENDS = ("none", "torch", "ray")
# Methods that cannot train data-parallel, with the reason (the module docstring): none.
NOT_DATA_PARALLEL: dict[str, str] = {}
FORWARD_STREAM = 23  # the random stream of a worker's forward draws (``begin_steps``)
RESULT_FILE = "result.pt"


class DistributedConfigError(ValueError):
    """A ``training.distributed`` setting is unknown or invalid."""


class WorkerFailedError(RuntimeError):
    """A training worker failed; the message carries the worker's own error."""


@dataclass(frozen=True)
class DistributedConfig:
    """``continual_learning.training.distributed``: ``backend`` none | torch | ray; ``workers``
    processes (torch: on this machine, one per GPU on GPUs; ray: Ray Train workers anywhere in
    the cluster). ``address``: the Ray cluster (``auto``, ``ray://host:10001``; null starts a
    local instance); ``use_gpu``: Ray workers each take a GPU ("auto": when this machine has
    one); ``storage_path``: where Ray Train keeps the result, shared by all machines of a
    multi-machine cluster (null: a temporary folder here); ``ray_init``: extra ``ray.init``
    arguments (e.g. ``num_cpus``)."""

    backend: str = "none"
    workers: int = 1
    address: str | None = None
    use_gpu: bool | str | None = "auto"
    storage_path: str | None = None
    ray_init: Mapping[str, Any] | None = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise DistributedConfigError(
                f"training.distributed.backend must be one of {', '.join(BACKENDS)}; got {self.backend!r}")
        if isinstance(self.workers, bool) or not isinstance(self.workers, int) or self.workers < 1:
            raise DistributedConfigError(
                f"training.distributed.workers must be a positive integer, got {self.workers!r}")
        if self.use_gpu is None:
            object.__setattr__(self, "use_gpu", "auto")
        if self.use_gpu not in (True, False, "auto"):
            raise DistributedConfigError(
                f"training.distributed.use_gpu must be true, false or auto, got {self.use_gpu!r}")

    @classmethod
    def from_params(cls, params: Mapping[str, Any] | None) -> DistributedConfig:
        params = dict(params or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(params) - known)
        if unknown:
            raise DistributedConfigError(
                f"unknown training.distributed setting(s) {unknown}; known: {', '.join(sorted(known))}")
        return cls(**params)

    @property
    def active(self) -> bool:
        return self.backend != "none"


# --- one rank ------------------------------------------------------------------------------

class _LossOfBatch(nn.Module):
    """The method's loss as a module, so that ``DistributedDataParallel`` sees the forward
    whose backward it must synchronise (the methods call the encoders, not ``forward``)."""

    def __init__(self, model: nn.Module, loss_terms: Callable[[nn.Module, Batch], dict]):
        super().__init__()
        self.model = model
        self._loss_terms = loss_terms

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        return self._loss_terms(self.model, batch)


class _GatherRows(torch.autograd.Function):
    """All workers' rows (padded to the longest part) in rank order; backward hands each worker
    the gradient its own rows got on every worker, summed (what one process's backward gives)."""

    @staticmethod
    def forward(ctx, rows: torch.Tensor, counts: list[int], rank: int, group) -> torch.Tensor:
        ctx.counts, ctx.rank, ctx.group = counts, rank, group
        padded = rows.new_zeros(max(counts), *rows.shape[1:])
        padded[: len(rows)] = rows
        pieces = [torch.empty_like(padded) for _ in counts]
        dist.all_gather(pieces, padded.contiguous(), group=group)
        return torch.cat([piece[:count] for piece, count in zip(pieces, counts)])

    @staticmethod
    def backward(ctx, gradient: torch.Tensor):
        gradient = gradient.contiguous().clone()
        dist.all_reduce(gradient, op=dist.ReduceOp.SUM, group=ctx.group)
        start = sum(ctx.counts[: ctx.rank])
        return gradient[start : start + ctx.counts[ctx.rank]], None, None, None


# torch 2.14 renames broadcast_buffers (deprecated) forward_sync_buffers; both keep the initial sync.
_NO_BUFFER_SYNC_EACH_FORWARD = (
    {"forward_sync_buffers": False}
    if "forward_sync_buffers" in inspect.signature(nn.parallel.DistributedDataParallel).parameters
    else {"broadcast_buffers": False})


class DataParallelReplica(Replica):
    """Rank ``rank`` of ``world_size`` in an initialised default process group. The methods'
    ``gather`` and ``sum`` run on a group of their own, so that they never interleave with the
    gradient averaging that ``DistributedDataParallel`` runs during backward."""

    def __init__(self, rank: int, world_size: int) -> None:
        self.rank = rank
        self.world_size = world_size
        self._group = dist.new_group() if dist.is_initialized() else None

    def part(self, global_size: int) -> slice:
        if global_size < self.world_size:
            raise DistributedConfigError(
                f"a global batch of {global_size} images cannot be split over {self.world_size} "
                f"workers; use fewer workers or a larger batch (the last batch of an epoch is "
                f"the remainder of the training set)")
        # Contiguous, as even as possible (the first ranks take one more when it does not divide).
        base, extra = divmod(global_size, self.world_size)
        start = self.rank * base + min(self.rank, extra)
        return slice(start, start + base + (self.rank < extra))

    def loss_terms(self, model: nn.Module, method: ContinualMethod, context: TaskContext) -> LossTerms:
        if not method.gradient_steps:  # nothing to average (RAIL gathers what it fits from)
            return super().loss_terms(model, method, context)
        module = _LossOfBatch(model, lambda model, batch: method.loss_terms(model, batch, context))
        device_ids = None
        if context.device.type == "cuda":  # 'cuda' is the current device, which the worker set to its own
            device = context.device
            device_ids = [device.index if device.index is not None else torch.cuda.current_device()]
        # Unused parameters: a step may not reach every trainable one (MoE experts no sample is
        # routed to, routers of other tasks). Buffers are not broadcast from rank 0 each step:
        # they start equal everywhere, and a method's counters (MoE's expert usage) count this
        # worker's rows until the method sums them (``sum``).
        return nn.parallel.DistributedDataParallel(module, device_ids=device_ids, find_unused_parameters=True,
                                                   **_NO_BUFFER_SYNC_EACH_FORWARD)

    def reduce(self, values: torch.Tensor) -> torch.Tensor:
        values = values.clone()
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
        return values / self.world_size

    def gather(self, rows: torch.Tensor) -> torch.Tensor:
        count = torch.tensor([len(rows)], device=rows.device)
        counts = [torch.zeros_like(count) for _ in range(self.world_size)]
        dist.all_gather(counts, count, group=self._group)
        return _GatherRows.apply(rows, [int(c) for c in counts], self.rank, self._group)

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        values = values.clone()
        dist.all_reduce(values, op=dist.ReduceOp.SUM, group=self._group)
        return values

    def begin_steps(self, seed: int) -> None:
        """What the forward draws (dropout, MoE routing noise) is drawn per worker, for its own
        rows: each worker but the first gets a stream of its own, so that the workers' rows are
        not given the same draws (the first keeps the one-process run's stream)."""
        if self.rank:
            torch.manual_seed(derive_seed(seed, FORWARD_STREAM, self.rank))


def _train_rank(task: TrainingTask, rank: int, world_size: int) -> dict[str, Any] | None:
    """Train this rank's part; rank 0 returns plain data (state dict, summary, per-step losses)."""
    steps: list[tuple[int, dict[str, float]]] = []
    if rank != 0:
        task = dataclasses.replace(task, config=dataclasses.replace(task.config, progress=False))
    model, summary = train(task, on_step=lambda step, values: steps.append((step, values)),
                           replica=DataParallelReplica(rank, world_size))
    if rank != 0:
        return None
    state = {name: tensor.detach().cpu() for name, tensor in model.model.state_dict().items()}
    # What the method hands to the next task, as tensors (the Ray result loads weights only).
    handed_on = {name: torch.from_numpy(np.ascontiguousarray(value))
                 for name, value in task.method.export_state().items()}
    return {"state": state, "summary": summary, "metadata": model.metadata, "steps": steps,
            "handed_on": handed_on}


def _on_cuda(task: Any) -> bool:
    config = getattr(task, "config", None)
    return config is not None and resolve_device(config.device).type == "cuda"


@record
def _torch_worker(task: TrainingTask, entry: Callable[[Any, int, int], Any] | None = None) -> Any:
    """Entry point of one process started by the elastic launcher (env:// rendezvous): ``entry``
    (``_train_rank``; tests run several tasks in one launch) of ``task`` on this rank."""
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if _on_cuda(task):
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    else:  # the workers share this machine's cores (as torchrun's OMP_NUM_THREADS default does)
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["LOCAL_WORLD_SIZE"])))
    dist.init_process_group("nccl" if _on_cuda(task) else "gloo")
    # On failure the group is left open: ``record`` writes this worker's error before the process
    # exits and its peers lose the connection, so the first error is the real one.
    result = (entry or _train_rank)(task, rank, world_size)
    dist.destroy_process_group()
    return result


# --- the node's side -----------------------------------------------------------------------

def _failures_message(error: ChildFailedError, workers: int) -> str:
    """Every failed worker's own error, the first to fail first (the others often only report
    that a peer went away)."""
    failures = sorted(error.failures.items(), key=lambda item: (item[1].timestamp, item[0]))
    lines = []
    for rank, failure in failures:
        message = failure.message if isinstance(failure.message, str) else failure.message.get("message", "")
        lines.append(f"worker {rank} of {workers}: {message or f'exit code {failure.exitcode}'}")
    return "training failed; nothing was written. " + "; ".join(lines)


def _launch_torch(task: TrainingTask, settings: DistributedConfig,
                  entry: Callable[[Any, int, int], Any] | None = None) -> Any:
    if _on_cuda(task) and settings.workers > torch.cuda.device_count():
        raise DistributedConfigError(
            f"training.distributed.workers is {settings.workers} but this machine has "
            f"{torch.cuda.device_count()} GPU(s); one worker per GPU (or backend 'ray' for more machines)")
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    launch = LaunchConfig(
        min_nodes=1, max_nodes=1, nproc_per_node=settings.workers, run_id=f"clip-continual-{uuid.uuid4().hex[:8]}",
        rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0, monitor_interval=0.1,
        start_method="spawn",
    )
    try:
        results = elastic_launch(launch, _torch_worker)(task, entry)
    except ChildFailedError as error:
        raise WorkerFailedError(_failures_message(error, settings.workers)) from None
    return results[0]


# --- Ray Train ----------------------------------------------------------------------------

def _ray_modules():
    try:
        import ray
        from ray import train
        from ray.train.torch import TorchTrainer
    except ImportError as error:
        raise DistributedConfigError(
            f"training.distributed.backend 'ray' needs Ray Train, which is not installed ({error}); "
            f"install it with: pip install -e \".[ray]\"  (or choose backend 'torch' or 'none')"
        ) from None
    return ray, train, TorchTrainer


def _ray_worker(loop_config: dict[str, Any]) -> None:
    """One Ray Train worker: Ray has set up the process group; rank 0 reports the result as a
    checkpoint (a folder with one ``torch.save`` file of plain data)."""
    ray, train, _ = _ray_modules()
    import ray.train.torch

    task = loop_config["task"]
    if _on_cuda(task):
        torch.cuda.set_device(ray.train.torch.get_device())
    context = train.get_context()
    result = _train_rank(task, context.get_world_rank(), context.get_world_size())
    if result is None:
        train.report({})
        return
    with tempfile.TemporaryDirectory() as folder:
        torch.save(result, os.path.join(folder, RESULT_FILE))
        train.report({"steps": len(result["steps"])}, checkpoint=train.Checkpoint.from_directory(folder))


def _ray_use_gpu(settings: DistributedConfig) -> bool:
    return torch.cuda.is_available() if settings.use_gpu == "auto" else bool(settings.use_gpu)


def _launch_ray(task: TrainingTask, settings: DistributedConfig) -> dict[str, Any]:
    ray, train, TorchTrainer = _ray_modules()
    if not ray.is_initialized():
        ray.init(address=settings.address, **dict(settings.ray_init or {}))
    with tempfile.TemporaryDirectory() as scratch:
        trainer = TorchTrainer(
            _ray_worker, train_loop_config={"task": task},
            scaling_config=train.ScalingConfig(num_workers=settings.workers, use_gpu=_ray_use_gpu(settings)),
            run_config=train.RunConfig(name=f"clip-continual-{uuid.uuid4().hex[:8]}",
                                       storage_path=settings.storage_path or scratch),
        )
        try:
            outcome = trainer.fit()
        except Exception as error:  # Ray wraps the worker's exception; keep its message
            raise WorkerFailedError(f"a Ray training worker failed: {error}") from None
        if outcome.error is not None:
            raise WorkerFailedError(f"a Ray training worker failed: {outcome.error}")
        with outcome.checkpoint.as_directory() as folder:
            return torch.load(os.path.join(folder, RESULT_FILE), weights_only=True)


def _result_model(start: ClipModel, result: dict[str, Any]) -> ClipModel:
    model = start.clone()
    model.model.load_state_dict(result["state"])
    model.model.eval()
    model.metadata = result["metadata"]
    return model


def _check_method(method, settings: DistributedConfig) -> None:
    if method.name in NOT_DATA_PARALLEL:
        raise DistributedConfigError(
            f"method '{method.name}' cannot train with training.distributed.backend "
            f"'{settings.backend}': {NOT_DATA_PARALLEL[method.name]}; use backend 'none'")


def train_on(settings: DistributedConfig | Mapping[str, Any] | None, task: TrainingTask,
             on_step: StepCallback | None = None) -> tuple[ClipModel, dict[str, Any]]:
    """``loop.train`` of the built ``task`` on the engine ``settings`` name: in this process
    (``backend: none``) or on ``workers`` data-parallel processes, each running the same loop on
    its part of every batch. ``on_step`` is called here, after training, with rank 0's numbers of
    every step (global-batch values)."""
    settings = settings if isinstance(settings, DistributedConfig) else DistributedConfig.from_params(settings)
    if not settings.active:
        return train(task, on_step)
    _check_method(task.method, settings)
    result = _launch_torch(task, settings) if settings.backend == "torch" else _launch_ray(task, settings)
    for step, values in result["steps"]:
        if on_step is not None:
            on_step(step, values)
    summary = {**result["summary"], "backend": settings.backend, "workers": settings.workers}
    task.method.adopt_state({name: value.numpy() for name, value in result["handed_on"].items()})
    return _result_model(task.start, result), summary


def fine_tune_distributed(
    settings: DistributedConfig | Mapping[str, Any] | None,
    start: ClipModel,
    train_set,
    class_prompts,
    *,
    on_step: StepCallback | None = None,
    **kwargs: Any,
) -> tuple[ClipModel, dict[str, Any]]:
    """``train_on`` from ``loop.fine_tune``'s arguments."""
    return train_on(settings, training_task(start, train_set, class_prompts, **kwargs), on_step)
