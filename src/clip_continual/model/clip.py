"""The CLIP model: an open_clip model with its tokenizer and image normalisation, how it is
made from open_clip, which of its parts train, and its text and image encoders.

Plain Python and PyTorch; no Kedro import.
"""

from __future__ import annotations

import copy
import functools
import json
import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from torch import nn

from clip_continual.model.adapters import (
    TOWERS_OF_PARTS, adapter_kind, adapter_parameters, adapter_recipe, evaluation_ensemble,
)

PACKAGED_CONFIG_DIR = Path(__file__).parent / "model_configs"
TRAINABLE_PARTS = ("wm", "io", "to")


class ModelError(RuntimeError):
    """A model cannot be built or loaded; the message says why and what to do."""


@dataclass(frozen=True)
class ModelSpec:
    """What to build: an open_clip architecture name and where its weights come from.

    ``pretrained`` is None (random init), an open_clip tag such as ``openai``, or a local file
    (an open_clip/OpenAI state dict or one of our checkpoints).
    """

    architecture: str
    pretrained: str | None = None
    cache_dir: str | None = None


@dataclass
class ClipModel:
    """An open_clip CLIP with the tokenizer and image normalisation that belong to it."""

    spec: ModelSpec
    model: nn.Module
    model_config: dict[str, Any]
    tokenizer: Any
    image_mean: tuple[float, ...]
    image_std: tuple[float, ...]
    metadata: dict[str, Any] = field(default_factory=dict)
    # (path, modification time, size) of the checkpoint this object was loaded from, so that
    # saving it back unchanged is skipped; a clone (what training changes) has none.
    origin: tuple[str, int, int] | None = field(default=None, compare=False, repr=False)

    @property
    def image_size(self) -> int:
        size = self.model.visual.image_size
        return int(size[0] if isinstance(size, (tuple, list)) else size)

    @property
    def context_length(self) -> int:
        return int(self.model.context_length)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def tokenize(self, texts: list[str] | tuple[str, ...]) -> torch.Tensor:
        return self.tokenizer(list(texts))

    def preprocess(self, images: np.ndarray, device: torch.device | str | None = None) -> torch.Tensor:
        """uint8 (N, H, W, 3) images -> normalised float (N, 3, S, S) at the model's resolution."""
        return preprocess_images(
            images, self.image_size, self.image_mean, self.image_std, device or self.device
        )

    def clone(self) -> ClipModel:
        """An independent copy (new parameters), for a student that must not touch its input."""
        return ClipModel(
            spec=self.spec,
            model=copy.deepcopy(self.model),
            model_config=copy.deepcopy(self.model_config),
            tokenizer=self.tokenizer,
            image_mean=self.image_mean,
            image_std=self.image_std,
            metadata=copy.deepcopy(self.metadata),
        )


