"""Figures of the experiments (matplotlib, Agg backend: no display needed).

Every function takes the plain data structures the experiments produce and writes one PNG.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

__all__ = ["gridworld_figure", "learning_curves_figure", "diagnostics_figure", "summary_figure",
           "probability_of_improvement_figure"]


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: str) -> None:
    fig.savefig(path, dpi=110, bbox_inches="tight")
    _pyplot().close(fig)


def _colors(n: int) -> list:
    cmap = _pyplot().get_cmap("tab10")
    return [cmap(i % 10) for i in range(n)]


# ----------------------------------------------------------------------------------------------- GridWorld


def _draw_grid(ax: Any, study: dict[str, Any]) -> None:
    """The 2x2 grid, with pi(.|S0) drawn as arrows from S0 (length ~ probability) and the advantages."""
    names = {(0, 0): "S0", (0, 1): "S1", (1, 0): "S2", (1, 1): "G"}
    for (r, c), label in names.items():
        face = "#d9f2d9" if label == "G" else "white"
        ax.add_patch(_pyplot().Rectangle((c, 1 - r), 1, 1, facecolor=face, edgecolor="black"))
        ax.text(c + 0.06, 1 - r + 0.92, label, ha="left", va="top", fontsize=10, weight="bold")
    arrows = {"up": (0, 1), "down": (0, -1), "left": (-1, 0), "right": (1, 0)}
    cx, cy = 0.5, 1.5
    for a, p in study["pi"].items():
        dx, dy = arrows[a]
        ax.annotate(
            "",
            xy=(cx + 0.45 * p * 2 * dx, cy + 0.45 * p * 2 * dy),
            xytext=(cx, cy),
            arrowprops={"arrowstyle": "->", "color": "tab:blue", "lw": 1.5},
        )
        adv = study["advantages"][a]
        ax.text(
            cx + 0.36 * dx, cy + 0.36 * dy - 0.08 * (dy == 0), f"{p:.2f}\nA={adv:+.2f}",
            ha="center", va="center", fontsize=6.5, color="tab:blue",
        )
    ax.set_xlim(-0.05, 2.05)
    ax.set_ylim(-0.05, 2.05)
    ax.set_aspect("equal")
    ax.axis("off")
    ax.set_title(f"2x2 GridWorld, pi(.|S0) and A(S0, .)\nreward -1 per step, gamma = {study['gamma']}", fontsize=9)


def gridworld_figure(study: dict[str, Any], path: str) -> None:
    """The grid in one panel and one bias-variance scatter (with its Pareto frontier) per off-policy case."""
    plt = _pyplot()
    off_policy = [
        name for name, case in study["cases"].items() if max(abs(r - 1.0) for r in case["ratio"].values()) > 1e-12
    ]
    n = 1 + len(off_policy)
    fig, axes = plt.subplots(1, n, figsize=(3.6 * n, 3.6), squeeze=False)
    axes = axes[0]
    _draw_grid(axes[0], study)
    labels = [r["method"] for r in study["cases"][off_policy[0]]["rows"]] if off_policy else []
    colors = dict(zip(labels, _colors(len(labels))))
    markers = {"no_clip_loss": "s", "gipo_loss": "o", "ppo_clip_loss": "^", "sapo_loss": "D"}
    for ax, name in zip(axes[1:], off_policy):
        rows = study["cases"][name]["rows"]
        for r in rows:
            ax.scatter(
                r["bias"], r["variance"], color=colors.get(r["method"], "gray"), marker=markers.get(r["loss"], "o"),
                s=40, edgecolor="black" if r["pareto"] else "none", linewidth=0.8, label=r["method"], zorder=3,
            )
        front = sorted((r["bias"], r["variance"]) for r in rows if r["pareto"])
        if front:
            xs, ys = zip(*front)
            ax.step(xs, ys, where="post", color="black", lw=0.8, ls="--", zorder=2, label="Pareto frontier")
        ax.set_xlabel("bias |E[g] - grad J|")
        ax.set_ylabel("variance of g")
        mu = ", ".join(f"{a[0]} {p:.2f}" for a, p in study["cases"][name]["mu"].items())
        ax.set_title(f"Case {name}: mu(.|S0) = {mu}", fontsize=8)
        ax.grid(alpha=0.3)
    if off_policy:
        handles, names = axes[1].get_legend_handles_labels()
        fig.legend(handles, names, loc="lower center", ncol=min(len(names), 5), fontsize=7.5, frameon=False,
                   bbox_to_anchor=(0.5, -0.12))
    fig.suptitle("One-sample estimates of dJ/dtheta[S0, right]: exact bias and variance over mu", fontsize=10)
    fig.tight_layout()
    _save(fig, path)


# ---------------------------------------------------------------------------------------------------- demo


def _band(ax: Any, x: np.ndarray, mean: np.ndarray, lo: np.ndarray, hi: np.ndarray, color: Any, label: str) -> None:
    ax.plot(x, mean, color=color, lw=1.4, label=label)
    ax.fill_between(x, lo, hi, color=color, alpha=0.18, lw=0)


def learning_curves_figure(
    curves: dict[str, dict[str, np.ndarray]], path: str, *, title: str, ylabel: str = "episode return"
) -> None:
    """One panel: per objective, the mean curve over seeds with its confidence band.

    ``curves[objective] = {"x": (points,), "mean": (points,), "lo": (points,), "hi": (points,)}``.
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.2, 3.6))
    for (name, c), color in zip(curves.items(), _colors(len(curves))):
        _band(ax, c["x"], c["mean"], c["lo"], c["hi"], color, name)
    ax.set_xlabel("environment steps")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7.5, loc="upper left")
    fig.tight_layout()
    _save(fig, path)


