"""The analytic 2x2 GridWorld bias-variance study (REFERENCE section 6), computed exactly.

The grid has states S0 = (0, 0), S1 = (0, 1), S2 = (1, 0) and the absorbing goal G = (1, 1); actions up,
down, left, right move deterministically and bumping a wall stays put. Every step from a non-goal state
costs -1, gamma = 0.9. The target policy is pi = softmax(0, 1, 0, 1) in every state.

One action ``a ~ mu(.|S0)`` is drawn and the component ``dJ/dtheta[S0, right]`` of the policy gradient is
estimated. Plain importance sampling gives ``g_IS(a) = rho(a) * d log pi(a) * A(a)`` with
``rho = pi/mu``, ``d log pi(a) = 1{a = right} - pi(right)`` and ``A = A^pi(S0, a)`` exact from the linear
Bellman system. Each method replaces ``rho`` by its gradient multiplier ``u(a) = c(a) * rho(a)``, where
``c`` is its coefficient (GIPO's omega, PPO-clip's 0/1 gate, SAPO's ``4 p (1 - p)``).

The multiplier is never re-derived here: it is read off the library. For each action the method's loss
is evaluated by :func:`gipo_core.numpy.value_and_grad` on one element with ``logp = log pi(a)``,
``old_logp = log mu(a)`` and ``advantages = A(a)``; its gradient is ``dL/dlogp = -A(a) * u(a)``, so the
per-sample estimate is ``g(a) = -dL/dlogp * d log pi(a)`` and the coefficient is that gradient divided by
No-Clip's (``c = u / rho``). Mean and variance are exact sums over the four actions, weighted by mu;
``bias = |E[g] - E[g_IS]|`` (``E[g_IS]`` is the true gradient component), ``MSE = bias^2 + variance``.

Examples
--------
>>> from gipo_core.experiments.gridworld import run_study
>>> study = run_study()
>>> [row["method"] for row in study["cases"]["D"]["rows"]][:2]
['No-Clip', 'GIPO sigma=0.1']
>>> all(row["bias"] < 1e-15 for row in study["cases"]["D"]["rows"])    # on-policy: nobody is biased
True
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from .. import numpy as gnp

__all__ = [
    "ACTIONS",
    "GAMMA",
    "THETA",
    "Method",
    "default_methods",
    "default_behaviours",
    "mixture",
    "softmax",
    "state_values",
    "advantages_at_s0",
    "run_study",
    "to_markdown",
    "to_csv",
    "write_outputs",
    "pareto_mask",
]

ACTIONS = ("up", "down", "left", "right")
_MOVES = {"up": (-1, 0), "down": (1, 0), "left": (0, -1), "right": (0, 1)}
#: Non-goal states in order S0, S1, S2, and the goal.
STATES = ((0, 0), (0, 1), (1, 0))
GOAL = (1, 1)
GAMMA = 0.9
#: Target-policy logits (up, down, left, right), the same in every state.
THETA = (0.0, 1.0, 0.0, 1.0)
#: The components behaviour mixtures are made of: uniform, softmax(0, 0, 0, 1), softmax(0, 1, 0, 0).
MIXTURE_COMPONENTS = ((0.0, 0.0, 0.0, 0.0), (0.0, 0.0, 0.0, 1.0), (0.0, 1.0, 0.0, 0.0))


@dataclass(frozen=True)
class Method:
    """One estimator: a label, the library loss function's name and its options."""

    label: str
    loss: str
    options: dict = field(default_factory=dict)

    def gradient_of_loss(self, logpi: float, logmu: float, advantage: float) -> float:
        """``dL/dlogp`` of this method's loss on one element, from :func:`gipo_core.numpy.value_and_grad`."""
        fn = getattr(gnp, self.loss)
        one = lambda v: np.array([v], dtype=np.float64)  # noqa: E731
        _, grad = gnp.value_and_grad(fn)(one(logpi), one(logmu), one(advantage), with_metrics=False, **self.options)
        return float(grad[0])