def preprocess_images(
    images: np.ndarray,
    image_size: int,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected images of shape (N, H, W, 3), got {images.shape}")
    x = torch.from_numpy(np.ascontiguousarray(images)).to(device)
    x = x.permute(0, 3, 1, 2).float().div_(255.0)
    if x.shape[-2:] != (image_size, image_size):
        x = F.interpolate(x, size=(image_size, image_size), mode="bicubic", antialias=True,
                          align_corners=False).clamp_(0.0, 1.0)
    mean_t = torch.tensor(mean, device=x.device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, device=x.device).view(1, 3, 1, 1)
    return (x - mean_t) / std_t


# --- made from open_clip -------------------------------------------------------------

class _QuietRandomInit(logging.Filter):
    """open_clip warns 'No pretrained weights loaded' whenever it builds a model we are about to
    fill from a checkpoint or deliberately initialise at random; that warning would mislead."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "No pretrained weights loaded" not in record.getMessage()


def create_open_clip_model(architecture: str, pretrained: str | None, **kwargs: Any) -> nn.Module:
    quiet = _QuietRandomInit()
    root = logging.getLogger()
    root.addFilter(quiet)
    try:
        return open_clip.create_model(architecture, pretrained=pretrained, **kwargs)
    finally:
        root.removeFilter(quiet)


_packaged_registered = False


def register_packaged_configs() -> None:
    """Make the architectures shipped with this package known to open_clip (idempotent)."""
    global _packaged_registered
    if not _packaged_registered:
        open_clip.add_model_config(PACKAGED_CONFIG_DIR)
        _packaged_registered = True


def register_config(architecture: str, model_config: dict[str, Any]) -> None:
    """Register an architecture carried inside a checkpoint, so it loads anywhere."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{architecture}.json"
        path.write_text(json.dumps(model_config))
        open_clip.add_model_config(path)


@functools.lru_cache(maxsize=8)
def _tokenizer(architecture: str) -> Any:
    """One tokenizer per architecture: building one reads the BPE vocabulary (about a second),
    and every checkpoint loaded in a run would otherwise build its own."""
    return open_clip.get_tokenizer(architecture)


def wrap_open_clip(spec: ModelSpec, model: nn.Module, model_config: dict[str, Any],
          metadata: dict[str, Any] | None = None) -> ClipModel:
    preprocess_cfg = open_clip.get_model_preprocess_cfg(model)
    return ClipModel(
        spec=spec,
        model=model,
        model_config=model_config,
        tokenizer=_tokenizer(spec.architecture),
        image_mean=tuple(float(v) for v in preprocess_cfg.get("mean", open_clip.OPENAI_DATASET_MEAN)),
        image_std=tuple(float(v) for v in preprocess_cfg.get("std", open_clip.OPENAI_DATASET_STD)),
        metadata=dict(metadata or {}),
    )


# --- parts and freezing -------------------------------------------------------------------

def text_tower_parameters(model: nn.Module) -> list[nn.Parameter]:
    visual_ids = {id(p) for p in model.visual.parameters()}
    return [
        p for name, p in model.named_parameters()
        if id(p) not in visual_ids and not name.startswith("logit_")
    ]


def set_trainable_parts(model: nn.Module, parts: str) -> list[nn.Parameter]:
    """Freeze all but ``parts`` (wm: whole model incl. logit scale, io: image, to: text).

    A model with adapters (``model.adapters``) trains only its adapters within
    ``parts``; its backbone stays frozen (unless its kind trains the backbone: ConDU's full
    fine-tuning). Returns the trainable parameters, the only ones the
    optimizer should hold.
    """
    if parts not in TRAINABLE_PARTS:
        raise ValueError(f"unknown parts '{parts}': choose one of {', '.join(TRAINABLE_PARTS)}")
    recipe = adapter_recipe(model)
    if recipe is not None and not adapter_kind(recipe["kind"]).trains_backbone(recipe):
        chosen = adapter_parameters(model, TOWERS_OF_PARTS[parts])
    elif parts == "wm":
        chosen = list(model.parameters())
    elif parts == "io":
        chosen = list(model.visual.parameters())
    else:
        chosen = text_tower_parameters(model)
    chosen_ids = {id(p) for p in chosen}
    for p in model.parameters():
        p.requires_grad_(id(p) in chosen_ids)
    return chosen


def freeze(model: nn.Module) -> nn.Module:
    """Eval mode and no gradients: a teacher."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


# --- text encoding ------------------------------------------------------------------------

def _last_block_at(block: nn.Module, x: torch.Tensor, rows: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """A residual attention block's output at one position per sequence (``rows``), with keys
    and values from the whole sequence: the same numbers as the full block at those positions."""
    batch = torch.arange(x.shape[0], device=x.device)
    h = block.ln_1(x)
    query_mask = mask[rows].repeat_interleave(block.attn.num_heads, dim=0).unsqueeze(1)
    attended = block.attn(h[batch, rows].unsqueeze(1), h, h, need_weights=False,
                          attn_mask=query_mask.to(h.dtype))[0]
    y = x[batch, rows].unsqueeze(1) + block.ls_1(attended)
    y = y + block.ls_2(block.mlp(block.ln_2(y)))
    return y[:, 0]


def _plain_text_blocks(model: nn.Module) -> bool:
    transformer = model.transformer
    return (
        isinstance(transformer, open_clip.transformer.Transformer)
        and transformer.batch_first
        and not transformer.grad_checkpointing
        and all(type(block) is open_clip.transformer.ResidualAttentionBlock
                and not hasattr(block, "ln_1_kv") for block in transformer.resblocks)
    )


def encode_text(model: nn.Module, tokens: torch.Tensor, normalize: bool = True) -> torch.Tensor:
    """CLIP text features with only the work the pooled feature depends on.

    CLIP's text transformer is causal and pools at the EOT token (the largest id), so (1) the
    padding after the batch's longest sequence cannot change any pooled feature, and (2) the
    last block is needed at the EOT position only. Skipping both is exact. Falls back to
    open_clip for towers we do not know. A model with task experts encodes at evaluation as
    its experts do (``adapters.evaluation_ensemble``).
    """
    experts = evaluation_ensemble(model)
    if experts is not None:
        return experts.encode_text(model, tokens, normalize)
    if not hasattr(model, "token_embedding") or getattr(model, "text_pool_type", "argmax") != "argmax":
        return model.encode_text(tokens, normalize=normalize)
    nonzero = (tokens != 0).any(dim=0).nonzero()
    length = int(nonzero.max()) + 1 if len(nonzero) else 1
    tokens = tokens[:, :length]
    eot = tokens.argmax(dim=-1)
    mask = model.attn_mask[:length, :length]
    cast_dtype = model.transformer.get_cast_dtype()
    x = model.token_embedding(tokens).to(cast_dtype)
    x = x + model.positional_embedding[:length].to(cast_dtype)
    if _plain_text_blocks(model):
        for block in model.transformer.resblocks[:-1]:
            x = block(x, attn_mask=mask)
        x = _last_block_at(model.transformer.resblocks[-1], x, eot, mask)
    else:
        x = model.transformer(x, attn_mask=mask)
        x = x[torch.arange(x.shape[0], device=x.device), eot]
    x = model.ln_final(x)
    if model.text_projection is not None:
        x = model.text_projection(x) if isinstance(model.text_projection, nn.Linear) else x @ model.text_projection
    return F.normalize(x, dim=-1) if normalize else x


def encode_images(model: nn.Module, pixels: torch.Tensor, normalize: bool = True) -> torch.Tensor:
    experts = evaluation_ensemble(model)  # as encode_text
    if experts is not None:
        return experts.encode_images(model, pixels, normalize)
    # Pixels arrive in float32; a float64 tower (exact equivalence checks) takes them as float64.
    weights_dtype = next(model.visual.parameters()).dtype
    if weights_dtype == torch.float64:
        pixels = pixels.to(weights_dtype)
    return model.encode_image(pixels, normalize=normalize)


def full_precision(values: torch.Tensor) -> torch.Tensor:
    """At least float32: half-precision results (autocast) are raised to float32 for the losses;
    float32 and float64 stay as they are."""
    return values.float() if values.dtype in (torch.float16, torch.bfloat16) else values


# --- devices ----------------------------------------------------------------------------

def resolve_device(requested: str | None = "auto") -> torch.device:
    if requested in (None, "", "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(requested)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelError(f"device '{requested}' was asked for but CUDA is not available; use 'auto' or 'cpu'")
    return device
