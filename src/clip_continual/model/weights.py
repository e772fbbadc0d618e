"""Weight-space operations on state dicts (IMM, WiSE-FT, weight ensembles).

Plain PyTorch; no Kedro import.
"""

from __future__ import annotations

from typing import Mapping

import torch


class StateDictMismatchError(ValueError):
    """Two state dicts do not describe the same architecture."""


def check_same_layout(first: Mapping[str, torch.Tensor], second: Mapping[str, torch.Tensor]) -> None:
    """Raise ``StateDictMismatchError`` unless both have the same keys with the same shapes."""
    missing, extra = sorted(set(first) - set(second)), sorted(set(second) - set(first))
    if missing or extra:
        raise StateDictMismatchError(
            f"state dicts have different keys (only in the first: {missing[:5]}, only in the "
            f"second: {extra[:5]}); both models must share one architecture"
        )
    shapes = [(k, tuple(first[k].shape), tuple(second[k].shape)) for k in first
              if first[k].shape != second[k].shape]
    if shapes:
        raise StateDictMismatchError(f"state dicts differ in shape at {shapes[:5]}")


def interpolate_state_dicts(
    a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor], weight: float
) -> dict[str, torch.Tensor]:
    """``weight * a + (1 - weight) * b`` for every floating-point tensor, computed in float64
    and cast back to ``a``'s dtype; other tensors (integer buffers) are taken from ``a``.

    Keys and shapes must match. Neither input is modified; the result lives on ``a``'s devices.
    """
    weight = float(weight)
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"interpolation weight must lie in [0, 1], got {weight}")
    check_same_layout(a, b)
    merged: dict[str, torch.Tensor] = {}
    for key, value in a.items():
        if not value.is_floating_point():
            merged[key] = value.clone()
            continue
        other = b[key].detach().to(device=value.device, dtype=torch.float64)
        mixed = weight * value.detach().double() + (1.0 - weight) * other
        merged[key] = mixed.to(value.dtype)
    return merged


def interpolate_into(model: torch.nn.Module, anchor: torch.nn.Module, weight: float,
                     untrained_from_anchor: bool = False) -> None:
    """Set ``model``'s weights to ``weight * model + (1 - weight) * anchor`` in place (the anchor
    may live on another device). With ``untrained_from_anchor`` the parameters that do not require
    a gradient take the anchor's values instead (CL-CLIP's ``model_fusion`` for ``parts`` io/to)."""
    own = model.state_dict()
    anchor_state = {key: value.to(own[key].device) if key in own else value
                    for key, value in anchor.state_dict().items()}
    merged = interpolate_state_dicts(own, anchor_state, weight)
    if untrained_from_anchor:
        for name, parameter in model.named_parameters():
            if not parameter.requires_grad:
                merged[name] = anchor_state[name].clone()
    with torch.no_grad():
        model.load_state_dict(merged)
