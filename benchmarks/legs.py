"""What the benchmarks run: one forward + backward step per (leg, implementation, size, dtype).

A *leg* is one framework in one execution mode on one device: ``numpy:cpu``, ``torch:cpu`` (eager; large
inputs run the library's fused kernel), ``torch.opbyop:cpu`` (eager, the core one torch op at a time),
``torch.compile:cpu``, ``jax.jit:cpu``, ``tf.xla:cpu`` and, where a GPU is present, ``torch:cuda``,
``torch.compile:cuda`` and ``jax.jit:gpu``. A leg whose framework, adapter or device is missing is
reported as unavailable with the reason (see ``leg_status``), never silently dropped.

Implementations, each a full forward + backward of a masked token-mean loss over ``n`` elements:

``floor``
    The memory-streaming floor: the time to read four arrays of ``n`` elements and write one, the least
    any fused loss + gradient pass over (logp, old_logp, advantages, mask) -> grad_logp can take. It is the
    faster of a fused ``a * b + c * d`` (compiled by the framework where it has a compiler) and 5/2 times an
    elementwise copy of one array (each copy reads one array and writes one).
``copy``
    One elementwise copy (read one array, write one): the device's copy bandwidth.
``gipo``, ``gipo+metrics``, ``ppo_clip``
    This library's ``gipo_loss`` (without and with the diagnostics) and ``ppo_clip_loss``.
``gipo_literal``
    GIPO written the way the authors' trainer writes it in plain framework ops: ``ratio = exp(logp -
    old_logp)``, ``weight = exp(-0.5 * (log(ratio.detach()) / sigma) ** 2)``, ``-(weight * ratio * adv)``,
    masked mean, autodiff for the gradient.
``ppo_clip_verl``
    PPO-clip written the way verl's ``compute_policy_loss`` writes it (log-ratio clamped to +-20, two
    surrogate losses, the max, dual clip at c = 3 for negative advantages, masked mean), autodiff.

Every step ends with a device sync (``torch.cuda.synchronize``, ``block_until_ready``, a host read of
the loss), compiled steps are warmed up by ``make_step``, inputs come from a fixed seed.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import math
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

if "tensorflow" not in sys.modules and importlib.util.find_spec("triton") is not None:
    # Triton and TensorFlow both bundle LLVM: importing Triton after TensorFlow aborts the process ("Option
    # ... registered more than once"), and torch.compile imports Triton by itself when it is installed. Triton
    # first, and both work in one process (a script that imported TensorFlow already does not get Triton).
    try:
        import triton  # noqa: F401
    except Exception:  # noqa: BLE001 - a broken Triton: torch.compile will say so
        pass

__all__ = [
    "ALL_LEGS",
    "DTYPES",
    "IMPLS",
    "SIGMA",
    "Step",
    "as_numpy",
    "leg_status",
    "available_legs",
    "make_inputs",
    "make_step",
]

#: Every leg this suite knows, in report order.
ALL_LEGS = (
    "numpy:cpu",
    "torch:cpu",
    "torch.opbyop:cpu",
    "torch.compile:cpu",
    "jax.jit:cpu",
    "tf.xla:cpu",
    "torch:cuda",
    "torch.compile:cuda",
    "jax.jit:gpu",
)
IMPLS = ("floor", "copy", "gipo", "gipo+metrics", "ppo_clip", "gipo_literal", "ppo_clip_verl")
DTYPES = ("float32", "bfloat16")
SIGMA = 1.0
CLIP = 0.2
DUAL_CLIP = 3.0
SEED = 0
#: Elements per sequence; a size below it is one sequence.
TIME_AXIS = 1024


@dataclass
class Step:
    """A prepared benchmark step: ``run()`` does one forward + backward and waits for the device.

    For the loss implementations ``run()`` returns ``(loss, grad_logp)`` as the framework's arrays.
    """

    run: Callable[[], Any]
    leg: str
    impl: str
    n: int
    dtype: str
    #: extra bytes measured by the framework itself (``None``: measure resident memory instead).
    extra_bytes: Callable[[], int] | None = None
    #: bytes one call must move at least (read + write), for bandwidth figures.
    bytes_moved: int = 0
    info: dict = field(default_factory=dict)


# ------------------------------------------------------------------------------------------- inputs


def make_inputs(n: int, seed: int = SEED) -> dict[str, np.ndarray]:
    """Fixed-seed float32 inputs of shape ``(n // T, T)`` (``T = min(n, 1024)``), the way a trainer sees them.

    ``old_logp`` are log-probabilities of sampled tokens, ``logp`` differs from it by a log-ratio of
    standard deviation 0.1 (with 1 % of elements far off-policy, |l| up to 3), advantages are normalised,
    and about 10 % of elements (the tail of each sequence) are padding.
    """
    t = min(n, TIME_AXIS)
    shape = (n // t, t)
    rng = np.random.default_rng(seed)
    old = -np.abs(rng.standard_normal(shape, dtype=np.float32)) - 0.05
    ell = 0.1 * rng.standard_normal(shape, dtype=np.float32)
    far = rng.random(shape, dtype=np.float32) < 0.01
    ell[far] = rng.uniform(-3.0, 3.0, size=int(far.sum())).astype(np.float32)
    adv = rng.standard_normal(shape, dtype=np.float32)
    lengths = rng.integers(int(0.8 * t), t + 1, size=(shape[0], 1))
    mask = (np.arange(t)[None, :] < lengths).astype(np.float32)
    return {"logp": old + ell, "old_logp": old, "advantages": adv, "mask": mask}


# --------------------------------------------------------------------------------------------- legs


def _parse(leg: str) -> tuple[str, str, str]:
    """``'torch.compile:cuda'`` -> (framework 'torch', mode 'compile', device 'cuda')."""
    head, _, device = leg.partition(":")
    framework, _, mode = head.partition(".")
    return framework, mode or "eager", device


@functools.lru_cache(maxsize=None)
def leg_status(leg: str) -> str | None:
    """``None`` if ``leg`` can run here, else why not (framework, adapter or device missing)."""
    if leg not in ALL_LEGS:
        return f"unknown leg {leg!r}; known: {', '.join(ALL_LEGS)}"
    framework, mode, device = _parse(leg)
    try:
        importlib.import_module({"tf": "tensorflow"}.get(framework, framework))
    except Exception as exc:  # noqa: BLE001 - any import failure makes the leg unavailable
        return f"{framework} not importable ({type(exc).__name__}: {exc})"
    try:
        importlib.import_module(f"gipo_core.{framework}")
    except Exception as exc:  # noqa: BLE001
        return f"gipo_core.{framework} not importable yet ({type(exc).__name__}: {exc})"
    if device == "cpu":
        if framework == "torch" and mode == "compile" and _torch_compile_broken():
            return "torch.compile cannot build a CPU kernel here (no working C++ compiler)"
        return None
    if framework == "torch":
        import torch

        return None if torch.cuda.is_available() else "no CUDA device visible to torch"
    if framework == "jax":
        import jax

        try:
            jax.devices("gpu")
        except RuntimeError:
            return "no GPU device visible to jax"
        return None
    return f"no {device} leg for {framework}"


@functools.lru_cache(maxsize=None)
def _torch_compile_broken() -> bool:
    import torch

    try:
        f = torch.compile(lambda x: x * 2.0 + 1.0)
        f(torch.ones(4))
    except Exception:  # noqa: BLE001 - inductor needs a C++ toolchain on CPU
        return True
    return False


def available_legs(legs: tuple[str, ...] | None = None) -> list[str]:
    """The legs of ``legs`` (default: all) that can run here."""
    return [leg for leg in (legs or ALL_LEGS) if leg_status(leg) is None]


# ---------------------------------------------------------------------------------- memory helpers


def _resident_bytes() -> tuple[int, int]:
    """(current, peak) resident set size of this process in bytes, from /proc (Linux)."""
    cur = peak = 0
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                cur = int(line.split()[1]) * 1024
            elif line.startswith("VmHWM:"):
                peak = int(line.split()[1]) * 1024
    return cur, peak


def measure_extra_bytes(step: Step) -> tuple[int | None, str]:
    """Bytes one call allocates beyond its inputs, and how that was measured.

    The framework's own counter where it has one (CUDA allocator, XLA's buffer assignment, tracemalloc
    for NumPy); elsewhere the growth of the resident set over one call, after resetting the kernel's
    high-water mark (``/proc/self/clear_refs``). That last figure misses memory the C allocator reuses
    without returning it to the system, so it is a lower bound at sizes below glibc's mmap threshold.
    """
    if step.extra_bytes is not None:
        return int(step.extra_bytes()), step.info.get("mem_method", "framework counter")
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        return None, "unavailable"
    before, _ = _resident_bytes()
    step.run()
    _, peak = _resident_bytes()
    return max(peak - before, 0), "resident-set growth"


# ------------------------------------------------------------------------------------------- numpy


def _numpy_step(impl: str, data: dict[str, np.ndarray]) -> tuple[Callable[[], Any], Callable[[], int] | None]:
    from gipo_core.numpy import gipo_loss, ppo_clip_loss, value_and_grad

    lp, old, adv, mask = data["logp"], data["old_logp"], data["advantages"], data["mask"]
    out = np.empty_like(lp)

    if impl == "copy":
        def run() -> Any:
            np.copyto(out, lp)
    elif impl == "floor":
        def run() -> Any:  # numpy has no fused kernel: 5/2 copies move the bytes of read 4, write 1
            np.copyto(out, lp)
            np.copyto(out, old)
            np.copyto(out.reshape(-1)[: lp.size // 2], adv.reshape(-1)[: lp.size // 2])
    elif impl in ("gipo", "gipo+metrics", "ppo_clip"):
        if impl == "ppo_clip":
            fn = functools.partial(value_and_grad(ppo_clip_loss), clip_low=CLIP, clip_high=CLIP, dual_clip=DUAL_CLIP)
        else:
            fn = functools.partial(value_and_grad(gipo_loss), sigma=SIGMA)
        metrics = impl == "gipo+metrics"

        def run() -> Any:
            out, grad = fn(lp, old, adv, mask, with_metrics=metrics)
            return out.loss, grad
    elif impl == "gipo_literal":
        def run() -> Any:  # the authors' formula, the gradient by hand (numpy has no autodiff)
            ratio = np.exp(lp - old)
            weight = np.exp(-0.5 * (np.log(ratio) / SIGMA) ** 2)
            n_valid = mask.sum()
            loss = (-(weight * ratio * adv) * mask).sum() / n_valid
            grad = -(weight * ratio * adv) * mask / n_valid
            return loss, grad
    elif impl == "ppo_clip_verl":
        def run() -> Any:
            ratio = np.exp(np.clip(lp - old, -20.0, 20.0))
            loss1 = -adv * ratio
            loss2 = -adv * np.clip(ratio, 1.0 - CLIP, 1.0 + CLIP)
            clipped = np.maximum(loss1, loss2)
            loss3 = -adv * DUAL_CLIP
            per = np.where(adv < 0, np.minimum(loss3, clipped), clipped)
            n_valid = mask.sum()
            active = (loss1 >= loss2) & ~((adv < 0) & (loss3 < clipped))
            grad = np.where(active, -adv * ratio, 0.0) * mask / n_valid
            return (per * mask).sum() / n_valid, grad
    else:
        raise ValueError(f"unknown implementation {impl!r}")

    def traced() -> int:
        import tracemalloc

        tracemalloc.start()
        try:
            tracemalloc.reset_peak()
            run()
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    return run, traced


# --------------------------------------------------------------------------------- compiled caches

#: Compiled (or traced) functions, built once per process and key, reused across sizes: a new size then
#: costs at most a retrace, not a new compiler entry point (torch.compile marks the size dynamic itself).
_COMPILED: dict[tuple, Callable] = {}


def _cached(key: tuple, build: Callable[[], Callable]) -> Callable:
    if key not in _COMPILED:
        _COMPILED[key] = build()
    return _COMPILED[key]


def _fused4(a: Any, b: Any, c: Any, d: Any) -> Any:
    """Read four arrays, write one: the floor kernel, where a compiler fuses it."""
    return a * b + c * d


# ------------------------------------------------------------------------------------------- torch


@dataclass(frozen=True)
class _Ops:
    """The handful of framework ops the plain-op losses use, so that each is written once."""

    exp: Callable
    log: Callable
    stop_gradient: Callable
    clip: Callable
    maximum: Callable
    minimum: Callable
    where: Callable
    sum: Callable


def _literal_gipo(ops: _Ops) -> Callable:
    """GIPO as the authors' trainer writes it: exp of the ratio, detached log of the ratio, product, mean."""

    def loss_fn(logp: Any, old_logp: Any, advantages: Any, mask: Any) -> Any:
        ratio = ops.exp(logp - old_logp)
        weight = ops.exp(-0.5 * (ops.log(ops.stop_gradient(ratio)) / SIGMA) ** 2)
        pg_losses = -(weight * ratio * advantages)
        return ops.sum(pg_losses * mask) / ops.sum(mask)

    return loss_fn


