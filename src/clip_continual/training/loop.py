"""The one training loop every continual-learning method runs through.

``train`` reads top to bottom: build once what the task needs (the student copy, its teacher,
what the method sees, the optimiser), then the steps (batch -> loss terms -> backward -> clip ->
step -> log; a method without gradient steps fits each batch instead), then hand back the
trained copy with a summary. ``fine_tune`` is the same from plain arguments. A method
(``methods/``) only turns a batch into named loss terms and may hook the steps. Everything
that varies with the step (batch order, augmentation, the replayed vocabulary, the learning
rate) is a pure function of ``(seed, task_index, step)``, so a step can be recomputed exactly.

Plain Python and PyTorch; no Kedro import.
"""

from __future__ import annotations

import logging
import math
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from clip_continual.data.loading import TrainBatch
from clip_continual.methods.base import Batch, ContinualMethod, TaskContext, evaluation_mode
from clip_continual.model.clip import ClipModel, full_precision, resolve_device
from clip_continual.training.costs import PassCounter, PeakMemory, measured_costs, stored_costs, teacher_models
from clip_continual.training.replica import Replica
from clip_continual.training.schedule import (
    autocast_for, build_optimizer, global_batch_size, resolve_precision, step_learning_rate,
)
from clip_continual.training.speed import training_speed
from clip_continual.training.task import (
    TrainingTask, build_student, build_teacher, make_batch, precompute_teacher_features, task_batches,
    task_context, trainable_parameters, training_task,
)

logger = logging.getLogger(__name__)

LOGIT_SCALE_MAX = math.log(100.0)  # open_clip's clamp: a temperature of at least 1/100

StepCallback = Callable[[int, dict[str, float]], None]


def train(task: TrainingTask, on_step: StepCallback | None = None,
          replica: Replica | None = None) -> tuple[ClipModel, dict[str, Any]]:
    """Fine-tune a copy of ``task.start`` (never modified); return it with the task's summary.
    ``on_step(step, values)`` follows every optimizer step (1-based step, the loss terms, their
    sum ``loss``, ``lr``); ``replica`` is this process's part of a data-parallel run."""
    config, method, plan, replica = task.config, task.method, task.plan, replica or Replica()
    device = resolve_device(config.device)
    record = RunRecord(task, on_step, device, replica.world_size)
    precision = resolve_precision(config.precision, device)
    student = build_student(task, device)
    model, teacher = student.model, build_teacher(task, device)
    context = task_context(task, student, teacher, device, autocast_for(precision, device), replica)
    method.prepare_for_task(model, context)
    trainable = trainable_parameters(task, student)
    # A method solved in closed form (RAIL) gets no optimiser: it fits each batch instead.
    optimizer = build_optimizer(trainable, config) if method.gradient_steps else None
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    loss_terms = replica.loss_terms(model, method, context)
    stepper = GradientStepper(task, model, trainable, optimizer, scaler, loss_terms, context, replica)
    record.started(trainable, device, precision)
    with evaluation_mode(None if teacher is None else teacher.model), training_speed(model, config, device):
        precompute_teacher_features(task, context, student)
        method.before_task(context)
        record.set_up()
        replica.begin_steps(task.seed)
        passes = PassCounter(model, teacher_models(context))
        try:
            for step, train_batch in record.steps(task_batches(task, student, device, replica)):
                lr = step_learning_rate(config, plan, step)
                batch = make_batch(task, step, train_batch, device)
                if optimizer is None:
                    record.step(step, lr, fit_batch(method, model, batch, context))
                    continue
                record.step(step, lr, stepper.step(step, lr, batch))
        finally:
            passes.remove()
            method.after_task(context, model)
    return finish(task, student, trainable, record, device, costs=(context, passes))


@dataclass
class GradientStepper:
    """One optimiser step of a task on a batch (loss, backward, the method's hooks, clipping)."""

    task: TrainingTask
    model: nn.Module
    trainable: list[nn.Parameter]
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    loss_terms: Callable[[Batch], dict[str, torch.Tensor]]
    context: TaskContext
    replica: Replica

    def step(self, step: int, lr: float, batch: Batch) -> dict[str, float]:
        """The step's loss terms and their sum ``loss``, averaged over the replicas."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        with self.context.autocast():
            terms = self.loss_terms(batch)
        # Batch-mean terms weighted by this replica's share of the global batch: averaged
        # over replicas (DDP), the gradient is the global batch's. 1 in a one-process run.
        share = len(batch.indices) * self.replica.world_size / global_batch_size(self.task.plan, step)
        terms = {name: term * share for name, term in terms.items()}
        loss = torch.stack(list(terms.values())).sum()
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)  # a no-op without fp16 loss scaling
        # The method's gradient hook sees unscaled gradients before any clipping (A-GEM
        # projects before clipping, as the paper's agem.py does not clip).
        self.task.method.before_optimizer_step(self.model, batch, self.context)
        if self.task.config.grad_clip_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.trainable, self.task.config.grad_clip_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        clamp_logit_scale(self.model)
        self.task.method.after_optimizer_step(self.model, step + 1, self.context)
        # One device sync per step: all terms and the total come back together.
        numbers = full_precision(torch.stack([loss.detach()] + [t.detach() for t in terms.values()]))
        return dict(zip(["loss", *terms], self.replica.reduce(numbers).tolist()))


def fit_batch(method: ContinualMethod, model: nn.Module, batch: Batch, context: TaskContext) -> dict[str, float]:
    """One batch of a method without gradient steps: no graph, no step; its numbers and their
    sum as ``loss``, logged as a step's loss terms are."""
    with torch.no_grad(), context.autocast():
        numbers = method.fit_batch(model, batch, context)
    return {"loss": float(sum(numbers.values())), **numbers}


