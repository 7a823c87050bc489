"""The hand-written Triton kernel of the PyTorch backend (``gipo_core._triton_kernel``) against the core.

The reference is the core run one torch op at a time on the CPU (``engine.forward``; it is checked against
the golden data by the conformance suite). On a machine without CUDA the kernel runs in Triton's CPU
interpreter on CPU tensors: ``TRITON_INTERPRET=1`` has to be set before ``triton`` is first imported (its
standard library is decorated at import), so the repository's root ``conftest.py`` sets it for the whole
session on machines without CUDA, where nothing else runs Triton code. With CUDA (and ``TRITON_INTERPRET``
unset) the same tests run the compiled kernel on the GPU (``backends/gpu_run.sh``).

The interpreter runs each kernel with NumPy, one program at a time: inputs are small (odd sizes that no block
size divides, with blocks of 32 or 64 elements so that several programs and loop steps run), and the cases
cover every objective, aggregation, mask kind and dtype without taking their product.
"""

from __future__ import annotations

import dataclasses
import math
import os

import pytest
import torch

import triton  # noqa: F401 - a test dependency (the "test" extra); imported after conftest set the mode

import gipo_core.torch as gt
from gipo_core import _torch_fused
from gipo_core import _triton_kernel as tk
from gipo_core._core import engine
from gipo_core._core.engine import AGG_MODES, METRIC_NAMES, LossSpec
from gipo_core._core.objectives import OBJECTIVES
from gipo_core._torch_namespace import namespace as _xp

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
DEVICE = "cpu" if INTERPRET else "cuda"


def _interpreter_ready() -> str | None:
    from triton.runtime.interpreter import InterpretedFunction

    if isinstance(triton.language.standard.sum, InterpretedFunction):
        return None
    return (
        "triton was imported before TRITON_INTERPRET=1 was set (the root conftest.py sets it on machines "
        "without CUDA); run with TRITON_INTERPRET=1 in the environment"
    )


@pytest.fixture(autouse=True)
def kernel_device():
    """CPU tensors through the interpreter, or CUDA tensors compiled; the dispatch mode restored after."""
    if INTERPRET:
        problem = _interpreter_ready()
        assert problem is None, problem
        with tk.interpret_on_cpu():
            before = gt.fused_settings()
            yield
            gt.set_fused(**before)
    else:
        assert torch.cuda.is_available(), "without CUDA these tests need TRITON_INTERPRET=1 (root conftest.py)"
        before = gt.fused_settings()
        yield
        gt.set_fused(**before)


def make_batch(shape=(3, 37), *, seed=0, dtype=torch.float32, mask="bool", per_seq=False):
    """Log-ratios mostly near 0, some out to +-6, some exactly 0 (PPO's tie at rho = 1); NaN and inf planted
    where the mask is 0 (logp, old_logp, advantages and behaviour weights)."""
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(shape, generator=g, dtype=torch.float64) * 3.0
    ell = 0.4 * torch.randn(shape, generator=g, dtype=torch.float64)
    u = torch.rand(shape, generator=g)
    ell[u < 0.15] = 12.0 * torch.rand(int((u < 0.15).sum()), generator=g, dtype=torch.float64) - 6.0
    ell[u > 0.92] = 0.0
    adv = torch.randn(shape[:-1] + (1,) if per_seq else shape, generator=g, dtype=torch.float64)
    bw = torch.rand(shape, generator=g, dtype=torch.float64)
    valid = torch.rand(shape, generator=g) < 0.75
    valid.view(-1, shape[-1])[0, 3:] = False  # one sequence almost empty
    weights = torch.where(valid, 0.25 + torch.rand(shape, generator=g), 0.0)  # a float mask: any non-zero
    if mask != "none":
        ell[~valid] = math.nan
        old[~valid] = math.inf
        bw[~valid] = math.nan
        if not per_seq:
            adv[~valid] = -math.inf
    m = {"bool": valid, "float": weights.to(dtype), "none": None}[mask]
    cast = [x.to(dtype) for x in (old + ell, old, adv)]
    return (*cast, m, bw.to(dtype))


