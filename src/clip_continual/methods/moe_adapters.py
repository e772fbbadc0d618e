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
from typing import Any, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from open_clip.transformer import ResidualAttentionBlock
from torch import nn

from clip_continual.methods.base import MethodConfigError, TaskContext, evaluation_mode
from clip_continual.methods.ft import FineTuning
from clip_continual.model.adapters import (
    TOWERS_OF_PARTS, AdapterError, adapter_recipe, add_adapters, register_adapter_kind, tower_transformers,
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
    MoE-Adapters mtil/clip/model.py (ResidualAttentionBlock.noisy_top_k_gating, after Shazeer
    et al. 2017): one router (gate and noise weights, zero-initialised) per task over experts
    shared by all tasks; the router reads the sample's first token; in training the logits get
    Gaussian noise of std ``softplus(x W_noise) + 0.01``. ``usage`` counts how often each expert
    was chosen in training (the reference freezes the most used experts after each task).
    """

    def __init__(self, width: int, experts: int, top_k: int, bottleneck: int, routers: int,
                 scale: float = 0.1, dropout: float = 0.1) -> None:
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
        # Set for one forward by DDAS: each sample's router, -1 for none (the frozen CLIP).
        self.routes: torch.Tensor | None = None
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

    def routing(self, first_token: torch.Tensor) -> torch.Tensor:
        """(B, experts) gate weights: softmax over each sample's top-k logits, zero elsewhere;
        all zero for a sample whose DDAS route is -1."""
        if self.routes is not None:
            per_sample = torch.stack(list(self.gates))[self.routes.clamp(min=0)]
            logits = torch.einsum("bd,bde->be", first_token, per_sample.to(first_token.dtype))
            return self._top_k(logits) * (self.routes >= 0).unsqueeze(1)
        gate, noise = self.gates[self.active_router], self.noise[self.active_router]
        logits = first_token @ gate.to(first_token.dtype)
        if self.training:
            std = F.softplus(first_token @ noise.to(first_token.dtype)) + 1e-2
            logits = logits + torch.randn_like(logits) * std
        return self._top_k(logits)

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
        add_task_selector(model, int(recipe.get("ddas_tasks", 0)))


def mixtures(model: nn.Module) -> Iterator[MixtureOfAdapters]:
    return (module for module in model.modules() if isinstance(module, MixtureOfAdapters))


# --- DDAS: which task's router an image should take -----------------------------------------

class Autoencoder(nn.Module):
    """``sigmoid(W2 relu(W1 x))``, trained to reconstruct sigmoid-squashed features (MSE), as
    MoE-Adapters mtil/src/models/AutoEncoder.py."""

    def __init__(self, features: int, code: int) -> None:
        super().__init__()
        self.encoder = nn.Linear(features, code)
        self.decoder = nn.Linear(code, features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.decoder(torch.relu(self.encoder(x))))


class TaskSelector(nn.Module):
    """MoE-Adapters' Distribution Discriminative Auto-Selector (mtil/src/models/evaluation.py,
    zeroshot_eval): one autoencoder per task; an image takes the router of the task whose
    autoencoder reconstructs its features best, or no adapter at all (the frozen CLIP) when
    even that error exceeds the task's threshold.

    Differences, because the reference's parts are not available here: the features are the
    frozen CLIP's own image embeddings (adapters bypassed) instead of an ImageNet AlexNet's
    conv5 maps; the choice is per image instead of per test batch (our test batches mix tasks);
    each task's threshold is a quantile of its own training images' errors instead of one
    hand-set number (feature scales differ between models).
    """

    def __init__(self, features: int, tasks: int = 0) -> None:
        super().__init__()
        self.features = features
        self.autoencoders = nn.ModuleList()
        self.register_buffer("thresholds", torch.zeros(0))
        for _ in range(tasks):
            self.add_task()

    @property
    def code(self) -> int:
        # The reference squeezes 9,216 features into 100; small embeddings keep a bottleneck.
        return max(1, min(100, self.features // 2))

    def add_task(self, threshold: float = float("inf")) -> Autoencoder:
        like = self.thresholds
        autoencoder = Autoencoder(self.features, self.code).to(like.device)
        self.autoencoders.append(autoencoder)
        self.thresholds = torch.cat([like, torch.tensor([threshold], device=like.device)])
        return autoencoder

    def errors(self, features: torch.Tensor) -> torch.Tensor:
        """(B, tasks) mean squared reconstruction error of each image under each autoencoder."""
        target = torch.sigmoid(features.float())
        return torch.stack([((ae(target) - target) ** 2).mean(dim=1) for ae in self.autoencoders], dim=1)

    def select(self, features: torch.Tensor) -> torch.Tensor:
        """Each image's task index, -1 where no autoencoder knows it."""
        best_error, best = self.errors(features).min(dim=1)
        return torch.where(best_error <= self.thresholds[best], best, torch.full_like(best, -1))


