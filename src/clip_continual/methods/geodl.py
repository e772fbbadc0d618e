"""GeoDL as the paper's code runs it (CL-CLIP ``methods/geodl.py`` with
``methods/GFK_distill_normalise.py``, class ``GFK``).

``L = CE + alpha * (D_GFK(f_I(x), f_I_old(x)) + D_GFK(f_T(C), f_T_old(C)))``: image features of
the batch, and text features of the class prompts (MST: every seen class; OST: all classes).

``D_GFK(X, Y)`` for row-normalised n x D features: ``P_s`` = the first ``n - 2`` left singular
vectors of ``X^T`` centred per row ("tall PCA"), completed with up to 60 orthonormal vectors of
its null space; ``P_t`` likewise for ``Y`` (no completion). The geodesic-flow kernel
``G = P_s Delta P_s^T`` comes from the generalised SVD of ``[P_s1^T P_t, P_s2^T P_t]`` computed
as GFK does (HO-GSVD with inverses by ONE Newton-Schulz iteration, principal angles
``theta = acos(Gamma)``, blocks ``B1 = 1/2 (1 + sin 2t / 2t)``, ``B2 = B3 = 1/2 (cos 2t - 1) / 2t``,
``B4 = 1/2 (1 - sin 2t / 2t)``), and ``D = mean_i (x_i - y_i) G (x_i - y_i)^T``. ``G`` is
treated as a constant (detached), so the gradient flows through ``x_i - y_i`` only.

As in CL-CLIP, a term is zero when it has fewer than 3 rows (there its ``try``/``except`` falls
back to CE, e.g. text in the first MST phase of 2 classes). One guard CL-CLIP lacks: the PCA
dimension is at most ``D - 1``, so that the null space is never empty when a batch has more
rows than the feature dimension.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from clip_continual.methods.base import (
    Batch, ContinualMethod, TaskContext, class_cross_entropy, image_features, require_alpha,
    text_features_together,
)

NULL_SPACE_DIMS = 60  # GFK.fit's num_nullspacedim


def newton_schulz_inverse_sqrt(matrix: torch.Tensor, iterations: int = 1) -> torch.Tensor:
    """GFK's ``sqrt_newton_schulz_minus``: an approximation of ``A^(-1/2)`` (exact in the limit
    of many iterations), here with GFK's single iteration: ``1/2 (3I - A/|A|) / sqrt(|A|)``."""
    matrix = matrix.double()
    norm = matrix.pow(2).sum().sqrt()
    y = matrix / norm
    eye = torch.eye(len(matrix), dtype=torch.float64, device=matrix.device)
    z = eye.clone()
    for _ in range(iterations):
        t = 0.5 * (3.0 * eye - z @ y)
        y, z = y @ t, t @ z
    return z / norm.sqrt()


def tall_pca(features: torch.Tensor, dims: int) -> torch.Tensor:
    """GFK's ``train_pca_tall`` on ``features`` (D x n, one column per row of the batch): subtract
    ``features.mean(0)`` as GFK does (each column's own mean), then the first ``dims`` left
    singular vectors (D x dims)."""
    centred = features - features.mean(0)
    left, _, _ = torch.linalg.svd(centred, full_matrices=False)
    return left[:, :dims]


def null_space(basis: torch.Tensor, limit: int) -> torch.Tensor:
    """Up to ``limit`` orthonormal vectors orthogonal to the columns of ``basis`` (scipy's
    ``null_space(basis.T)``: the right singular vectors past the rank)."""
    _, _, vh = torch.linalg.svd(basis.t(), full_matrices=True)
    return vh[basis.shape[1]:].t()[:, :limit]