def default_methods(extra_sigmas: Sequence[float] = ()) -> list[Method]:
    """No-Clip, GIPO sigma in {0.1, 0.3, 0.5, 1, 2} plus ``extra_sigmas``, PPO-clip eps 0.2, SAPO (1, 2)."""
    sigmas = sorted({0.1, 0.3, 0.5, 1.0, 2.0} | {float(s) for s in extra_sigmas})
    methods = [Method("No-Clip", "no_clip_loss")]
    methods += [Method(f"GIPO sigma={s:g}", "gipo_loss", {"sigma": s}) for s in sigmas]
    methods.append(Method("PPO-clip eps=0.2", "ppo_clip_loss", {"clip_low": 0.2, "clip_high": 0.2}))
    # tau_neg = 2 as the GIPO authors ran SAPO (the library's default is the SAPO paper's 1.05).
    methods.append(Method("SAPO tau=1/2", "sapo_loss", {"tau_pos": 1.0, "tau_neg": 2.0}))
    return methods


def softmax(logits: Sequence[float]) -> np.ndarray:
    """Softmax of a 1-d sequence, in float64."""
    z = np.asarray(logits, dtype=np.float64)
    e = np.exp(z - z.max())
    return e / e.sum()


def mixture(weights: Sequence[float]) -> np.ndarray:
    """Behaviour ``mu(.|S0)`` as ``w0 * uniform + w1 * softmax(0,0,0,1) + w2 * softmax(0,1,0,0)``.

    Raises
    ------
    ValueError
        Not three non-negative weights with a positive sum (they are normalised to sum 1).
    """
    w = np.asarray(weights, dtype=np.float64)
    if w.shape != (3,) or not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
        raise ValueError(
            f"`mixture`: `weights` must be three finite non-negative numbers with a positive sum "
            f"(uniform, softmax(0,0,0,1), softmax(0,1,0,0)); got {list(weights)!r}"
        )
    w = w / w.sum()
    return sum(wi * softmax(c) for wi, c in zip(w, MIXTURE_COMPONENTS))


def default_behaviours() -> dict[str, tuple[str, np.ndarray]]:
    """The four behaviour cases A-D: name -> (description, mu(.|S0))."""
    return {
        "A": ("mu uniform", mixture((1.0, 0.0, 0.0))),
        "B": ("mu = 0.4 uniform + 0.3 softmax(0,0,0,1) + 0.3 softmax(0,1,0,0)", mixture((0.4, 0.3, 0.3))),
        "C": ("mu = 0.2 uniform + 0.4 softmax(0,0,0,1) + 0.4 softmax(0,1,0,0)", mixture((0.2, 0.4, 0.4))),
        "D": ("mu = pi (on-policy)", softmax(THETA)),
    }


def _step(state: tuple[int, int], action: str) -> tuple[int, int]:
    dr, dc = _MOVES[action]
    r, c = state[0] + dr, state[1] + dc
    return (r, c) if 0 <= r <= 1 and 0 <= c <= 1 else state


def state_values(pi: np.ndarray, gamma: float = GAMMA) -> dict[tuple[int, int], float]:
    """``V^pi`` of every cell from the linear Bellman system ``(I - gamma P) V = r`` (``V(goal) = 0``)."""
    index = {s: i for i, s in enumerate(STATES)}
    n = len(STATES)
    P = np.zeros((n, n))
    for s in STATES:
        for a, p in zip(ACTIONS, pi):
            nxt = _step(s, a)
            if nxt != GOAL:
                P[index[s], index[nxt]] += p
    v = np.linalg.solve(np.eye(n) - gamma * P, -np.ones(n))
    values = {s: float(v[index[s]]) for s in STATES}
    values[GOAL] = 0.0
    return values


def advantages_at_s0(pi: np.ndarray, gamma: float = GAMMA) -> np.ndarray:
    """``A^pi(S0, a) = -1 + gamma V(s') - V(S0)`` for a in (up, down, left, right)."""
    v = state_values(pi, gamma)
    s0 = STATES[0]
    return np.array([-1.0 + gamma * v[_step(s0, a)] - v[s0] for a in ACTIONS])


