"""open_clip models: build from a config, freeze parts, (de)serialise checkpoints.

Plain Python and PyTorch; no Kedro import.
"""

from __future__ import annotations

import copy
import functools
import json
import logging
import os
import socket
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from torch import nn

from clip_continual.adapters import (
    TOWERS_OF_PARTS, AdapterError, adapter_parameters, adapter_recipe, add_adapters,
)
from clip_continual.files import atomic_write

logger = logging.getLogger(__name__)

PACKAGED_CONFIG_DIR = Path(__file__).parent / "model_configs"
CHECKPOINT_FORMAT = "clip-continual/1"
TRAINABLE_PARTS = ("wm", "io", "to")
WEIGHT_FILE_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")
NETWORK_PROBE_TIMEOUT_S = 3.0


class ModelError(RuntimeError):
    """A model cannot be built or loaded; the message says why and what to do."""


class UnknownArchitectureError(ModelError):
    pass


class PretrainedWeightsUnavailable(ModelError):
    pass


class CheckpointError(ModelError):
    pass


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


class _QuietRandomInit(logging.Filter):
    """open_clip warns 'No pretrained weights loaded' whenever it builds a model we are about to
    fill from a checkpoint or deliberately initialise at random; that warning would mislead."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "No pretrained weights loaded" not in record.getMessage()


def _create_open_clip_model(architecture: str, pretrained: str | None, **kwargs: Any) -> nn.Module:
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


def _register_config(architecture: str, model_config: dict[str, Any]) -> None:
    """Register an architecture carried inside a checkpoint, so it loads anywhere."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{architecture}.json"
        path.write_text(json.dumps(model_config))
        open_clip.add_model_config(path)


def model_config_for(architecture: str) -> dict[str, Any]:
    register_packaged_configs()
    config = open_clip.get_model_config(architecture)
    if config is None:
        known = ", ".join(sorted(open_clip.list_models())[:12])
        raise UnknownArchitectureError(
            f"unknown CLIP architecture '{architecture}'. Use an open_clip model name "
            f"(e.g. {known}, ...; see open_clip.list_models()) or one shipped with "
            f"clip_continual: {', '.join(sorted(p.stem for p in PACKAGED_CONFIG_DIR.glob('*.json')))}."
        )
    return copy.deepcopy(config)


