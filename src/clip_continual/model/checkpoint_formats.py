"""Checkpoints written elsewhere, read into our CLIP: our own (``model/checkpoints.py``), the
releases of ZSCL and of MoE-Adapters, and, only when the user opts in, a pickled whole model.

- **ZSCL** (Thunderbeee/ZSCL ``mtil/src/utils.py:44-47`` ``torch_save``, called for every task in
  ``mtil/src/models/finetune.py:343-352``): ``torch.save({"state_dict": model.state_dict()})``
  of OpenAI's CLIP (``mtil/clip/model.py``). open_clip's CLIP keeps OpenAI's parameter names,
  so only OpenAI's extra entries (``input_resolution``, ``context_length``, ``vocab_size``)
  and a ``module.`` prefix go. OpenAI's CLIP uses QuickGELU (``mtil/clip/model.py:164-177``).
- **MoE-Adapters** (JiazuoYu/MoE-Adapters4CL ``mtil/src/utils.py:44-47``, called in
  ``mtil/src/models/finetune.py:224-228``): the same wrapper around their CLIP with adapters
  (``mtil/clip/model.py:287-358``): per block ``adaptmlp_list.<e>.{down,up}_proj`` (experts),
  ``router_list.<t>`` / ``w_noise_list.<t>`` (11 routers, one per MTIL task, zero until
  trained) or ``router1`` / ``w_noise`` (one shared router), mapped onto
  ``methods/moe_adapters.py`` (``mixture.experts.<e>.{down,up}``, ``mixture.gates.<t>``,
  ``mixture.noise.<t>``). Left out: ``ln_3`` (never used in ``forward``), ``mean`` / ``std``
  (the Normal of the load-balancing loss, never added to the loss), ``adaptmlp`` (the same
  module as the last expert). Their DDAS autoencoders are a file beside it,
  ``<checkpoint>_autochooser.pth`` (``mtil/src/models/AutoEncoder.py:196-199``, read with the
  checkpoint of the same task in ``mtil/scripts/test/Full_Shot_order1.sh:16-36``): a list of 12
  autoencoders, 0 the reference one (TinyImageNet), i the one of task i
  (``mtil/src/models/evaluation.py:59-71``), mapped onto ``methods/ddas.py``'s TaskSelector
  (the reference, and the autoencoders of tasks 1..k only, as ``methods/moe_adapters.py``
  keeps them). Without that file the latest router serves every input (no DDAS).

Plain Python and PyTorch; no Kedro import.
"""

from __future__ import annotations

import logging
import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import open_clip
import torch
from torch import nn

from clip_continual.model.adapters import AdapterError, add_adapters
from clip_continual.model.checkpoints import CHECKPOINT_FORMAT, CheckpointError, model_from_checkpoint
from clip_continual.model.clip import ClipModel, ModelSpec
from clip_continual.model.sources import OPENAI_ONLY_KEYS, build_model

logger = logging.getLogger(__name__)

PICKLE_OPT_IN = "allow_pickled_checkpoint"
_BLOCK = re.compile(r"^(?P<block>(?:visual\.)?transformer\.resblocks\.\d+)\.(?P<rest>.+)$")
_UNUSED_MOE_ENTRIES = ("ln_3", "mean", "std", "adaptmlp")
_AUTOENCODER = re.compile(r"^(?P<index>\d+)\.(?P<part>encoder|decoder)\.0\.(?P<kind>weight|bias)$")
_MOE_ROUTERS = {"router_list": "gates", "w_noise_list": "noise", "router1": "gates", "w_noise": "noise"}


@dataclass(frozen=True)
class ReadOptions:
    """``architecture``: None builds a foreign checkpoint on the template's module (the
    benchmark's starting model); else a fresh open_clip model of that name. ``moe_top_k``: the
    experts each input takes (MoE-Adapters does not store it); ``ddas_*``: DDAS's settings
    (``methods/moe_adapters.py``) where an autochooser file comes with the checkpoint.
    ``allow_pickled``: unpickle files that hold Python objects, which runs code from the file."""

    architecture: str | None = None
    moe_top_k: int = 2
    ddas_threshold: float = 0.0655
    ddas_alexnet_weights: str | None = None
    allow_pickled: bool = False


