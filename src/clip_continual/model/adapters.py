"""Parameter-efficient modules on a frozen open_clip CLIP: RKR rectifiers and MoE-Adapters.

An adapted model carries its recipe (a small dict of plain values) in the attribute
``adapter_recipe``. A checkpoint stores the recipe next to the state dict, and loading applies
the recipe to a fresh model before the weights (``models.model_from_checkpoint``), so an adapted
model loads back adapted. ``models.set_trainable_parts`` trains only the adapters of an adapted
model: its backbone stays bit-for-bit frozen.

Both kinds adapt the residual blocks of the towers named by ``towers`` (``visual``, ``text``),
following the towers the reference code adapts for its ``part`` setting (wm: both).

Plain PyTorch; no Kedro import.
"""

from __future__ import annotations

import math
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from open_clip.transformer import ResidualAttentionBlock
from torch import nn
from torch.nn.utils import parametrize

RECIPE_ATTRIBUTE = "adapter_recipe"
ADAPTER_KINDS = ("rkr", "moe")
TOWERS_OF_PARTS = {"wm": ("visual", "text"), "io": ("visual",), "to": ("text",)}


class AdapterError(ValueError):
    """Adapters cannot be added or do not fit the model."""


def adapter_recipe(model: nn.Module) -> dict[str, Any] | None:
    """The recipe of the adapters ``model`` carries, or None for a plain CLIP."""
    return getattr(model, RECIPE_ATTRIBUTE, None)


def tower_transformers(model: nn.Module, towers: tuple[str, ...] | list[str]) -> dict[str, nn.Module]:
    """The transformer of each named tower (``visual``: the image tower, ``text``)."""
    found = {}
    for tower in towers:
        owner = model.visual if tower == "visual" else model if tower == "text" else None
        if owner is None:
            raise AdapterError(f"unknown tower '{tower}': use visual and/or text")
        transformer = getattr(owner, "transformer", None)
        if transformer is None or not hasattr(transformer, "resblocks"):
            raise AdapterError(f"the {tower} tower of this model has no transformer blocks to adapt")
        found[tower] = transformer
    return found


def add_adapters(model: nn.Module, recipe: dict[str, Any]) -> nn.Module:
    """Add the adapters ``recipe`` describes to ``model`` in place (idempotent for an equal
    recipe); a model that carries other adapters is refused."""
    current = adapter_recipe(model)
    if current is not None:
        if _structure(current) != _structure(recipe):
            raise AdapterError(
                f"the model already carries {current['kind']} adapters on {current['towers']}; "
                f"start from a plain CLIP to train {recipe['kind']} on {recipe['towers']}"
            )
        return model
    kind = recipe.get("kind")
    if kind == "rkr":
        _add_rectifiers(model, int(recipe["rank"]), recipe["towers"])
    elif kind == "moe":
        _add_mixtures(model, recipe)
    else:
        raise AdapterError(f"unknown adapter kind {kind!r}; known: {', '.join(ADAPTER_KINDS)}")
    setattr(model, RECIPE_ATTRIBUTE, {**recipe, "towers": list(recipe["towers"])})
    return model


def _structure(recipe: dict[str, Any]) -> dict[str, Any]:
    """What must match for a model's adapters to continue under a recipe (a MoE model gains
    routers task by task)."""
    return {key: list(value) if key == "towers" else value
            for key, value in recipe.items() if key not in ("routers", "ddas_tasks")}


def adapter_parameters(model: nn.Module, towers: tuple[str, ...] | list[str]) -> list[nn.Parameter]:
    """The trainable adapter parameters within ``towers`` (frozen MoE experts excluded)."""
    recipe = adapter_recipe(model)
    if recipe is None:
        return []
    chosen: list[nn.Parameter] = []
    for tower, transformer in tower_transformers(model, [t for t in towers if t in recipe["towers"]]).items():
        for module in transformer.modules():
            if isinstance(module, Rectifier):
                chosen += list(module.parameters())
            elif isinstance(module, MixtureOfAdapters):
                chosen += module.trainable_parameters()
    return chosen


# --- RKR: a rank-r branch and a per-output-channel scale on every linear layer --------------

class Rectifier(nn.Module):
    """The weight parametrization ``W -> diag(s) (W + U D)`` of one linear layer.

    CL-CLIP (models/clip_rkr.py, LoraInjectedLinear) computes ``(W x + b + U D x) * s``: a
    rank-r branch ``U D`` beside the frozen layer and a per-output-channel scale ``s`` of the
    sum. As a parametrization the same numbers reach every caller of ``weight``, including
    ``nn.MultiheadAttention``, which reads ``out_proj.weight`` rather than calling the layer.
    Initialisation as CL-CLIP: D zeros (so the branch starts at zero), U as ``nn.Linear(r,
    out)``'s default, s ones; CL-CLIP injects with dropout 0.
    """

    def __init__(self, out_features: int, in_features: int, rank: int) -> None:
        super().__init__()
        if not 1 <= rank <= min(out_features, in_features):
            raise AdapterError(
                f"RKR rank {rank} must lie in [1, {min(out_features, in_features)}] for a "
                f"{in_features} -> {out_features} layer"
            )
        self.down = nn.Parameter(torch.zeros(rank, in_features))
        self.up = nn.Parameter(torch.empty(out_features, rank))
        nn.init.kaiming_uniform_(self.up, a=math.sqrt(5))
        self.scale = nn.Parameter(torch.ones(out_features))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return self.scale.unsqueeze(1) * (weight + self.up @ self.down)


class _ScaledBias(nn.Module):
    """The bias parametrization ``b -> s * b`` with the scale of the layer's ``Rectifier``
    (held outside the module tree, so the scale is stored and trained once)."""

    def __init__(self, rectifier: Rectifier) -> None:
        super().__init__()
        self.__dict__["rectifier"] = rectifier

    def forward(self, bias: torch.Tensor) -> torch.Tensor:
        return self.rectifier.scale * bias


def _add_rectifiers(model: nn.Module, rank: int, towers: list[str]) -> None:
    # CL-CLIP adapts every nn.Linear inside the residual blocks (attention output, MLP in and
    # out); the fused q/k/v projection of CLIP's attention is a raw parameter, left frozen there.
    for transformer in tower_transformers(model, towers).values():
        linears = [m for m in transformer.modules() if isinstance(m, nn.Linear)]
        for layer in linears:
            rectifier = Rectifier(layer.out_features, layer.in_features, rank).to(layer.weight)
            parametrize.register_parametrization(layer, "weight", rectifier)
            if layer.bias is not None:
                parametrize.register_parametrization(layer, "bias", _ScaledBias(rectifier))


# --- MoE-Adapters: top-k routed adapter experts beside each block's MLP ----------------------

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


def _add_mixtures(model: nn.Module, recipe: dict[str, Any]) -> None:
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