def fine_tune(start: ClipModel, *args: Any, on_step: StepCallback | None = None,
              replica: Replica | None = None, **kwargs: Any) -> tuple[ClipModel, dict[str, Any]]:
    """``train`` from plain arguments: ``training_task``'s (which says what each one is), plus
    ``on_step`` and ``replica`` by keyword."""
    return train(training_task(start, *args, **kwargs), on_step, replica)


def clamp_logit_scale(model: nn.Module) -> None:
    if hasattr(model, "logit_scale"):
        with torch.no_grad():
            model.logit_scale.clamp_(0.0, LOGIT_SCALE_MAX)


def divergence_message(values: dict[str, float], step: int, task_index: int, precision: str) -> str:
    advice = "lower continual_learning.training.lr"
    if precision != "fp32":  # fp32 is only advice where training is not already in fp32
        advice += " or set continual_learning.training.precision=fp32"
    return f"the loss became {values['loss']} at step {step + 1} of task {task_index} ({values}); {advice}"


class RunRecord:
    """What a task's run records: every step's numbers (history, progress bar, log lines,
    ``on_step``), the time of each step (waiting for its batch included) and of the set-up."""

    def __init__(self, task: TrainingTask, on_step: StepCallback | None, device: torch.device,
                 world_size: int = 1) -> None:
        self.task, self.on_step = task, on_step
        self.memory, self.world_size = PeakMemory(device), world_size  # the peak from here on
        self.history: dict[str, list[float]] = {}
        self.window: dict[str, list[float]] = {}
        self.step_times: list[float] = []
        self.precision = "fp32"
        self.setup_time = 0.0
        self.wall_started = self.clock = time.perf_counter()

    def started(self, trainable: list[nn.Parameter], device: torch.device, precision: str) -> None:
        task, plan = self.task, self.task.plan
        self.precision = precision
        logger.info(
            "task %d: %s %s, %d steps (%d per epoch, batch %d), parts %s (%d trainable parameters), "
            "%s %s", task.task_index, task.method.name, task.method.hyper_parameters(), plan.total_steps,
            plan.steps_per_epoch, plan.batch_size, task.config.parts, sum(p.numel() for p in trainable),
            device, self.precision,
        )
        self.clock = time.perf_counter()

    def set_up(self) -> None:
        self.setup_time = time.perf_counter() - self.clock

    def steps(self, batches: Iterator[TrainBatch]) -> Iterator[tuple[int, TrainBatch]]:
        task = self.task
        self.progress = tqdm(range(task.plan.total_steps), desc=f"task {task.task_index} {task.method.name}",
                             disable=not task.config.progress, leave=False)
        self.clock = time.perf_counter()
        yield from zip(self.progress, batches)
        self.progress.close()

    def step(self, step: int, lr: float, values: dict[str, float]) -> None:
        task, total = self.task, self.task.plan.total_steps
        self.step_times.append(time.perf_counter() - self.clock)
        if not math.isfinite(values["loss"]):
            raise FloatingPointError(divergence_message(values, step, task.task_index, self.precision))
        for name, value in values.items():
            self.history.setdefault(name, []).append(value)
            self.window.setdefault(name, []).append(value)
        self.progress.set_postfix({k: f"{np.mean(v):.4f}" for k, v in self.window.items()}, refresh=False)
        if (step + 1) % task.config.log_every == 0 or step + 1 == total:
            logger.info("task %d step %d/%d lr %.3g %s", task.task_index, step + 1, total, lr,
                        {k: round(float(np.mean(v)), 5) for k, v in self.window.items()})
            self.window = {}
        if self.on_step is not None:
            self.on_step(step + 1, {**values, "lr": lr})
        self.clock = time.perf_counter()  # the next step's time includes waiting for its batch


def finish(task: TrainingTask, student: ClipModel, trainable: list[nn.Parameter], record: RunRecord,
           device: torch.device, costs: tuple[TaskContext, PassCounter]) -> tuple[ClipModel, dict[str, Any]]:
    """Hand back a plain model (eval mode, every parameter trainable again, as CLIP loads) and
    the task's summary, with what the task cost (``training.costs``)."""
    method, config, plan, history = task.method, task.config, task.plan, record.history
    context, passes = costs
    wall_time = time.perf_counter() - record.wall_started
    student.model.eval()
    for parameter in student.model.parameters():
        parameter.requires_grad_(True)
    summary = {
        "method": method.name,
        "hyper_parameters": method.hyper_parameters(),
        "task_index": task.task_index,
        "steps": plan.total_steps,
        "steps_per_epoch": plan.steps_per_epoch,
        "epochs": plan.total_steps / plan.steps_per_epoch,
        "num_images": plan.num_images,
        "batch_size": plan.batch_size,
        "trainable_parameters": sum(p.numel() for p in trainable),
        "median_step_time_s": statistics.median(record.step_times),
        "train_time_s": float(sum(record.step_times)),
        "setup_time_s": record.setup_time,
        "wall_time_s": wall_time,
        **measured_costs(plan, passes, record.memory, record.world_size, wall_time),
        **stored_costs(method, context, student.model),
        "final_losses": {name: values[-1] for name, values in history.items()},
        "mean_losses": {name: float(np.mean(values)) for name, values in history.items()},
        "final_lr": step_learning_rate(config, plan, plan.total_steps - 1),
        "logit_scale": (float(student.model.logit_scale.detach().exp())
                        if hasattr(student.model, "logit_scale") else None),
        "device": str(device),
        "precision": record.precision,
    }
    student.metadata.setdefault("training", []).append(
        {"task_index": task.task_index, "method": method.name, "steps": plan.total_steps,
         "parts": config.parts, "final_loss": summary["final_losses"]["loss"]}
    )
    return student, summary