def load_any_checkpoint(path: str | Path, template: ClipModel, step: int,
                        options: ReadOptions = ReadOptions()) -> ClipModel:
    """The model in ``path`` (our format, ZSCL's or MoE-Adapters'), as the model after task
    ``step`` (MoE-Adapters: its routers of tasks 1..step)."""
    content = _read(Path(path), options.allow_pickled)
    if isinstance(content, dict) and content.get("format") == CHECKPOINT_FORMAT:
        return _own(content, path, options.architecture)
    state = _state_dict(content, path)
    template = _template(template, options.architecture)
    if _is_moe_adapters(state):
        state, recipe = moe_adapters_state(state, step, options.moe_top_k, path)
        state, recipe = _with_autochooser(state, recipe, Path(path), step, options)
        return _loaded(template, state, recipe, path, "moe_adapters")
    return _loaded(template, openai_state(state), None, path, "zscl")


def _is_moe_adapters(state: dict[str, torch.Tensor]) -> bool:
    """Any block with MoE-Adapters' adapters or routers (``adaptmlp*``, ``router*``)."""
    blocks = (_BLOCK.match(key) for key in state)
    return any(match["rest"].startswith(("adaptmlp", "router")) for match in blocks if match)


def _read(path: Path, allow_pickled: bool) -> Any:
    if not path.is_file():
        raise CheckpointError(f"checkpoint '{path}' does not exist; list existing files in "
                              f"evaluate_checkpoints.checkpoints")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:  # weights_only met a Python object
        if not allow_pickled:
            raise CheckpointError(
                f"'{path}' holds pickled Python objects (e.g. a whole model saved with torch.save(model)), "
                f"not only tensors. Unpickling it runs code stored in the file: arbitrary code execution "
                f"if the file is not from a source you trust. Re-save its weights "
                f"(torch.save(model.state_dict(), path)), or, for a file you trust, set "
                f"evaluate_checkpoints.{PICKLE_OPT_IN}: true."
            ) from error
    except Exception as error:
        raise CheckpointError(f"checkpoint '{path}' cannot be read ({error.__class__.__name__}: "
                              f"{str(error)[:200]}); it is corrupt or not a PyTorch weights file") from error
    logger.warning("unpickling '%s' (%s: true): it may run code stored in the file", path, PICKLE_OPT_IN)
    return torch.load(path, map_location="cpu", weights_only=False)