def _verl_ppo(ops: _Ops) -> Callable:
    """PPO-clip as verl's ``compute_policy_loss`` writes it (dual clip c = 3 for negative advantages)."""

    def loss_fn(logp: Any, old_logp: Any, advantages: Any, mask: Any) -> Any:
        negative_approx_kl = ops.clip(logp - old_logp, -20.0, 20.0)
        ratio = ops.exp(negative_approx_kl)
        pg_losses1 = -advantages * ratio
        pg_losses2 = -advantages * ops.clip(ratio, 1.0 - CLIP, 1.0 + CLIP)
        clip_pg_losses1 = ops.maximum(pg_losses1, pg_losses2)
        clip_pg_losses2 = ops.minimum(-advantages * DUAL_CLIP, clip_pg_losses1)
        pg_losses = ops.where(advantages < 0, clip_pg_losses2, clip_pg_losses1)
        return ops.sum(pg_losses * mask) / ops.sum(mask)

    return loss_fn


def _plain_or_library(impl: str, ops: _Ops, module: Any) -> Callable:
    """The loss ``f(logp, old_logp, advantages, mask) -> scalar`` of a loss implementation."""
    if impl == "gipo_literal":
        return _literal_gipo(ops)
    if impl == "ppo_clip_verl":
        return _verl_ppo(ops)
    return _loss_fn(module, impl)