def pareto_mask(bias: Sequence[float], variance: Sequence[float], rtol: float = 1e-12) -> list[bool]:
    """True for points no other point dominates (bias and variance both <=, one of them clearly <).

    Differences within ``rtol`` (relative to the larger value) count as ties, so equal points are all kept.
    """
    pts = list(zip(bias, variance))

    def less(x: float, y: float) -> bool:
        return x < y - rtol * max(abs(x), abs(y), 1e-300)

    def leq(x: float, y: float) -> bool:
        return not less(y, x)

    return [
        not any(
            leq(bj, bi) and leq(vj, vi) and (less(bj, bi) or less(vj, vi))
            for j, (bj, vj) in enumerate(pts)
            if j != i
        )
        for i, (bi, vi) in enumerate(pts)
    ]


def _case(mu: np.ndarray, pi: np.ndarray, adv: np.ndarray, methods: Sequence[Method]) -> dict[str, Any]:
    right = ACTIONS.index("right")
    dlogpi = np.array([(1.0 if i == right else 0.0) - pi[right] for i in range(len(ACTIONS))])
    logpi, logmu = np.log(pi), np.log(mu)
    support = mu > 0
    no_clip = Method("No-Clip", "no_clip_loss")

    def per_sample(method: Method) -> np.ndarray:
        # g(a) = -dL/dlogp(a) * dlogpi(a); actions mu never takes contribute nothing.
        return np.array(
            [
                -method.gradient_of_loss(logpi[i], logmu[i], adv[i]) * dlogpi[i] if support[i] else 0.0
                for i in range(len(ACTIONS))
            ]
        )

    g_is = per_sample(no_clip)
    true_grad = float(np.sum(mu * g_is))
    rows = []
    for method in methods:
        g = per_sample(method)
        mean = float(np.sum(mu * g))
        var = float(np.sum(mu * (g - mean) ** 2))
        bias = abs(mean - true_grad)
        coef = [float(g[i] / g_is[i]) if g_is[i] != 0 else None for i in range(len(ACTIONS))]
        rows.append(
            {
                "method": method.label,
                "loss": method.loss,
                "options": dict(method.options),
                "mean": mean,
                "bias": bias,
                "variance": var,
                "mse": bias * bias + var,
                "coefficient": dict(zip(ACTIONS, coef)),
                "per_sample_gradient": dict(zip(ACTIONS, g.tolist())),
            }
        )
    for row, on in zip(rows, pareto_mask([r["bias"] for r in rows], [r["variance"] for r in rows])):
        row["pareto"] = on
    return {
        "mu": dict(zip(ACTIONS, mu.tolist())),
        "ratio": dict(zip(ACTIONS, (pi / np.where(support, mu, 1.0)).tolist())),
        "true_gradient": true_grad,
        "rows": rows,
    }


def run_study(
    extra_sigmas: Sequence[float] = (),
    extra_behaviours: dict[str, tuple[str, Sequence[float]]] | None = None,
    *,
    methods: Sequence[Method] | None = None,
) -> dict[str, Any]:
    """Exact bias, variance and MSE of every method's one-sample estimate of ``dJ/dtheta[S0, right]``.

    Parameters
    ----------
    extra_sigmas : sequence of float
        GIPO widths added to the default sweep {0.1, 0.3, 0.5, 1, 2}.
    extra_behaviours : dict, optional
        More behaviour cases: name -> (description, mu(.|S0) over up, down, left, right).
    methods : sequence of Method, optional
        Replaces the default method list (``extra_sigmas`` is then ignored).

    Returns
    -------
    dict
        ``{"gamma", "theta", "pi", "values", "advantages", "cases": {name: {"description", "mu", "ratio",
        "true_gradient", "rows": [{"method", "bias", "variance", "mse", "pareto", "coefficient", ...}]}}}``.

    Raises
    ------
    ValueError
        A behaviour that is not a probability vector over the four actions.
    """
    methods = list(methods) if methods is not None else default_methods(extra_sigmas)
    pi = softmax(THETA)
    adv = advantages_at_s0(pi)
    behaviours = {k: (d, np.asarray(m, dtype=np.float64)) for k, (d, m) in default_behaviours().items()}
    for name, (desc, mu) in (extra_behaviours or {}).items():
        mu = np.asarray(mu, dtype=np.float64)
        if mu.shape != (4,) or np.any(mu < 0) or not math.isclose(float(mu.sum()), 1.0, rel_tol=1e-9):
            raise ValueError(
                f"`run_study`: behaviour {name!r} must be 4 non-negative probabilities (up, down, left, right) "
                f"summing to 1; got {mu.tolist()!r}"
            )
        if mu[pi > 0].min() <= 0:
            raise ValueError(
                f"`run_study`: behaviour {name!r} gives probability 0 to an action pi takes; "
                f"importance sampling needs mu > 0 wherever pi > 0; got {mu.tolist()!r}"
            )
        behaviours[name] = (desc, mu)
    values = state_values(pi)
    cases = {}
    for name, (desc, mu) in behaviours.items():
        cases[name] = {"description": desc, **_case(mu, pi, adv, methods)}
    return {
        "gamma": GAMMA,
        "theta": list(THETA),
        "pi": dict(zip(ACTIONS, pi.tolist())),
        "values": {f"S{i}": values[s] for i, s in enumerate(STATES)},
        "advantages": dict(zip(ACTIONS, adv.tolist())),
        "cases": cases,
    }