def _state_dict(content: Any, path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a state dict, a ``{"state_dict": ...}`` wrapper or a pickled module,
    without a ``module.`` prefix (nn.DataParallel)."""
    if isinstance(content, nn.Module):
        content = content.state_dict()
    if isinstance(content, dict) and isinstance(content.get("state_dict"), dict):
        content = content["state_dict"]
    if not isinstance(content, dict) or not content or not all(torch.is_tensor(v) for v in content.values()):
        shown = sorted(content)[:5] if isinstance(content, dict) else type(content).__name__
        raise CheckpointError(f"'{path}' holds no state dict of a CLIP (found {shown}); expected our "
                              f"checkpoint, ZSCL's or MoE-Adapters' ({{'state_dict': ...}})")
    if all(key.startswith("module.") for key in content):
        content = {key[len("module."):]: value for key, value in content.items()}
    return content


def _own(payload: dict[str, Any], path: str | Path, architecture: str | None) -> ClipModel:
    found = payload.get("architecture")
    if architecture is not None and found != architecture:
        raise CheckpointError(f"'{path}' holds a {found} checkpoint, but evaluate_checkpoints.architecture "
                              f"is {architecture}; set it to null (our checkpoints name their architecture)")
    return model_from_checkpoint(payload)


def _template(start: ClipModel, architecture: str | None) -> ClipModel:
    """The module a foreign state dict is loaded into: the starting model's, or a fresh model
    of ``architecture``; refused where it has GELU but the architecture comes with OpenAI's
    QuickGELU (ZSCL and MoE-Adapters fine-tune OpenAI's CLIP: GELU would misjudge them)."""
    template = start if architecture is None else build_model(ModelSpec(architecture))
    name = template.spec.architecture
    quick = any(type(module).__name__ == "QuickGELU" for module in template.model.modules())
    if not quick and f"{name}-quickgelu" in open_clip.list_models():
        raise CheckpointError(
            f"ZSCL and MoE-Adapters fine-tune OpenAI's CLIP, which uses QuickGELU; the model {name} they would "
            f"be read into uses GELU and would score their weights wrongly. Set "
            f"evaluate_checkpoints.architecture: {name}-quickgelu"
        )
    return template


def openai_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """OpenAI's CLIP names onto open_clip's: the same but for OpenAI's scalar entries."""
    return {key: value for key, value in state.items() if key not in OPENAI_ONLY_KEYS}


def moe_adapters_state(state: dict[str, torch.Tensor], step: int, top_k: int,
                       path: str | Path = "checkpoint") -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """MoE-Adapters' names onto ours, and the adapter recipe they imply; the routers of tasks
    1..``step`` are kept (all, for a shared router)."""
    mapped: dict[str, torch.Tensor] = {}
    routers: dict[tuple[str, str], dict[int, torch.Tensor]] = {}
    for key, value in state.items():
        match = _BLOCK.match(key)
        if match is None:
            mapped[key] = value
            continue
        block, parts = match["block"], match["rest"].split(".")
        if parts[0] == "adaptmlp_list":
            layer = {"down_proj": "down", "up_proj": "up"}.get(parts[2], parts[2])  # else: refused on loading
            mapped[f"{block}.mixture.experts.{parts[1]}.{layer}.{'.'.join(parts[3:])}"] = value
        elif parts[0] in _MOE_ROUTERS:
            index = int(parts[1]) if parts[0].endswith("_list") else 0
            routers.setdefault((block, _MOE_ROUTERS[parts[0]]), {})[index] = value
        elif parts[0] not in _UNUSED_MOE_ENTRIES:
            mapped[key] = value
    if not routers:
        raise CheckpointError(f"'{path}' holds MoE-Adapters' single adapter per block (apply_moe off), which "
                              f"has no counterpart in methods/moe_adapters.py; only its experts with routers load")
    kept = _routers_kept(routers, step, path)
    for (block, name), tensors in routers.items():
        mapped.update({f"{block}.mixture.{name}.{t}": tensors[t] for t in range(kept)})
    return mapped, _moe_recipe(mapped, kept, top_k)


def _routers_kept(routers: dict[tuple[str, str], dict[int, torch.Tensor]], step: int, path: str | Path) -> int:
    """``step`` routers of a per-task router list (1 for a shared router), refusing a file whose
    routers of later tasks are trained already (it is a later task's checkpoint)."""
    count = min(len(tensors) for tensors in routers.values())
    kept = min(step, count)
    trained = [t for tensors in routers.values() for t, value in tensors.items() if t >= kept and value.any()]
    if trained:
        raise CheckpointError(
            f"'{path}' has trained routers of task {max(trained) + 1}, but it is listed as the model after "
            f"task {step}; list the checkpoints in the order of the benchmark's tasks"
        )
    return kept


def autochooser_path(checkpoint: Path) -> Path:
    """Where MoE-Adapters writes a task's DDAS autoencoders beside its checkpoint
    (``{dataset}.pth`` and ``{dataset}_autochooser.pth``, AutoEncoder.py:196-199)."""
    return checkpoint.with_name(f"{checkpoint.stem}_autochooser{checkpoint.suffix}")


def _with_autochooser(state: dict[str, torch.Tensor], recipe: dict[str, Any], path: Path, step: int,
                      options: ReadOptions) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    chooser = autochooser_path(path)
    if not chooser.is_file():
        logger.warning("no DDAS autoencoders beside '%s' (%s): the latest router serves every input",
                       path, chooser.name)
        return state, recipe
    autoencoders = ddas_state(_state_dict(_read(chooser, options.allow_pickled), chooser), step, chooser)
    return {**state, **autoencoders}, {
        **recipe, "ddas": True, "ddas_tasks": step, "ddas_reference": 1,
        "ddas_threshold": float(options.ddas_threshold), "ddas_alexnet_weights": options.ddas_alexnet_weights}


def ddas_state(chooser: dict[str, torch.Tensor], step: int,
               path: str | Path = "autochooser") -> dict[str, torch.Tensor]:
    """MoE-Adapters' autoencoder list (``<i>.encoder.0`` / ``<i>.decoder.0``) onto our
    ``visual.task_selector``: 0 the reference, 1..``step`` the tasks'."""
    entries = {key: _AUTOENCODER.match(key) for key in chooser}
    if not all(entries.values()) or not {"0", "1"} <= {match["index"] for match in entries.values()}:
        raise CheckpointError(f"'{path}' does not hold MoE-Adapters' autoencoders 0..{step} "
                              f"(<i>.encoder.0.weight, ...; AutoEncoder.py:13-31)")
    mapped = {}
    for key, match in entries.items():
        index = int(match["index"])
        if index <= step:  # a later task's autoencoder is untrained
            owner = "reference" if index == 0 else f"autoencoders.{index - 1}"
            mapped[f"visual.task_selector.{owner}.{match['part']}.{match['kind']}"] = chooser[key]
    return mapped


def _moe_recipe(mapped: dict[str, torch.Tensor], routers: int, top_k: int) -> dict[str, Any]:
    """The ``moe`` adapter recipe of ``methods/moe_adapters.py`` the mapped weights fit."""
    downs = [key for key in mapped if key.endswith(".mixture.experts.0.down.weight")]
    towers = sorted({"visual" if key.startswith("visual.") else "text" for key in downs}, reverse=True)
    first_block = downs[0].split(".mixture.")[0]
    experts = sum(key.startswith(f"{first_block}.mixture.experts.") and key.endswith(".down.weight") for key in mapped)
    return {"kind": "moe", "experts": experts, "top_k": int(top_k), "bottleneck": int(mapped[downs[0]].shape[0]),
            "routers": routers, "towers": towers, "ddas": False, "ddas_tasks": 0, "ddas_reference": 0,
            "eval_noise": False}


def _loaded(template: ClipModel, state: dict[str, torch.Tensor], recipe: dict[str, Any] | None,
            path: str | Path, kind: str) -> ClipModel:
    """``template``'s model (a copy) with ``state`` (and the adapters of ``recipe``)."""
    clip = template.clone()
    clip.model.eval()
    try:
        if recipe is not None:
            add_adapters(clip.model, recipe)
            own = clip.model.state_dict()  # bookkeeping buffers the release does not have
            state = {**{k: v for k, v in own.items() if k.endswith((".mixture.frozen", ".mixture.usage"))}, **state}
        clip.model.load_state_dict(state, strict=True)
    except (RuntimeError, AdapterError, KeyError) as error:
        raise CheckpointError(
            f"'{path}' (read as {kind}) does not fit the model {clip.spec.architecture}: "
            f"{_gist(str(error))}. Set evaluate_checkpoints.architecture to the checkpoint's architecture"
        ) from error
    clip.metadata.update({"checkpoint": str(path), "checkpoint_format": kind})
    return clip


def _gist(message: str, count: int = 3) -> str:
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    return " ".join(lines[:count]) + (f" (and {len(lines) - count} more lines)" if len(lines) > count else "")