def _loss_fn(module: Any, impl: str) -> Callable:
    """The library's loss as ``f(logp, old_logp, advantages, mask) -> scalar``."""
    metrics = impl == "gipo+metrics"
    if impl == "ppo_clip":  # the same options as the verl-style plain-op version
        fn = functools.partial(module.ppo_clip_loss, clip_low=CLIP, clip_high=CLIP, dual_clip=DUAL_CLIP)
    else:
        fn = functools.partial(module.gipo_loss, sigma=SIGMA)

    def loss_fn(logp: Any, old_logp: Any, advantages: Any, mask: Any) -> Any:
        out = fn(logp, old_logp, advantages, mask, with_metrics=metrics)
        if metrics:  # keep the diagnostics alive so that a compiler cannot drop them
            return out.loss + 0.0 * sum(out.metrics.values())
        return out.loss

    return loss_fn


def _with_fused_kernel_off(fn: Callable[[], Any], gt: Any) -> Callable[[], Any]:
    """``fn`` run with ``gipo_core.torch.set_fused('never')``, the setting restored after each call."""

    def call() -> Any:
        before = gt.fused_settings()
        gt.set_fused("never", min_numel=before["min_numel"])
        try:
            return fn()
        finally:
            gt.set_fused(**before)

    return call


def _torch_step(impl: str, data: dict, dtype: str, device: str, mode: str) -> tuple[Callable, Callable | None]:
    """``mode``: 'eager' (the library's default dispatch: one fused kernel for large CPU inputs), 'opbyop' (the
    core one torch op at a time, ``set_fused('never')``) or 'compile' (``torch.compile`` of the whole step)."""
    import torch

    import gipo_core.torch as gt

    tdtype = getattr(torch, dtype)
    lp, old, adv, mask = (torch.from_numpy(data[k]).to(device=device, dtype=tdtype) for k in
                          ("logp", "old_logp", "advantages", "mask"))
    cuda = device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    compiled = mode == "compile"
    maybe_compile = torch.compile if compiled else (lambda f: f)

    if impl in ("copy", "floor"):
        out = torch.empty_like(lp)
        fused = _cached(("torch", "floor", compiled), lambda: maybe_compile(_fused4))

        if impl == "copy":
            def run() -> Any:
                out.copy_(lp)
                sync()
        elif compiled:
            def run() -> Any:
                fused(lp, old, adv, mask)
                sync()
        else:
            def run() -> Any:  # eager torch has no read-4-write-1 kernel: 5/2 copies
                out.copy_(lp)
                out.copy_(old)
                out.view(-1)[: lp.numel() // 2].copy_(adv.view(-1)[: lp.numel() // 2])
                sync()
    else:
        ops = _Ops(torch.exp, torch.log, torch.Tensor.detach, torch.clamp, torch.maximum, torch.minimum,
                   torch.where, torch.sum)
        loss_fn = _cached(("torch", impl, compiled), lambda: maybe_compile(_plain_or_library(impl, ops, gt)))
        leaf = lp.clone().requires_grad_(True)

        def fwd_bwd() -> Any:
            loss = loss_fn(leaf, old, adv, mask)
            loss.backward()
            return loss

        if mode == "opbyop":
            fwd_bwd = _with_fused_kernel_off(fwd_bwd, gt)

        def run() -> Any:
            leaf.grad = None
            loss = fwd_bwd()
            sync()
            return loss, leaf.grad

    if not cuda:
        return run, None

    def cuda_bytes() -> int:
        sync()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        run()
        return torch.cuda.max_memory_allocated(device) - base

    return run, cuda_bytes


# --------------------------------------------------------------------------------------------- jax


def _jax_step(impl: str, data: dict, dtype: str, device: str) -> tuple[Callable, Callable | None]:
    import jax
    import jax.numpy as jnp

    import gipo_core.jax as gj

    dev = jax.devices(device)[0]
    jdtype = getattr(jnp, dtype)
    arrays = tuple(jax.device_put(jnp.asarray(data[k], dtype=jdtype), dev) for k in
                   ("logp", "old_logp", "advantages", "mask"))

    if impl == "copy":
        fn = _cached(("jax", impl), lambda: jax.jit(lambda a, b, c, d: a + 1.0))
    elif impl == "floor":
        fn = _cached(("jax", impl), lambda: jax.jit(_fused4))
    else:
        ops = _Ops(jnp.exp, jnp.log, jax.lax.stop_gradient, jnp.clip, jnp.maximum, jnp.minimum, jnp.where,
                   jnp.sum)
        fn = _cached(("jax", impl), lambda: jax.jit(jax.value_and_grad(_plain_or_library(impl, ops, gj))))

    def run() -> Any:
        return jax.block_until_ready(fn(*arrays))

    def xla_bytes() -> int:
        analysis = fn.lower(*arrays).compile().memory_analysis()
        return int(analysis.temp_size_in_bytes + analysis.output_size_in_bytes)

    return run, xla_bytes


# ---------------------------------------------------------------------------------------------- tf


def _tf_step(impl: str, data: dict, dtype: str) -> tuple[Callable, Callable | None]:
    import tensorflow as tf

    import gipo_core.tf as gtf

    tdtype = getattr(tf, dtype)
    arrays = tuple(tf.constant(data[k], dtype=tdtype) for k in ("logp", "old_logp", "advantages", "mask"))

    if impl == "copy":
        fn = _cached(("tf", impl), lambda: tf.function(lambda a, b, c, d: a + 1.0, jit_compile=True))
    elif impl == "floor":
        fn = _cached(("tf", impl), lambda: tf.function(_fused4, jit_compile=True))
    else:
        ops = _Ops(tf.exp, tf.math.log, tf.stop_gradient, tf.clip_by_value, tf.maximum, tf.minimum, tf.where,
                   tf.reduce_sum)
        loss_fn = _plain_or_library(impl, ops, gtf)

        def value_and_grad(logp: Any, old_logp: Any, advantages: Any, mask: Any) -> Any:
            with tf.GradientTape() as tape:
                tape.watch(logp)
                loss = loss_fn(logp, old_logp, advantages, mask)
            return loss, tape.gradient(loss, logp)

        fn = _cached(("tf", impl), lambda: tf.function(value_and_grad, jit_compile=True))

    def run() -> Any:
        result = fn(*arrays)
        first = result[0] if isinstance(result, tuple) else result
        first.numpy()  # a host read of the loss (a scalar): the call has finished
        return result

    return run, None


# ------------------------------------------------------------------------------------------ public


def make_step(leg: str, impl: str, n: int, dtype: str = "float32", *, warmup: int = 2,
              data: dict | None = None) -> Step:
    """A warmed-up step for ``leg`` running ``impl`` on ``n`` elements of ``dtype``.

    Raises
    ------
    NotImplementedError
        The leg cannot run here (``leg_status`` says why) or has no ``dtype`` (numpy has no bfloat16).
    ValueError
        Unknown ``impl`` or ``dtype``, or ``n`` not a power of two >= 2.
    """
    if impl not in IMPLS:
        raise ValueError(f"`make_step`: `impl` must be one of {', '.join(IMPLS)}; got {impl!r}")
    if dtype not in DTYPES:
        raise ValueError(f"`make_step`: `dtype` must be one of {', '.join(DTYPES)}; got {dtype!r}")
    if n < 2 or n & (n - 1):
        raise ValueError(f"`make_step`: `n` must be a power of two >= 2; got {n!r}")
    reason = leg_status(leg)
    if reason is not None:
        raise NotImplementedError(f"leg {leg} unavailable: {reason}")
    framework, mode, device = _parse(leg)
    if framework == "numpy" and dtype == "bfloat16":
        raise NotImplementedError("numpy has no bfloat16")
    data = make_inputs(n) if data is None else data
    info: dict = {}
    if framework == "numpy":
        run, extra = _numpy_step(impl, data)
        info["mem_method"] = "tracemalloc peak"
    elif framework == "torch":
        run, extra = _torch_step(impl, data, dtype, device, mode)
        if extra is not None:
            info["mem_method"] = "torch.cuda peak allocated"
    elif framework == "jax":
        run, extra = _jax_step(impl, data, dtype, device)
        info["mem_method"] = "XLA temp + output buffers"
    else:
        run, extra = _tf_step(impl, data, dtype)
    for _ in range(warmup):
        run()
    itemsize = 2 if dtype == "bfloat16" else 4
    moved = {"copy": 2, "floor": 5}.get(impl, 5) * n * itemsize
    return Step(run=run, leg=leg, impl=impl, n=n, dtype=dtype, extra_bytes=extra, bytes_moved=moved, info=info)


def as_numpy(x: Any) -> np.ndarray:
    """A float64 NumPy copy of a numpy, torch, jax or tf array (bfloat16 included), for comparisons."""
    if hasattr(x, "detach"):  # torch
        x = x.detach().float().cpu().numpy()
    elif hasattr(x, "numpy") and not isinstance(x, np.ndarray):  # tf
        x = x.numpy()
    return np.asarray(x).astype(np.float64)


def malloc_settings() -> dict[str, str]:
    """The glibc allocator settings in force (environment variables; unset means glibc's default)."""
    names = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_MAX_", "MALLOC_TOP_PAD_",
             "MALLOC_ARENA_MAX")
    return {name: os.environ.get(name, "default") for name in names}


def human_bytes(n: float | None) -> str:
    """``1536 -> '1.5 KiB'``; ``None -> 'n/a'``."""
    if n is None:
        return "n/a"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def log2(n: int) -> int:
    """Exact log2 of a power of two."""
    k = int(math.log2(n))
    if 1 << k != n:
        raise ValueError(f"`log2`: {n} is not a power of two")
    return k
