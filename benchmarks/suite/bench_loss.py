"""asv benchmarks: time and memory of forward + backward, per framework, mode, device, size, dtype, method.

Parameters: ``leg`` (framework x mode x device, see ``legs.ALL_LEGS``), ``n`` (elements, 2^10 to 2^24),
``dtype`` (float32, bfloat16) and ``impl`` (the memory-streaming floor, a copy, this library's GIPO with and
without diagnostics and PPO-clip, the literal GIPO formula and verl-style PPO-clip in plain framework ops).
A combination that cannot run here (framework or adapter missing, no GPU, numpy without bfloat16) raises
``NotImplementedError`` in ``setup``, which asv records as skipped.

Benchmarks per class:

``time_fwd_bwd``
    One forward + backward, ending with a device sync; compiled paths were warmed up in ``setup``.
``peakmem_fwd_bwd``
    Peak resident memory of the process over one call (asv's measure: it includes the inputs).
``track_extra_bytes``
    Bytes one call allocates beyond its inputs (see ``legs.measure_extra_bytes`` for how, per framework).
``track_x_floor``, ``track_x_literal``
    Best time over the memory-streaming floor's, and over the literal GIPO formula's, each pair timed in
    alternation in one process. Machine load moves these ratios far less than times, and the literal formula
    is plain framework code with the same kind of temporaries: ``track_x_literal`` is the one to compare
    across commits on a shared machine (``asv continuous``), since a slowdown of this library moves it and
    noise mostly does not.

Select with asv's ``-b`` regex, which also matches the parameters, e.g.
``-b "Torch.time_fwd_bwd\\('torch:cpu', 4194304"``.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for legs.py

import legs as L  # noqa: E402

SIZES = [1 << k for k in (10, 14, 18, 22, 24)]
DTYPES = list(L.DTYPES)
IMPLS = list(L.IMPLS)


class _FwdBwd:
    """Shared body; each subclass fixes the legs of one framework."""

    param_names = ["leg", "n", "dtype", "impl"]
    timeout = 900.0
    # make_step has already warmed up (and compiled); bound the samples at the large sizes.
    warmup_time = 0.0
    repeat = (1, 7, 10.0)

    def setup(self, leg: str, n: int, dtype: str, impl: str) -> None:
        self.step = L.make_step(leg, impl, n, dtype)

    def teardown(self, leg: str, n: int, dtype: str, impl: str) -> None:
        self.step = None

    def time_fwd_bwd(self, leg: str, n: int, dtype: str, impl: str) -> None:
        self.step.run()

    def peakmem_fwd_bwd(self, leg: str, n: int, dtype: str, impl: str) -> None:
        self.step.run()

    def track_extra_bytes(self, leg: str, n: int, dtype: str, impl: str) -> int:
        extra, _ = L.measure_extra_bytes(self.step)
        if extra is None:
            raise NotImplementedError("no way to measure allocations on this leg")
        return extra

    track_extra_bytes.unit = "bytes"

    def _ratio_to(self, leg: str, n: int, dtype: str, reference: str) -> float:
        """Best time over ``reference``'s best, the two run in alternation (5 to 50 rounds, ~2 s)."""
        ref = L.make_step(leg, reference, n, dtype)
        best = {"impl": float("inf"), "ref": float("inf")}
        deadline = time.perf_counter() + 2.0
        rounds = 0
        while rounds < 5 or (rounds < 50 and time.perf_counter() < deadline):
            for key, step in (("impl", self.step), ("ref", ref)):
                t0 = time.perf_counter()
                step.run()
                best[key] = min(best[key], time.perf_counter() - t0)
            rounds += 1
        return best["impl"] / best["ref"]

    def track_x_floor(self, leg: str, n: int, dtype: str, impl: str) -> float:
        return self._ratio_to(leg, n, dtype, "floor")

    track_x_floor.unit = "x floor"

    def track_x_literal(self, leg: str, n: int, dtype: str, impl: str) -> float:
        return self._ratio_to(leg, n, dtype, "gipo_literal")

    track_x_literal.unit = "x literal GIPO"


def _legs(framework: str) -> list[str]:
    return [leg for leg in L.ALL_LEGS if leg.split(":")[0].split(".")[0] == framework]


class Numpy(_FwdBwd):
    params = [_legs("numpy"), SIZES, DTYPES, IMPLS]


class Torch(_FwdBwd):
    params = [_legs("torch"), SIZES, DTYPES, IMPLS]


class Jax(_FwdBwd):
    params = [_legs("jax"), SIZES, DTYPES, IMPLS]


class Tf(_FwdBwd):
    params = [_legs("tf"), SIZES, DTYPES, IMPLS]