def hogsvd(first: torch.Tensor, second: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """GFK's ``HOGSVD_fit`` for two matrices: returns (U_1, U_2), their column norms, V."""
    grams = [m.t() @ m for m in (first, second)]
    inverses = [newton_schulz_inverse_sqrt(g) @ newton_schulz_inverse_sqrt(g) for g in grams]
    s = 0.5 * (grams[0] @ inverses[1] + grams[1] @ inverses[0])
    v, _, _ = torch.linalg.svd(s)
    b = [m @ v for m in (first, second)]
    sigmas = torch.stack([x.norm(dim=0) for x in b])
    return [x / sigma for x, sigma in zip(b, sigmas)], sigmas, v


def gfk_kernel(source: torch.Tensor, target: torch.Tensor, source_dims: int) -> torch.Tensor:
    """GFK's ``gfk_G``: ``P_s Delta P_s^T`` from the completed source basis ``source`` (D x N,
    its first ``source_dims`` columns the PCA) and the target basis ``target`` (D x d_t)."""
    (u1, u2), sigmas, _ = hogsvd(source[:, :source_dims].t() @ target, source[:, source_dims:].t() @ target)
    v1, v2 = u1, -u2
    theta = torch.acos(sigmas[0].clamp(-1.0, 1.0))
    sinc = torch.sin(2 * theta) / (2 * theta + 1e-12)
    b1, b4 = torch.diag(0.5 * (1 + sinc)), torch.diag(0.5 * (1 - sinc))
    b2 = torch.diag(0.5 * (torch.cos(2 * theta) - 1) / (2 * theta + 1e-12))
    left = torch.block_diag(v1, v2)  # N x 2 d_t
    middle = torch.cat([torch.cat([b1, b2], 1), torch.cat([b2, b4], 1)], 0)
    return source @ (left @ middle @ left.t()) @ source.t()


def gfk_distance(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """GFK.fit: ``mean_i (x_i - y_i) G (x_i - y_i)^T`` on row-normalised features; 0 below 3 rows."""
    student, teacher = F.normalize(student.float(), dim=-1), F.normalize(teacher.float(), dim=-1)
    rows, dims = student.shape
    if rows < 3:
        return student.sum() * 0.0
    with torch.no_grad():
        s_dims, t_dims = min(rows - 2, dims - 1), min(len(teacher) - 2, dims - 1)
        source = tall_pca(student.detach().double().t(), s_dims)
        source = torch.cat([source, null_space(source, NULL_SPACE_DIMS)], dim=1)
        target = tall_pca(teacher.double().t(), t_dims)
        kernel = gfk_kernel(source, target, s_dims).float()
    difference = student - teacher
    return ((difference @ kernel) * difference).sum(-1).mean()


class GeodesicDistillation(ContinualMethod):
    """``L = CE + alpha * (D_GFK(image) + D_GFK(class text))``, teacher = CL-CLIP's."""

    name = "geodl"
    needs_teacher = True
    uses_teacher_images = True

    def __init__(self, alpha: float = 0.5, label_smoothing: float = 0.0) -> None:
        super().__init__(label_smoothing=label_smoothing)
        self.alpha = require_alpha(alpha)
        self._teacher_text: torch.Tensor | None = None

    def before_task(self, task: TaskContext) -> None:
        self._teacher_text = task.teacher.text_features(task.class_tokens[task.seen_classes])

    def after_task(self, task: TaskContext, student: nn.Module) -> None:
        self._teacher_text = None

    def loss_terms(self, student: nn.Module, batch: Batch, task: TaskContext) -> dict[str, torch.Tensor]:
        image = image_features(student, batch.pixels)
        (text,) = text_features_together(student, task.class_tokens[task.seen_classes])
        logits = student.logit_scale.exp() * image @ text[task.current_in_seen].t()
        return {
            "ce": class_cross_entropy(logits, batch.labels, task, self.label_smoothing),
            # The geodesic flow kernel is spanned by the global batch's features (its PCA).
            "geodl_image": self.alpha * gfk_distance(task.workers.gather(image),
                                                     task.workers.gather(task.teacher.image_features_for(batch))),
            "geodl_text": self.alpha * gfk_distance(text, self._teacher_text),
        }

