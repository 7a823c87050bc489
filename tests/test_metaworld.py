"""The Meta-World study: its robust statistics against hand-computed cases, and the `gipo metaworld --quick` path."""

from __future__ import annotations

import csv
import json
import math
import os

import numpy as np
import pytest

from gipo_core.experiments import stats
from gipo_core.experiments.cli import main

# ------------------------------------------------------------------------------------------------ statistics


def test_iqm_matches_hand_computed_trimmed_means():
    # 8 runs: drop 2 at each end -> mean(2, 3, 4, 5) = 3.5 (the order and the task split do not matter)
    assert stats.iqm(np.array([[7.0, 0.0, 5.0, 2.0], [1.0, 6.0, 3.0, 4.0]])) == 3.5
    # 5 runs: floor(5 / 4) = 1 dropped at each end -> mean(1, 2, 3) = 2
    assert stats.iqm(np.array([[0.0, 1.0, 2.0, 10.0, 3.0]])) == 2.0
    # 3 runs: nothing dropped -> plain mean
    assert stats.iqm(np.array([[0.0], [0.3], [0.9]])) == pytest.approx(0.4)
    # success rates with outliers: 12 runs, 3 dropped each end -> mean of the middle six
    x = np.array([[0.0, 0.0, 0.1, 0.2, 0.2, 0.3], [0.3, 0.4, 0.5, 0.9, 1.0, 1.0]])
    assert stats.iqm(x) == pytest.approx((0.2 + 0.2 + 0.3 + 0.3 + 0.4 + 0.5) / 6)


def test_probability_of_improvement_matches_hand_computed_case():
    # task 1: pairs (1>0), (1>0), (0=0), (0=0) -> (1 + 1 + 0.5 + 0.5) / 4 = 0.75; task 2: all ties -> 0.5
    x = np.array([[1.0, 0.0], [1.0, 1.0]])
    y = np.array([[0.0, 0.0], [1.0, 1.0]])
    assert stats.probability_of_improvement(x, y) == pytest.approx(0.625)
    assert stats.probability_of_improvement(y, x) == pytest.approx(0.375)  # P(X>Y) + P(Y>X) = 1 with ties split
    # different seed counts: x has 3 runs, y 1 run -> 2 of 3 pairs win, one ties
    assert stats.probability_of_improvement(np.array([[0.5, 0.7, 0.2]]), np.array([[0.2]])) == pytest.approx(2.5 / 3)


def test_stratified_bootstrap_keeps_every_task_and_resamples_within_it():
    # each task's scores lie in a band of their own: a replicate's per-task means must stay in that band,
    # which a bootstrap that pooled the tasks would break
    scores = np.array([[0.0, 0.1, 0.2], [10.0, 10.1, 10.2]])
    seen = []
    reps = stats.stratified_bootstrap(lambda s: seen.append(s.copy()) or 0.0, scores, reps=50, seed=0)
    assert reps.shape == (50,)
    for s in seen:
        assert s.shape == scores.shape
        assert np.all((s[0] >= 0) & (s[0] <= 0.2)) and np.all((s[1] >= 10) & (s[1] <= 10.2))
    assert len({s.tobytes() for s in seen}) > 1  # it resamples
    # constant scores: a zero-width interval at the value
    assert stats.interval_estimates(stats.iqm, np.full((3, 5), 0.4), reps=200) == pytest.approx((0.4, 0.4, 0.4))
    point, lo, hi = stats.interval_estimates(stats.iqm, np.random.default_rng(1).random((3, 5)), reps=500)
    assert lo <= point <= hi and lo < hi


def test_statistics_reject_bad_input():
    with pytest.raises(ValueError, match=r"`iqm`: `scores` must be a non-empty \(tasks, seeds\) array"):
        stats.iqm(np.zeros(4))
    with pytest.raises(ValueError, match=r"`iqm`: `scores` must be finite"):
        stats.iqm(np.array([[0.0, np.nan]]))
    with pytest.raises(ValueError, match="same number of tasks"):
        stats.probability_of_improvement(np.zeros((2, 3)), np.zeros((3, 3)))
    with pytest.raises(ValueError, match="`reps` must be an integer >= 1"):
        stats.stratified_bootstrap(stats.iqm, np.zeros((2, 2)), reps=0)


