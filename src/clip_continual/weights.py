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


def interpolate_into(model: torch.nn.Module, anchor: torch.nn.Module, weight: float) -> None:
    """Set ``model``'s weights to ``weight * model + (1 - weight) * anchor`` in place."""
    merged = interpolate_state_dicts(model.state_dict(), anchor.state_dict(), weight)
    with torch.no_grad():
        model.load_state_dict(merged)
