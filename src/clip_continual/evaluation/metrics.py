"""Continual-learning metrics of an accuracy matrix R of shape (T + 1, T): row t is the model
after step t (row 0 the starting model), column i - 1 is task (phase) i.

Plain Python and NumPy; no Kedro import.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def _check_matrix(R: Any) -> np.ndarray:
    """R as float (T + 1, T): row 0 the starting model, row t after task t, column i - 1 task i."""
    R = np.asarray(R, dtype=float)
    if R.ndim != 2 or R.shape[1] < 1 or R.shape[0] != R.shape[1] + 1:
        raise ValueError(
            f"accuracy matrix must have shape (T + 1, T) with T >= 1 (row 0 = starting model), got {R.shape}"
        )
    if not np.isfinite(R).all():
        raise ValueError("accuracy matrix contains NaN or infinite values")
    return R


def average_accuracy(R: Any) -> float:
    """Mean accuracy over all tasks after the last step: mean_j R[T][j]."""
    R = _check_matrix(R)
    return float(R[-1].mean())


def last_accuracy(R: Any) -> float:
    """MTIL "Last": mean_i R[T][i] (the same number as the average accuracy)."""
    return average_accuracy(R)


def average_incremental_accuracy(R: Any) -> float:
    """Mean over steps t = 1..T of the mean accuracy on the tasks seen so far, R[t][1..t]."""
    R = _check_matrix(R)
    T = R.shape[1]
    return float(np.mean([R[t, :t].mean() for t in range(1, T + 1)]))


def backward_transfer(R: Any) -> float:
    """BWT = 1/(T-1) sum_{i<T} (R[T][i] - R[i][i]); 0.0 when T < 2."""
    R = _check_matrix(R)
    T = R.shape[1]
    if T < 2:
        return 0.0
    return float(np.mean([R[T, i - 1] - R[i, i - 1] for i in range(1, T)]))


def forgetting(R: Any) -> float:
    """Chaudhry et al. 2018: mean over j < T of max_{j <= l <= T-1} R[l][j] - R[T][j]; 0.0 when T < 2."""
    R = _check_matrix(R)
    T = R.shape[1]
    if T < 2:
        return 0.0
    return float(np.mean([R[j:T, j - 1].max() - R[T, j - 1] for j in range(1, T)]))


def forward_transfer(R: Any) -> float:
    """FWT = 1/(T-1) sum_{i>=2} (R[i-1][i] - R[0][i]); 0.0 when T < 2."""
    R = _check_matrix(R)
    T = R.shape[1]
    if T < 2:
        return 0.0
    return float(np.mean([R[i - 1, i - 1] - R[0, i - 1] for i in range(2, T + 1)]))


def transfer(R: Any) -> float:
    """MTIL Transfer: mean over i >= 2 of mean over 1 <= t < i of R[t][i]; NaN when T < 2 (undefined)."""
    R = _check_matrix(R)
    T = R.shape[1]
    if T < 2:
        return float("nan")
    return float(np.mean([R[1:i, i - 1].mean() for i in range(2, T + 1)]))


def avg_accuracy(R: Any) -> float:
    """MTIL "Avg": mean of R[t][i] over all steps t = 1..T and tasks i = 1..T."""
    R = _check_matrix(R)
    return float(R[1:].mean())


def _check_partial(R: Any, t: int) -> np.ndarray:
    """Rows 0..t of an accuracy matrix (a run still in progress has no later rows)."""
    R = np.asarray(R, dtype=float)
    if R.ndim != 2 or R.shape[1] < 1:
        raise ValueError(f"accuracy rows must form a 2-D array with one column per task, got {R.shape}")
    if not 0 <= t <= R.shape[1]:
        raise ValueError(f"step {t} is outside 0..T with T = {R.shape[1]} tasks")
    if R.shape[0] < t + 1:
        raise ValueError(f"step {t} needs accuracy rows 0..{t}, got {R.shape[0]} rows")
    return R


def ut_acc(R: Any, t: int) -> float:
    """Accuracy on the updated task after step t: mean over i <= t of R[t][i] (step 0: over all tasks)."""
    R = _check_partial(R, t)
    return float(R[t].mean() if t == 0 else R[t, :t].mean())


def bwt_at(R: Any, t: int) -> float:
    """Backward transfer after step t: mean over i < t of (R[t][i] - R[i][i]); 0.0 for t <= 1."""
    R = _check_partial(R, t)
    if t <= 1:
        return 0.0
    return float(np.mean([R[t, i - 1] - R[i, i - 1] for i in range(1, t)]))


def learning_accuracies(R: Any) -> list[float]:
    """The diagonal R[t][t]: the accuracy on each task right after learning it (Riemer et al.
    2019's "learning accuracy"), which forgetting cannot lower."""
    R = _check_matrix(R)
    return [float(R[t, t - 1]) for t in range(1, R.shape[1] + 1)]


def continual_metrics(R: Any) -> dict[str, float]:
    """Every continual metric of a complete (T + 1, T) accuracy matrix, by name."""
    R = _check_matrix(R)
    return {
        "average_accuracy": average_accuracy(R),
        "average_incremental_accuracy": average_incremental_accuracy(R),
        "backward_transfer": backward_transfer(R),
        "forgetting": forgetting(R),
        "forward_transfer": forward_transfer(R),
        "transfer": transfer(R),
        "avg": avg_accuracy(R),
        "last": last_accuracy(R),
        "mean_learning_acc": float(np.mean(learning_accuracies(R))),
    }
