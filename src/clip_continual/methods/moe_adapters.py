"""MoE-Adapters: a frozen CLIP with routed adapter experts in every transformer block.

Follows MoE-Adapters (Yu et al., CVPR 2024), ``mtil/clip/model.py`` (ResidualAttentionBlock:
experts, per-task routers, noisy top-k gating), ``mtil/clip/adapter.py`` (the expert),
``mtil/src/models/finetune.py`` (only adapters and routers train; after each task the two most
chosen experts of every block are frozen for later tasks) and
``mtil/scripts/train/train_full_shot_router11_experts22_1000iters.sh`` (22 experts, top-2,
bottleneck 64, both encoders, label smoothing 0.2). The experts, routers and DDAS autoencoders
are an adapter kind ("moe") of ``model/adapters.py``, registered below.

Not taken over: the reference computes a load-balancing loss in each block but never adds it
to the training loss, so neither do we.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from open_clip.transformer import ResidualAttentionBlock
from torch import nn

from clip_continual.data.image_folder import image_folder_index
from clip_continual.data.loading import TaskImages, training_source
from clip_continual.methods.base import MethodConfigError, TaskContext, tensor_bytes
from clip_continual.methods.ddas import (
    TaskSelector, alexnet_conv5, feature_count, fit_autoencoder, regroup, training_rows,
)
from clip_continual.methods.ft import FineTuning
from clip_continual.model.adapters import (
    TOWERS_OF_PARTS, AdapterError, adapter_recipe, add_adapters, evaluated_task, register_adapter_kind,
    tower_transformers,
)


# --- the experts, routed top-k beside each block's MLP ----------------------------------------

class AdapterExpert(nn.Module):
    """One expert: ``0.1 * up(dropout(relu(down(x))))`` with the 'lora' initialisation
    (down Kaiming-uniform, up and both biases zero), as MoE-Adapters mtil/clip/adapter.py."""

    def __init__(self, width: int, bottleneck: int, scale: float, dropout: float) -> None:
        super().__init__()
        self.down = nn.Linear(width, bottleneck)
        self.up = nn.Linear(bottleneck, width)
        self.scale = scale
        self.dropout = dropout
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
            nn.init.zeros_(self.up.weight)
            nn.init.zeros_(self.down.bias)
            nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = F.dropout(F.relu(self.down(x)), self.dropout, self.training)
        return self.up(hidden) * self.scale


class MixtureOfAdapters(nn.Module):
    """Noisy top-k routing of each sample to ``top_k`` of ``experts`` adapters, as
    MoE-Adapters mtil/clip/model.py:429-460 (noisy_top_k_gating, after Shazeer et al. 2017): a
    router (gate and noise weights, zero-initialised) per task, or one shared by all
    (``router_per_task: false``), over experts shared by all tasks; the router reads the
    sample's first token; in training (and at evaluation with ``eval_noise``) the logits get
    Gaussian noise of std ``softplus(x W_noise) + 0.01``. ``usage`` counts how often each
    expert was chosen in training (the reference freezes the most used experts after a task).

    Which router: ``routes`` (set by DDAS for one image forward: each sample's task, -1 none),
    else ``route`` (one task for every sample, set while class texts are encoded for that
    task), else the latest router.
    """

    def __init__(self, width: int, experts: int, top_k: int, bottleneck: int, routers: int,
                 scale: float = 0.1, dropout: float = 0.1, eval_noise: bool = False) -> None:
        super().__init__()
        if not 1 <= top_k <= experts:
            raise AdapterError(f"top_k must lie in [1, experts={experts}], got {top_k}")
        self.top_k = top_k
        self.experts = nn.ModuleList(AdapterExpert(width, bottleneck, scale, dropout) for _ in range(experts))
        self.gates = nn.ParameterList()
        self.noise = nn.ParameterList()
        self.register_buffer("frozen", torch.zeros(experts, dtype=torch.bool))
        self.register_buffer("usage", torch.zeros(experts))
        for _ in range(routers):
            self.add_router()
        self.eval_noise = eval_noise
        self.routes: torch.Tensor | None = None
        self.route: int | None = None
        self.bypass = False

    @property
    def active_router(self) -> int:
        """The router in use: the latest task's, as the reference evaluates without DDAS."""
        return len(self.gates) - 1

    def add_router(self) -> None:
        width, count = self.experts[0].down.in_features, len(self.experts)
        like = self.experts[0].down.weight
        self.gates.append(nn.Parameter(torch.zeros(width, count, device=like.device, dtype=like.dtype)))
        self.noise.append(nn.Parameter(torch.zeros(width, count, device=like.device, dtype=like.dtype)))
        self.usage.zero_()

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The current router and every expert not frozen."""
        chosen = [self.gates[self.active_router], self.noise[self.active_router]]
        for expert, frozen in zip(self.experts, self.frozen.tolist()):
            if not frozen:
                chosen += list(expert.parameters())
        return chosen

    def _chosen_routers(self, first_token: torch.Tensor) -> torch.Tensor | None:
        if self.routes is not None:
            return self.routes
        if self.route is not None:
            return torch.full((len(first_token),), self.route, dtype=torch.long, device=first_token.device)
        return None

    def routing(self, first_token: torch.Tensor) -> torch.Tensor:
        """(B, experts) gate weights: softmax over each sample's top-k logits, zero elsewhere;
        all zero for a sample whose route is -1 (no adapter: the pretrained CLIP)."""
        chosen = self._chosen_routers(first_token)
        if chosen is not None and bool((chosen < 0).all()):
            return first_token.new_zeros(len(first_token), len(self.experts))
        logits = self._logits(first_token, self.gates, chosen)
        if self.training or self.eval_noise:
            std = F.softplus(self._logits(first_token, self.noise, chosen)) + 1e-2
            logits = logits + torch.randn_like(logits) * std
        gates = self._top_k(logits)
        return gates if chosen is None else gates * (chosen >= 0).unsqueeze(1).to(gates.dtype)

    def _logits(self, first_token: torch.Tensor, weights: nn.ParameterList,
                chosen: torch.Tensor | None) -> torch.Tensor:
        """``x W`` with the latest router's ``W``, or each sample's own router's."""
        if chosen is None:
            return first_token @ weights[self.active_router].to(first_token.dtype)
        per_sample = torch.stack(list(weights))[chosen.clamp(min=0)].to(first_token.dtype)
        return torch.einsum("bd,bde->be", first_token, per_sample)

    def _top_k(self, logits: torch.Tensor) -> torch.Tensor:
        top_logits, top_experts = logits.topk(self.top_k, dim=1)
        return torch.zeros_like(logits).scatter(1, top_experts, top_logits.softmax(dim=1))

    def forward(self, x: torch.Tensor, batch_first: bool = True) -> torch.Tensor:
        if self.bypass:
            return torch.zeros_like(x)
        tokens = x if batch_first else x.transpose(0, 1)  # (B, L, D)
        gates = self.routing(tokens[:, 0])
        if self.training:
            self.usage += (gates > 0).sum(0).to(self.usage.dtype)
        # Each expert runs on its own samples only (the reference's SparseDispatcher).
        samples, experts = gates.nonzero(as_tuple=True)
        out = torch.zeros_like(tokens)
        for index in experts.unique().tolist():
            rows = samples[experts == index]
            weight = gates[rows, index].to(tokens.dtype).view(-1, 1, 1)
            out = out.index_add(0, rows, weight * self.experts[index](tokens[rows]))
        return out if batch_first else out.transpose(0, 1)


class MixtureBlock(ResidualAttentionBlock):
    """open_clip's residual block with MoE-Adapters' parallel branch:
    ``x = x + attn(ln_1(x)); x = x + mlp(ln_2(x)) + moe(x)`` (mtil/clip/model.py, the experts
    read the residual stream after attention). Blocks are converted in place (``__class__``),
    so the backbone's state-dict keys stay those of the plain CLIP."""

    mixture: MixtureOfAdapters

    def forward(self, q_x: torch.Tensor, k_x: torch.Tensor | None = None,
                v_x: torch.Tensor | None = None, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        if k_x is not None or v_x is not None:
            raise AdapterError("MoE-Adapters blocks support self-attention only")
        x = q_x + self.ls_1(self.attention(q_x=self.ln_1(q_x), attn_mask=attn_mask))
        return x + self.ls_2(self.mlp(self.ln_2(x))) + self.mixture(x, self.attn.batch_first)


# Recipe entries that may change from task to task (counts, evaluation settings), as opposed
# to the structure a continued model must share.
SETTINGS = ("routers", "ddas_tasks", "ddas_reference", "ddas_threshold", "ddas_batch",
            "ddas_alexnet_weights", "eval_noise")


def add_mixtures(model: nn.Module, recipe: dict[str, Any]) -> None:
    for transformer in tower_transformers(model, recipe["towers"]).values():
        for block in transformer.resblocks:
            if type(block) is not ResidualAttentionBlock:
                raise AdapterError(f"MoE-Adapters supports open_clip's ResidualAttentionBlock, not {type(block).__name__}")
            like = block.mlp.c_fc.weight
            mixture = MixtureOfAdapters(
                like.shape[1], int(recipe["experts"]), int(recipe["top_k"]), int(recipe["bottleneck"]),
                int(recipe["routers"]),
            ).to(device=like.device, dtype=like.dtype)
            block.__class__ = MixtureBlock
            block.add_module("mixture", mixture)
    if recipe.get("ddas"):
        if "visual" not in recipe["towers"]:
            raise AdapterError("DDAS routes images: it needs adapters in the visual tower (parts wm or io)")
        add_task_selector(model, recipe)
    configure_mixtures(model, recipe)


def configure_mixtures(model: nn.Module, recipe: dict[str, Any]) -> None:
    """Apply the recipe's settings (``SETTINGS``) to the modules."""
    for mixture in mixtures(model):
        mixture.eval_noise = bool(recipe.get("eval_noise", False))
    selector = getattr(model.visual, "task_selector", None)
    if selector is not None:
        selector.threshold = float(recipe.get("ddas_threshold", 0.0655))
        selector.batch = int(recipe.get("ddas_batch", 128))
        selector.weights = recipe.get("ddas_alexnet_weights")


def mixtures(model: nn.Module) -> Iterator[MixtureOfAdapters]:
    return (module for module in model.modules() if isinstance(module, MixtureOfAdapters))


# --- DDAS at evaluation: route each chunk of test images (methods/ddas.py) -------------------

def add_task_selector(model: nn.Module, recipe: dict[str, Any]) -> TaskSelector:
    visual = model.visual
    size = visual.image_size
    selector = TaskSelector(feature_count(size[0] if isinstance(size, (tuple, list)) else size),
                            int(recipe.get("ddas_tasks", 0)), bool(recipe.get("ddas_reference", 0)))
    visual.add_module("task_selector", selector.to(next(visual.parameters()).device))
    visual.register_forward_pre_hook(_route_images)
    visual.register_forward_hook(_forget_routes)
    return selector


def visual_mixtures(model_or_visual: nn.Module) -> list[MixtureOfAdapters]:
    visual = getattr(model_or_visual, "visual", model_or_visual)
    return [m for m in visual.modules() if isinstance(m, MixtureOfAdapters)]


def _route_images(visual: nn.Module, args: tuple) -> None:
    """Before an evaluation forward of the image tower: one task (or none) per chunk of images."""
    selector = visual.task_selector
    selector.last_routes = None
    if visual.training or not selector.active:
        return
    with torch.no_grad():
        routes = selector.select(args[0], evaluated_task(visual).mixed_batches)
    selector.last_routes = routes
    for mixture in visual_mixtures(visual):
        mixture.routes = routes


def _forget_routes(visual: nn.Module, args: tuple, output: torch.Tensor) -> None:
    for mixture in visual_mixtures(visual):
        mixture.routes = None


def mixture_parameters(transformer: nn.Module) -> list[nn.Parameter]:
    chosen: list[nn.Parameter] = []
    for module in transformer.modules():
        if isinstance(module, MixtureOfAdapters):
            chosen += module.trainable_parameters()
    return chosen


register_adapter_kind("moe", add_mixtures, mixture_parameters, settings=SETTINGS)


# --- the method ------------------------------------------------------------------------------

class MoEAdapters(FineTuning):
    """``L = CE`` as ``ft`` (label smoothing 0.2 as published), trained only through the
    adapters: each block adds ``sum_e g_e(x_0) * A_e(x)`` to its residual stream, ``A_e`` the
    experts (``0.1 * up(relu(down(x)))``), ``g`` the task's router (softmax over the noisy top-k
    logits of the first token x_0). Experts are shared; after a task the ``frozen_per_task``
    experts its router chose most are frozen for good.

    Defaults: MoE-Adapters' full-shot MTIL recipe (a router per task, DDAS on: every published
    MTIL test script passes ``--autorouter``). Its class-incremental recipe (cil/) is
    ``experts: 2, top_k: 2, router_per_task: false, frozen_per_task: 0, ddas: false`` (plus
    ``eval_noise: true`` to keep its quirk of router noise at test time; label smoothing 0).

    ``ddas``: after each task an autoencoder learns the task's images (AlexNet conv5 features,
    ``ddas_steps`` steps of 64); at evaluation each chunk of ``ddas_batch`` consecutive test
    images takes the router of the task whose autoencoder reconstructs it best, in both towers
    (the class texts are encoded with that task's router), or no adapter at all (exactly the
    pretrained CLIP) when the smallest error exceeds ``ddas_threshold`` or the reference
    autoencoder wins. ``ddas_reference``: an image folder (one folder per class) for that
    reference autoencoder, trained ``ddas_reference_steps`` steps after the first task (the
    reference trains it on TinyImageNet before); null, unlike the reference, has none, so only
    the threshold sends a chunk to the pretrained CLIP. Only learnt tasks have autoencoders
    (the reference also lets the untrained ones of later tasks compete). The AlexNet weights
    are torchvision's ImageNet ones (downloaded once) or the state dict at
    ``ddas_alexnet_weights``. Without ``ddas`` the latest router serves every input.
    """

    name = "moe_adapters"

    def __init__(
        self,
        experts: int = 22,                # train_full_shot_router11_experts22_1000iters.sh:14 (num=22)
        top_k: int = 2,                   # mtil/src/args.py:324 (--topk default)
        bottleneck: int = 64,             # mtil/src/args.py:304 (--ffn_num); mtil/clip/adapter.py:35
        frozen_per_task: int = 2,         # mtil/src/models/finetune.py:195-220 (topk(choose_map, 2))
        router_per_task: bool = True,     # mtil/clip/model.py:336-338 (11 routers); cil/clip/model.py:288-315 (1)
        eval_noise: bool = False,         # mtil: noise only with --is_train (model.py:440-447); cil: always
        ddas: bool = True,                # every MTIL test script passes --autorouter (Full_Shot_order1.sh:16-36)
        ddas_steps: int = 300,            # train_full_shot...sh:43 (--iterations 300 per task)
        ddas_threshold: float = 0.0655,   # train_full_shot...sh:13 (655e-4); few-shot 585e-4 / 600e-4
        ddas_batch: int = 128,            # mtil/src/args.py:12 (--batch-size-eval): one choice per batch
        ddas_reference: str | None = None,  # the reference's AE0: TinyImageNet (train_full_shot...sh:22-33)
        ddas_reference_steps: int = 1000,   # train_full_shot...sh:27 (--iterations 1000)
        ddas_alexnet_weights: str | None = None,  # None: torchvision's ImageNet weights (AutoEncoder.py:145-147)
        label_smoothing: float = 0.2,     # train_full_shot...sh:58 (--ls 0.2)
    ) -> None:
        super().__init__(label_smoothing=label_smoothing)
        _check_counts(experts=experts, top_k=top_k, bottleneck=bottleneck, ddas_steps=ddas_steps,
                      ddas_batch=ddas_batch, ddas_reference_steps=ddas_reference_steps)
        if top_k > experts:
            raise MethodConfigError(f"top_k ({top_k}) cannot exceed experts ({experts})")
        if isinstance(frozen_per_task, bool) or not isinstance(frozen_per_task, int) or frozen_per_task < 0:
            raise MethodConfigError(f"frozen_per_task must be an integer >= 0, got {frozen_per_task!r}")
        if not float(ddas_threshold) > 0.0:
            raise MethodConfigError(f"ddas_threshold must be a positive number, got {ddas_threshold!r}")
        if ddas and not router_per_task:
            raise MethodConfigError("DDAS picks a task's router, but router_per_task: false shares one "
                                    "router; set ddas: false (as MoE-Adapters' class-incremental setup)")
        self.experts, self.top_k, self.bottleneck = experts, top_k, bottleneck
        self._usage_before: list[torch.Tensor] = []  # the image tower's counts as the task starts
        self.frozen_per_task, self.router_per_task = frozen_per_task, bool(router_per_task)
        self.eval_noise, self.ddas, self.ddas_steps = bool(eval_noise), bool(ddas), ddas_steps
        self.ddas_threshold, self.ddas_batch = float(ddas_threshold), ddas_batch
        self.ddas_reference, self.ddas_reference_steps = ddas_reference, ddas_reference_steps
        self.ddas_alexnet_weights = None if ddas_alexnet_weights is None else str(ddas_alexnet_weights)

    def check_files(self) -> None:
        """The reference folder and the AlexNet weights DDAS reads (downloaded now when online)."""
        if self.ddas:
            _check_paths(self.ddas_reference, self.ddas_alexnet_weights)
            alexnet_conv5(self.ddas_alexnet_weights)

    def _settings(self) -> dict[str, Any]:
        return {"eval_noise": self.eval_noise, "ddas_threshold": self.ddas_threshold,
                "ddas_batch": self.ddas_batch, "ddas_alexnet_weights": self.ddas_alexnet_weights}

    def prepare_student(self, student: nn.Module, parts: str) -> None:
        add_adapters(student, {"kind": "moe", "experts": self.experts, "top_k": self.top_k,
                               "bottleneck": self.bottleneck, "routers": 0,
                               "towers": TOWERS_OF_PARTS[parts], "ddas": self.ddas, "ddas_tasks": 0,
                               "ddas_reference": 0, **self._settings()})
        recipe = adapter_recipe(student)
        recipe.update(self._settings())  # a continued model takes this run's settings
        configure_mixtures(student, recipe)
        if self.router_per_task or not recipe["routers"]:
            for mixture in mixtures(student):
                mixture.add_router()
            recipe["routers"] += 1
        if self.ddas:  # fail now, not after the task's training, when AlexNet cannot be had
            self.check_files()
        self._usage_before = [mixture.usage.clone() for mixture in visual_mixtures(student)]

    def _count_usage_of_all_workers(self, task: TaskContext, student: nn.Module) -> None:
        """Data-parallel, each worker's image tower routed its own part of the batch: the
        task's counts there are the sum of the workers'. The text tower encoded the same
        prompts on every worker, so its counts are already the task's."""
        for mixture, before in zip(visual_mixtures(student), self._usage_before):
            mixture.usage.copy_(before + task.workers.sum(mixture.usage - before))

    def after_task(self, task: TaskContext, student: nn.Module) -> None:
        with torch.no_grad():
            if task.workers.world_size > 1:
                self._count_usage_of_all_workers(task, student)
            for mixture in mixtures(student):
                count = min(self.frozen_per_task, len(mixture.experts))
                if count:
                    mixture.frozen[mixture.usage.topk(count).indices] = True
        if self.ddas:
            self._fit_task_selector(task, student)

    def extra_storage_bytes(self, task: TaskContext, student: nn.Module) -> dict[str, int]:
        """The experts and routers added to the architecture, and DDAS's autoencoders (one per
        task learnt, and the reference's), all kept with the model."""
        adapters = [p for mixture in mixtures(student) for p in mixture.parameters()]
        selector = getattr(getattr(student, "visual", None), "task_selector", None)
        kept = super().extra_storage_bytes(task, student) | {"adapters": tensor_bytes(adapters)}
        return kept | ({"autoencoders": tensor_bytes(selector.parameters())} if selector is not None else {})

    def _fit_task_selector(self, task: TaskContext, student: nn.Module) -> None:
        """The reference autoencoder (once, if asked for), then one for this task's images."""
        images = task.train_images
        if images is None or task.preprocess is None:
            raise ValueError("moe_adapters with ddas needs the task's training images in TaskContext")
        selector, recipe = student.visual.task_selector, adapter_recipe(student)
        if self.ddas_reference is not None and selector.reference is None:
            reference = TaskImages(training_source(image_folder_index(self.ddas_reference)), images.clip,
                                   images.progress)
            _fit(selector.add_reference(task.device), selector, reference, task.preprocess,
                 self.ddas_reference_steps, task.seed)
            recipe["ddas_reference"] = 1
        _fit(selector.add_task(task.device), selector, images, task.preprocess, self.ddas_steps, task.seed)
        recipe["ddas_tasks"] += 1


DDAS_TRAIN_BATCH = 64  # mtil/src/args.py:11 (--batch-size default) for the autoencoders too


def _fit(autoencoder: nn.Module, selector: TaskSelector, images: TaskImages,
         preprocess: Callable[[np.ndarray], torch.Tensor], steps: int, seed: int) -> None:
    """Train ``autoencoder`` on ``steps`` batches of 64 of ``images``: AlexNet codes of the
    un-augmented images (the reference reads its train transform's crops)."""
    rows = training_rows(len(images), steps, DDAS_TRAIN_BATCH, seed)
    arrays = images.arrays(np.concatenate(rows), DDAS_TRAIN_BATCH, "ddas")
    codes = (selector.codes(preprocess(chunk)) for _, chunk in arrays)
    fit_autoencoder(autoencoder, regroup(codes, [len(batch) for batch in rows]),
                    math.ceil(len(images) / DDAS_TRAIN_BATCH))


def _check_counts(**counts: Any) -> None:
    for key, value in counts.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise MethodConfigError(f"{key} must be a positive integer, got {value!r}")


def _check_paths(reference: str | None, weights: str | None) -> None:
    if reference is not None and not Path(reference).is_dir():
        raise MethodConfigError(f"ddas_reference '{reference}' is not a folder; give an image folder "
                                "(one folder per class, e.g. TinyImageNet's train/) or null for none")
    if weights is not None and not Path(weights).is_file():
        raise MethodConfigError(f"ddas_alexnet_weights '{weights}' is not a file; give an AlexNet state dict "
                                "saved with torch.save, or null for torchvision's ImageNet weights")
