"""Where a model's weights come from: an open_clip tag (cached or downloadable), a local
weights file (open_clip's, OpenAI's, or one of our checkpoints), or none; ``build_model``
resolves the source and builds the CLIP, failing at once with advice when offline.

Plain Python and PyTorch; no Kedro import.
"""

from __future__ import annotations

import copy
import os
import socket
import zipfile
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import open_clip
import torch
from torch import nn

from clip_continual.model.checkpoints import (
    CHECKPOINT_FORMAT, CheckpointError, model_from_checkpoint, read_own_checkpoint,
)
from clip_continual.model.clip import (
    PACKAGED_CONFIG_DIR, ClipModel, ModelError, ModelSpec, create_open_clip_model, register_packaged_configs,
    wrap_open_clip,
)

WEIGHT_FILE_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")
NETWORK_PROBE_TIMEOUT_S = 3.0


class UnknownArchitectureError(ModelError):
    pass


class PretrainedWeightsUnavailable(ModelError):
    pass


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
    own_checkpoint = read_own_checkpoint(pretrained) if pretrained and Path(pretrained).is_file() else None
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
            model = create_open_clip_model(
                spec.architecture, pretrained, device=device, cache_dir=spec.cache_dir
            )
    except RuntimeError as error:
        raise PretrainedWeightsUnavailable(
            f"could not load the weights '{pretrained}' into {spec.architecture}: "
            f"{_first_lines(str(error))}. Check that the file holds weights of this architecture."
        ) from error
    return wrap_open_clip(spec, model, model_config)


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


def check_model_source(spec: ModelSpec, setting: str = "model") -> None:
    """What ``build_model`` will need, checked in a second without building anything: the
    architecture is known, the weights file exists and is readable (or the tag can be
    fetched), and one of our own checkpoints holds this architecture."""
    model_config_for(spec.architecture)
    pretrained = resolve_pretrained(spec, setting)
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
OPENAI_ONLY_KEYS = ("input_resolution", "context_length", "vocab_size")


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
    return isinstance(state, dict) and all(key in state for key in OPENAI_ONLY_KEYS)


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
