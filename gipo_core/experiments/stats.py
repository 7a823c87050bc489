"""Robust aggregate statistics across tasks and seeds, as in rliable (Agarwal et al., NeurIPS 2021).

The estimators are the ones the ``rliable`` package computes, written out in NumPy so that the experiments
need no extra dependency:

- :func:`iqm`: the interquartile mean of all runs pooled over tasks, ``scipy.stats.trim_mean(x, 0.25)`` (sort,
  drop ``floor(n / 4)`` values at each end, average the rest).
- :func:`stratified_bootstrap`: resample the seeds *within each task* with replacement (tasks are the strata,
  so every replicate keeps every task), recompute the statistic, and report the percentile interval of the
  replicates (rliable's default ``percentile`` method).
- :func:`probability_of_improvement`: ``P(X > Y)`` averaged over tasks, where per task it is the
  Mann-Whitney statistic ``mean over run pairs of [x > y] + 0.5 [x = y]``; its interval resamples the runs of
  both methods within each task.

Scores are arrays of shape ``(tasks, seeds)``.

Examples
--------
>>> import numpy as np
>>> from gipo_core.experiments.stats import iqm, probability_of_improvement
>>> float(iqm(np.array([[0.0, 1.0, 2.0, 10.0, 3.0]])))  # drops 0 and 10
2.0
>>> float(probability_of_improvement(np.array([[1.0, 0.0]]), np.array([[0.0, 0.0]])))
0.75
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

__all__ = ["iqm", "probability_of_improvement", "stratified_bootstrap", "interval_estimates"]


def _scores(x: np.ndarray, name: str, fn: str) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != 2 or a.shape[0] < 1 or a.shape[1] < 1:
        raise ValueError(f"`{fn}`: `{name}` must be a non-empty (tasks, seeds) array; got shape {a.shape}")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"`{fn}`: `{name}` must be finite; got {int(np.sum(~np.isfinite(a)))} non-finite values")
    return a


def iqm(scores: np.ndarray) -> float:
    """Interquartile mean of every run pooled over tasks: drop ``floor(n / 4)`` runs at each end, average.

    Parameters
    ----------
    scores : array of shape (tasks, seeds)
    """
    x = np.sort(_scores(scores, "scores", "iqm").reshape(-1))
    cut = x.size // 4
    return float(x[cut: x.size - cut].mean())


def probability_of_improvement(x: np.ndarray, y: np.ndarray) -> float:
    """``P(X > Y)``: per task the Mann-Whitney statistic over all run pairs (ties count 1/2), averaged over tasks.

    Parameters
    ----------
    x, y : arrays of shape (tasks, seeds_x) and (tasks, seeds_y)
        The same tasks in the same order; the seed counts may differ.
    """
    x = _scores(x, "x", "probability_of_improvement")
    y = _scores(y, "y", "probability_of_improvement")
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"`probability_of_improvement`: `x` and `y` must have the same number of tasks; got "
                         f"{x.shape[0]} and {y.shape[0]}")
    diff = x[:, :, None] - y[:, None, :]
    return float(((diff > 0) + 0.5 * (diff == 0)).mean(axis=(1, 2)).mean())


def stratified_bootstrap(
    statistic: Callable[..., Any],
    *score_sets: np.ndarray,
    reps: int = 2000,
    seed: int = 0,
) -> np.ndarray:
    """Bootstrap replicates of ``statistic(*score_sets)``, resampling seeds with replacement within each task.

    Every score set is resampled independently (each keeps its own seed count) and every task is kept in every
    replicate. Returns an array of ``reps`` replicates.
    """
    if not isinstance(reps, int) or reps < 1:
        raise ValueError(f"`stratified_bootstrap`: `reps` must be an integer >= 1; got {reps!r}")
    sets = [_scores(s, "score_sets", "stratified_bootstrap") for s in score_sets]
    rng = np.random.default_rng(seed)
    out = np.empty(reps)
    for r in range(reps):
        resampled = []
        for s in sets:
            idx = rng.integers(0, s.shape[1], size=s.shape)
            resampled.append(np.take_along_axis(s, idx, axis=1))
        out[r] = statistic(*resampled)
    return out


def interval_estimates(
    statistic: Callable[..., Any],
    *score_sets: np.ndarray,
    reps: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[float, float, float]:
    """Point estimate and percentile stratified-bootstrap interval: ``(estimate, low, high)``."""
    if not 0 < confidence < 1:
        raise ValueError(f"`interval_estimates`: `confidence` must be in (0, 1); got {confidence!r}")
    point = float(statistic(*score_sets))
    reps_values = stratified_bootstrap(statistic, *score_sets, reps=reps, seed=seed)
    tail = 100 * (1 - confidence) / 2
    lo, hi = np.percentile(reps_values, [tail, 100 - tail])
    return point, float(lo), float(hi)