def diagnostics_figure(
    panels: dict[tuple[str, str], dict[str, dict[str, np.ndarray]]],
    rows: Sequence[str],
    cols: Sequence[str],
    path: str,
    *,
    title: str,
) -> None:
    """A grid of panels ``panels[(row, col)][objective] = {"x", "mean", "lo", "hi"}`` (rows: metrics)."""
    plt = _pyplot()
    fig, axes = plt.subplots(len(rows), len(cols), figsize=(3.3 * len(cols), 2.4 * len(rows)), squeeze=False)
    for i, row in enumerate(rows):
        for j, col in enumerate(cols):
            ax = axes[i][j]
            curves = panels.get((row, col), {})
            for (name, c), color in zip(curves.items(), _colors(len(curves))):
                _band(ax, c["x"], c["mean"], c["lo"], c["hi"], color, name)
            if i == 0:
                ax.set_title(col, fontsize=9)
            if j == 0:
                ax.set_ylabel(row, fontsize=8)
            if i == len(rows) - 1:
                ax.set_xlabel("environment steps", fontsize=8)
            ax.tick_params(labelsize=7)
            ax.grid(alpha=0.3)
    handles, names = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, names, loc="lower center", ncol=min(len(names), 6), fontsize=8, frameon=False,
               bbox_to_anchor=(0.5, -0.03))
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    _save(fig, path)


def summary_figure(
    table: dict[str, dict[Any, dict[str, float]]],
    staleness: Sequence[Any],
    path: str,
    *,
    title: str,
    ylabels: tuple[str, str] = ("final return (last 10% of training)", "mean return over training (AUC)"),
) -> None:
    """Two bar panels ("final" and "auc" statistics) against staleness, per objective, with confidence intervals.

    ``table[objective][K] = {"final_mean", "final_lo", "final_hi", "auc_mean", "auc_lo", "auc_hi"}``;
    ``ylabels`` names the two panels' statistics.
    """
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(9.5, 3.5))
    n = len(table)
    width = 0.8 / max(n, 1)
    pos = np.arange(len(staleness))
    for k, ((name, cells), color) in enumerate(zip(table.items(), _colors(n))):
        for ax, key in zip(axes, ("final", "auc")):
            mean = np.array([cells[s][f"{key}_mean"] for s in staleness])
            lo = np.array([cells[s][f"{key}_lo"] for s in staleness])
            hi = np.array([cells[s][f"{key}_hi"] for s in staleness])
            ax.bar(pos + (k - (n - 1) / 2) * width, mean, width, color=color, label=name,
                   yerr=np.vstack([mean - lo, hi - mean]), capsize=2, error_kw={"lw": 0.8})
    for ax, label in zip(axes, ylabels):
        ax.set_xticks(pos)
        ax.set_xticklabels([f"K={s}" for s in staleness])
        ax.set_xlabel("replay buffer: last K policy versions")
        ax.set_ylabel(label, fontsize=8)
        ax.grid(alpha=0.3, axis="y")
    axes[0].legend(fontsize=7.5)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    _save(fig, path)


def probability_of_improvement_figure(
    improvement: dict[tuple[str, str], dict[Any, dict[str, float]]], staleness: Sequence[Any], path: str, *, title: str
) -> None:
    """One panel per K: P(X > Y) with its interval, one row per (X, Y) pair, and the 0.5 line of no difference.

    ``improvement[(x_label, y_label)][K] = {"p", "lo", "hi"}``.
    """
    plt = _pyplot()
    pairs = list(improvement)
    fig, axes = plt.subplots(1, len(staleness), figsize=(4.2 * len(staleness), 0.45 * len(pairs) + 1.4),
                             squeeze=False, sharey=True)
    xs = sorted({x for x, _ in pairs})
    colors = dict(zip(xs, _colors(len(xs))))
    pos = np.arange(len(pairs))[::-1]
    for ax, k in zip(axes[0], staleness):
        for y, (x_label, y_label) in zip(pos, pairs):
            c = improvement[(x_label, y_label)][k]
            ax.plot([c["lo"], c["hi"]], [y, y], color=colors[x_label], lw=5, alpha=0.45, solid_capstyle="butt")
            ax.plot([c["p"]], [y], "|", color="black", ms=12, mew=1.5)
        ax.axvline(0.5, color="gray", ls="--", lw=0.8)
        ax.set_xlim(0, 1)
        ax.set_title(f"K={k}", fontsize=9)
        ax.set_xlabel("P(X > Y)", fontsize=8)
        ax.grid(alpha=0.3, axis="x")
    axes[0][0].set_yticks(pos)
    axes[0][0].set_yticklabels([f"{x} > {y}" for x, y in pairs], fontsize=7.5)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    _save(fig, path)
