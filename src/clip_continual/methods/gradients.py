"""Gradient surgery shared by A-GEM and GEM: flat gradients and the two projections.

Plain PyTorch; no Kedro import.
"""

from __future__ import annotations

import itertools

import torch
from torch import nn


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def flat_gradient(parameters: list[nn.Parameter]) -> torch.Tensor:
    """All gradients as one vector (zeros where a parameter got none), in float32."""
    return torch.cat([
        (p.grad.reshape(-1) if p.grad is not None else torch.zeros(p.numel(), device=p.device)).float()
        for p in parameters
    ])


def gradient_vector(loss: torch.Tensor, parameters: list[nn.Parameter]) -> torch.Tensor:
    """d loss / d parameters as one vector, without touching ``p.grad``."""
    grads = torch.autograd.grad(loss, parameters, allow_unused=True)
    return torch.cat([
        (g.reshape(-1) if g is not None else torch.zeros(p.numel(), device=p.device)).float()
        for g, p in zip(grads, parameters)
    ])


def set_flat_gradient(parameters: list[nn.Parameter], flat: torch.Tensor) -> None:
    offset = 0
    for p in parameters:
        count = p.numel()
        if p.grad is not None:
            p.grad.copy_(flat[offset : offset + count].view_as(p.grad))
        offset += count


def agem_project(gradient: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """A-GEM: if ``g . g_ref < 0``, ``g - (g . g_ref / g_ref . g_ref) g_ref`` (then ``g . g_ref
    = 0``), else ``g`` unchanged."""
    dot = torch.dot(gradient, reference)
    norm = torch.dot(reference, reference)
    if dot >= 0 or norm == 0:
        return gradient
    return gradient - (dot / norm) * reference


def gem_project(gradient: torch.Tensor, constraints: torch.Tensor, margin: float = 0.5) -> torch.Tensor:
    """GEM (Lopez-Paz & Ranzato 2017): the gradient closest to ``g`` whose dot product with every
    row of ``constraints`` (K x P) is non-negative, through GEM's dual QP

        min_v  1/2 v^T (G G^T) v + (G g)^T v   s.t.  v >= margin,   then  g~ = G^T v + g,

    applied only when some constraint is violated. K is small (the reference set and the earlier
    tasks), so the QP is solved exactly by trying every active set (2^K, K <= 12)."""
    dots = constraints @ gradient
    if bool((dots >= 0).all()):
        return gradient
    count = len(constraints)
    if count > 12:
        raise ValueError(f"gem_project solves at most 12 constraints exactly, got {count}")
    gram = (constraints @ constraints.t()).double()
    gram = 0.5 * (gram + gram.t()) + 1e-3 * torch.eye(count, dtype=torch.float64, device=gram.device)
    # v = margin + u, u >= 0:  min 1/2 u^T P u + c^T u  with  c = P margin 1 + G g
    linear = gram @ torch.full((count,), float(margin), dtype=torch.float64, device=gram.device) + dots.double()
    u = _nonnegative_qp(gram, linear)
    v = (u + margin).to(gradient.dtype)
    return constraints.t() @ v + gradient


def _nonnegative_qp(matrix: torch.Tensor, linear: torch.Tensor) -> torch.Tensor:
    """argmin_{u >= 0} 1/2 u^T P u + c^T u for a small positive-definite P: the free set whose
    unconstrained optimum is non-negative and satisfies the KKT conditions on the rest."""
    count = len(linear)
    best, best_value = torch.zeros_like(linear), 0.0
    for size in range(1, count + 1):
        for free in itertools.combinations(range(count), size):
            index = list(free)
            u = torch.zeros_like(linear)
            u[index] = torch.linalg.solve(matrix[index][:, index], -linear[index])
            if bool((u < 0).any()):
                continue
            value = float(0.5 * u @ matrix @ u + linear @ u)
            if value < best_value:
                best, best_value = u, value
    return best
