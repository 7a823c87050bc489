"""An independent exact computation of the 2x2 GridWorld study, straight from REFERENCE section 6.

Nothing here uses gipo_core's losses or the experiment's helpers: the MDP, the value function (by value
iteration in 40-digit mpmath arithmetic, not a linear solve), the advantages and every method's gradient
coefficient are written out again from the reference text. `gipo gridworld` must agree to 1e-9.
"""

from __future__ import annotations

import pytest

mpmath = pytest.importorskip("mpmath")
mp = mpmath.mp

from gipo_core.experiments.gridworld import run_study  # noqa: E402  (the study under test)

ACTIONS = ["up", "down", "left", "right"]
# Grid cells (row, col): S0 (0,0), S1 (0,1), S2 (1,0), goal (1,1). Transitions listed by hand from the text:
# S0: down -> S2, right -> S1; S1: down -> G, left -> S0; S2: up -> S0, right -> G; walls keep you in place.
NEXT = {
    "S0": {"up": "S0", "down": "S2", "left": "S0", "right": "S1"},
    "S1": {"up": "S1", "down": "G", "left": "S0", "right": "S1"},
    "S2": {"up": "S0", "down": "S2", "left": "S2", "right": "G"},
}


def _softmax(z):
    e = [mp.exp(mp.mpf(v)) for v in z]
    s = sum(e)
    return [v / s for v in e]


def _study(sigmas, behaviours):
    mp.dps = 40
    gamma = mp.mpf("0.9")
    pi = _softmax([0, 1, 0, 1])
    p = dict(zip(ACTIONS, pi))
    v = {"S0": mp.mpf(0), "S1": mp.mpf(0), "S2": mp.mpf(0), "G": mp.mpf(0)}
    for _ in range(1200):  # gamma^1200 ~ 1e-55: converged far below 40 digits' needs
        v = {
            **{s: sum(p[a] * (-1 + gamma * v[NEXT[s][a]]) for a in ACTIONS) for s in NEXT},
            "G": mp.mpf(0),
        }
    adv = {a: -1 + gamma * v[NEXT["S0"][a]] - v["S0"] for a in ACTIONS}
    dlog = {a: (1 if a == "right" else 0) - p["right"] for a in ACTIONS}

    def gipo(sigma):
        return lambda rho, a: mp.exp(-((mp.log(rho) / sigma) ** 2) / 2)

    def ppo(eps):
        # inclusive band: the gradient stops only strictly outside it, on the side the advantage pushes to
        return lambda rho, a: 0 if (adv[a] > 0 and rho > 1 + eps) or (adv[a] < 0 and rho < 1 - eps) else 1

    def sapo(tau_pos, tau_neg):
        def coef(rho, a):
            q = 1 / (1 + mp.exp(-(tau_pos if adv[a] > 0 else tau_neg) * (rho - 1)))
            return 4 * q * (1 - q)

        return coef

    methods = [("No-Clip", lambda rho, a: 1)]
    methods += [(f"GIPO sigma={s:g}", gipo(mp.mpf(s))) for s in sigmas]
    methods += [("PPO-clip eps=0.2", ppo(mp.mpf("0.2"))), ("SAPO tau=1/2", sapo(1, 2))]
    out = {}
    for name, mu_list in behaviours.items():
        mu = dict(zip(ACTIONS, mu_list))
        rho = {a: p[a] / mu[a] for a in ACTIONS}
        g_is = {a: rho[a] * dlog[a] * adv[a] for a in ACTIONS}
        truth = sum(mu[a] * g_is[a] for a in ACTIONS)
        rows = {}
        for label, coef in methods:
            g = {a: coef(rho[a], a) * g_is[a] for a in ACTIONS}
            mean = sum(mu[a] * g[a] for a in ACTIONS)
            var = sum(mu[a] * (g[a] - mean) ** 2 for a in ACTIONS)
            bias = abs(mean - truth)
            rows[label] = {"bias": bias, "variance": var, "mse": bias**2 + var, "mean": mean}
        out[name] = {"truth": truth, "rows": rows}
    return out, pi, adv


def _mix(w0, w1, w2):
    comps = [_softmax([0, 0, 0, 0]), _softmax([0, 0, 0, 1]), _softmax([0, 1, 0, 0])]
    return [w0 * c0 + w1 * c1 + w2 * c2 for c0, c1, c2 in zip(*comps)]


def _dominated(i, pts):
    bi, vi = pts[i]
    return any(bj <= bi and vj <= vi and (bj < bi - 1e-20 or vj < vi - 1e-20) for j, (bj, vj) in enumerate(pts) if j != i)


def test_gridworld_matches_independent_exact_computation():
    mp.dps = 40
    behaviours = {
        "A": _mix(1, 0, 0),
        "B": _mix(mp.mpf("0.4"), mp.mpf("0.3"), mp.mpf("0.3")),
        "C": _mix(mp.mpf("0.2"), mp.mpf("0.4"), mp.mpf("0.4")),
        "D": _softmax([0, 1, 0, 1]),
    }
    sigmas = [0.1, 0.3, 0.5, 1, 2]
    ref, pi, adv = _study(sigmas, behaviours)
    study = run_study()
    assert list(study["cases"]) == list(behaviours)
    for a, p in zip(ACTIONS, pi):
        assert abs(study["pi"][a] - float(p)) <= 1e-12
        assert abs(study["advantages"][a] - float(adv[a])) <= 1e-12
    worst = 0.0
    for name, case in study["cases"].items():
        assert abs(case["true_gradient"] - float(ref[name]["truth"])) <= 1e-12
        assert [r["method"] for r in case["rows"]] == list(ref[name]["rows"])
        for row in case["rows"]:
            exact = ref[name]["rows"][row["method"]]
            for key in ("bias", "variance", "mse", "mean"):
                err = abs(row[key] - float(exact[key]))
                worst = max(worst, err)
                assert err <= 1e-9, (name, row["method"], key, row[key], float(exact[key]))
        pts = [(ref[name]["rows"][r["method"]]["bias"], ref[name]["rows"][r["method"]]["variance"]) for r in case["rows"]]
        expected_front = [not _dominated(i, pts) for i in range(len(pts))]
        assert [r["pareto"] for r in case["rows"]] == expected_front, name
    assert worst <= 1e-9


def test_extra_sigma_and_mixture_match_independent_computation():
    mp.dps = 40
    mix = _mix(mp.mpf("0.1"), mp.mpf("0.6"), mp.mpf("0.3"))
    ref, _, _ = _study([0.1, 0.3, 0.5, 1, 2, 4], {"E": mix})
    study = run_study([4.0], {"E": ("custom", [float(x) for x in mix])})
    rows = {r["method"]: r for r in study["cases"]["E"]["rows"]}
    assert "GIPO sigma=4" in rows
    for label, exact in ref["E"]["rows"].items():
        for key in ("bias", "variance", "mse"):
            assert abs(rows[label][key] - float(exact[key])) <= 1e-9, (label, key)
