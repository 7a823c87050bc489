"""One-run ratio report: forward + backward time of every implementation, as ratios measured together.

Run from the repository root::

    python benchmarks/report.py                                  # every installed leg, 2^18, 2^22, 2^24
    python benchmarks/report.py --legs torch:cpu --sizes 22 --dtypes float32,bfloat16
    python benchmarks/report.py --malloc both                    # glibc's defaults, then heap reuse

For each leg (framework x mode x device), size and dtype, every implementation of ``legs.IMPLS`` is built
and warmed up, then timed round-robin in one process (one call of each per round, so that machine noise hits
them alike); the best of the rounds is reported (on a shared machine the least disturbed one), the median
goes to the JSON. The markdown table gives, per implementation, the time,
the ratio to the memory-streaming floor (read four arrays, write one), to verl-style PPO-clip and to the
literal GIPO formula in the same framework, the share of the device's copy bandwidth it reaches counting
the five array passes a fused step must make, the extra bytes one call allocates, and page faults per call.
The same figures, with the machine, the versions and the allocator settings, go to a JSON file.

Allocator: at 2^24 float32 elements each temporary is 64 MiB, above glibc's mmap threshold, so eager
frameworks get fresh pages from the kernel (and fault them in) on every call. ``--malloc reuse`` re-runs the
report with ``MALLOC_MMAP_MAX_=0`` and ``MALLOC_TRIM_THRESHOLD_`` at 64 GiB, which keeps freed memory in the
heap for reuse; ``--malloc both`` prints both. The settings in force are recorded in the output.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import functools
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import legs as L  # noqa: E402

#: Environment that makes glibc keep freed memory for reuse instead of returning it to the kernel.
MALLOC_REUSE = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(64 << 30), "MALLOC_TOP_PAD_": str(256 << 20)}
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "XLA_FLAGS", "TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS")


def thread_env(threads: int | None) -> dict[str, str]:
    """Environment that caps every framework's CPU thread pool at ``threads`` (empty: leave theirs)."""
    if threads is None:
        return {}
    xla = f"--xla_cpu_multi_thread_eigen={'true' if threads > 1 else 'false'} intra_op_parallelism_threads={threads}"
    return {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "XLA_FLAGS": xla,
            "TF_NUM_INTRAOP_THREADS": str(threads), "TF_NUM_INTEROP_THREADS": str(threads)}


def _faults() -> int:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_minflt + r.ru_majflt


def measure(leg: str, n: int, dtype: str, impls: tuple[str, ...], repeats: int, budget: float,
            data: dict | None = None) -> list[dict]:
    """Time every implementation of one (leg, n, dtype) round-robin; one record per implementation."""
    data = L.make_inputs(n) if data is None else data
    steps: dict[str, L.Step] = {}
    first: dict[str, float] = {}
    records: list[dict] = []
    for impl in impls:
        try:
            step = L.make_step(leg, impl, n, dtype, data=data)
            t0 = time.perf_counter()
            step.run()
            first[impl] = time.perf_counter() - t0
            steps[impl] = step
        except NotImplementedError as exc:
            records.append({"leg": leg, "n": n, "dtype": dtype, "impl": impl, "skipped": str(exc)})
        except Exception as exc:  # noqa: BLE001 - one broken implementation must not lose the others
            print(f"{leg} {impl} 2^{L.log2(n)} {dtype}: FAILED: {type(exc).__name__}: {exc}", file=sys.stderr)
            records.append({"leg": leg, "n": n, "dtype": dtype, "impl": impl,
                            "error": f"{type(exc).__name__}: {str(exc)[:300]}"})
    if not steps:
        return records
    per_round = sum(first.values())
    rounds = int(max(3, min(repeats, budget / max(per_round, 1e-9))))
    times: dict[str, list[float]] = {impl: [] for impl in steps}
    faults: dict[str, list[int]] = {impl: [] for impl in steps}
    for _ in range(rounds):
        for impl, step in steps.items():
            f0 = _faults()
            t0 = time.perf_counter()
            step.run()
            times[impl].append(time.perf_counter() - t0)
            faults[impl].append(_faults() - f0)
    for impl, step in steps.items():
        extra, method = L.measure_extra_bytes(step)
        records.append({
            "leg": leg, "n": n, "dtype": dtype, "impl": impl,
            "median_s": statistics.median(times[impl]), "min_s": min(times[impl]), "rounds": rounds,
            "faults_per_call": statistics.median(faults[impl]),
            "extra_bytes": extra, "extra_bytes_method": method, "bytes_moved": step.bytes_moved,
        })
    steps.clear()
    gc.collect()
    return records