def reference(arrays, spec):
    """The core, one op at a time, on the CPU."""
    cpu = tuple(x.cpu() if isinstance(x, torch.Tensor) else x for x in arrays)
    loss, saved, metrics = engine.forward(*cpu, spec=spec, xp=_xp)
    return loss, saved, torch.stack(list(metrics.values())) if spec.with_metrics else None


def check(arrays, spec, *, block, exact_nan=False):
    arrays = tuple(x.to(DEVICE) if isinstance(x, torch.Tensor) else x for x in arrays)
    assert tk.supports(arrays, spec) is None
    loss, saved, stacked = tk.forward(arrays, spec, block=block if INTERPRET else None)
    ref_loss, ref_saved, ref_stacked = reference(arrays, spec)
    assert loss.dtype == saved.dtype == torch.float32 and saved.shape == arrays[0].shape
    assert loss.device == saved.device == arrays[0].device
    tol = dict(rtol=2e-5, atol=1e-6, equal_nan=exact_nan)
    torch.testing.assert_close(saved.cpu(), ref_saved, **tol)
    torch.testing.assert_close(loss.cpu(), ref_loss, **tol)
    if spec.with_metrics:
        names = engine.metric_names(spec, len(arrays) > 6 and arrays[6] is not None)
        assert stacked.shape == (len(names),) and stacked.device == arrays[0].device
        for name, got, want in zip(names, stacked.cpu(), ref_stacked):
            torch.testing.assert_close(got, want, **tol, msg=lambda m, name=name: f"{name}: {m}")
    else:
        assert stacked is None
    return loss, saved, stacked


OBJECTIVE_CASES = [
    ("gipo", {"sigma": 1.0, "sigma_neg": None, "kernel": "gaussian"}),
    ("gipo", {"sigma": 0.5, "sigma_neg": 0.3, "kernel": "gaussian"}),
    ("gipo", {"sigma": 20.0, "sigma_neg": None, "kernel": "gaussian"}),  # u unbounded in float32: guarded form
    ("gipo", {"sigma": 0.7, "sigma_neg": 1.3, "kernel": "laplace"}),
    ("gipo", {"sigma": 0.4, "sigma_neg": None, "kernel": "cauchy"}),
    ("ppo_clip", {"clip_low": 0.2, "clip_high": 0.28, "dual_clip": None}),
    ("ppo_clip", {"clip_low": 0.2, "clip_high": 0.2, "dual_clip": 3.0}),
    ("sapo", {"tau_pos": 1.0, "tau_neg": 1.05}),
    ("cispo", {"clip_max": 5.0, "clip_min": None}),
    ("no_clip", {}),
    ("cispo", {"clip_max": 4.0, "clip_min": 0.6}),
]
MASKS = ("none", "bool", "float")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _spec(objective, opts, **kw):
    options = tuple((k, opts[k]) for k, _ in OBJECTIVES[objective].defaults)
    return LossSpec(objective, options, **kw)


