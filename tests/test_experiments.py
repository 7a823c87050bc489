"""The experiments: GridWorld invariants, the demo's smoke run, the `gipo` command line."""

from __future__ import annotations

import csv
import json
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from gipo_core.experiments import gridworld
from gipo_core.experiments.cli import main


# ------------------------------------------------------------------------------------------------ GridWorld


@pytest.fixture(scope="module")
def study():
    return gridworld.run_study([1e4])


def test_on_policy_case_is_identical_for_every_method(study):
    rows = study["cases"]["D"]["rows"]
    ref = rows[0]
    assert ref["method"] == "No-Clip"
    for r in rows:
        assert r["bias"] <= 1e-15, r["method"]
        assert r["variance"] == pytest.approx(ref["variance"], rel=1e-13, abs=0), r["method"]
        assert all(c == pytest.approx(1.0, abs=1e-13) for c in r["coefficient"].values()), r["method"]
        assert r["pareto"]


def test_no_clip_is_exactly_unbiased(study):
    for name, case in study["cases"].items():
        no_clip = case["rows"][0]
        assert no_clip["method"] == "No-Clip"
        assert no_clip["bias"] == 0.0, name
        assert no_clip["mean"] == case["true_gradient"]


def test_large_sigma_approaches_no_clip(study):
    for name, case in study["cases"].items():
        rows = {r["method"]: r for r in case["rows"]}
        big, ref = rows["GIPO sigma=10000"], rows["No-Clip"]
        assert big["bias"] < 1e-6, name
        assert big["variance"] == pytest.approx(ref["variance"], rel=1e-6), name
        # and the bias shrinks monotonically as sigma grows off-policy
        if name != "D":
            biases = [rows[f"GIPO sigma={s:g}"]["bias"] for s in (0.1, 0.3, 0.5, 1, 2, 1e4)]
            assert all(a > b for a, b in zip(biases, biases[1:])), (name, biases)


def test_true_gradient_matches_finite_difference_of_the_exact_return():
    """The study's E[g_IS] is dJ/dtheta[S0, right] at S0 (all else fixed), checked by differencing V(S0)."""
    pi = gridworld.softmax(gridworld.THETA)
    true_grad = gridworld.run_study()["cases"]["A"]["true_gradient"]
    # d/dtheta of sum_a pi(a|S0) Q(S0, a) with Q held at pi's values: the policy-gradient theorem's S0 term.
    adv = gridworld.advantages_at_s0(pi)
    h = 1e-6
    theta = np.array(gridworld.THETA)
    e = np.zeros(4)
    e[3] = h
    fd = (gridworld.softmax(theta + e) @ adv - gridworld.softmax(theta - e) @ adv) / (2 * h)
    assert true_grad == pytest.approx(fd, rel=1e-7)


def test_pareto_mask():
    assert gridworld.pareto_mask([0, 1, 2, 1.5], [3, 1, 0, 2]) == [True, True, True, False]
    assert gridworld.pareto_mask([1, 1], [2, 2]) == [True, True]  # ties are both kept


def test_bad_behaviours_are_rejected_with_a_clear_message():
    with pytest.raises(ValueError, match=r"`mixture`: `weights` must be three"):
        gridworld.mixture((1.0, -0.5, 0.5))
    with pytest.raises(ValueError, match=r"`run_study`: behaviour 'X' must be 4 non-negative"):
        gridworld.run_study(extra_behaviours={"X": ("bad", [0.5, 0.5, 0.5, 0.5])})
    with pytest.raises(ValueError, match=r"probability 0 to an action pi takes"):
        gridworld.run_study(extra_behaviours={"X": ("bad", [0.0, 0.5, 0.0, 0.5])})