def add_ratios(records: list[dict]) -> None:
    """Ratios of best times within each (leg, n, dtype): to the floor, verl-style PPO-clip, the literal formula.

    The floor is the faster of the ``floor`` step and 5/2 times the ``copy`` step (both move the bytes of
    reading four arrays and writing one).
    """
    groups: dict[tuple, dict[str, dict]] = {}
    for r in records:
        if "median_s" in r:
            groups.setdefault((r["leg"], r["n"], r["dtype"]), {})[r["impl"]] = r
    for group in groups.values():
        candidates = [group[k]["min_s"] * s for k, s in (("floor", 1.0), ("copy", 2.5)) if k in group]
        floor = min(candidates) if candidates else None
        copy_bw = group["copy"]["bytes_moved"] / group["copy"]["min_s"] if "copy" in group else None
        for r in group.values():
            t = r["min_s"]
            r["floor_s"] = floor
            r["x_floor"] = t / floor if floor else None
            for key, ref in (("x_ppo_clip_verl", "ppo_clip_verl"), ("x_gipo_literal", "gipo_literal")):
                r[key] = t / group[ref]["min_s"] if ref in group else None
            r["bandwidth_GBps"] = r["bytes_moved"] / t / 1e9
            r["copy_bw_frac"] = (r["bytes_moved"] / t) / copy_bw if copy_bw else None


def _fmt(x: float | None, spec: str) -> str:
    return "–" if x is None else format(x, spec)


def _fmt_time(t: float) -> str:
    return f"{t * 1e6:.0f} µs" if t < 1e-3 else f"{t * 1e3:.2f} ms"


