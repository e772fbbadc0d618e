"""DPW: Dynamic Prefix Weighting (CVPR 2026), built on DIKI's code and on the prefix machinery
this project shares with DIKI (``model/prefix_attention.py``: slots per task, the Gaussian task
choice and its calibrated weight at evaluation).

Follows YonseiML/dpw: clip/attention.py (``Adapter``, ``MultiheadAttention.init_attn`` and
``forward``, ``multi_head_attention_forward``), DPW/DPW.py (``inter_class_variance``,
``train_one_task``, ``CustomCLIP.forward``'s MTIL branch) and configs/mtil.yaml. In every block of
both towers a task's slot holds value-only prefixes whose weight for each token is a sigmoid gate
(no softmax over prefixes), normalised only when the gates' sum exceeds 1; the "saturation
adapter" is a bottleneck adapter of the token whose output counts only by how much the gates'
sum exceeds 1 (``rt = max(sum, 1) - 1``, attention.py:391-393, 428), so it takes over where the
prefixes saturate. A task's number of prefix heads comes from how fine-grained its classes are.

Built on the CPU: DPW moves tensors to CUDA while it builds the model (attention.py:200
``fixed_down ... .cuda()``, DPW.py:129/166 ``.cuda()`` for the prompt processor and the frozen
copy); nothing here names a device, the modules follow the model.

Not taken over: the best epoch on a validation split (as ``diki``); the gate statistics of the
image tower (the Normal of each head's class-token gate score) come from one pass over the task's
training images after training, where DPW accumulates them over the last epoch's batches while
training (attention.py:412-426).

ODCL-CIL (``evaluation.label_space: learned_tasks``, configs/odcl-cil.yaml ``is_CIL: True``):
``pooled_inference: task_confidence`` follows ``CustomCLIP.forward``'s ``is_CIL`` branch
(DPW.py:209-233) on a learnt dataset's test images: each image alone (DPW evaluates them one per
batch, DPW.py:706-713) takes its most likely task's slot at that task's confidence
``sigmoid(log p_t / 512 - 1)``; task t's class texts are encoded with slot t at the image's
confidence in t, and their logits multiplied by it; the blocks are concatenated over the learnt
tasks (``GaussianTaskSelector.select_confident``). ``routed`` (a named variant, not DPW's) gives
all pooled classes the image's chosen slot and its batch's mean weight, the MTIL rule. Datasets
not learnt yet keep their own classes and the MTIL rule, as DPW. DPW defines no inference among
all domains' classes (X-TAIL): ``label_space: all_tasks`` is refused before the run starts.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from clip_continual.methods.base import MethodConfigError, TaskContext
from clip_continual.methods.diki import DIKI, task_images
from clip_continual.model.adapters import TOWERS_OF_PARTS, adapter_recipe, register_adapter_kind
from clip_continual.model.clip import encode_text
from clip_continual.model.prefix_attention import (
    PrefixBranch, PrefixRoute, add_prefix_branches, add_slot, add_task_selector, branches_off, fit_task_gaussian,
    latest_slot_parameters, merge_heads, per_sequence, set_route, split_heads,
)

GATE_BIAS = {"visual": -4.0, "text": -2.0}  # attention.py:331-336 (by width 768 / 512)
GATES = ("full", "reduced")                   # attention.py | attention_reduced_param.py (DPW†)
REDUCED_SCORE = 0.25                          # attention_reduced_param.py:312: num_heads // 4
GATE_THRESHOLD = 1.0                          # attention.py:301
UNCERTAINTY_SWITCH = 0.825                    # attention.py:404, 408
ADAPTER_SCALE, ADAPTER_DROPOUT = 0.05, 0.1    # attention.py:293 (lr=0.05, dropout=0.1)


class DPWSlot(nn.Module):
    """One task's prefixes in one layer: ``values`` (n, E), the gate projection ``gate``
    (h, E, n), or (h, E / h, n) on each head's slice of the token with ``reduced`` gates, and
    its per-position bias (h, positions, n), the adapter's up-projection, and the Normal of each
    head's class-token gate score (buffers; image tower)."""

    def __init__(self, width: int, heads: int, length: int, positions: int, bottleneck: int,
                 reduced: bool = False) -> None:
        super().__init__()
        self.heads, self.reduced = heads, reduced
        self.values = nn.Parameter(torch.zeros(length, width))
        self.gate = nn.Parameter(torch.zeros(heads, width // heads if reduced else width, length))
        self.gate_bias = nn.Parameter(torch.zeros(heads, positions, length))
        self.up = nn.Linear(bottleneck, width)
        self.register_buffer("score_mean", torch.zeros(heads, length))
        self.register_buffer("score_var", torch.ones(heads, length))

    def initialise(self, attn: nn.MultiheadAttention, bias: float) -> None:
        """attention.py:319-351: gates from the top singular vectors of W_q W_k^T (``reduced``:
        a random orthogonal projection of each head's slice, drawn from torch's generator as
        upstream); values from those of W_v times its mean column norm; up-projection
        N(0, 0.02), bias 0 (:202-203)."""
        width, length = attn.embed_dim, self.values.shape[0]
        weight = attn.in_proj_weight.detach().float()
        w_q, w_k, w_v = weight[:width], weight[width:2 * width], weight[2 * width:]
        with torch.no_grad():
            if self.reduced:  # attention_reduced_param.py:324-328: random orthogonal, per head
                slice_width = width // self.heads
                self.gate.copy_(torch.linalg.qr(torch.randn(self.heads, slice_width, slice_width))[0][:, :, :length])
            else:
                u = torch.linalg.svd(w_q @ w_k.t())[0][:, :length * self.heads]
                self.gate.copy_(u.reshape(width, self.heads, length).permute(1, 0, 2))
            self.gate_bias.fill_(bias)
            self.values.copy_((torch.linalg.svd(w_v)[0][:, :length] * w_v.norm(dim=0).mean()).t())
            nn.init.normal_(self.up.weight, std=0.02)
            nn.init.zeros_(self.up.bias)


class GatedValuePrefix(PrefixBranch):
    """DPW's branch (attention.py:375-437, 154-173): per head ``g V_t + A(x) * rt``, with
    ``g = s / max(1, sum s)``, ``s = sigmoid(x G_t + b_t)`` per token and prefix, ``A`` the
    adapter ``0.05 * up(dropout(x D))`` (``D`` a fixed bottleneck basis) and ``rt = max(1, sum
    s) - 1``; at evaluation gates below an uncertainty are zeroed when the batch's mean weight
    is under 0.825, and the whole is scaled by the route's weight."""

    def __init__(self, attn: nn.MultiheadAttention, tower: str, length: int, positions: int, bottleneck: int,
                 basis: str, heads: list[int], gates: str = "full") -> None:
        super().__init__()
        width = attn.embed_dim
        self.tower, self.length, self.positions = tower, length, positions
        self.reduced = gates == "reduced"
        self.bottleneck = min(bottleneck, width)
        # A model loaded with its slots reads its basis from the checkpoint: no draw, no SVD then.
        self.register_buffer("down", torch.zeros(width, self.bottleneck) if heads
                             else adapter_basis(attn, self.bottleneck, basis))
        self.slots = nn.ModuleList(DPWSlot(width, h, length, positions, self.bottleneck, self.reduced) for h in heads)
        self.recording: list[torch.Tensor] | None = None

    @property
    def slot_count(self) -> int:
        return len(self.slots)

    def add_slot(self, attn: nn.MultiheadAttention, **options: Any) -> None:
        heads = int(options["heads"][self.tower])
        slot = DPWSlot(attn.embed_dim, heads, self.length, self.positions, self.bottleneck, self.reduced)
        slot.initialise(attn, GATE_BIAS[self.tower])
        self.slots.append(slot.to(attn.in_proj_weight))

    def latest_parameters(self) -> list[nn.Parameter]:
        return list(self.slots[-1].parameters()) if len(self.slots) else []

    def branch(self, tokens: torch.Tensor, attn: nn.MultiheadAttention, route: PrefixRoute) -> torch.Tensor:
        if isinstance(route.slots, int):
            return self._slot_branch(tokens, route.slots, route.weights, route.batch_weights)
        out = None
        for slot in route.slots.unique().tolist():  # a slot per image: each slot's images together
            rows = (route.slots == slot).nonzero().squeeze(1)
            part = self._slot_branch(tokens[rows], slot, _rows_of(route.weights, rows),
                                     _rows_of(route.batch_weights, rows))
            out = part.new_zeros(*tokens.shape[:2], part.shape[-1]) if out is None else out
            out[rows] = part
        return out

    def _slot_branch(self, tokens: torch.Tensor, index: int, weights: Any, batch_weights: Any) -> torch.Tensor:
        slot, count = self.slots[index], len(tokens)
        score = gate_score(tokens, slot)
        gates = torch.sigmoid(score)
        norm = (gates.sum(-1, keepdim=True) / GATE_THRESHOLD).clamp(min=1.0)
        gates = gates / norm
        if self.recording is not None:
            self.recording.append(score[:, :, 0].detach().float())
        if weights is not None:
            gates = self._drop_uncertain(gates, score, slot, weights, batch_weights, count)
        values = slot.values.view(self.length, slot.heads, -1).transpose(0, 1)  # (h, n, E / h)
        adapted = slot.up(F.dropout(tokens @ self.down, ADAPTER_DROPOUT, self.training)) * ADAPTER_SCALE
        out = gates @ values + split_heads(adapted, slot.heads) * (norm - GATE_THRESHOLD)
        if weights is not None:
            out = out * per_sequence(weights, count, out)
        return merge_heads(out)

    def _drop_uncertain(self, gates: torch.Tensor, score: torch.Tensor, slot: DPWSlot, weights: Any,
                        batch_weights: Any, count: int) -> torch.Tensor:
        """attention.py:396-410: image tower, 1 - sigmoid(log N(score_cls; mean, var)) per head
        and prefix; text tower, 1 - the weight; applied where the batch's weight is < 0.825."""
        if self.tower == "visual":
            normal = torch.distributions.Normal(slot.score_mean, slot.score_var.clamp(min=1e-6).sqrt())
            uncertainty = 1 - torch.sigmoid(normal.log_prob(score[:, :, 0].float())).unsqueeze(2).to(gates)
        else:
            uncertainty = 1 - per_sequence(weights, count, gates)
        unsure = per_sequence(batch_weights, count, gates) < UNCERTAINTY_SWITCH
        return torch.where(unsure & (gates <= uncertainty), torch.zeros_like(gates), gates)


def gate_score(tokens: torch.Tensor, slot: DPWSlot) -> torch.Tensor:
    """``x G_t + b_t`` per head, token and prefix, (b, h, l, n): over the whole token
    (attention.py:387-388), or each head over its slice of the token with reduced gates
    (attention_reduced_param.py:389-394)."""
    count, positions, width = tokens.shape
    if slot.reduced:
        slices = tokens.view(count, positions, slot.heads, width // slot.heads)
        score = torch.einsum("blhd,hdn->bhln", slices, slot.gate)
    else:
        score = torch.einsum("ble,hen->bhln", tokens, slot.gate)
    return score + slot.gate_bias[:, :positions]


def _rows_of(values: Any, rows: torch.Tensor) -> Any:
    """A per-sequence value's entries for ``rows`` (one value or None stays as it is)."""
    return values[rows] if torch.is_tensor(values) and values.ndim > 0 else values


def adapter_basis(attn: nn.MultiheadAttention, bottleneck: int, basis: str) -> torch.Tensor:
    """The adapter's fixed down-projection: the top ``bottleneck`` left singular vectors of W_v^T
    (attention.py:197-201). DPW builds the adapter before CLIP's weights are loaded, so its W_v
    is the in-projection's Xavier-uniform initialisation (``initial``, as published);
    ``pretrained`` takes the CLIP's own W_v (what the code's comment-free form suggests)."""
    width = attn.embed_dim
    if basis == "initial":
        weight = nn.init.xavier_uniform_(torch.empty(3 * width, width))
    else:
        weight = attn.in_proj_weight.detach().float().cpu()
    down = torch.linalg.svd(weight[2 * width:].t())[0][:, :bottleneck]
    return down.to(attn.in_proj_weight)


def prefix_heads(layer_heads: int, score: float, length: int, width: int) -> int:
    """attention.py:311-315: ``2 ** round(log2(int(H * score)))``, at least 1; halved while the
    heads do not divide the width or the gate needs more singular vectors than the width has
    (where DPW's reshape would fail)."""
    count = int(layer_heads * score) if math.isfinite(score) else width
    heads = 1 if count <= 0 else 2 ** round(math.log2(count))
    while heads > 1 and (width % heads or heads * length > width):
        heads //= 2
    return heads


# Recipe entries that may change between tasks.
SETTINGS = ("slots", "tasks", "heads", "batchwise", "vote_batch", "likelihood_scale", "pooled_inference")
POOLED_INFERENCE = ("task_confidence", "routed")


def add_dpw(model: nn.Module, recipe: dict[str, Any]) -> None:
    positions = {"visual": model.visual.positional_embedding.shape[0], "text": model.positional_embedding.shape[0]}
    heads = recipe.get("heads") or {}
    add_prefix_branches(model, recipe["towers"], int(recipe["depth"]), lambda attn, tower: GatedValuePrefix(
        attn, tower, int(recipe["length"]), int(positions[tower]), int(recipe["bottleneck"]),
        recipe["adapter_basis"], list(heads.get(tower, [])), recipe.get("gates", "full")))
    add_task_selector(model, recipe)


register_adapter_kind("dpw", add_dpw, latest_slot_parameters, settings=SETTINGS)


# --- how fine-grained a task is: its number of prefix heads -------------------------------------

def fine_grained_score(images: torch.Tensor, labels: torch.Tensor, texts: torch.Tensor) -> float:
    """DPW.py:363-437 on normalised frozen-CLIP features: ((inter-class variance of the images'
    class means + of the class texts) / 2) / (intra-class variance + 10 / C), over the zero-shot
    accuracy. ``labels`` index ``texts`` (C, D). Classes with one image have no intra-class pairs
    and are left out of that mean (DPW's would be NaN)."""
    accuracy = float((images @ texts.t()).argmax(dim=1).eq(labels).float().mean())
    present = labels.unique()
    intra, means = [], []
    for label in present.tolist():
        own = images[labels == label]
        means.append(F.normalize(own.mean(dim=0), dim=0))
        if len(own) > 1:
            intra.append(_off_diagonal_mean(own @ own.t()))
    means = torch.stack(means)
    intra_variance = 1 - sum(intra) / max(len(intra), 1)
    inter_images = 1 - _off_diagonal_mean(means @ means.t())
    inter_texts = 1 - _off_diagonal_mean(texts @ texts.t())
    easiness = ((inter_images + inter_texts) / 2) / (intra_variance + 10 / len(texts))
    return easiness / accuracy if accuracy > 0 else math.inf


def _off_diagonal_mean(similarities: torch.Tensor) -> float:
    mask = ~torch.eye(len(similarities), dtype=torch.bool, device=similarities.device)
    return float(similarities[mask].mean()) if mask.any() else 0.0


def frozen_class_texts(student: nn.Module, task: TaskContext) -> torch.Tensor:
    """Normalised frozen-CLIP features of the current classes' prompts (DPW.py:129, 366-370)."""
    modes = [(module, module.training) for module in student.modules()]
    student.eval()
    try:
        with torch.inference_mode(), branches_off(student):
            return F.normalize(encode_text(student, task.class_tokens[task.current_classes]).float(), dim=-1).clone()
    finally:
        for module, training in modes:
            module.training = training


@torch.no_grad()
def record_gate_statistics(student: nn.Module, task: TaskContext, batch_size: int = 256) -> None:
    """The Normal (mean, population variance) of each image-tower head's class-token gate score
    under the task's slot, over its training images (attention.py:412-426)."""
    branches = [b for b in student.visual.modules() if isinstance(b, GatedValuePrefix)]
    for branch in branches:
        branch.recording = []
    modes = [(module, module.training) for module in student.modules()]
    student.eval()
    set_route(student.visual, PrefixRoute(branches[0].slot_count - 1) if branches else None)
    try:
        images = task.train_images
        for _, arrays in images.arrays(torch.arange(len(images)).numpy(), batch_size, "gate statistics"):
            # float32 pixels; a float64 tower (exact equivalence checks) takes them as float64
            student.visual.forward(task.preprocess(arrays).to(next(student.visual.parameters()).dtype))
        for branch in branches:
            scores = torch.cat(branch.recording)
            slot = branch.slots[-1]
            slot.score_mean.copy_(scores.mean(dim=0))
            slot.score_var.copy_((scores ** 2).mean(dim=0) - scores.mean(dim=0) ** 2)
    finally:
        set_route(student.visual, None)
        for branch in branches:
            branch.recording = None
        for module, training in modes:
            module.training = training


class DynamicPrefixWeighting(DIKI):
    """``L = CE`` as ``ft`` through the task's slot; the CLIP itself stays frozen.

    Each of the first ``depth`` blocks of each tower trained (``parts``: wm both, as DPW) gets a
    slot per task: ``length`` value prefixes over that task's number of prefix heads, their
    per-token gates, and the saturation adapter (``bottleneck``; its fixed basis from
    ``adapter_basis``: ``initial``, as published, or ``pretrained``). ``gates: reduced`` is the
    published reduced-parameter DPW† (``clip/attention_reduced_param.py``, ``MTIL_reduced_param.sh``):
    a quarter of the layer's heads whatever the task, each head's gate a random orthogonal
    projection of its slice of the token; DPW† also takes ``bottleneck`` 4. The task choice at
    evaluation is DIKI's (``batchwise``, ``vote_batch``, ``likelihood_scale``: see ``diki``);
    among the classes of every learnt task (ODCL-CIL) it is ``pooled_inference``'s (module doc).
    """

    name = "dpw"
    label_spaces = ("own", "learned_tasks")  # DPW.py: the MTIL and ODCL-CIL branches only

    def __init__(
        self,
        depth: int = 12,                 # configs/mtil.yaml prompt_depth_vision / _text 12
        length: int = 8,                 # configs/mtil.yaml n_ctx_vision / _text 8
        bottleneck: int = 64,            # clip/attention.py:293 (bottleneck=64)
        adapter_basis: str = "initial",  # clip/attention.py:197-201, built before the weights load
        batchwise: bool = True,          # configs/mtil.yaml batchwise_prompt True
        vote_batch: int = 256,           # DPW.py:709-713 (test batch 256)
        likelihood_scale: float | None = None,  # DPW.py:240 (/512); null: the feature width
        label_smoothing: float = 0.0,    # DPW.py:603 F.cross_entropy
        pooled_inference: str = "task_confidence",  # DPW.py:209-233 (is_CIL); routed: a variant
        gates: str = "full",             # attention.py; reduced: DPW† (attention_reduced_param.py)
    ) -> None:
        super().__init__(depth=depth, length=length, batchwise=batchwise, vote_batch=vote_batch,
                         likelihood_scale=likelihood_scale, label_smoothing=label_smoothing)
        if pooled_inference not in POOLED_INFERENCE:
            raise MethodConfigError(f"pooled_inference must be one of {', '.join(POOLED_INFERENCE)}, "
                                    f"got {pooled_inference!r}")
        self.pooled_inference = pooled_inference
        if isinstance(bottleneck, bool) or not isinstance(bottleneck, int) or bottleneck < 1:
            raise MethodConfigError(f"bottleneck must be a positive integer, got {bottleneck!r}")
        if adapter_basis not in ("initial", "pretrained"):
            raise MethodConfigError(f"adapter_basis must be initial or pretrained, got {adapter_basis!r}")
        if gates not in GATES:
            raise MethodConfigError(f"gates must be one of {', '.join(GATES)}, got {gates!r}")
        self.bottleneck, self.adapter_basis, self.gates = bottleneck, adapter_basis, gates

    def _settings(self) -> dict[str, Any]:
        return {**super()._settings(), "pooled_inference": self.pooled_inference}

    def prepare_student(self, student: nn.Module, parts: str) -> None:
        """The branches without a slot: a task's slot is sized from its data (``prepare_for_task``)."""
        self.adapt(student, {"kind": "dpw", "depth": self.depth, "length": self.length, "heads": {},
                             "bottleneck": self.bottleneck, "adapter_basis": self.adapter_basis,
                             "gates": self.gates, "towers": TOWERS_OF_PARTS[parts]})

    def prepare_for_task(self, student: nn.Module, task: TaskContext) -> None:
        """The task's Gaussian and fine-grained score from frozen features, then its slot
        (DPW.py:532-572)."""
        images = fit_task_gaussian(student, *task_images(task))
        labels = task.label_to_current[torch.as_tensor(task.train_images.labels, device=task.device)]
        score = (REDUCED_SCORE if self.gates == "reduced"  # DPW† sets a quarter of the heads, whatever the task
                 else fine_grained_score(images, labels.to(images.device), frozen_class_texts(student, task)))
        recipe = adapter_recipe(student)
        heads = {tower: prefix_heads(int(_tower_blocks(student, tower)[0].attn.num_heads), score, self.length,
                                     int(_tower_blocks(student, tower)[0].attn.embed_dim))
                 for tower in recipe["towers"]}
        add_slot(student, heads=heads)
        recipe["heads"] = {tower: [*recipe["heads"].get(tower, []), count] for tower, count in heads.items()}
        recipe["slots"] += 1

    def after_task(self, task: TaskContext, student: nn.Module) -> None:
        if "visual" in adapter_recipe(student)["towers"]:
            record_gate_statistics(student, task)


def _tower_blocks(model: nn.Module, tower: str) -> list[nn.Module]:
    owner = model.visual if tower == "visual" else model
    return list(owner.transformer.resblocks)
