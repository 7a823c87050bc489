"""The core's forward as one hand-written Triton kernel: each input byte read once, on CUDA.

One pass reads ``logp``, ``old_logp``, ``advantages``, ``mask``, ``behavior_weights`` (and ``rollout_logp`` for
a token-level rollout correction), writes ``saved`` (``dloss/dlogp`` for an upstream gradient of 1) and
per-program partial sums of the loss and of every diagnostic; a second, one-program kernel finishes the sums
into the loss and the diagnostics of ``METRIC_NAMES`` in order. Backward stays the core's one multiply.

The math is not written here a third time:

- The per-element objective (loss, gradient, multiplier ``u`` and trust weight) is generated from the
  core's own functions (``gipo_core._core.objectives.OBJECTIVES``): they are called once per option set
  with a symbolic array namespace (``_Trace``) that records each array operation as one line of Triton
  code. Options are Python values there, so the core's branches on them (kernel choice, ``sigma_neg``, the
  overflow guard, dual clip) pick the lines; numbers become kernel arguments, so option sets that take the
  same branches share one compiled kernel.
- The aggregation scale (``1 / N_tok``, ``1 / N_seq``, per-sequence ``1 / (n_i N_seq)``, ``1 / T``, or the
  caller's ``denominator``) is the core's ``_coefficient`` itself, run on the mask before the kernel (it
  reads only the mask: one extra read of the mask where the count depends on it, none otherwise).
- The diagnostics are the sums, minima and maxima that ``engine.diagnostics`` takes, accumulated per lane
  (the PPO clip conditions traced from ``engine.ppo_clip_conditions``, the NaN rule from the sums of the
  log-ratio and of the advantage);
  the effective sample size keeps the core's overflow-safe scaling by the largest multiplier as a running
  rescale (``ess_*`` columns), and infinite multipliers count as in the core.

What it covers: every objective and option of the core (GIPO with ``sigma_neg`` and its three kernels,
PPO-clip with dual clip and the inclusive tie rule, SAPO, CISPO with ``clip_min``, No-Clip), every aggregation
mode, no mask, bool and floating masks, ``behavior_weights``, a number or 0-d tensor ``denominator``,
``rollout_logp`` with no correction or a token-level one (``rollout_is`` "token-truncate", "token-mask": the
core's ``_rollout_correction`` traced like the objectives; the rollout diagnostics come from the core's
functions op by op), ``with_metrics`` True, "basic" (a subset of the same values) or False, float16, bfloat16
and float32 inputs (float32 work). What it does not cover runs the current path (``supports`` gives the
reason): float64 inputs (float64 work), empty inputs, the sequence-level off-policy options
(``ratio_level="sequence"``, the sequence and geometric ``rollout_is`` modes, ``opsm_delta``) and any option the
core gains beyond these.

On CUDA the functions use libdevice's exp, log, expm1 and log1p (within an ulp or two of torch's); in
Triton's CPU interpreter, which has no libdevice, the same kernel uses ``tl.exp``/``tl.log`` and exact
rewrites of ``expm1``/``log1p``: the tests run the kernel there on CPU tensors.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import linecache
import math
import warnings
from typing import Any, Callable

import torch

from ._core import engine
from ._core.engine import METRIC_NAMES, LossSpec
from ._core.objectives import OBJECTIVES
from ._torch_namespace import namespace as _xp

__all__ = ["DEFAULT_ON_CUDA", "available", "wants", "supports", "forward", "try_forward", "interpret_on_cpu"]

#: Whether ``set_fused("auto")`` (the default) runs this kernel for CUDA tensors. False until the kernel has
#: passed ``backends/gpu_run.sh`` on a GPU; ``set_fused("always")`` uses it on CUDA either way.
DEFAULT_ON_CUDA = False

#: Elements per program and loop step (2 per thread: about 64-80 registers with the diagnostics on an H100,
#: measured with ptxas from the kernel's PTX), and warps per program.
BLOCK = 512
NUM_WARPS = 8
#: Programs per streaming multiprocessor: None for as many as fit at once (from the compiled kernel's register
#: count), so that every program of the grid-stride loop runs in one wave.
PROGRAMS_PER_SM: int | None = None

#: Columns of the per-program partials, in the order the finishing kernel reads them.
PARTIALS = (
    "loss",
    "n_valid",
    "sum_weight",
    "min_weight",
    "n_low",
    "n_low_pos",
    "n_low_neg",
    "sum_mult",
    "max_mult",
    "ess_max",  # the largest finite multiplier seen
    "ess_sum",  # sum of u / ess_max over finite u
    "ess_sum_sq",  # sum of (u / ess_max)^2
    "n_inf_mult",
    "sum_ratio",
    "max_ratio",
    "sum_abs_log_ratio",
    "max_abs_log_ratio",
    "sum_neg_log_ratio",
    "sum_k3",
    "n_ppo_clip",
    "n_ppo_clip_lower",
    "sum_adv",  # with sum_k1: a NaN input at a valid element (the core's rule: every diagnostic NaN)
)
_K = len(PARTIALS)

_state: dict[str, Any] = {"interpret": False, "warned": set()}


def available() -> bool:
    """Whether ``triton`` can be imported (it is not a dependency of gipo-core: ``pip install triton``)."""
    return _triton() is not None


@functools.lru_cache(maxsize=None)
def _triton() -> Any:
    try:
        import triton  # noqa: PLC0415
        import triton.language  # noqa: F401, PLC0415
    except Exception:  # noqa: BLE001 - absent, or a build that does not load on this platform
        return None
    return triton


class interpret_on_cpu:
    """Context manager: CPU tensors take this kernel too, run by Triton's interpreter (for tests).

    The interpreter executes the kernel with NumPy, one program at a time: slow, only for small inputs.
    """

    def __enter__(self) -> "interpret_on_cpu":
        self._before = _state["interpret"]
        _state["interpret"] = True
        return self

    def __exit__(self, *exc: Any) -> None:
        _state["interpret"] = self._before


def wants(logp: torch.Tensor, mode: str) -> bool:
    """Whether the dispatch mode sends this call here (before ``supports``): CUDA tensors when ``mode`` is
    ``'always'``, or ``'auto'`` with ``DEFAULT_ON_CUDA``; CPU tensors inside ``interpret_on_cpu``."""
    if mode == "never":
        return False
    if logp.device.type == "cpu":
        return _state["interpret"]
    return logp.device.type == "cuda" and (mode == "always" or DEFAULT_ON_CUDA) and available()


# ----------------------------------------------------------------------------------- what it covers

#: The LossSpec fields the kernel reads, and for each of the others the one value it handles (off).
_SPEC_FIELDS = ("objective", "options", "agg", "denominator", "with_metrics", "rollout_is", "rollout_is_bounds")
_OFF = {"ratio_level": "token", "opsm_delta": None}
#: The rollout corrections the kernel applies (one weight per element); the sequence ones fall back.
ROLLOUT_MODES = (None, "token-truncate", "token-mask")


def supports(arrays: tuple[Any, ...], spec: LossSpec) -> str | None:
    """``None`` if the kernel computes this call, else why the current path runs it."""
    logp, old_logp, advantages, mask, behavior_weights, denominator, *extra = arrays
    rollout_logp = extra[0] if extra else None
    if len(extra) > 1:
        return f"{len(arrays)} array arguments"
    if spec.rollout_is not in ROLLOUT_MODES:
        return f"rollout_is={spec.rollout_is!r} (a sequence-level correction)"
    if spec.rollout_is is not None and rollout_logp is None:
        return "rollout_is without rollout_logp"
    for field in dataclasses.fields(spec):
        if field.name not in _SPEC_FIELDS and getattr(spec, field.name) != _OFF.get(field.name):
            return f"{field.name}={getattr(spec, field.name)!r} (the off-policy options)"
    objective = OBJECTIVES.get(spec.objective)
    if objective is None:
        return f"objective {spec.objective!r}"
    if tuple(key for key, _ in spec.options) != objective.option_names:
        return f"options {[key for key, _ in spec.options]} (the objective has {list(objective.option_names)})"
    if spec.agg not in engine.AGG_MODES:
        return f"agg={spec.agg!r}"
    if spec.with_metrics not in (True, False, "basic"):
        return f"with_metrics={spec.with_metrics!r}"
    tensors = [x for x in (*arrays[:6], rollout_logp) if x is not None]
    if any(type(x) is not torch.Tensor for x in tensors):
        return "a tensor subclass"
    if engine.work_dtype(_xp, logp, old_logp, advantages, rollout_logp) != torch.float32:
        return "float64 inputs (float64 work)"
    if logp.numel() == 0:
        return "an empty input"
    if logp.numel() >= 2**62:
        return "more than 2^62 elements"
    return None


# ------------------------------------------------------------------------- the objectives, traced


class _Dtype:
    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


_F32, _F64, _BOOL = _Dtype("float32"), _Dtype("float64"), _Dtype("bool")


class _Sym:
    """One array of the trace: the name of a variable in the generated code and its dtype (float32 or bool)."""

    __slots__ = ("trace", "name", "dtype")

    def __init__(self, trace: "_Trace", name: str, dtype: _Dtype) -> None:
        self.trace, self.name, self.dtype = trace, name, dtype

    def __bool__(self) -> bool:
        raise TypeError("gipo_core._triton_kernel: the core branched on an array value; the kernel cannot follow")

    def _bin(self, op: str, other: Any, *, reflected: bool = False, dtype: _Dtype = _F32) -> "_Sym":
        a, b = self.trace.code(self), self.trace.code(other)
        if reflected:
            a, b = b, a
        if op == "/":  # IEEE division, as torch's (Triton's `/` is the approximate one on CUDA)
            return self.trace.emit(f"tl.math.div_rn({a}, {b})", dtype)
        return self.trace.emit(f"{a} {op} {b}", dtype)

    def __neg__(self) -> "_Sym":
        return self.trace.emit(f"-{self.name}", _F32)

    def __invert__(self) -> "_Sym":
        return self.trace.emit(f"~{self.name}", _BOOL)

    __hash__ = None  # type: ignore[assignment]


def _operator(op: str, *, reflected: bool = False, dtype: _Dtype = _F32) -> Callable[[_Sym, Any], _Sym]:
    def method(self: _Sym, other: Any) -> _Sym:
        return self._bin(op, other, reflected=reflected, dtype=dtype)

    return method


for _name, _op in (("add", "+"), ("sub", "-"), ("mul", "*"), ("truediv", "/")):
    setattr(_Sym, f"__{_name}__", _operator(_op))
    setattr(_Sym, f"__r{_name}__", _operator(_op, reflected=True))
_COMPARISONS = (
    ("lt", "<"), ("le", "<="), ("gt", ">"), ("ge", ">="), ("eq", "=="), ("ne", "!="), ("and", "&"), ("or", "|"),
)  # fmt: skip
for _name, _op in _COMPARISONS:
    setattr(_Sym, f"__{_name}__", _operator(_op, dtype=_BOOL))


class _Trace:
    """A symbolic array namespace: each call appends one line of Triton code (identical lines are shared)."""

    float32, float64, bool = _F32, _F64, _BOOL

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.constants: dict[str, tuple[str, float]] = {}  # repr(value) -> (argument name, value)
        self._seen: dict[str, _Sym] = {}
        self._names = itertools.count()

    def input(self, name: str) -> _Sym:
        return _Sym(self, name, _F32)

    def code(self, x: Any) -> str:
        if isinstance(x, _Sym):
            return x.name
        if isinstance(x, bool):
            return repr(x)
        if isinstance(x, (int, float)):
            # A number is a kernel argument, not a literal: the source (and Triton's compiled binary) is the
            # same for every value of an option, so a sigma schedule does not recompile.
            key = repr(float(x))
            if key not in self.constants:
                self.constants[key] = (f"c{len(self.constants)}", float(x))
            return self.constants[key][0]
        raise TypeError(f"gipo_core._triton_kernel: cannot trace a {type(x).__name__} ({x!r})")

    def emit(self, expr: str, dtype: _Dtype) -> _Sym:
        if expr in self._seen:
            return self._seen[expr]
        name = f"t{next(self._names)}"
        self.lines.append(f"{name} = {expr}")
        sym = self._seen[expr] = _Sym(self, name, dtype)
        return sym

    def _call(self, fn: str, *args: Any, dtype: _Dtype = _F32) -> _Sym:
        return self.emit(f"{fn}({', '.join(self.code(a) for a in args)})", dtype)

    # The array-API functions the objectives use (gipo_core/_core/objectives.py's module docstring).
    def exp(self, x: Any) -> _Sym:
        return self._call("_exp", x)

    def expm1(self, x: Any) -> _Sym:
        return self._call("_expm1", x)

    def log(self, x: Any) -> _Sym:
        return self._call("_log", x)

    def log1p(self, x: Any) -> _Sym:
        return self._call("_log1p", x)

    def abs(self, x: Any) -> _Sym:
        return self._call("tl.abs", x)

    def where(self, c: Any, a: Any, b: Any) -> _Sym:
        dtype = _BOOL if all(getattr(v, "dtype", None) is _BOOL for v in (a, b)) else _F32
        return self._call("tl.where", c, a, b, dtype=dtype)

    def maximum(self, a: Any, b: Any) -> _Sym:
        return self._call("_maximum", a, b)

    def minimum(self, a: Any, b: Any) -> _Sym:
        return self._call("_minimum", a, b)

    def full_like(self, x: Any, value: float) -> _Sym:
        return self.emit(f"tl.full([BLOCK], 0.0, tl.float32) + {self.code(value)}", _F32)

    def ones_like(self, x: Any) -> _Sym:
        return self.full_like(x, 1.0)

    def zeros_like(self, x: Any) -> _Sym:
        return self.full_like(x, 0.0)

    def astype(self, x: Any, dtype: Any, /, *, copy: bool = True) -> Any:
        if dtype is _BOOL:
            return x if x.dtype is _BOOL else x != 0.0
        if dtype is not _F32:
            raise TypeError(f"gipo_core._triton_kernel: the kernel works in float32; the core asked for {dtype}")
        return self.emit(f"{x.name}.to(tl.float32)", _F32) if x.dtype is _BOOL else x


def element_code(
    objective: str, options: tuple[tuple[str, Any], ...], with_metrics: bool, rollout: tuple[Any, Any] = (None, None)
) -> tuple[list[str], dict[str, float]]:
    """Triton lines computing ``loss_``, ``grad_``, ``mult_`` (and with metrics ``weight_`` and the PPO clip
    conditions ``clip_``, ``clip_lower_`` of the diagnostics) from ``ell``,
    ``adv`` and ``lp``, traced from the core's objective (see the module docstring), and the numbers they use
    as kernel arguments ``c0, c1, ...`` (name -> value, computed in Python as the core computes them).

    ``rollout``: ``(rollout_is, rollout_is_bounds)`` of a token mode, or ``(None, None)``; with a mode, also
    ``roll_``, the correction factor of ``rr = old_logp - rollout_logp`` (the core's ``_rollout_correction``)."""
    obj = OBJECTIVES[objective]
    spec = LossSpec(objective, options, rollout_is=rollout[0], rollout_is_bounds=rollout[1])
    trace = _Trace()
    ell, adv, lp = trace.input("ell"), trace.input("adv"), trace.input("lp")
    opts = dict(options)
    terms = obj.terms(ell, adv, lp, opts, trace)
    out = {"loss_": terms.loss, "grad_": terms.loss if terms.grad is None else terms.grad, "mult_": terms.mult}
    if with_metrics:
        out["weight_"] = obj.weight(ell, adv, opts, trace)
        out["clip_"], out["clip_lower_"] = engine.ppo_clip_conditions(ell, adv, spec)
    if spec.rollout_is is not None:
        out["roll_"] = engine._rollout_correction(trace.input("rr"), None, None, spec, trace)[0]
    lines = list(trace.lines)
    for name, value in out.items():
        code = trace.code(value)
        # A Python number (an objective whose term is constant) becomes a block of it.
        block = code if isinstance(value, _Sym) else f"tl.full([BLOCK], 0.0, tl.float32) + {code}"
        lines.append(f"{name} = {block}")
    return lines, dict(trace.constants.values())


# --------------------------------------------------------------------------------- the kernel source

_MAIN = '''
def {name}(
    logp_ptr, old_ptr, adv_ptr, mask_ptr, bw_ptr, roll_ptr, scale_ptr, scale_value, saved_ptr, part_ptr,
    N, T, n_blocks, {constants}
    MASK_KIND: tl.constexpr, ADV_PER_ROW: tl.constexpr, HAS_BW: tl.constexpr, SCALE_KIND: tl.constexpr,
    WITH_METRICS: tl.constexpr, OFFSETS_64: tl.constexpr, BLOCK: tl.constexpr,
):
    # MASK_KIND: 0 none, 1 bool, 2 floating. SCALE_KIND: 0 the number scale_value, 1 a 0-d tensor,
    # 2 one value per sequence (row). Accumulators are per lane; summed once at the end.
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    acc_loss = tl.full([BLOCK], 0.0, tl.float32)
    acc_n = tl.full([BLOCK], 0.0, tl.float32)
    acc_w = tl.full([BLOCK], 0.0, tl.float32)
    acc_wmin = tl.full([BLOCK], _INF, tl.float32)
    acc_low = tl.full([BLOCK], 0.0, tl.float32)
    acc_low_pos = tl.full([BLOCK], 0.0, tl.float32)
    acc_low_neg = tl.full([BLOCK], 0.0, tl.float32)
    acc_u = tl.full([BLOCK], 0.0, tl.float32)
    acc_umax = tl.full([BLOCK], -_INF, tl.float32)
    ess_m = tl.full([BLOCK], 0.0, tl.float32)
    ess_s1 = tl.full([BLOCK], 0.0, tl.float32)
    ess_s2 = tl.full([BLOCK], 0.0, tl.float32)
    acc_uinf = tl.full([BLOCK], 0.0, tl.float32)
    acc_rho = tl.full([BLOCK], 0.0, tl.float32)
    acc_rhomax = tl.full([BLOCK], -_INF, tl.float32)
    acc_abs = tl.full([BLOCK], 0.0, tl.float32)
    acc_absmax = tl.full([BLOCK], -_INF, tl.float32)
    acc_k1 = tl.full([BLOCK], 0.0, tl.float32)
    acc_k3 = tl.full([BLOCK], 0.0, tl.float32)
    acc_clip = tl.full([BLOCK], 0.0, tl.float32)
    acc_clip_lo = tl.full([BLOCK], 0.0, tl.float32)
    acc_adv = tl.full([BLOCK], 0.0, tl.float32)
    if SCALE_KIND == 0:
        s = scale_value
    elif SCALE_KIND == 1:
        s = tl.load(scale_ptr).to(tl.float32)
    for blk in range(pid, n_blocks, nprog):
        if OFFSETS_64:
            offs = tl.cast(blk, tl.int64) * BLOCK + tl.arange(0, BLOCK)
        else:
            offs = blk * BLOCK + tl.arange(0, BLOCK)  # int32: a cheaper division by T below
        inb = offs < N
        lp = tl.load(logp_ptr + offs, mask=inb, other=0.0).to(tl.float32)
        old = tl.load(old_ptr + offs, mask=inb, other=0.0).to(tl.float32)
        ell = lp - old
        if ADV_PER_ROW or SCALE_KIND == 2:
            row = offs // T
        if ADV_PER_ROW:
            adv = tl.load(adv_ptr + row, mask=inb, other=0.0).to(tl.float32)
        else:
            adv = tl.load(adv_ptr + offs, mask=inb, other=0.0).to(tl.float32)
        if MASK_KIND == 1:
            valid = inb & (tl.load(mask_ptr + offs, mask=inb, other=0) != 0)
        elif MASK_KIND == 2:
            m = tl.load(mask_ptr + offs, mask=inb, other=0.0).to(tl.float32)
            valid = inb & (m != 0.0)
        else:
            valid = inb
        # Masked (and out-of-range) elements: log-ratio, advantage and logp 0 before any exp.
        ell = tl.where(valid, ell, 0.0)
        adv = tl.where(valid, adv, 0.0)
        lp = tl.where(valid, lp, 0.0)
{rollout}
{element}
        if SCALE_KIND == 2:
            s = tl.load(scale_ptr + row, mask=inb, other=0.0).to(tl.float32)
        if MASK_KIND == 2:
            c = m * s
        else:
            c = s
        if HAS_BW:
            c = c * tl.where(valid, tl.load(bw_ptr + offs, mask=inb, other=0.0).to(tl.float32), 0.0)
{rollout_apply}
        tl.store(saved_ptr + offs, c * grad_, mask=inb)
        acc_loss += tl.where(inb, c * loss_, 0.0)
        acc_n += valid.to(tl.float32)
        if WITH_METRICS:
            # engine.diagnostics, one element at a time.
            acc_w += tl.where(valid, weight_, 0.0)
            acc_wmin = _minimum(acc_wmin, tl.where(valid, weight_, _INF))
            low = valid & (weight_ < 0.5)
            acc_low += low.to(tl.float32)
            acc_low_pos += (low & (adv > 0.0)).to(tl.float32)
            acc_low_neg += (low & (adv <= 0.0)).to(tl.float32)
            acc_u += tl.where(valid, mult_, 0.0)
            acc_umax = _maximum(acc_umax, tl.where(valid, mult_, -_INF))
            finite_u = tl.where(valid & (mult_ < _INF), mult_, 0.0)
            m_new = tl.maximum(ess_m, finite_u)
            # Two divisions, not a reciprocal: 1 / m overflows for a subnormal largest u (SAPO's tiny u).
            m_safe = tl.where(m_new == 0.0, 1.0, m_new)
            shrink = tl.math.div_rn(ess_m, m_safe)
            r = tl.math.div_rn(finite_u, m_safe)
            ess_s1 = ess_s1 * shrink + r
            ess_s2 = ess_s2 * (shrink * shrink) + r * r
            ess_m = m_new
            acc_uinf += (valid & (mult_ == _INF)).to(tl.float32)
            rho = _exp(ell)
            acc_rho += tl.where(valid, rho, 0.0)
            acc_rhomax = _maximum(acc_rhomax, tl.where(valid, rho, -_INF))
            abs_ell = tl.abs(ell)
            acc_abs += tl.where(valid, abs_ell, 0.0)
            acc_absmax = _maximum(acc_absmax, tl.where(valid, abs_ell, -_INF))
            acc_k1 += tl.where(valid, -ell, 0.0)
            acc_k3 += tl.where(valid, _expm1(-ell) + ell, 0.0)
            acc_clip += (valid & clip_).to(tl.float32)
            acc_clip_lo += (valid & clip_lower_).to(tl.float32)
            acc_adv += adv
    base = part_ptr + pid * {K}
    tl.store(base + 0, tl.sum(acc_loss, 0))
    tl.store(base + 1, tl.sum(acc_n, 0))
    if WITH_METRICS:
        tl.store(base + 2, tl.sum(acc_w, 0))
        tl.store(base + 3, tl.min(acc_wmin, 0))
        tl.store(base + 4, tl.sum(acc_low, 0))
        tl.store(base + 5, tl.sum(acc_low_pos, 0))
        tl.store(base + 6, tl.sum(acc_low_neg, 0))
        tl.store(base + 7, tl.sum(acc_u, 0))
        tl.store(base + 8, tl.max(acc_umax, 0))
        big = tl.max(ess_m, 0)
        rel = tl.math.div_rn(ess_m, tl.where(big == 0.0, 1.0, big))
        tl.store(base + 9, big)
        tl.store(base + 10, tl.sum(ess_s1 * rel, 0))
        tl.store(base + 11, tl.sum(ess_s2 * (rel * rel), 0))
        tl.store(base + 12, tl.sum(acc_uinf, 0))
        tl.store(base + 13, tl.sum(acc_rho, 0))
        tl.store(base + 14, tl.max(acc_rhomax, 0))
        tl.store(base + 15, tl.sum(acc_abs, 0))
        tl.store(base + 16, tl.max(acc_absmax, 0))
        tl.store(base + 17, tl.sum(acc_k1, 0))
        tl.store(base + 18, tl.sum(acc_k3, 0))
        tl.store(base + 19, tl.sum(acc_clip, 0))
        tl.store(base + 20, tl.sum(acc_clip_lo, 0))
        tl.store(base + 21, tl.sum(acc_adv, 0))
'''

_FINISH = '''
def _gipo_finish(part_ptr, loss_ptr, metrics_ptr, P, WITH_METRICS: tl.constexpr, BLOCK_P: tl.constexpr):
    # One program: the partials of every program of the main kernel -> the loss and METRIC_NAMES in order.
    rows = tl.arange(0, BLOCK_P)
    ok = rows < P
    p = part_ptr + rows * {K}
    tl.store(loss_ptr, tl.sum(tl.load(p + 0, mask=ok, other=0.0), 0))
    if WITH_METRICS:
        n = tl.sum(tl.load(p + 1, mask=ok, other=0.0), 0)
        inv_n = tl.math.div_rn(1.0, tl.where(n == 0.0, 1.0, n))
        some = n > 0.0
        u_max = tl.max(tl.load(p + 8, mask=ok, other=-_INF), 0)
        # Effective sample size: the core scales u by its largest value; infinite u count 1 each.
        big_p = tl.load(p + 9, mask=ok, other=0.0)
        big = tl.max(big_p, 0)
        rel = tl.math.div_rn(big_p, tl.where(big == 0.0, 1.0, big))
        sum_r = tl.sum(tl.load(p + 10, mask=ok, other=0.0) * rel, 0)
        sum_r2 = tl.sum(tl.load(p + 11, mask=ok, other=0.0) * (rel * rel), 0)
        n_inf = tl.sum(tl.load(p + 12, mask=ok, other=0.0), 0)
        sum_r = tl.where(u_max < _INF, sum_r, n_inf)
        sum_r2 = tl.where(u_max < _INF, sum_r2, n_inf)
        ess = tl.math.div_rn((sum_r * sum_r) * inv_n, tl.where(sum_r2 == 0.0, 1.0, sum_r2))
        ess = tl.where(u_max != u_max, u_max, ess)  # NaN in, NaN out, as in the core
        k1 = tl.sum(tl.load(p + 17, mask=ok, other=0.0), 0)
        adv_sum = tl.sum(tl.load(p + 21, mask=ok, other=0.0), 0)
        # A NaN log-ratio or advantage at a valid element: every diagnostic but n_valid NaN, as in the core.
        bad = (k1 != k1) | (adv_sum != adv_sum)
        out = metrics_ptr
        tl.store(out + 0, tl.where(bad, _NAN, tl.sum(tl.load(p + 2, mask=ok, other=0.0), 0) * inv_n))
        tl.store(out + 1, tl.where(bad, _NAN, tl.where(some, tl.min(tl.load(p + 3, mask=ok, other=_INF), 0), 0.0)))
        tl.store(out + 2, tl.where(bad, _NAN, tl.sum(tl.load(p + 4, mask=ok, other=0.0), 0) * inv_n))
        tl.store(out + 3, tl.where(bad, _NAN, tl.sum(tl.load(p + 5, mask=ok, other=0.0), 0) * inv_n))
        tl.store(out + 4, tl.where(bad, _NAN, tl.sum(tl.load(p + 6, mask=ok, other=0.0), 0) * inv_n))
        tl.store(out + 5, tl.where(bad, _NAN, tl.sum(tl.load(p + 7, mask=ok, other=0.0), 0) * inv_n))
        tl.store(out + 6, tl.where(bad, _NAN, tl.where(some, u_max, 0.0)))
        tl.store(out + 7, tl.where(bad, _NAN, ess))
        tl.store(out + 8, tl.where(bad, _NAN, tl.sum(tl.load(p + 13, mask=ok, other=0.0), 0) * inv_n))
        tl.store(out + 9, tl.where(bad, _NAN, tl.where(some, tl.max(tl.load(p + 14, mask=ok, other=-_INF), 0), 0.0)))
        tl.store(out + 10, tl.where(bad, _NAN, tl.sum(tl.load(p + 15, mask=ok, other=0.0), 0) * inv_n))
        tl.store(out + 11, tl.where(bad, _NAN, tl.where(some, tl.max(tl.load(p + 16, mask=ok, other=-_INF), 0), 0.0)))
        tl.store(out + 12, tl.where(bad, _NAN, k1 * inv_n))
        tl.store(out + 13, tl.where(bad, _NAN, tl.sum(tl.load(p + 18, mask=ok, other=0.0), 0) * inv_n))
        tl.store(out + 14, tl.where(bad, _NAN, tl.sum(tl.load(p + 19, mask=ok, other=0.0), 0) * inv_n))
        tl.store(out + 15, tl.where(bad, _NAN, tl.sum(tl.load(p + 20, mask=ok, other=0.0), 0) * inv_n))
        tl.store(out + 16, n)
'''

#: The finishing kernel's metric order; checked against the core's at import.
_FINISH_ORDER = (
    "weight_mean", "weight_min", "low_weight_frac", "low_weight_frac_pos", "low_weight_frac_neg",
    "grad_mult_mean", "grad_mult_max", "ess", "ratio_mean", "ratio_max", "log_ratio_abs_mean",
    "log_ratio_abs_max", "kl_k1", "kl_k3", "ppo_clip_frac", "ppo_clip_frac_lower", "n_valid",
)  # fmt: skip
if _FINISH_ORDER != METRIC_NAMES:  # pragma: no cover - a new diagnostic in the core must be added here
    raise ImportError(f"gipo_core._triton_kernel: the core's METRIC_NAMES changed to {METRIC_NAMES}")

# Elementary functions. On CUDA: libdevice (precise). In the interpreter: tl.exp/tl.log (NumPy there) and
# expm1/log1p rewritten exactly from them (Kahan's and Goldberg's forms).
_PORTABLE = '''
def _exp(x):
    return tl.exp(x)

def _log(x):
    return tl.log(x)

def _expm1(x):
    u = tl.exp(x)
    um1 = u - 1.0
    lu = tl.log(u)
    q = um1 * (x / tl.where((lu == 0.0) | (lu != lu), 1.0, lu))
    return tl.where(u == 1.0, x, tl.where((um1 == -1.0) | (u == _INF), um1, q))

def _log1p(x):
    u = 1.0 + x
    d = u - 1.0
    q = tl.log(u) * (x / tl.where(d == 0.0, 1.0, d))
    return tl.where(d == 0.0, x, tl.where(u == _INF, u, q))
'''

_LIBDEVICE = "".join(f"\ndef _{f}(x):\n    return libdevice.{f}(x)\n" for f in ("exp", "log", "expm1", "log1p"))

_MINMAX = '''
def _maximum(a, b):
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)

def _minimum(a, b):
    return tl.minimum(a, b, propagate_nan=tl.PropagateNan.ALL)
'''

_files = itertools.count()

_ROLLOUT_LOAD = " " * 8 + "rr = tl.where(valid, old - tl.load(roll_ptr + offs, mask=inb, other=0.0).to(tl.float32), 0.0)"


def _define(source: str, namespace: dict[str, Any], interpret: bool) -> dict[str, Any]:
    """Exec ``source`` (one or more top-level functions) with its text registered in ``linecache`` (Triton
    reads a kernel's source), and return each function as a Triton kernel (JIT, or interpreted)."""
    triton = _triton()
    filename = f"<gipo_core._triton_kernel {next(_files)}>"
    linecache.cache[filename] = (len(source), None, source.splitlines(keepends=True), filename)
    local: dict[str, Any] = {}
    exec(compile(source, filename, "exec"), namespace, local)  # noqa: S102 - our own generated code
    out = {}
    for name, fn in local.items():
        fn.__module__ = __name__
        namespace[name] = out[name] = _jit(triton, fn, interpret)
    return out


def _jit(triton: Any, fn: Callable, interpret: bool) -> Any:
    if interpret:
        from triton.runtime.interpreter import InterpretedFunction  # noqa: PLC0415

        return InterpretedFunction(fn)
    return triton.jit(fn)


def _split(source: str) -> list[str]:
    """Top-level functions of ``source``, one per string (the interpreter reads each def on its own)."""
    return ["\ndef " + part for part in source.split("\ndef ")[1:]]


@functools.lru_cache(maxsize=2)
def _runtime(interpret: bool) -> dict[str, Any]:
    """The helper functions and the finishing kernel, for the JIT (CUDA) or the interpreter."""
    triton = _triton()
    import triton.language as tl  # noqa: PLC0415

    namespace: dict[str, Any] = {"tl": tl, "triton": triton, "_INF": tl.constexpr(math.inf), "_NAN": tl.constexpr(math.nan)}
    if not interpret:
        from triton.language.extra import libdevice  # noqa: PLC0415

        namespace["libdevice"] = libdevice
    for part in _split(_PORTABLE if interpret else _LIBDEVICE) + _split(_MINMAX) + [_FINISH.format(K=_K)]:
        _define(part, namespace, interpret)
    return namespace


@functools.lru_cache(maxsize=256)
def _main_kernel(
    objective: str,
    options: tuple[tuple[str, Any], ...],
    with_metrics: bool,
    interpret: bool,
    rollout: tuple[Any, Any] = (None, None),
) -> tuple[Any, tuple[float, ...]]:
    """The main kernel of one option set and its number arguments. Option sets whose code differs only in
    numbers share one kernel (compiled by Triton on first launch, per dtype/flag combination)."""
    lines, constants = element_code(objective, options, with_metrics, rollout)
    body = "\n".join(" " * 8 + line for line in lines)
    kernel = _kernel_from_source(objective, body, tuple(constants), rollout[0] is not None, interpret)
    return kernel, tuple(constants.values())


@functools.lru_cache(maxsize=None)
def _kernel_from_source(objective: str, body: str, constants: tuple[str, ...], rollout: bool, interpret: bool) -> Any:
    name = f"_gipo_{objective}_{next(_files)}"
    source = _MAIN.format(
        name=name,
        element=body,
        constants="".join(f"{c}, " for c in constants),
        K=_K,
        # The rollout correction (token modes): one more load; its factor multiplies the aggregation weight.
        rollout=_ROLLOUT_LOAD if rollout else "",
        rollout_apply=" " * 8 + "c = c * roll_" if rollout else "",
    )
    namespace = dict(_runtime(interpret))
    return _define(source, namespace, interpret)[name]


# ---------------------------------------------------------------------------------------- the call


def _scale(
    mask: torch.Tensor | None, logp: torch.Tensor, spec: LossSpec, denominator: Any
) -> tuple[int, float, torch.Tensor | None]:
    """(SCALE_KIND, number, tensor) from the core's ``_coefficient`` (the aggregation weight without the mask
    factor, which the kernel applies per element)."""
    m = valid = mask
    if m is not None and m.dtype != torch.bool:
        m = m.to(torch.float32)  # the core counts a float16/bfloat16/float64 mask in float32
        valid = m != 0
    coef = engine._coefficient(m, valid, logp, spec, denominator, torch.float32, _xp, binary=True)
    if isinstance(coef, (int, float)):
        return 0, float(coef), None
    if coef.ndim == 0:
        return 1, 0.0, coef
    return 2, 0.0, coef.reshape(-1)  # one value per sequence: shape (..., 1)


def forward(arrays: tuple[Any, ...], spec: LossSpec, *, block: int | None = None) -> tuple[Any, Any, Any]:
    """``(loss, saved, stacked diagnostics or None)``, like ``engine.forward`` through ``_torch_fused``.

    The caller checks ``supports`` first. ``block`` overrides ``BLOCK`` (the tests use small blocks so that
    odd sizes span several programs and loop steps).
    """
    logp, old_logp, advantages, mask, behavior_weights, denominator = arrays[:6]
    rollout_logp = arrays[6] if len(arrays) > 6 else None
    rollout = (spec.rollout_is, spec.rollout_is_bounds)
    interpret = logp.device.type == "cpu"
    block = block or BLOCK
    shape = logp.shape
    n = logp.numel()
    n_time = shape[-1]
    per_row = advantages.shape != shape
    kind, scale_value, scale_tensor = _scale(mask, logp, spec, denominator)
    flat = [
        x.contiguous().reshape(-1) if x is not None else None
        for x in (logp, old_logp, advantages, mask, rollout_logp if spec.rollout_is is not None else None)
    ]
    bw = behavior_weights.contiguous().reshape(-1) if behavior_weights is not None else None
    saved = torch.empty(shape, dtype=torch.float32, device=logp.device)
    n_blocks = -(-n // block)
    mask_kind = 0 if mask is None else (1 if mask.dtype == torch.bool else 2)
    with_metrics = bool(spec.with_metrics)
    main, constants = _main_kernel(spec.objective, spec.options, with_metrics, interpret, rollout)
    finish = _runtime(interpret)["_gipo_finish"]
    dummy = flat[0]
    pointers = (
        flat[0], flat[1], flat[2], flat[3] if mask is not None else dummy, bw if bw is not None else dummy,
        flat[4] if flat[4] is not None else dummy, scale_tensor if scale_tensor is not None else dummy,
    )  # fmt: skip
    flags = dict(
        MASK_KIND=mask_kind, ADV_PER_ROW=per_row, HAS_BW=bw is not None, SCALE_KIND=kind,
        WITH_METRICS=with_metrics, OFFSETS_64=n + block >= 2**31, BLOCK=block,
    )  # fmt: skip
    loss = torch.empty((), dtype=torch.float32, device=logp.device)
    metrics = torch.empty(len(METRIC_NAMES), dtype=torch.float32, device=logp.device)
    with torch.cuda.device(logp.device) if logp.device.type == "cuda" else contextlib.nullcontext():
        if interpret:
            programs, launch = min(n_blocks, 3), {}
        else:
            launch = dict(num_warps=NUM_WARPS, enable_fp_fusion=False)  # op-by-op rounding: no fused multiply-add
            args = (*pointers, scale_value, saved, saved, n, n_time, n_blocks, *constants)
            programs = min(n_blocks, _resident_programs(main, args, flags, launch, logp.device))
        part = torch.empty((programs, _K), dtype=torch.float32, device=logp.device)
        main[(programs,)](*pointers, scale_value, saved, part, n, n_time, n_blocks, *constants, **flags, **launch)
        finish[(1,)](
            part, loss, metrics, programs,
            WITH_METRICS=with_metrics, BLOCK_P=max(16, 1 << (programs - 1).bit_length()),
        )  # fmt: skip
    if not with_metrics:
        return loss, saved, None
    names = engine.metric_names(spec, False)
    if names != METRIC_NAMES:  # "basic": the kernel computes every diagnostic, the call returns its subset
        metrics = metrics[_subset(names, metrics.device)]
    if rollout_logp is not None:
        metrics = torch.cat([metrics, _rollout_metrics(old_logp, rollout_logp, mask, spec)])
    return loss, saved, metrics


@functools.lru_cache(maxsize=16)
def _subset(names: tuple[str, ...], device: torch.device) -> torch.Tensor:
    """The positions of ``names`` in ``METRIC_NAMES``, as an index tensor on ``device`` (made once)."""
    return torch.tensor([METRIC_NAMES.index(k) for k in names], device=device)


def _rollout_metrics(old_logp: Any, rollout_logp: Any, mask: Any, spec: LossSpec) -> torch.Tensor:
    """The diagnostics of the rollout correction (``engine.ROLLOUT_METRIC_NAMES``), by the core's own
    functions one torch op at a time (a few passes over two inputs; the kernel does the loss and gradient)."""
    r = old_logp.to(torch.float32) - rollout_logp.to(torch.float32)
    valid = None if mask is None else (mask if mask.dtype == torch.bool else mask != 0)
    if valid is not None:
        r = torch.where(valid, r, 0.0)
    correction = None if spec.rollout_is is None else engine._rollout_correction(r, valid, None, spec, _xp)
    values = engine._rollout_diagnostics(r, correction, valid, r, spec, _xp)
    return torch.stack([values[k] for k in engine.ROLLOUT_METRIC_NAMES])


_resident: dict[tuple, int] = {}


def _resident_programs(main: Any, args: tuple, flags: dict, launch: dict, device: torch.device) -> int:
    """How many programs of ``main`` run at once on the whole GPU (``PROGRAMS_PER_SM`` per multiprocessor, or
    as many as its registers and threads allow), cached per compiled variant."""
    props = torch.cuda.get_device_properties(device)
    if PROGRAMS_PER_SM is not None:
        return PROGRAMS_PER_SM * props.multi_processor_count
    key = (main, device, tuple(getattr(a, "dtype", type(a)) for a in args), tuple(flags.items()), NUM_WARPS)
    if key not in _resident:
        threads = 32 * NUM_WARPS
        per_sm = 2
        try:
            compiled = main.warmup(*args, grid=(1,), **flags, **launch)
            compiled._init_handles()
            regs = max(1, compiled.n_regs)
            per_sm = min(getattr(props, "regs_per_multiprocessor", 65536) // (regs * threads),
                         props.max_threads_per_multi_processor // threads)  # fmt: skip
        except Exception:  # noqa: BLE001 - a Triton without these attributes: two per multiprocessor
            pass
        _resident[key] = max(1, per_sm) * props.multi_processor_count
    return _resident[key]


def try_forward(arrays: tuple[Any, ...], spec: LossSpec) -> tuple[Any, Any, Any] | None:
    """``forward`` when ``supports`` the call, else ``None``. A failure to build or launch the kernel (an
    old Triton, an unsupported GPU) warns once per option set and returns ``None``; inside
    ``interpret_on_cpu`` it raises (the tests must see it)."""
    if supports(arrays, spec) is not None:
        return None
    if _state["interpret"]:
        return forward(arrays, spec)
    key = (spec.objective, spec.options, bool(spec.with_metrics), spec.rollout_is, spec.rollout_is_bounds)
    if key in _state["warned"]:
        return None
    try:
        return forward(arrays, spec)
    except Exception as exc:  # noqa: BLE001 - any Triton failure: the current path for this option set
        _state["warned"].add(key)
        reason = (str(exc).strip().splitlines() or [""])[0][:300]
        warnings.warn(
            f"gipo_core.torch: the Triton loss kernel failed ({type(exc).__name__}: {reason}); this option set "
            "runs the current path from now on (gipo_core.torch.set_fused('never') silences this)",
            RuntimeWarning,
            stacklevel=4,
        )
        return None