# Twenty-two cases: every objective option case twice, every (aggregation, mask kind) pair (a new mode of the
# core too), every dtype with every mask kind, per-sequence advantages, behaviour weights and diagnostics (all,
# "basic", none) spread over them (each aggregation with and without per-sequence advantages).
CASES = [
    (
        *OBJECTIVE_CASES[k % len(OBJECTIVE_CASES)], AGG_MODES[k % len(AGG_MODES)], MASKS[k % 3], DTYPES[(k // 3) % 3],
        (k // 4) % 2 == 1, (k // 2) % 3 != 2, (True, True, "basic", True, False)[k % 5 if k % 7 else 2],
    )  # fmt: skip
    for k in range(22)
]


@pytest.mark.parametrize(("objective", "opts", "agg", "mask", "dtype", "per_seq", "bw", "metrics"), CASES)
def test_kernel_equals_the_core(objective, opts, agg, mask, dtype, per_seq, bw, metrics):
    logp, old, adv, m, w = make_batch((3, 37), seed=len(objective) + len(agg), dtype=dtype, mask=mask,
                                      per_seq=per_seq)  # fmt: skip
    spec = _spec(objective, opts, agg=agg, with_metrics=metrics)
    check((logp, old, adv, m, w if bw else None, None), spec, block=32 if per_seq else 64)


def test_case_coverage():
    assert {(c[2], c[3]) for c in CASES} == {(a, m) for a in AGG_MODES for m in MASKS}
    assert {(c[3], c[4]) for c in CASES} == {(m, d) for m in MASKS for d in DTYPES}
    assert {c[0] for c in CASES} == set(OBJECTIVES)
    assert {(c[2], c[5]) for c in CASES} == {(a, p) for a in AGG_MODES for p in (False, True)}
    assert {c[7] for c in CASES} == {True, False, "basic"}
    assert {(c[0], c[1]["clip_min"] is None) for c in CASES if c[0] == "cispo"} == {("cispo", True), ("cispo", False)}


ROLLOUT_CASES = [
    (None, None, "bool", torch.float32, True),
    ("token-truncate", None, "float", torch.bfloat16, True),
    ("token-truncate", (0.5, 1.5), "none", torch.float32, "basic"),
    ("token-mask", None, "bool", torch.float16, True),
    ("token-mask", (0.0, 3.0), "float", torch.float32, False),
]


@pytest.mark.parametrize(("mode", "bounds", "mask", "dtype", "metrics"), ROLLOUT_CASES)
def test_token_rollout_corrections_equal_the_core(mode, bounds, mask, dtype, metrics):
    """rollout_logp with a token-level correction: one more load, the core's clamp or mask of exp(old -
    rollout) traced into the kernel; the rollout diagnostics by the core's own functions."""
    logp, old, adv, m, w = make_batch((3, 37), seed=13, dtype=dtype, mask=mask)
    g = torch.Generator().manual_seed(1)
    rollout = old.double() + 0.3 * torch.randn(old.shape, generator=g, dtype=torch.float64)
    rollout.view(-1)[::9] -= 2.0  # weights e^2 and more: truncated or masked
    if m is not None:
        rollout[m == 0] = math.nan
    spec = _spec(*OBJECTIVE_CASES[1], agg="seq-mean-token-mean", with_metrics=metrics, rollout_is=mode,
                 rollout_is_bounds=bounds)  # fmt: skip
    check((logp, old, adv, m, w, None, rollout.to(dtype)), spec, block=32)


@pytest.mark.parametrize("metrics", [True, "basic"])
@pytest.mark.parametrize("where", ["logp", "advantages"])
def test_a_nan_at_a_valid_element_makes_every_diagnostic_nan(where, metrics):
    """The core's rule: a NaN log-ratio or advantage at an unmasked element gives NaN in every diagnostic but
    n_valid (and in the loss); +inf and -inf log-ratios together count as a NaN."""
    logp, old, adv, m, w = make_batch((3, 37), seed=2, mask="bool")
    (logp if where == "logp" else adv)[1, 5], m[1, 5] = math.nan, True
    spec = _spec(*OBJECTIVE_CASES[6], with_metrics=metrics)
    _, _, stacked = check((logp, old, adv, m, w, None), spec, block=32, exact_nan=True)
    assert stacked[:-1].isnan().all() and stacked[-1] == m.sum()
    logp, old, adv, m, w = make_batch((3, 37), seed=2, mask="bool")
    logp[0, 1], logp[2, 2], old[0, 1], old[2, 2], m[0, 1], m[2, 2] = math.inf, -math.inf, -1.0, -1.0, True, True
    _, _, stacked = check((logp, old, adv, m, w, None), _spec(*OBJECTIVE_CASES[0]), block=32, exact_nan=True)
    assert stacked[:-1].isnan().all()


# On a GPU also sizes where every program loops over several blocks (more than fit on the GPU at once).
_GPU_SHAPES = [] if INTERPRET else [(7, 100_003), (3_000_017,)]


@pytest.mark.parametrize("shape", [(1,), (5,), (2, 1, 33), (129,), *_GPU_SHAPES])
def test_odd_sizes_and_ranks(shape):
    logp, old, adv, m, _ = make_batch(shape, seed=sum(shape), mask="float")
    check((logp, old, adv, m, None, None), _spec(*OBJECTIVE_CASES[1], agg="seq-mean-token-mean"), block=32)


@pytest.mark.parametrize("agg", AGG_MODES)
def test_number_and_tensor_denominators(agg):
    logp, old, adv, m, w = make_batch((4, 19), seed=7, mask="bool", per_seq=True)
    check((logp, old, adv, m, w, None), _spec(*OBJECTIVE_CASES[0], agg=agg, denominator=50.0), block=64)
    check((logp, old, adv, m, None, torch.tensor(33.0)), _spec(*OBJECTIVE_CASES[5], agg=agg), block=64)


@pytest.mark.parametrize("mask", ["bool", "float"])
def test_all_masked_gives_zeros(mask):
    logp, old, adv, m, w = make_batch((2, 21), seed=3, mask=mask)
    m = torch.zeros_like(m)
    logp[:] = math.nan
    for objective in ("gipo", "ppo_clip"):
        spec = _spec(*OBJECTIVE_CASES[0 if objective == "gipo" else 6], agg="seq-mean-token-mean")
        loss, saved, stacked = check((logp, old, adv, m, w, None), spec, block=32)
        assert loss.item() == 0.0 and not saved.any() and torch.isfinite(stacked).all()


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # NumPy, inside the interpreter
def test_overflowing_multipliers_match_the_core():
    """Valid log-ratios beyond float32's exp range: rho and u = inf, the core's ess counts them, loss inf."""
    logp, old, adv, m, _ = make_batch((2, 40), seed=5, mask="bool")
    old[1, ::7], logp[1, ::7], adv[1, ::7], m[1, ::7] = -1.0, 94.0, 0.5, True
    for objective, opts in (("no_clip", {}), OBJECTIVE_CASES[3], OBJECTIVE_CASES[2]):
        check((logp, old, adv.abs(), m, None, None), _spec(objective, opts), block=32, exact_nan=True)


def test_the_public_api_takes_the_kernel_and_set_fused_never_turns_it_off(monkeypatch):
    calls = []
    real = tk.forward
    monkeypatch.setattr(tk, "forward", lambda *a, **k: calls.append(1) or real(*a, **k))
    logp, old, adv, m, w = make_batch((3, 40), seed=11, dtype=torch.bfloat16, mask="float", per_seq=True)
    args = [x.to(DEVICE) for x in (logp, old, adv, m)]
    x = args[0].clone().requires_grad_(True)
    gt.set_fused("always")
    out = gt.sapo_loss(x, *args[1:], agg="seq-mean-token-sum", behavior_weights=w.to(DEVICE))
    (grad,) = torch.autograd.grad(out.loss, x)
    assert len(calls) == 1
    gt.set_fused("never")
    y = args[0].clone().requires_grad_(True)
    ref = gt.sapo_loss(y, *args[1:], agg="seq-mean-token-sum", behavior_weights=w.to(DEVICE))
    (ref_grad,) = torch.autograd.grad(ref.loss, y)
    assert len(calls) == 1
    assert grad.dtype == torch.bfloat16 and out.metrics.keys() == ref.metrics.keys()
    torch.testing.assert_close(out.loss, ref.loss, rtol=2e-5, atol=1e-6)
    torch.testing.assert_close(grad.float(), ref_grad.float(), rtol=1e-2, atol=1e-5)
    for key in ref.metrics:
        torch.testing.assert_close(out.metrics[key], ref.metrics[key], rtol=2e-5, atol=1e-6)


def test_the_public_api_takes_the_kernel_with_a_token_rollout_correction(monkeypatch):
    calls = []
    real = tk.forward
    monkeypatch.setattr(tk, "forward", lambda *a, **k: calls.append(1) or real(*a, **k))
    logp, old, adv, m, _ = make_batch((2, 40), seed=17, mask="bool")
    rollout = torch.where(m, old - 0.5 * torch.rand(old.shape, generator=torch.Generator().manual_seed(2)), math.nan)
    args = [x.to(DEVICE) for x in (logp, old, adv, m, rollout)]
    kw = dict(rollout_logp=args[4], rollout_is="token-mask", rollout_is_bounds=(0.7, 1.4), with_metrics="basic")
    results = []
    for mode in ("always", "never"):
        gt.set_fused(mode)
        x = args[0].clone().requires_grad_(True)
        out = gt.ppo_clip_loss(x, *args[1:4], dual_clip=3.0, **kw)
        results.append((out, *torch.autograd.grad(out.loss, x)))
    assert len(calls) == 1
    (out, grad), (ref, ref_grad) = results
    assert list(out.metrics) == list(ref.metrics) and "rollout_masked_token_frac" in out.metrics
    assert ref.metrics["rollout_masked_token_frac"] > 0
    torch.testing.assert_close(out.loss, ref.loss, rtol=2e-5, atol=1e-6)
    torch.testing.assert_close(grad, ref_grad, rtol=2e-5, atol=1e-6)
    for key in ref.metrics:
        torch.testing.assert_close(out.metrics[key], ref.metrics[key], rtol=2e-5, atol=1e-6)


def test_what_it_does_not_cover_falls_back():
    logp, old, adv, m, _ = make_batch((2, 9))
    spec = _spec(*OBJECTIVE_CASES[0])
    assert tk.supports((logp, old, adv, m, None, None), spec) is None
    assert "float64" in tk.supports((logp.double(), old, adv, m, None, None), spec)
    assert "empty" in tk.supports((logp[:0], old[:0], adv[:0], None, None, None), spec)
    assert tk.supports((logp, old, adv, m, None, None, None), spec) is None
    assert tk.supports((logp, old, adv, m, None, None, old), spec) is None
    sequence_is = dataclasses.replace(spec, rollout_is="sequence-truncate")
    assert "sequence-level" in tk.supports((logp, old, adv, m, None, None, old), sequence_is)
    assert "float64" in tk.supports((logp, old, adv, m, None, None, old.double()), spec)
    for field, value in (("opsm_delta", 0.5), ("ratio_level", "sequence"), ("rollout_is", "sequence-mask")):
        assert field in tk.supports((logp, old, adv, m, None, None), dataclasses.replace(spec, **{field: value}))
    assert "options" in tk.supports((logp, old, adv, m, None, None), LossSpec("gipo", spec.options[:1]))
    # Through the API: the off-policy options run the core, with their own diagnostics.
    gt.set_fused("always")
    args = [x.to(DEVICE) for x in (logp, old, adv, m)]
    offpolicy = ({"rollout_logp": args[1] - 0.1, "rollout_is": "geometric-mask"}, {"ratio_level": "sequence"},
                 {"opsm_delta": 0.5})  # fmt: skip
    for kw in offpolicy:
        out = gt.gipo_loss(*args, **kw)
        want = gt.gipo_loss(*[x.cpu() for x in args], **{k: getattr(v, "cpu", lambda v=v: v)() for k, v in kw.items()})
        assert out.metrics.keys() == want.metrics.keys() and len(out.metrics) > len(METRIC_NAMES)
    # Through the API: float64 runs the core.
    gt.set_fused("auto")
    out = gt.gipo_loss(logp.double().to(DEVICE), old.double().to(DEVICE), adv.double().to(DEVICE), m.to(DEVICE))
    assert out.loss.dtype == torch.float64


def test_the_objectives_are_traced_from_the_core():
    """Every option branch of the core's objectives generates code; the tracer refuses a branch on data."""
    for objective, opts in OBJECTIVE_CASES:
        options = _spec(objective, opts).options
        lines, constants = tk.element_code(objective, options, with_metrics=True)
        outputs = ["loss_", "grad_", "mult_", "weight_", "clip_", "clip_lower_"]
        assert [line.split(" = ")[0] for line in lines[-6:]] == outputs
        assert all(isinstance(v, float) for v in constants.values())
    trace = tk._Trace()
    with pytest.raises(TypeError, match="branched on an array value"):
        bool(trace.input("ell") > 0)
    trace = tk._Trace()
    assert (trace.code(math.inf), trace.code(-0.5), trace.code(math.inf)) == ("c0", "c1", "c0")
    # Numbers are arguments: a new sigma reuses the kernel; a new branch of the core's code does not.
    sigma = [_spec("gipo", dict(OBJECTIVE_CASES[0][1], sigma=s)).options for s in (1.0, 0.5, 30.0)]
    kernels = [tk._main_kernel("gipo", options, True, INTERPRET) for options in sigma]
    assert kernels[0][0] is kernels[1][0] and kernels[0][1] != kernels[1][1]
    assert kernels[2][0] is not kernels[0][0]  # sigma^2 / 2 beyond float32's exp range: the guarded form


def test_cpu_tensors_take_the_kernel_only_inside_interpret_on_cpu():
    cpu = torch.zeros(3)
    assert not tk.wants(cpu, "never")
    before = tk._state["interpret"]
    tk._state["interpret"] = False
    try:
        assert not tk.wants(cpu, "always")
        with tk.interpret_on_cpu():
            assert tk.wants(cpu, "auto")
        assert not tk.wants(cpu, "auto")
    finally:
        tk._state["interpret"] = before


_COMPILE_FOR_A_GPU = r"""
import triton
from triton.backends.compiler import GPUTarget
from gipo_core import _triton_kernel as tk

target = GPUTarget("cuda", 90, 32)
pointers = ("logp_ptr", "old_ptr", "adv_ptr", "mask_ptr", "bw_ptr", "roll_ptr", "scale_ptr", "saved_ptr", "part_ptr")
variants = [
    ("gipo", (("sigma", 1.0), ("sigma_neg", 0.5), ("kernel", "gaussian")), "bf16", "i1", 1, True, 2, True),
    ("sapo", (("tau_pos", 1.0), ("tau_neg", 1.05)), "fp16", "fp32", 2, False, 1, True),
    ("cispo", (("clip_max", 5.0), ("clip_min", 0.5)), "fp32", "fp16", 2, True, 0, False),
]
for k, (objective, options, dtype, mask_dtype, mask_kind, per_row, scale_kind, metrics) in enumerate(variants):
    rollout = [(None, None), ("token-truncate", None), ("token-mask", (0.5, 2.0))][k]
    main = tk._main_kernel(objective, options, metrics, False, rollout)[0]
    flags = dict(MASK_KIND=mask_kind, ADV_PER_ROW=per_row, HAS_BW=True, SCALE_KIND=scale_kind,
                 WITH_METRICS=metrics, OFFSETS_64=per_row, BLOCK=tk.BLOCK)
    signature = {name: "*fp32" for name in pointers}
    signature.update(logp_ptr="*" + dtype, old_ptr="*" + dtype, adv_ptr="*" + dtype, mask_ptr="*" + mask_dtype)
    signature.update(scale_value="fp32", N="i64" if per_row else "i32", T="i32", n_blocks="i32")
    signature.update({name: "fp32" for name in main.arg_names if name[0] == "c" and name[1:].isdigit()})
    signature.update({k: "constexpr" for k in flags})
    compiled = triton.compile(triton.compiler.ASTSource(main, signature, flags), target=target,
                              options={"num_warps": tk.NUM_WARPS, "enable_fp_fusion": False})
    assert ".target sm_90" in compiled.asm["ptx"], objective
finish = tk._runtime(False)["_gipo_finish"]
signature = {"part_ptr": "*fp32", "loss_ptr": "*fp32", "metrics_ptr": "*fp32", "P": "i32",
             "WITH_METRICS": "constexpr", "BLOCK_P": "constexpr"}
triton.compile(triton.compiler.ASTSource(finish, signature, dict(WITH_METRICS=True, BLOCK_P=1024)), target=target)
print("compiled")
"""


@pytest.mark.skipif(not INTERPRET, reason="with a GPU the other tests compile and run the kernels there")
def test_the_kernels_compile_for_a_gpu(tmp_path):
    """The GPU path (libdevice, the compiler's type rules) compiled to an H100 binary with Triton's own
    ptxas, in a process without the interpreter: no GPU needed to see that it builds."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(tmp_path), TRITON_DEFAULT_FP_FUSION="0")
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(os.path.dirname(os.path.abspath(tk.__file__)))]
                                        + [p for p in [env.get("PYTHONPATH")] if p])  # fmt: skip
    done = subprocess.run([sys.executable, "-c", _COMPILE_FOR_A_GPU], env=env, capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert done.returncode == 0 and "compiled" in done.stdout, done.stderr[-3000:]