# ------------------------------------------------------------------------------------------ the quick study

_TINY = ["--iterations", "2", "--num-envs", "2", "--rollout-len", "8", "--max-episode-steps", "8",
         "--eval-episodes", "2", "--workers", "1", "--no-progress"]


@pytest.fixture(scope="module")
def quick_study(tmp_path_factory):
    out = tmp_path_factory.mktemp("mw")
    assert main(["metaworld", "--quick", "--out", str(out), *_TINY]) == 0
    return out


def test_quick_study_gives_every_method_a_finite_success_rate(quick_study):
    from gipo_core.experiments.demo import OBJECTIVES

    runs = sorted(os.listdir(quick_study / "runs"))
    assert len(runs) == len(OBJECTIVES) * 2  # one task, one K, 2 seeds
    for name in runs:
        run = json.loads((quick_study / "runs" / name).read_text())
        assert 0.0 <= run["eval_success"] <= 1.0 and math.isfinite(run["eval_return"])
        assert len(run["train_success"]) == 2 and all(math.isfinite(v) for v in run["train_success"])
        assert all(math.isfinite(v) for v in run["ess"])
    with open(quick_study / "metaworld_results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert {r["objective"] for r in rows} == set(OBJECTIVES)
    for r in rows:
        assert r["staleness"] == "8" and r["runs"] == "2"
        assert 0.0 <= float(r["iqm_lo"]) <= float(r["iqm"]) <= float(r["iqm_hi"]) <= 1.0


def test_quick_study_writes_every_output_of_the_full_study(quick_study):
    for name in ("metaworld_iqm.png", "metaworld_curves.png", "metaworld_probability_of_improvement.png"):
        assert (quick_study / name).stat().st_size > 10_000, name
    table = (quick_study / "metaworld_results.md").read_text()
    assert "| GIPO sigma=1 |" in table and "P(GIPO > baseline)" in table
    assert "| GIPO sigma=0.5 vs PPO-clip eps=0.2 |" in table
    summary = json.loads((quick_study / "metaworld_summary.json").read_text())
    assert summary["paper_iqm"] == {"gipo-1": 0.73, "ppo-clip": 0.18}
    assert set(summary["improvement"]["gipo-1"]) == {"ppo-clip", "sapo", "no-clip"}


def test_quick_study_resumes_without_rerunning_and_refuses_another_config(quick_study, capsys):
    before = {p: os.stat(quick_study / "runs" / p).st_mtime_ns for p in os.listdir(quick_study / "runs")}
    assert main(["metaworld", "--quick", "--out", str(quick_study), *_TINY]) == 0
    assert "10 runs" in capsys.readouterr().out
    after = {p: os.stat(quick_study / "runs" / p).st_mtime_ns for p in os.listdir(quick_study / "runs")}
    assert after == before  # nothing was trained again
    with pytest.raises(SystemExit) as exc:
        main(["metaworld", "--quick", "--out", str(quick_study), *_TINY, "--eval-episodes", "3"])
    assert exc.value.code == 2
    assert "another configuration" in capsys.readouterr().err


def test_metaworld_cli_rejects_bad_options(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["metaworld", "--out", str(tmp_path), "--tasks", "reach"])
    assert exc.value.code == 2
    assert "Meta-World v3 task names" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["metaworld", "--out", str(tmp_path), "--staleness", "0"])
    assert "integers >= 1" in capsys.readouterr().err


def test_metaworld_help_lists_the_study_options(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["metaworld", "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for option in ("--quick", "--tasks", "--staleness", "--seeds", "--iterations", "--eval-episodes", "--workers"):
        assert option in text, option
