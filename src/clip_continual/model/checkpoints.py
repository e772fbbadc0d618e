"""Our checkpoints: a plain payload (tensors, strings, numbers) that ``torch.load`` reads with
``weights_only=True``, written atomically; an adapted model stores its adapter recipe, and
loading applies it to a fresh model before the weights.

Plain Python and PyTorch; no Kedro import.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import open_clip
import torch

from clip_continual.files import atomic_write
from clip_continual.model.adapters import AdapterError, adapter_recipe, add_adapters
from clip_continual.model.clip import (
    ClipModel, ModelError, ModelSpec, create_open_clip_model, register_config, register_packaged_configs,
    wrap_open_clip,
)

CHECKPOINT_FORMAT = "clip-continual/1"


class CheckpointError(ModelError):
    pass


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


def read_own_checkpoint(path: str) -> dict[str, Any] | None:
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
        register_config(architecture, payload["model_config"])
    model = create_open_clip_model(architecture, None, device=device)
    try:
        if payload.get("adapters"):
            add_adapters(model, payload["adapters"])
        model.load_state_dict(payload["state_dict"], strict=True)
    except (RuntimeError, AdapterError, KeyError) as error:
        raise CheckpointError(
            f"checkpoint state does not fit architecture '{architecture}': {error}"
        ) from error
    spec = ModelSpec(architecture=architecture, pretrained=payload.get("pretrained"))
    return wrap_open_clip(spec, model, payload["model_config"], payload.get("metadata"))


def load_checkpoint(path: str | os.PathLike, device: str | torch.device = "cpu") -> ClipModel:
    return model_from_checkpoint(load_checkpoint_payload(path), device=device)