def test_gridworld_cli_writes_tables_and_figure(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out = tmp_path / "gw"
    assert main(["gridworld", "--out", str(out), "--sigma", "4", "--mixture", "E=0.1,0.6,0.3",
                 "--mu", "F=0.1,0.2,0.3,0.4"]) == 0
    printed = capsys.readouterr().out
    assert "### Case E" in printed and "### Case F" in printed and "| GIPO sigma=4 |" in printed
    with open(out / "gridworld.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert {r["case"] for r in rows} == {"A", "B", "C", "D", "E", "F"}
    assert len(rows) == 6 * 9  # No-Clip, 6 sigmas, PPO-clip, SAPO
    data = json.loads((out / "gridworld.json").read_text())
    f_case = data["cases"]["F"]
    assert f_case["mu"] == {"up": 0.1, "down": 0.2, "left": 0.3, "right": 0.4}
    for r in rows:
        ref = next(x for x in data["cases"][r["case"]]["rows"] if x["method"] == r["method"])
        assert float(r["variance"]) == ref["variance"]
    assert (out / "gridworld.png").stat().st_size > 10_000
    assert (out / "gridworld.md").read_text().count("| method |") == 6


def test_gridworld_cli_rejects_bad_options(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["gridworld", "--out", str(tmp_path), "--sigma", "-1"])
    assert exc.value.code == 2
    assert "expected a finite number > 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["gridworld", "--out", str(tmp_path), "--mixture", "E=1,2"])
    assert "NAME=W_UNIFORM,W_RIGHT,W_DOWN" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------- CLI


@pytest.mark.parametrize("argv", [["--help"], ["gridworld", "--help"], ["demo", "--help"]])
def test_cli_help(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith("usage: gipo")
    if argv[0] == "demo":
        assert "--quick" in text and "--staleness" in text and "--kl-coef" in text
        assert "95% Student-t" in " ".join(text.split()) and "%%" not in text  # argparse does not %-format it


def test_console_script_help_in_a_fresh_process():
    res = subprocess.run([sys.executable, "-m", "gipo_core.experiments.cli", "--help"], capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "gridworld" in res.stdout and "demo" in res.stdout


# ---------------------------------------------------------------------------------------------------- demo


def test_t_interval_quantiles_match_student_t():
    mpmath = pytest.importorskip("mpmath")
    from gipo_core.experiments import demo

    for df in list(range(1, 41)) + [60, 200]:
        q = demo.t_quantile_975(df)
        # P(T <= q) for Student's t with df degrees of freedom, via the regularised incomplete beta function
        x = df / (df + q * q)
        cdf = 1 - 0.5 * float(mpmath.betainc(df / 2, 0.5, 0, x, regularized=True))
        assert cdf == pytest.approx(0.975, abs=5e-6), df
    mean, lo, hi = demo.t_interval(np.array([[1.0, 5.0], [2.0, 5.0], [3.0, 5.0]]))
    assert mean.tolist() == [2.0, 5.0]
    assert hi[0] - mean[0] == pytest.approx(demo.t_quantile_975(2) / math.sqrt(3))
    assert lo[1] == hi[1] == 5.0


def test_t_interval_is_clipped_to_the_quantity_range():
    """A fraction near 1 (or a return near 0) gave a band past the range the quantity cannot leave."""
    from gipo_core.experiments import demo

    samples = np.array([0.99, 1.0, 1.0, 0.97])
    _, lo, hi = demo.t_interval(samples)
    assert hi > 1.0  # the plain symmetric interval
    mean, lo, hi = demo.t_interval(samples, bounds=demo.BOUNDS["ess"])
    assert 0.0 <= lo <= mean <= hi == 1.0
    _, lo, _ = demo.t_interval(np.array([[0.0, 5.0], [0.5, 5.0], [4.0, 5.0]]), bounds=demo.BOUNDS["returns"])
    assert (lo >= 0).all()


def test_trailing_mean_smooths_over_the_last_window():
    from gipo_core.experiments.demo import _trailing_mean

    x = np.array([[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], [0.0, 0.0, 6.0, 0.0, 0.0, 0.0]])
    ref = np.array([[np.mean(row[max(0, i - 2): i + 1]) for i in range(6)] for row in x])
    assert np.allclose(_trailing_mean(x, 3), ref)


def _tiny(**kw):
    from gipo_core.experiments.demo import DemoConfig

    base = dict(seeds=2, staleness=(1, 3), iterations=4, num_envs=4, rollout_len=8, updates_per_iteration=2,
                minibatch=32, hidden=8, workers=1)
    base.update(kw)
    return DemoConfig.quick(**base)


def test_demo_goes_through_gipo_core_torch():
    pytest.importorskip("torch")
    import gipo_core.torch as gt
    from gipo_core.experiments import demo

    assert demo._loss_functions() is gt
    assert {OBJ[1] for OBJ in demo.OBJECTIVES.values()} <= set(dir(gt))


def test_demo_replays_stored_behaviour_log_probs():
    """K = 1 with one update per rollout is exactly on-policy; K = 4 replays older policies' samples."""
    pytest.importorskip("gymnasium")
    from gipo_core.experiments.demo import train_one

    cfg = _tiny(iterations=6, updates_per_iteration=1, minibatch=64)
    fresh = train_one("gipo-1", 1, 0, cfg)
    assert fresh["weight_mean"] == pytest.approx([1.0] * 6, abs=1e-6)
    assert max(abs(k) for k in fresh["kl_k3"]) < 1e-6
    stale = train_one("gipo-1", 4, 0, cfg)
    assert stale["weight_mean"][0] == pytest.approx(1.0, abs=1e-6)
    assert min(stale["weight_mean"][1:]) < 1.0 - 1e-7
    assert max(stale["kl_k3"][1:]) > 0.0


def test_demo_smoke_run_writes_every_output(tmp_path):
    pytest.importorskip("gymnasium")
    pytest.importorskip("matplotlib")
    from gipo_core.experiments.demo import DIAGNOSTICS, OBJECTIVES, run_demo

    cfg = _tiny()
    runs, paths = run_demo(cfg, str(tmp_path / "demo"), progress=False)
    assert len(runs) == len(OBJECTIVES) * 2 * 2
    for r in runs:
        assert len(r["returns"]) == len(r["steps"]) == cfg.iterations
        assert r["steps"][-1] == cfg.iterations * cfg.num_envs * cfg.rollout_len
        assert all(math.isfinite(v) and v > 0 for v in r["returns"])
        for d in DIAGNOSTICS:
            assert all(math.isfinite(v) for v in r[d])
    for p in paths.values():
        assert os.path.getsize(p) > 0, p
    assert {os.path.basename(p) for p in paths.values()} >= {
        "learning_curves_K1.png", "learning_curves_K3.png", "learning_curves.png", "diagnostics.png",
        "summary.png", "results.md", "results.csv", "results.json",
    }
    with open(paths["table_csv"], newline="") as f:
        rows = list(csv.DictReader(f))
    assert {(r["objective"], r["staleness"]) for r in rows} == {(o, k) for o in OBJECTIVES for k in ("1", "3")}
    for r in rows:
        assert float(r["final_lo"]) <= float(r["final_mean"]) <= float(r["final_hi"])
        assert float(r["auc_lo"]) <= float(r["auc_mean"]) <= float(r["auc_hi"])
    table = (tmp_path / "demo" / "results.md").read_text()
    for label, _, _ in OBJECTIVES.values():
        assert f"| {label} |" in table
    # same seed, same objective -> same run (the comparison is paired across objectives)
    again, _ = run_demo(_tiny(objectives=("ppo-clip",), staleness=(3,), seeds=1), str(tmp_path / "again"),
                        progress=False)
    first = next(r for r in runs if r["objective"] == "ppo-clip" and r["staleness"] == 3 and r["seed"] == 0)
    assert again[0]["returns"] == first["returns"]


def test_demo_config_errors_name_the_field():
    from gipo_core.experiments.demo import DemoConfig

    with pytest.raises(ValueError, match=r"`DemoConfig`: `objectives` must be a non-empty subset"):
        DemoConfig.quick(objectives=("gipo-2",)).validate()
    with pytest.raises(ValueError, match=r"`DemoConfig`: `staleness` must be integers >= 1"):
        DemoConfig.quick(staleness=(0,)).validate()
    with pytest.raises(ValueError, match=r"`DemoConfig`: `seeds` must be an integer >= 1"):
        DemoConfig.quick(seeds=0).validate()


def test_demo_cli_tiny_run(tmp_path, capsys):
    pytest.importorskip("gymnasium")
    pytest.importorskip("matplotlib")
    out = tmp_path / "cli-demo"
    assert main(["demo", "--quick", "--out", str(out), "--objectives", "gipo-1,ppo-clip", "--staleness", "2",
                 "--seeds", "1", "--iterations", "2", "--workers", "1", "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "| GIPO sigma=1 |" in text and "| PPO-clip eps=0.2 |" in text and str(out) in text
    assert (out / "learning_curves_K2.png").exists()
    results = (out / "results.md").read_text()
    assert re.match(r"Generated \d{4}-\d\d-\d\d \d\d:\d\d UTC by `gipo demo --quick --out ", results), results[:200]
    with pytest.raises(SystemExit) as exc:
        main(["demo", "--quick", "--out", str(out), "--objectives", "nope", "--no-progress"])
    assert exc.value.code == 2
    assert "`objectives` must be a non-empty subset" in capsys.readouterr().err
