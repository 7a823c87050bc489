"""The benchmarks stay runnable: every asv benchmark imports and runs once, and the report works.

Fast by construction: the smallest size of the suite only, each benchmark's ``setup`` and benchmark methods
called directly (the way asv calls them), in this process. A leg whose framework or device is missing here
is skipped with the reason; a leg whose framework is installed but whose adapter does not import fails, and
so does every benchmark that raises.
The same inputs also show that the benchmarks compare like with like: the library's GIPO and the literal
formula (and the library's PPO-clip and the verl-style one) give the same loss and gradient.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import sys
from pathlib import Path

import numpy as np
import pytest

BENCH_DIR = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH_DIR))

import legs  # noqa: E402

PREFIXES = ("time_", "peakmem_", "track_", "mem_", "timeraw_")


def _suite_modules() -> list:
    modules = []
    for path in sorted((BENCH_DIR / "suite").glob("*.py")):
        spec = importlib.util.spec_from_file_location(f"gipo_bench_suite_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)  # an import error here fails collection: CI fails
        modules.append(module)
    return modules


def _benchmark_classes() -> list[type]:
    found = []
    for module in _suite_modules():
        for name, obj in vars(module).items():
            if inspect.isclass(obj) and not name.startswith("_") and any(
                m.startswith(PREFIXES) for m in dir(obj)
            ):
                found.append(obj)
    return found


CLASSES = _benchmark_classes()


def _cases() -> list:
    cases = []
    for cls in CLASSES:
        leg_values, sizes, dtypes, impls = cls.params
        for leg in leg_values:
            for dtype in dtypes:
                for impl in impls:
                    if dtype != "float32" and impl not in ("gipo", "gipo_literal"):
                        continue  # bfloat16: the library and the literal path are enough to keep it alive
                    cases.append(pytest.param(cls, leg, min(sizes), dtype, impl,
                                              id=f"{cls.__name__}-{leg}-{dtype}-{impl}"))
    return cases


def test_suite_has_every_framework_and_method() -> None:
    names = {cls.__name__ for cls in CLASSES}
    assert {"Numpy", "Torch", "Jax", "Tf"} <= names, names
    for cls in CLASSES:
        assert cls.param_names == ["leg", "n", "dtype", "impl"]
        assert set(cls.params[3]) == set(legs.IMPLS)
        assert min(cls.params[1]) == 1 << 10 and max(cls.params[1]) == 1 << 24
        assert {"time_fwd_bwd", "peakmem_fwd_bwd", "track_extra_bytes", "track_x_floor",
                "track_x_literal"} <= set(dir(cls))


def _skip_unless_runnable(leg: str) -> None:
    """Skip a leg whose framework or device is missing here; fail one whose adapter does not import."""
    reason = legs.leg_status(leg)
    if reason is None:
        return
    if "gipo_core." in reason:
        pytest.fail(f"{leg}: the framework is installed but {reason}")
    pytest.skip(f"{leg}: {reason}")


@pytest.mark.parametrize(("cls", "leg", "n", "dtype", "impl"), _cases())
def test_benchmark_runs_once(cls: type, leg: str, n: int, dtype: str, impl: str) -> None:
    _skip_unless_runnable(leg)
    bench = cls()
    if leg.startswith("numpy") and dtype == "bfloat16":
        with pytest.raises(NotImplementedError, match="bfloat16"):
            bench.setup(leg, n, dtype, impl)
        return
    bench.setup(leg, n, dtype, impl)
    try:
        for name in sorted(m for m in dir(bench) if m.startswith(PREFIXES)):
            result = getattr(bench, name)(leg, n, dtype, impl)
            if name == "track_extra_bytes":
                assert isinstance(result, int) and result >= 0, (name, result)
            elif name in ("track_x_floor", "track_x_literal"):
                assert isinstance(result, float) and 0 < result < float("inf"), (name, result)
    finally:
        bench.teardown(leg, n, dtype, impl)


@pytest.mark.parametrize("leg", legs.ALL_LEGS)
def test_benchmarks_compare_like_with_like(leg: str) -> None:
    _skip_unless_runnable(leg)
    n = 1 << 10
    data = legs.make_inputs(n)
    out = {impl: [legs.as_numpy(x) for x in legs.make_step(leg, impl, n, data=data, warmup=0).run()]
           for impl in ("gipo", "gipo_literal", "ppo_clip", "ppo_clip_verl")}
    for ours, plain in (("gipo", "gipo_literal"), ("ppo_clip", "ppo_clip_verl")):
        for got, want, what in zip(out[ours], out[plain], ("loss", "grad")):
            np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-9, err_msg=f"{leg} {ours} vs {plain}: {what}")
    assert np.abs(out["gipo"][1]).max() > 0


def test_thread_env_caps_every_framework() -> None:
    spec = importlib.util.spec_from_file_location("gipo_bench_report_env", BENCH_DIR / "report.py")
    report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(report)
    assert report.thread_env(None) == {}
    env = report.thread_env(1)
    assert env["OMP_NUM_THREADS"] == "1" and env["TF_NUM_INTRAOP_THREADS"] == "1"
    assert "intra_op_parallelism_threads=1" in env["XLA_FLAGS"] and "eigen=false" in env["XLA_FLAGS"]


def test_inputs_are_seeded_and_masked() -> None:
    a, b = legs.make_inputs(1 << 12), legs.make_inputs(1 << 12)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    assert a["logp"].shape == (4, 1024) and a["logp"].dtype == np.float32
    valid = a["mask"].mean()
    assert 0.8 <= valid < 1.0
    assert np.all(a["logp"] <= 3.0 + a["old_logp"])


def test_make_step_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="impl"):
        legs.make_step("numpy:cpu", "nope", 1024)
    with pytest.raises(ValueError, match="power of two"):
        legs.make_step("numpy:cpu", "gipo", 1000)
    with pytest.raises(NotImplementedError, match="unknown leg"):
        legs.make_step("numpy:tpu", "gipo", 1024)


def test_report_writes_ratios(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    spec = importlib.util.spec_from_file_location("gipo_bench_report", BENCH_DIR / "report.py")
    report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(report)
    out_json = tmp_path / "r.json"
    rc = report.main(["--legs", "numpy:cpu,torch:cuda", "--sizes", "10,12", "--budget", "0.05", "--repeats", "3",
                      "--json", str(out_json), "--markdown", str(tmp_path / "r.md")])
    assert rc == 0
    data = json.loads(out_json.read_text())
    rows = {(r["n"], r["impl"]): r for r in data["results"] if r["leg"] == "numpy:cpu"}
    assert {n for n, _ in rows} == {1 << 10, 1 << 12}
    for n in (1 << 10, 1 << 12):
        assert rows[n, "gipo_literal"]["x_gipo_literal"] == 1.0
        assert rows[n, "ppo_clip_verl"]["x_ppo_clip_verl"] == 1.0
        gipo = rows[n, "gipo"]
        assert gipo["x_floor"] == gipo["min_s"] / gipo["floor_s"] > 0
        assert gipo["floor_s"] <= 2.5 * rows[n, "copy"]["min_s"] * (1 + 1e-12)
    assert "torch:cuda" in data["unavailable"] or any(r["leg"] == "torch:cuda" for r in data["results"])
    assert set(data["malloc"]) >= {"MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"}
    assert "OMP_NUM_THREADS" in data["threads"]
    table = capsys.readouterr().out
    assert "| numpy:cpu | 2^10 | float32 | gipo | " in table
    assert (tmp_path / "r.md").read_text().strip() == table.strip()


@pytest.mark.parametrize(
    ("script", "args", "framework"),
    [
        ("torch_targets.py", ["--large", "11", "--repeat", "1", "--no-compile"], "torch"),
        ("jax_targets.py", ["--help"], "jax"),
        ("tf_targets.py", ["--help"], "tensorflow"),
        ("diagnostics_overhead.py", ["--log2-n", "10", "--repeat", "1"], "torch"),
    ],
)
def test_target_scripts_run(script: str, args: list, framework: str) -> None:
    """The per-backend target scripts quoted in the closing notes still run (tiny sizes, or --help)."""
    import subprocess

    pytest.importorskip(framework)
    done = subprocess.run(
        [sys.executable, str(BENCH_DIR / script), *args], capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip()


def test_report_json_is_written_outside_the_source_tree_by_default():
    spec = importlib.util.spec_from_file_location("gipo_bench_report_default", BENCH_DIR / "report.py")
    report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(report)
    default = Path(report.parse_args([]).json)
    assert default.parts[0] == "gipo-out", default  # gitignored: a benchmark run leaves the checkout clean
    assert not default.resolve().is_relative_to(BENCH_DIR.resolve())