def _host_reachable(host: str, port: int = 443, timeout: float = NETWORK_PROBE_TIMEOUT_S) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _cached_hub_file(hf_hub: str, cache_dir: str | None) -> str | None:
    """The local path of a hub weight file already in the Hugging Face cache, else None."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - huggingface_hub ships with open_clip
        return None
    repo_id, filename = os.path.split(hf_hub)
    # open_clip prefers a .safetensors twin of a .bin, and falls back to its default names.
    names = [filename] if filename else []
    names += [name[: -len(".bin")] + ".safetensors" for name in names if name.endswith(".bin")]
    names += ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
    for name in dict.fromkeys(names):
        found = try_to_load_from_cache(repo_id=repo_id, filename=name, cache_dir=cache_dir)
        if isinstance(found, str) and os.path.isfile(found):
            return found
    return None


def resolve_pretrained(spec: ModelSpec, setting: str = "model") -> str | None:
    """Turn ``spec.pretrained`` into what open_clip should load: None, a local file or a tag.

    A tag whose weights are not cached is only passed on when the download host answers;
    otherwise this fails at once with advice instead of minutes of hub retries. ``setting`` is
    the parameters block the spec comes from (``coco_ost.model``), named in the advice.
    """
    source = spec.pretrained
    if source in (None, "", "none", "None"):
        return None
    path = Path(source).expanduser()
    if path.is_file():
        return str(path)
    if path.suffix in WEIGHT_FILE_SUFFIXES or os.sep in source:
        raise PretrainedWeightsUnavailable(
            f"pretrained weights file '{source}' does not exist. Point `{setting}.pretrained` at an existing "
            f"weights file, an open_clip tag, or null for random initialisation."
        )
    cfg = open_clip.get_pretrained_cfg(spec.architecture, source)
    if not cfg:
        tags = open_clip.list_pretrained_tags_by_model(spec.architecture)
        raise PretrainedWeightsUnavailable(
            f"'{source}' is neither a local file nor a pretrained tag of '{spec.architecture}'. "
            f"Known tags: {', '.join(tags) if tags else 'none'}."
        )
    hf_hub = cfg.get("hf_hub", "")
    if hf_hub:
        cached = _cached_hub_file(hf_hub, spec.cache_dir)
        if cached:
            return cached
    host = "huggingface.co" if hf_hub else urlparse(cfg.get("url", "")).hostname
    if host and not _host_reachable(host):
        raise PretrainedWeightsUnavailable(
            f"cannot download the '{source}' weights of {spec.architecture}: {host} is not "
            f"reachable (offline?). Download the weights file on a machine with internet access "
            f"and set `{setting}.pretrained` to its local path (e.g. --params "
            f"\"{setting}.pretrained=/path/to/{spec.architecture}-{source}.bin\")."
        )
    return source


def build_model(spec: ModelSpec, device: str | torch.device = "cpu") -> ClipModel:
    """Build an open_clip CLIP, its tokenizer and its image normalisation from ``spec``."""
    model_config = model_config_for(spec.architecture)
    pretrained = resolve_pretrained(spec)
    own_checkpoint = _read_own_checkpoint(pretrained) if pretrained and Path(pretrained).is_file() else None
    if own_checkpoint is not None:
        require_architecture(own_checkpoint.get("architecture"), spec.architecture, pretrained)
        loaded = model_from_checkpoint(own_checkpoint, device=device)
        return ClipModel(
            spec=spec,
            model=loaded.model,
            model_config=loaded.model_config,
            tokenizer=loaded.tokenizer,
            image_mean=loaded.image_mean,
            image_std=loaded.image_std,
            metadata=loaded.metadata,
        )
    try:
        if pretrained and _is_openai_file(pretrained):
            model = _load_openai_file(spec.architecture, pretrained, model_config).to(device)
        else:
            model = _create_open_clip_model(
                spec.architecture, pretrained, device=device, cache_dir=spec.cache_dir
            )
    except RuntimeError as error:
        raise PretrainedWeightsUnavailable(
            f"could not load the weights '{pretrained}' into {spec.architecture}: "
            f"{_first_lines(str(error))}. Check that the file holds weights of this architecture."
        ) from error
    return _wrap(spec, model, model_config)


def _first_lines(message: str, count: int = 2) -> str:
    """A load error's gist: PyTorch lists every mismatching tensor (hundreds of lines)."""
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    more = f" (and {len(lines) - count} more lines)" if len(lines) > count else ""
    return " ".join(lines[:count]) + more


def require_architecture(found: str | None, requested: str, path: str | os.PathLike) -> None:
    if found != requested:
        raise CheckpointError(
            f"'{path}' holds a {found} checkpoint, but the requested architecture is {requested}. "
            f"Set model.architecture={found} to start from it, or point model.pretrained at "
            f"{requested} weights."
        )


def check_model_source(spec: ModelSpec) -> None:
    """What ``build_model`` will need, checked in a second without building anything: the
    architecture is known, the weights file exists and is readable (or the tag can be
    fetched), and one of our own checkpoints holds this architecture."""
    model_config_for(spec.architecture)
    pretrained = resolve_pretrained(spec)
    if not pretrained or not Path(pretrained).is_file():
        return
    try:
        with open(pretrained, "rb") as handle:
            handle.read(1)
    except OSError as error:
        raise PretrainedWeightsUnavailable(
            f"cannot read the weights file '{pretrained}': {error.strerror or error}. "
            f"Make it readable or point model.pretrained at another file."
        ) from error
    if pretrained.endswith((".pt", ".pth", ".ckpt")):
        try:
            payload = torch.load(pretrained, map_location="cpu", weights_only=True, mmap=True)
        except Exception:  # not ours, or not a zip file: build_model hands it to open_clip
            return
        if isinstance(payload, dict) and payload.get("format") == CHECKPOINT_FORMAT:
            require_architecture(payload.get("architecture"), spec.architecture, pretrained)


# Entries of OpenAI's released files that open_clip's own state dicts lack.
_OPENAI_ONLY_KEYS = ("input_resolution", "context_length", "vocab_size")


def _is_openai_file(path: str) -> bool:
    """OpenAI's format: the TorchScript archive OpenAI publishes (e.g. ``ViT-B-32.pt``), or its
    state dict, which carries ``input_resolution`` / ``context_length`` / ``vocab_size``."""
    if not Path(path).is_file():
        return False
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            if any(name.endswith("constants.pkl") for name in archive.namelist()):
                return True
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:
        return False
    return isinstance(state, dict) and all(key in state for key in _OPENAI_ONLY_KEYS)


