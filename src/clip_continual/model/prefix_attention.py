"""Residual prefix attention with one prefix slot per task, chosen per image by task Gaussians:
the machinery DIKI (Tang et al., ECCV 2024) and DPW (CVPR 2026, built on DIKI's code) share.

A prefixed block keeps open_clip's attention exactly and adds a second branch beside it: the
block's queries read the current slot's prefixes (each method says how, as a ``PrefixBranch``)
and the branch's output, projected by the block's own ``out_proj`` weight, is added to the
frozen attention output (DIKI clip/attention.py:137-144, multi_head_attention_forward: the prefix
output joins before the out-projection, whose bias the frozen branch already carries). Blocks are
converted in place (``__class__``), so the backbone's state-dict keys stay those of the plain CLIP.

Which slot: while training, the latest (the task being learnt) at full weight; at evaluation the
``GaussianTaskSelector`` (``visual.task_selector``, the ``model.adapters.image_routing``
protocol) picks it: one Gaussian (mean, full covariance + 1e-7 I) of the frozen CLIP's normalised
image features per learnt task (DIKI/DIKI.py:361-376), each test image's most likely task, by
majority within a test batch when ``batchwise`` (DIKI.py:168-180); the branch is scaled by
``sigmoid(log p / scale - 1)``, per image in the image tower and by the batch's mean in the text
tower (DIKI.py:171-173). DIKI divides by 512, the feature width of its ViT-B/16; ``scale`` null
divides by this model's feature width (the same 512 there). With no task learnt the model is
exactly the frozen CLIP. The frozen CLIP's features are the image tower's with every branch off
(DIKI keeps a second, prompt-free copy of the tower for them; the backbone is frozen, so they are
the same numbers).

Plain PyTorch; no Kedro import.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from open_clip.transformer import ResidualAttentionBlock
from torch import nn

from clip_continual.model.adapters import AdapterError, evaluated_task, tower_transformers

COVARIANCE_RIDGE = 1e-7  # DIKI/DIKI.py:373 (covar += eye * 1e-7)


@dataclass(frozen=True)
class PrefixRoute:
    """Which slot each sequence of a forward reads and how much of its branch counts: ``slots``
    (B,) or one int for all; ``weights`` (B,) or one float, None for full weight;
    ``batch_weights`` the mean weight of each sequence's test batch (DPW's uncertainty switch)."""

    slots: torch.Tensor | int
    weights: torch.Tensor | float | None = None
    batch_weights: torch.Tensor | float | None = None


class PrefixBranch(nn.Module):
    """The per-task prefixes of one attention layer. Subclasses hold the slots and compute the
    branch (``branch``); this base decides which slot applies (``route``, else the latest slot
    while training, else none: the frozen attention alone)."""

    def __init__(self) -> None:
        super().__init__()
        self.route: PrefixRoute | None = None
        self.bypass = False

    @property
    def slot_count(self) -> int:
        raise NotImplementedError

    def add_slot(self, attn: nn.MultiheadAttention, **options: Any) -> None:
        raise NotImplementedError

    def latest_parameters(self) -> list[nn.Parameter]:
        """The trainable parameters of the latest slot (earlier tasks' slots stay as learnt)."""
        raise NotImplementedError

    def branch(self, tokens: torch.Tensor, attn: nn.MultiheadAttention, route: PrefixRoute) -> torch.Tensor:
        """(B, L, E) branch output before the out-projection, for batch-first ``tokens`` (the
        block's normalised input)."""
        raise NotImplementedError

    def active_route(self) -> PrefixRoute | None:
        if self.bypass or self.slot_count == 0:
            return None
        if self.route is not None:
            return self.route
        return PrefixRoute(self.slot_count - 1) if self.training else None

    def forward(self, tokens: torch.Tensor, attn: nn.MultiheadAttention) -> torch.Tensor | None:
        route = self.active_route()
        return None if route is None else self.branch(tokens, attn, route)


class PrefixBlock(ResidualAttentionBlock):
    """open_clip's residual block whose attention output gains ``out_proj.weight @ prefix(x)``."""

    prefix: PrefixBranch

    def attention(self, q_x: torch.Tensor, k_x: torch.Tensor | None = None, v_x: torch.Tensor | None = None,
                  attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        out = super().attention(q_x, k_x, v_x, attn_mask)
        tokens = q_x if self.attn.batch_first else q_x.transpose(0, 1)
        extra = self.prefix(tokens, self.attn)
        if extra is None:
            return out
        extra = F.linear(extra, self.attn.out_proj.weight)
        return out + (extra if self.attn.batch_first else extra.transpose(0, 1))


def add_prefix_branches(model: nn.Module, towers: list[str] | tuple[str, ...], depth: int,
                        make: Callable[[nn.MultiheadAttention, str], PrefixBranch]) -> None:
    """Convert the first ``depth`` blocks of each tower (all when it has fewer, as DIKI's
    ``prompts_needed > i``, clip/model.py:214-217) and give each the branch ``make(attn, tower)``."""
    for tower, transformer in tower_transformers(model, towers).items():
        for block in list(transformer.resblocks)[:depth]:
            if type(block) is not ResidualAttentionBlock:
                raise AdapterError(f"prefix attention supports open_clip's ResidualAttentionBlock, "
                                   f"not {type(block).__name__}")
            like = block.attn.in_proj_weight
            branch = make(block.attn, tower).to(device=like.device, dtype=like.dtype)
            block.__class__ = PrefixBlock
            block.add_module("prefix", branch)


def prefix_branches(module: nn.Module) -> list[PrefixBranch]:
    return [m for m in module.modules() if isinstance(m, PrefixBranch)]


def latest_slot_parameters(transformer: nn.Module) -> list[nn.Parameter]:
    return [p for branch in prefix_branches(transformer) for p in branch.latest_parameters()]


def add_slot(model: nn.Module, **options: Any) -> None:
    """One more task slot in every branch of the model (``options``: what the branch's
    ``add_slot`` takes besides the attention)."""
    for block in model.modules():
        if isinstance(block, PrefixBlock):
            block.prefix.add_slot(block.attn, **options)


@contextlib.contextmanager
def branches_off(module: nn.Module) -> Iterator[None]:
    """The frozen CLIP within the block: every prefix branch bypassed. Nested blocks restore what
    they found (the routing hook computes frozen features inside a caller's block)."""
    branches = prefix_branches(module)
    found = [branch.bypass for branch in branches]
    for branch in branches:
        branch.bypass = True
    try:
        yield
    finally:
        for branch, bypass in zip(branches, found):
            branch.bypass = bypass


def set_route(module: nn.Module, route: PrefixRoute | None) -> None:
    for branch in prefix_branches(module):
        branch.route = route


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, L, E) -> (B, heads, L, E / heads)."""
    return x.unflatten(-1, (heads, x.shape[-1] // heads)).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(B, heads, L, d) -> (B, L, heads * d)."""
    return x.transpose(1, 2).flatten(2)


def queries(tokens: torch.Tensor, attn: nn.MultiheadAttention) -> torch.Tensor:
    """The attention's own query projection of ``tokens`` (in_proj rows 0..E, with bias)."""
    width = attn.embed_dim
    bias = None if attn.in_proj_bias is None else attn.in_proj_bias[:width]
    return F.linear(tokens, attn.in_proj_weight[:width], bias)


def per_sequence(values: torch.Tensor | float, count: int, like: torch.Tensor) -> torch.Tensor:
    """A (count, 1, 1, 1) factor from one value or one per sequence."""
    values = torch.as_tensor(values, dtype=like.dtype, device=like.device)
    return values.expand(count).reshape(count, 1, 1, 1) if values.ndim == 0 else values.reshape(count, 1, 1, 1)


def slot_rows(stacked: torch.Tensor, slots: torch.Tensor | int, count: int) -> torch.Tensor:
    """The slot of each of ``count`` sequences from (T, ...) stacked slots."""
    if isinstance(slots, int):
        return stacked[slots].unsqueeze(0).expand(count, *stacked.shape[1:])
    return stacked[slots.to(stacked.device)]


# --- choosing a task per test image ----------------------------------------------------------------

class GaussianTaskSelector(nn.Module):
    """One Gaussian per learnt task over the frozen CLIP's normalised image features (buffers,
    so checkpoints keep them), and the choice of a slot and weight for each test image.

    Evaluation reads the protocol of ``model.adapters.image_routing``: every test batch (chunk of
    ``vote_batch`` images) becomes routes of its own, each a (slot, text weight) pair, since the
    text tower's weight is the batch's mean (class texts are encoded once per route)."""

    single_use_routes = True  # every chunk of images gets new routes: its classifiers can go after it

    def __init__(self, features: int, tasks: int = 0, batchwise: bool = True, vote_batch: int = 256,
                 scale: float | None = None, pooled_inference: str = "routed") -> None:
        super().__init__()
        self.features = features
        self.register_buffer("means", torch.zeros(tasks, features))
        self.register_buffer("covariances", torch.eye(features).repeat(tasks, 1, 1))
        self.batchwise, self.vote_batch, self.scale = bool(batchwise), int(vote_batch), scale
        self.pooled_inference = pooled_inference
        # route -> (slot, text weight), or for a task-confidence route (None, each task's confidence)
        self.table: dict[int, tuple[int | None, Any]] = {}
        self.last_routes: torch.Tensor | None = None
        self.class_weights: torch.Tensor | None = None  # the confidences of the text route in force

    @property
    def active(self) -> bool:
        return len(self.means) > 0

    def add_task(self, features: torch.Tensor) -> None:
        """The Gaussian of one task's (N, D) normalised features (DIKI.py:369-376)."""
        features = features.float()
        if len(features) < 2:
            raise ValueError("a task Gaussian needs at least two training images")
        mean = features.mean(dim=0)
        delta = features - mean
        covariance = delta.t() @ delta / (len(features) - 1)
        covariance += torch.eye(self.features, device=covariance.device) * COVARIANCE_RIDGE
        self.means = torch.cat([self.means, mean.to(self.means).unsqueeze(0)])
        self.covariances = torch.cat([self.covariances, covariance.to(self.covariances).unsqueeze(0)])

    def log_likelihoods(self, features: torch.Tensor) -> torch.Tensor:
        """(B, T) log-density of each image's features under each task's Gaussian."""
        with torch.autocast(features.device.type, enabled=False):  # densities in fp32, as DIKI.py:369
            try:
                gaussians = torch.distributions.MultivariateNormal(self.means, self.covariances)
            except (ValueError, RuntimeError) as error:  # a covariance that is not positive definite
                raise ValueError(f"a task Gaussian is degenerate ({error}); its task had too few distinct "
                                 "training images for the feature width") from error
            return gaussians.log_prob(features.float().unsqueeze(1))

    def confidences(self, features: torch.Tensor) -> torch.Tensor:
        """(B, T) ``sigmoid(log p / scale - 1)`` of each image under each task (DIKI.py:171-172)."""
        return torch.sigmoid(self.log_likelihoods(features) / (self.scale or self.features) - 1.0)

    def choose(self, features: torch.Tensor) -> PrefixRoute:
        """Each image's slot and weight, and its batch's mean weight, for one test batch."""
        weights, slots = self.confidences(features).max(dim=1)  # sigmoid is monotone: the most likely task
        if self.batchwise:  # DIKI.py:176-180: the batch's most frequent task (ties: the lower)
            slots = torch.full_like(slots, int(torch.bincount(slots).argmax()))
        batch = weights.mean().expand(len(weights))
        return PrefixRoute(slots, weights, batch)

    def select(self, features: torch.Tensor, mixed_batches: bool = False) -> PrefixRoute:
        """``choose`` per chunk of ``vote_batch`` images, or per image where the test batches mix
        tasks (``EvaluatedTask.mixed_batches``: a batch of one, as DPW evaluates the learnt tasks
        of its class-incremental protocol, DPW/DPW.py ``get_dataloader``); records each image's
        route."""
        chosen = [self.choose(chunk) for chunk in features.split(1 if mixed_batches else self.vote_batch)]
        routes = []
        for route in chosen:
            text_weight = float(route.batch_weights[0])
            ids = {slot: self._route_id(slot, text_weight) for slot in route.slots.unique().tolist()}
            routes.append(torch.tensor([ids[s] for s in route.slots.tolist()], dtype=torch.long))
        self.last_routes = torch.cat(routes).to(features.device)
        return PrefixRoute(*(torch.cat([getattr(r, key) for r in chosen])
                             for key in ("slots", "weights", "batch_weights")))

    def select_confident(self, features: torch.Tensor) -> PrefixRoute:
        """DPW's ODCL-CIL rule (DPW/DPW.py:209-233, ``is_CIL`` on a learnt task's test images, one
        image per batch, ``get_dataloader``): each image alone takes its most likely task's slot
        at that task's confidence, and a route of its own that keeps every task's confidence, by
        which the text tower encodes task t's classes with slot t and the classifier scales their
        block (``text_route``, ``class_weight``)."""
        confidences = self.confidences(features)
        weights, slots = confidences.max(dim=1)
        self.last_routes = torch.tensor([self._route_id(None, row) for row in confidences.cpu()],
                                        dtype=torch.long, device=features.device)
        return PrefixRoute(slots, weights, weights)

    def _route_id(self, slot: int | None, text_weight: Any) -> int:
        route = len(self.table)
        self.table[route] = (slot, text_weight)
        return route

    def class_weight(self, task: int) -> Any:
        """The factor of task ``task``'s class block under the text route in force: its
        confidence under a task-confidence route (DPW.py:230 ``logit *= task_confidence``), else 1."""
        return 1.0 if self.class_weights is None else float(self.class_weights[task])

    def routes(self) -> list[int]:
        return list(self.table)

    @contextlib.contextmanager
    def text_route(self, model: nn.Module, route: int) -> Iterator[None]:
        """Encode text with the route's slot, scaled by its batch's mean weight (DIKI.py:173); under
        a task-confidence route, task t's class names with slot t at its confidence (DPW.py:224-227)."""
        slot, weight = self.table[route]
        if slot is not None:
            set_route(model.transformer, PrefixRoute(slot, weight, weight))
            hook = None
        else:
            self.class_weights = weight
            hook = model.token_embedding.register_forward_pre_hook(
                lambda *_: set_route(model.transformer, self._class_task_route(model)))
        try:
            yield
        finally:
            set_route(model.transformer, None)
            self.class_weights = None
            if hook is not None:
                hook.remove()

    def _class_task_route(self, model: nn.Module) -> PrefixRoute | None:
        """The slot of the task whose class names the text tower is encoding, at its confidence."""
        task = evaluated_task(model).classes
        if task is None or task >= len(self.class_weights):
            return None
        confidence = float(self.class_weights[task])
        return PrefixRoute(task, confidence, confidence)

    def confident_rule_applies(self, told: Any) -> bool:
        """DPW's rule is for a learnt dataset's images among the classes of every learnt task."""
        learnt = tuple(range(len(self.means)))
        return (self.pooled_inference == "task_confidence" and told.label_space == "learned_tasks"
                and told.candidates == learnt)


def add_task_selector(model: nn.Module, recipe: dict[str, Any]) -> GaussianTaskSelector:
    visual = model.visual
    selector = GaussianTaskSelector(int(visual.output_dim), int(recipe.get("tasks", 0)))
    like = next(visual.parameters())
    visual.add_module("task_selector", selector.to(like.device))
    visual.register_forward_pre_hook(_route_images)
    visual.register_forward_hook(_forget_routes)
    configure_selector(selector, recipe)
    return selector


def configure_selector(selector: GaussianTaskSelector, recipe: dict[str, Any]) -> None:
    selector.batchwise = bool(recipe.get("batchwise", True))
    selector.pooled_inference = str(recipe.get("pooled_inference") or "routed")
    selector.vote_batch = int(recipe.get("vote_batch", 256))
    scale = recipe.get("likelihood_scale")
    selector.scale = None if scale is None else float(scale)


@torch.no_grad()
def frozen_image_features(visual: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """The frozen CLIP's normalised features: the image tower with every branch off."""
    if next(visual.parameters()).dtype == torch.float64:  # as encode_images: a float64 tower's checks
        pixels = pixels.double()
    with branches_off(visual):
        return F.normalize(visual.forward(pixels).float(), dim=-1)


def frozen_training_features(model: nn.Module, images: Any, preprocess: Callable[[Any], torch.Tensor],
                             batch_size: int = 256) -> torch.Tensor:
    """(N, D) frozen-CLIP features of a task's training images (``TaskImages``), read with the
    test transform as DIKI's train loader does (DIKI/utils.py:35-36), in eval mode."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        with torch.inference_mode():
            chunks = [frozen_image_features(model.visual, preprocess(arrays))
                      for _, arrays in images.arrays(torch.arange(len(images)).numpy(), batch_size, "features")]
    finally:
        for module, training in modes:
            module.training = training
    return torch.cat(chunks).clone()


def fit_task_gaussian(model: nn.Module, images: Any, preprocess: Callable[[Any], torch.Tensor]) -> torch.Tensor:
    """Store the Gaussian of a task's training images' frozen-CLIP features with the model,
    before training (DIKI.py:361-376; DPW.py:557-572); returns those features."""
    features = frozen_training_features(model, images, preprocess)
    model.visual.task_selector.add_task(features)
    model.adapter_recipe["tasks"] += 1
    return features


def _route_images(visual: nn.Module, args: tuple) -> None:
    """Before an evaluation forward of the image tower: each image's slot and weight."""
    selector = visual.task_selector
    selector.last_routes = None
    if visual.training or not selector.active:
        return
    features = frozen_image_features(visual, args[0])
    told = evaluated_task(visual)
    confident = selector.confident_rule_applies(told)
    set_route(visual, selector.select_confident(features) if confident
              else selector.select(features, told.mixed_batches))


def _forget_routes(visual: nn.Module, args: tuple, output: torch.Tensor) -> None:
    set_route(visual, None)


__all__ = [
    "GaussianTaskSelector", "PrefixBlock", "PrefixBranch", "PrefixRoute", "add_prefix_branches", "add_slot",
    "add_task_selector", "branches_off", "configure_selector", "fit_task_gaussian", "frozen_image_features",
    "frozen_training_features",
    "latest_slot_parameters",
    "merge_heads", "per_sequence", "prefix_branches", "queries", "set_route", "slot_rows", "split_heads",
]