def summary(records: list[dict]) -> list[str]:
    """A compact table: this library's GIPO per (leg, n, dtype), with and without its diagnostics."""
    rows = {(r["leg"], r["n"], r["dtype"], r["impl"]): r for r in records if "median_s" in r}
    lines = [
        "| leg | n | dtype | GIPO time | × floor | × PPO-clip (verl) | × literal GIPO | extra bytes "
        "| with diagnostics × floor |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for (leg, n, dtype, impl), r in rows.items():
        if impl != "gipo":
            continue
        metrics = rows.get((leg, n, dtype, "gipo+metrics"))
        lines.append(
            f"| {leg} | 2^{L.log2(n)} | {dtype} | {_fmt_time(r['min_s'])} | {_fmt(r['x_floor'], '.2f')} "
            f"| {_fmt(r['x_ppo_clip_verl'], '.2f')} | {_fmt(r['x_gipo_literal'], '.2f')} "
            f"| {L.human_bytes(r['extra_bytes'])} | {_fmt(metrics and metrics['x_floor'], '.2f')} |"
        )
    return lines if len(lines) > 2 else []


def markdown(records: list[dict], unavailable: dict[str, str], header: dict[str, Any]) -> str:
    """The report as markdown: a header, a GIPO summary, the full table, the legs that did not run."""
    alloc = ", ".join(f"{k}={v}" for k, v in header["malloc"].items() if v != "default") or "glibc defaults"
    threads = ", ".join(f"{k}={v}" for k, v in header["threads"].items() if v != "default") or "frameworks' defaults"
    lines = [
        f"Measured {header['date']} on {header['machine']} with `{header['command']}`; allocator: {alloc}; "
        f"threads: {threads}.",
        "",
        *summary(records),
        "",
        "| leg | n | dtype | implementation | time | GB/s | × floor | × PPO-clip (verl) | × literal GIPO "
        "| % copy BW | extra bytes | faults/call |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        if "median_s" not in r:
            continue
        lines.append(
            f"| {r['leg']} | 2^{L.log2(r['n'])} | {r['dtype']} | {r['impl']} | {_fmt_time(r['min_s'])} | {r['bandwidth_GBps']:.1f} "
            f"| {_fmt(r['x_floor'], '.2f')} | {_fmt(r['x_ppo_clip_verl'], '.2f')} "
            f"| {_fmt(r['x_gipo_literal'], '.2f')} | {_fmt(r['copy_bw_frac'] and 100 * r['copy_bw_frac'], '.0f')} "
            f"| {L.human_bytes(r['extra_bytes'])} | {r['faults_per_call']:.0f} |"
        )
    skipped = sorted({(r["leg"], r["dtype"], r["skipped"]) for r in records if "skipped" in r})
    errors = [r for r in records if "error" in r]
    if unavailable or skipped or errors:
        lines.append("")
        lines.extend(f"- {leg}: not run ({why})" for leg, why in unavailable.items())
        lines.extend(f"- {leg} {dtype}: skipped ({why})" for leg, dtype, why in skipped)
        lines.extend(f"- {r['leg']} 2^{L.log2(r['n'])} {r['dtype']} {r['impl']}: FAILED ({r['error']})"
                     for r in errors)
    lines.append("")
    lines.append(
        "time: best of round-robin rounds of forward + backward ending in a device sync; GB/s: the bytes a fused "
        "step must move (read four arrays, write one; a copy: read one, write one) over the time; floor: read "
        "four arrays and write one (the faster of a fused kernel and 5/2 copies); % copy BW: GB/s against the "
        "copy's; extra bytes: "
        + "; ".join(sorted({f"{r['leg'].split(':')[0]}: {r['extra_bytes_method']}" for r in records
                            if "extra_bytes_method" in r}))
    )
    return "\n".join(lines)


def machine() -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    desc = f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.machine()}, Python {platform.python_version()}"
    try:
        import torch

        if torch.cuda.is_available():
            desc += f", GPU {torch.cuda.get_device_name(0)}"
    except Exception:  # noqa: BLE001
        pass
    return desc


def versions() -> dict[str, str]:
    out = {}
    for name in ("numpy", "torch", "jax", "tensorflow", "gipo_core"):
        try:
            out[name] = __import__(name).__version__
        except Exception:  # noqa: BLE001
            out[name] = "not installed"
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--legs", default="all", help=f"comma-separated legs, or 'all' (default): {', '.join(L.ALL_LEGS)}")
    p.add_argument("--sizes", default="18,22,24", help="comma-separated log2 sizes (default 18,22,24)")
    p.add_argument("--dtypes", default="float32", help=f"comma-separated, of {', '.join(L.DTYPES)}")
    p.add_argument("--impls", default=",".join(L.IMPLS), help="comma-separated implementations")
    p.add_argument("--repeats", type=int, default=21, help="most timed rounds per (leg, size, dtype)")
    p.add_argument("--budget", type=float, default=8.0, help="seconds of timed rounds per (leg, size, dtype)")
    p.add_argument("--json", default="gipo-out/benchmarks/report.json",
                   help="where to write the JSON results (default: gipo-out/benchmarks/report.json; the report\n"
                        "kept in the repository, benchmarks/report.json, changes only when named here)")
    p.add_argument("--markdown", default=None, help="also write the markdown table here")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads per framework (OMP_NUM_THREADS, XLA and TF intra-op threads); default: theirs")
    p.add_argument("--strict", action="store_true",
                   help="exit with status 2 if a requested leg cannot run here (a GPU run that must not skip)")
    p.add_argument("--malloc", choices=("default", "reuse", "both"), default="default",
                   help="glibc allocator settings: as found (default), heap reuse, or both (two runs)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    modes = ("default", "reuse") if args.malloc == "both" else (args.malloc,)
    envs = {mode: {**(MALLOC_REUSE if mode == "reuse" else {}), **thread_env(args.threads)} for mode in modes}
    if len(modes) > 1 or any(os.environ.get(k) != v for k, v in envs[modes[0]].items()):
        # Allocator and thread settings are read at process start: run each setting in a fresh process.
        argv_rest, tokens = [], iter(argv if argv is not None else sys.argv[1:])
        for token in tokens:
            if token == "--malloc":
                next(tokens, None)
            elif not token.startswith("--malloc="):
                argv_rest.append(token)
        rc = 0
        for mode in modes:
            env = {k: v for k, v in os.environ.items() if k not in MALLOC_REUSE}
            env.update(envs[mode])
            extra = []
            if len(modes) > 1:
                stem = Path(args.json)
                extra = ["--json", str(stem.with_name(f"{stem.stem}-{mode}{stem.suffix}"))]
                if args.markdown:
                    md = Path(args.markdown)
                    extra += ["--markdown", str(md.with_name(f"{md.stem}-{mode}{md.suffix}"))]
                print(f"\n## allocator: {mode}\n", flush=True)
            rc |= subprocess.call([sys.executable, __file__, *argv_rest, *extra, "--malloc", "default"], env=env)
        return rc
    requested = L.ALL_LEGS if args.legs == "all" else tuple(s.strip() for s in args.legs.split(","))
    impls = tuple(s.strip() for s in args.impls.split(","))
    unknown = [i for i in impls if i not in L.IMPLS]
    if unknown:
        raise SystemExit(f"report.py: unknown --impls {unknown}; choose from {', '.join(L.IMPLS)}")
    sizes = [1 << int(s) for s in args.sizes.split(",")]
    dtypes = [s.strip() for s in args.dtypes.split(",")]
    unavailable = {leg: L.leg_status(leg) for leg in requested if L.leg_status(leg) is not None}
    header = {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
        "command": "python benchmarks/report.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "malloc": L.malloc_settings(),
        "threads": {k: os.environ.get(k, "default") for k in THREAD_VARS},
        "versions": versions(),
    }
    records: list[dict] = []
    inputs = functools.lru_cache(maxsize=None)(L.make_inputs)  # the same inputs for every leg

    def write() -> str:
        """Ratios, JSON and markdown of what has been measured so far (a time limit loses nothing done)."""
        add_ratios(records)
        table = markdown(records, unavailable, header)
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({**header, "unavailable": unavailable, "results": records}, indent=1))
        if args.markdown:
            Path(args.markdown).write_text(table + "\n")
        return table

    for leg in requested:
        if leg in unavailable:
            print(f"{leg}: not run ({unavailable[leg]})", file=sys.stderr, flush=True)
            continue
        for dtype in dtypes:
            for n in sizes:
                t0 = time.perf_counter()
                records += measure(leg, n, dtype, impls, args.repeats, args.budget, data=inputs(n))
                print(f"{leg} {dtype} 2^{L.log2(n)}: {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
                write()
    print(write())
    if any("error" in r for r in records):
        return 1
    return 2 if args.strict and unavailable else 0


if __name__ == "__main__":
    raise SystemExit(main())