def _load_openai_file(architecture: str, path: str, model_config: dict[str, Any]) -> nn.Module:
    """Build the model from an OpenAI file as OpenAI defined it (QuickGELU, fp32 on load),
    through open_clip's own loader; refuses weights of another architecture."""
    model = open_clip.load_openai_model(path, precision="fp32", device="cpu")
    vision = model_config.get("vision_cfg", {})
    width, patch = model.visual.conv1.weight.shape[0], model.visual.conv1.weight.shape[-1]
    if (vision.get("width"), vision.get("patch_size")) not in ((width, patch), (None, None)):
        raise RuntimeError(
            f"the OpenAI file holds a vision tower of width {width} and patch {patch}, not "
            f"{architecture}'s ({vision.get('width')}, {vision.get('patch_size')})"
        )
    return model


@functools.lru_cache(maxsize=8)
def _tokenizer(architecture: str) -> Any:
    """One tokenizer per architecture: building one reads the BPE vocabulary (about a second),
    and every checkpoint loaded in a run would otherwise build its own."""
    return open_clip.get_tokenizer(architecture)


def _wrap(spec: ModelSpec, model: nn.Module, model_config: dict[str, Any],
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

    A model with adapters (``clip_continual.adapters``) trains only its adapters within
    ``parts``; its backbone stays frozen. Returns the trainable parameters, the only ones the
    optimizer should hold.
    """
    if parts not in TRAINABLE_PARTS:
        raise ValueError(f"unknown parts '{parts}': choose one of {', '.join(TRAINABLE_PARTS)}")
    if adapter_recipe(model) is not None:
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
    open_clip for towers we do not know.
    """
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
    return model.encode_image(pixels, normalize=normalize)


# --- checkpoints --------------------------------------------------------------------------

def checkpoint_payload(clip: ClipModel) -> dict[str, Any]:
    """A plain dict (only tensors, strings, numbers) that `torch.load(weights_only=True)` reads."""
    return {
        "format": CHECKPOINT_FORMAT,
        "architecture": clip.spec.architecture,
        "pretrained": clip.spec.pretrained,
        "model_config": clip.model_config,
        "metadata": clip.metadata,
        "adapters": adapter_recipe(clip.model),
        "state_dict": {k: v.detach().cpu() for k, v in clip.model.state_dict().items()},
    }


def save_checkpoint(clip: ClipModel, path: str | os.PathLike) -> None:
    """Write atomically (see ``files.atomic_write``): a full disk or a kill mid-save leaves the
    previous file as it was and no half-written one."""
    payload = checkpoint_payload(clip)
    size = sum(t.numel() * t.element_size() for t in payload["state_dict"].values())
    atomic_write(path, lambda handle: torch.save(payload, handle), size_hint=size)


def _read_own_checkpoint(path: str) -> dict[str, Any] | None:
    """Our checkpoint's payload, or None when the file is some other weights file."""
    if not path.endswith((".pt", ".pth", ".ckpt")):
        return None
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # not ours (e.g. a TorchScript OpenAI file): open_clip handles it
        return None
    return payload if isinstance(payload, dict) and payload.get("format") == CHECKPOINT_FORMAT else None


def load_checkpoint_payload(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint '{path}' does not exist")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise CheckpointError(
            f"checkpoint '{path}' cannot be read ({error.__class__.__name__}: {error}); it is "
            f"corrupt or not a clip-continual checkpoint. Delete it and rerun the node that writes it."
        ) from error
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"'{path}' is not a clip-continual checkpoint (no '{CHECKPOINT_FORMAT}' format tag)."
        )
    return payload


def model_from_checkpoint(payload: dict[str, Any], device: str | torch.device = "cpu") -> ClipModel:
    architecture = payload["architecture"]
    register_packaged_configs()
    if open_clip.get_model_config(architecture) is None:
        _register_config(architecture, payload["model_config"])
    model = _create_open_clip_model(architecture, None, device=device)
    try:
        if payload.get("adapters"):
            add_adapters(model, payload["adapters"])
        model.load_state_dict(payload["state_dict"], strict=True)
    except (RuntimeError, AdapterError, KeyError) as error:
        raise CheckpointError(
            f"checkpoint state does not fit architecture '{architecture}': {error}"
        ) from error
    spec = ModelSpec(architecture=architecture, pretrained=payload.get("pretrained"))
    return _wrap(spec, model, payload["model_config"], payload.get("metadata"))


def load_checkpoint(path: str | os.PathLike, device: str | torch.device = "cpu") -> ClipModel:
    return model_from_checkpoint(load_checkpoint_payload(path), device=device)


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