def add_task_selector(model: nn.Module, tasks: int) -> TaskSelector:
    visual = model.visual
    selector = TaskSelector(int(visual.output_dim), tasks).to(next(visual.parameters()).device)
    visual.add_module("task_selector", selector)
    visual.register_forward_pre_hook(_route_images)
    visual.register_forward_hook(_forget_routes)
    return selector


def visual_mixtures(model_or_visual: nn.Module) -> list[MixtureOfAdapters]:
    visual = getattr(model_or_visual, "visual", model_or_visual)
    return [m for m in visual.modules() if isinstance(m, MixtureOfAdapters)]


def frozen_image_features(visual: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """The frozen CLIP's image embeddings: the image tower with its adapters bypassed."""
    chosen = visual_mixtures(visual)
    for mixture in chosen:
        mixture.bypass = True
    try:
        return visual(pixels)
    finally:
        for mixture in chosen:
            mixture.bypass = False


def _route_images(visual: nn.Module, args: tuple) -> None:
    """Before an evaluation forward of the image tower: route each image (DDAS)."""
    chosen = visual_mixtures(visual)
    selector = visual.task_selector
    if visual.training or not len(selector.autoencoders) or any(m.bypass for m in chosen):
        return
    routes = selector.select(frozen_image_features(visual, args[0]))
    for mixture in chosen:
        mixture.routes = routes


def _forget_routes(visual: nn.Module, args: tuple, output: torch.Tensor) -> None:
    for mixture in visual_mixtures(visual):
        mixture.routes = None


def fit_autoencoder(autoencoder: Autoencoder, features: torch.Tensor, steps: int, batch_size: int = 64,
                    seed: int = 0) -> None:
    """Train one DDAS autoencoder on a task's (frozen) image features: Adam, lr 0.01, weight
    decay 1e-4, MSE on sigmoid-squashed features (mtil/src/models/AutoEncoder.py)."""
    target = torch.sigmoid(features.detach().float())
    optimizer = torch.optim.Adam(autoencoder.parameters(), lr=0.01, weight_decay=1e-4)
    generator = torch.Generator().manual_seed(seed)
    autoencoder.train()
    for _ in range(steps):
        rows = torch.randint(0, len(target), (min(batch_size, len(target)),), generator=generator)
        batch = target[rows.to(target.device)]
        loss = F.mse_loss(autoencoder(batch), batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    autoencoder.eval()


def mixture_parameters(transformer: nn.Module) -> list[nn.Parameter]:
    chosen: list[nn.Parameter] = []
    for module in transformer.modules():
        if isinstance(module, MixtureOfAdapters):
            chosen += module.trainable_parameters()
    return chosen


register_adapter_kind("moe", add_mixtures, mixture_parameters)


# --- the method ------------------------------------------------------------------------------

class MoEAdapters(FineTuning):
    """``L = CE`` as ``ft`` (label smoothing 0.2 as published), trained only through the
    adapters: each block adds ``sum_e g_e(x_0) * A_e(x)`` to its residual stream, ``A_e`` the
    experts (``0.1 * up(relu(down(x)))``), ``g`` the task's router (softmax over the noisy top-k
    logits of the first token x_0). Each task gets a new router; experts are shared, and after
    a task the ``frozen_per_task`` experts its router chose most are frozen for good.

    ``ddas``: after each task an autoencoder learns the task's images (``ddas_steps`` Adam
    steps) and at evaluation every image takes the router of the task that reconstructs it
    best, or no adapter when its error exceeds the ``ddas_quantile`` quantile of that task's
    training errors (``TaskSelector``). Without it the latest router
    serves every input, as the reference evaluates without DDAS; the text tower always uses
    the latest router (text carries no image to discriminate).
    """

    name = "moe_adapters"

    def __init__(self, experts: int = 22, top_k: int = 2, bottleneck: int = 64,
                 frozen_per_task: int = 2, ddas: bool = False, ddas_steps: int = 300,
                 ddas_quantile: float = 0.95, label_smoothing: float = 0.2) -> None:
        super().__init__(label_smoothing=label_smoothing)
        for key, value in (("experts", experts), ("top_k", top_k), ("bottleneck", bottleneck)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise MethodConfigError(f"{key} must be a positive integer, got {value!r}")
        if top_k > experts:
            raise MethodConfigError(f"top_k ({top_k}) cannot exceed experts ({experts})")
        if isinstance(frozen_per_task, bool) or not isinstance(frozen_per_task, int) or frozen_per_task < 0:
            raise MethodConfigError(f"frozen_per_task must be an integer >= 0, got {frozen_per_task!r}")
        self.experts, self.top_k, self.bottleneck = experts, top_k, bottleneck
        self.frozen_per_task = frozen_per_task
        if isinstance(ddas_steps, bool) or not isinstance(ddas_steps, int) or ddas_steps < 1:
            raise MethodConfigError(f"ddas_steps must be a positive integer, got {ddas_steps!r}")
        if not 0.0 < float(ddas_quantile) <= 1.0:
            raise MethodConfigError(f"ddas_quantile must lie in (0, 1], got {ddas_quantile}")
        self.ddas, self.ddas_steps, self.ddas_quantile = bool(ddas), ddas_steps, float(ddas_quantile)

    def prepare_student(self, student: nn.Module, parts: str) -> None:
        add_adapters(student, {"kind": "moe", "experts": self.experts, "top_k": self.top_k,
                               "bottleneck": self.bottleneck, "routers": 0,
                               "towers": TOWERS_OF_PARTS[parts], "ddas": self.ddas, "ddas_tasks": 0})
        for mixture in mixtures(student):
            mixture.add_router()
        adapter_recipe(student)["routers"] += 1

    def after_task(self, task: TaskContext, student: nn.Module) -> None:
        with torch.no_grad():
            for mixture in mixtures(student):
                count = min(self.frozen_per_task, len(mixture.experts))
                if count:
                    mixture.frozen[mixture.usage.topk(count).indices] = True
        if self.ddas:
            self._fit_task_selector(task, student)

    def _fit_task_selector(self, task: TaskContext, student: nn.Module) -> None:
        """One more autoencoder, for this task's images; its threshold from their errors."""
        images = task.train_images
        if images is None or task.preprocess is None:
            raise ValueError("moe_adapters with ddas needs the task's training images in TaskContext")
        with torch.no_grad(), evaluation_mode(student):
            features = torch.cat([
                frozen_image_features(student.visual, task.preprocess(pixels))
                for _, pixels in images.arrays(np.arange(len(images)), 256, "ddas features")
            ]).float()
        selector = student.visual.task_selector
        autoencoder = selector.add_task()
        fit_autoencoder(autoencoder, features, self.ddas_steps, seed=task.task_index)
        with torch.no_grad():
            errors = selector.errors(features)[:, -1]
            selector.thresholds[-1] = torch.quantile(errors, self.ddas_quantile)
        adapter_recipe(student)["ddas_tasks"] += 1