def to_markdown(study: dict[str, Any]) -> str:
    """One markdown table per behaviour case: bias, variance, MSE and Pareto membership."""
    pi = study["pi"]
    lines = [
        "## GridWorld bias-variance study (exact)",
        "",
        "pi(.|S0) = " + ", ".join(f"{a} {p:.4f}" for a, p in pi.items())
        + "; A(S0, .) = " + ", ".join(f"{a} {v:+.4f}" for a, v in study["advantages"].items()),
        "",
    ]
    for name, case in study["cases"].items():
        lines += [
            f"### Case {name}: {case['description']}",
            "",
            "mu(.|S0) = " + ", ".join(f"{a} {p:.4f}" for a, p in case["mu"].items())
            + f"; true gradient dJ/dtheta[S0, right] = {case['true_gradient']:.6f}",
            "",
            "| method | bias | variance | MSE | Pareto |",
            "|---|---:|---:|---:|:---:|",
        ]
        for r in case["rows"]:
            lines.append(
                f"| {r['method']} | {r['bias']:.4e} | {r['variance']:.4e} | {r['mse']:.4e} | "
                f"{'yes' if r['pareto'] else ''} |"
            )
        lines.append("")
    return "\n".join(lines)


def to_csv(study: dict[str, Any]) -> str:
    """One CSV row per (case, method): case, method, loss, options, mean, bias, variance, mse, pareto."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["case", "method", "loss", "options", "mean", "true_gradient", "bias", "variance", "mse", "pareto"])
    for name, case in study["cases"].items():
        for r in case["rows"]:
            w.writerow(
                [
                    name,
                    r["method"],
                    r["loss"],
                    json.dumps(r["options"], sort_keys=True),
                    repr(r["mean"]),
                    repr(case["true_gradient"]),
                    repr(r["bias"]),
                    repr(r["variance"]),
                    repr(r["mse"]),
                    int(r["pareto"]),
                ]
            )
    return buf.getvalue()


def write_outputs(study: dict[str, Any], out_dir: str, *, figure: bool = True) -> dict[str, str]:
    """Write gridworld.md, gridworld.csv, gridworld.json and (with ``figure``) gridworld.png to ``out_dir``.

    Returns the paths written, keyed by kind.
    """
    os.makedirs(out_dir, exist_ok=True)
    paths = {
        "markdown": os.path.join(out_dir, "gridworld.md"),
        "csv": os.path.join(out_dir, "gridworld.csv"),
        "json": os.path.join(out_dir, "gridworld.json"),
    }
    with open(paths["markdown"], "w", encoding="utf-8") as f:
        f.write(to_markdown(study) + "\n")
    with open(paths["csv"], "w", encoding="utf-8", newline="") as f:
        f.write(to_csv(study))
    with open(paths["json"], "w", encoding="utf-8") as f:
        json.dump(study, f, indent=2)
    if figure:
        from .plotting import gridworld_figure

        paths["figure"] = os.path.join(out_dir, "gridworld.png")
        gridworld_figure(study, paths["figure"])
    return paths
