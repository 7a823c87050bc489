"""The fused eager path of the PyTorch backend: the core's forward compiled into one kernel (``set_fused``).

The op-by-op path is the reference here (it is checked against the NumPy oracle and the golden data in
``test_torch.py`` and the conformance suite); the kernel must agree with it to within rounding, keep every
property of the adapter (one saved tensor, float32 inside, NaN at masked positions contained, the double
backward error) and step aside wherever compiling would be wrong or nested.
"""

from __future__ import annotations

import itertools
import warnings

import pytest

torch = pytest.importorskip("torch")

import gipo_core.torch as gt  # noqa: E402
from gipo_core import _torch_fused  # noqa: E402
from gipo_core._api import PUBLIC_LOSSES  # noqa: E402

_sigmas = itertools.count()


def _fresh_sigma() -> float:
    """A sigma no other test uses: a new option set, so whether a kernel was built for it can be checked."""
    return 0.6 + 0.01 * next(_sigmas)


def _compiler_works() -> bool:
    try:
        torch.compile(lambda x: x * 2.0 + 1.0)(torch.ones(4))
    except Exception:  # noqa: BLE001 - inductor needs a C++ toolchain on CPU
        return False
    return True


pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not _compiler_works(), reason="torch.compile cannot build a CPU kernel here"),
]


@pytest.fixture(autouse=True)
def restore_dispatch():
    before = gt.fused_settings()
    yield
    gt.set_fused(**before)


def _kernel_built(fn_name: str, *, agg: str | None = None, with_metrics: bool | None = None, **opts) -> bool:
    """Whether a working kernel exists for an option set of ``fn_name`` matching the given fields."""
    objective = PUBLIC_LOSSES[fn_name]
    return any(
        spec.objective == objective
        and all(spec.opts.get(k) == v for k, v in opts.items())
        and agg in (None, spec.agg)
        and with_metrics in (None, spec.with_metrics)
        and kernel is not None
        for (spec, _), kernel in _torch_fused._kernels.items()
    )


def make_batch(shape=(6, 40), *, seed=0, dtype=torch.float32, mask="float", per_seq=False, plant_nan=True):
    """Log-ratios out to +-6 (the weights and ratios far from 1), and NaN/inf planted where the mask is 0."""
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(shape, generator=g, dtype=torch.float64) * 3.0
    ell = 0.4 * torch.randn(shape, generator=g, dtype=torch.float64)
    far = torch.rand(shape, generator=g) < 0.1
    ell[far] = 12.0 * torch.rand(int(far.sum()), generator=g, dtype=torch.float64) - 6.0
    logp = old + ell
    adv = torch.randn(shape[:-1] + (1,) if per_seq else shape, generator=g, dtype=torch.float64)
    valid = torch.rand(shape, generator=g) < 0.8
    valid[0, 5:] = False
    if plant_nan and mask != "none":
        logp[~valid] = float("nan")
        if not per_seq:
            adv[~valid] = float("inf")
    m = {"float": valid.to(dtype), "bool": valid, "none": None}[mask]
    return logp.to(dtype), old.to(dtype), adv.to(dtype), m


def run(fn, logp, *args, mode, **kw):
    gt.set_fused(mode)
    x = logp.detach().clone().requires_grad_(True)
    out = fn(x, *args, **kw)
    (grad,) = torch.autograd.grad(out.loss, x)
    return out, grad


# (loss function, options, agg, mask, dtype, diagnostics, per-sequence advantages)
CASES = [
    ("gipo_loss", {}, "token-mean", "float", torch.float32, True, False),
    ("gipo_loss", {"sigma": 0.5, "sigma_neg": 0.25}, "seq-mean-token-mean", "bool", torch.float32, False, True),
    ("gipo_loss", {"kernel": "laplace"}, "seq-mean-token-sum", "none", torch.float64, True, False),
    ("gipo_loss", {"kernel": "cauchy", "sigma": 2.0}, "seq-mean-token-sum-norm", "float", torch.bfloat16, False, False),
    ("ppo_clip_loss", {"dual_clip": 3.0}, "token-mean", "bool", torch.float16, True, False),
    ("no_clip_loss", {}, "token-mean", "float", torch.float32, False, False),
    ("sapo_loss", {"tau_neg": 2.0}, "seq-mean-token-mean", "float", torch.float32, True, False),
    ("cispo_loss", {"clip_max": 1.5}, "token-mean", "bool", torch.float32, False, True),
]


@pytest.mark.parametrize(("name", "opts", "agg", "mask", "dtype", "metrics", "per_seq"), CASES)
def test_fused_kernel_matches_op_by_op(name, opts, agg, mask, dtype, metrics, per_seq):
    logp, old, adv, m = make_batch(dtype=dtype, mask=mask, per_seq=per_seq, seed=len(name) + len(agg))
    fn = getattr(gt, name)
    kw = dict(opts, agg=agg, with_metrics=metrics)
    ref, ref_grad = run(fn, logp, old, adv, m, mode="never", **kw)
    out, grad = run(fn, logp, old, adv, m, mode="always", **kw)
    assert _kernel_built(name, agg=agg, with_metrics=metrics, **opts)
    assert out.loss.dtype == ref.loss.dtype and grad.dtype == logp.dtype
    assert torch.isfinite(out.loss) and torch.isfinite(grad).all()
    low = dtype in (torch.float16, torch.bfloat16)
    tol = dict(rtol=1e-2, atol=1e-4) if low else dict(rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(grad, ref_grad, **tol)
    assert out.metrics.keys() == ref.metrics.keys()
    for key in ref.metrics:
        torch.testing.assert_close(out.metrics[key], ref.metrics[key], rtol=1e-5, atol=1e-6, msg=key)


def test_behavior_weights_tensor_denominator_and_a_second_shape_reuse_the_kernel():
    sigma = _fresh_sigma()
    logp, old, adv, m = make_batch(seed=3)
    bw = torch.rand(logp.shape, generator=torch.Generator().manual_seed(5))
    kw = dict(sigma=sigma, behavior_weights=bw, denominator=torch.tensor(512.0), with_metrics=False)
    ref, ref_grad = run(gt.gipo_loss, logp, old, adv, m, mode="never", **kw)
    out, grad = run(gt.gipo_loss, logp, old, adv, m, mode="always", **kw)
    torch.testing.assert_close(out.loss, ref.loss)
    torch.testing.assert_close(grad, ref_grad)
    built = len(_torch_fused._kernels)
    logp2, old2, adv2, m2 = make_batch((3, 7, 50), seed=4)
    kw["behavior_weights"] = torch.ones(logp2.shape)
    ref2, ref_grad2 = run(gt.gipo_loss, logp2, old2, adv2, m2, mode="never", **kw)
    out2, grad2 = run(gt.gipo_loss, logp2, old2, adv2, m2, mode="always", **kw)
    assert len(_torch_fused._kernels) == built  # same option set: the same kernel, shapes are dynamic
    torch.testing.assert_close(out2.loss, ref2.loss)
    torch.testing.assert_close(grad2, ref_grad2)


def test_non_contiguous_and_one_dimensional_inputs():
    sigma = _fresh_sigma()
    logp, old, adv, m = make_batch((40, 6), seed=13)
    views = [x.t() for x in (logp, old, adv, m)]  # (6, 40), strides (1, 6)
    flat = [x.reshape(-1) for x in (logp, old, adv, m)]
    for arrays in (views, flat):
        ref, ref_grad = run(gt.gipo_loss, *arrays, mode="never", sigma=sigma)
        out, grad = run(gt.gipo_loss, *arrays, mode="always", sigma=sigma)
        torch.testing.assert_close(out.loss, ref.loss)
        torch.testing.assert_close(grad, ref_grad)
        for key in ref.metrics:
            torch.testing.assert_close(out.metrics[key], ref.metrics[key], rtol=1e-5, atol=1e-6, msg=key)
    assert _kernel_built("gipo_loss", sigma=sigma)


def test_auto_fuses_large_cpu_inputs_only():
    sigma = _fresh_sigma()
    gt.set_fused("auto", min_numel=200)
    small = make_batch((4, 40))  # 160 elements
    gt.gipo_loss(*small, sigma=sigma, with_metrics=False)
    assert not _kernel_built("gipo_loss", sigma=sigma)
    large = make_batch((6, 40))  # 240 elements
    gt.gipo_loss(*large, sigma=sigma, with_metrics=False)
    assert _kernel_built("gipo_loss", sigma=sigma)


def test_func_grad_runs_the_kernel_on_plain_tensors():
    """torch.func.grad runs an autograd.Function's forward on unwrapped tensors: the kernel is valid there."""
    sigma = _fresh_sigma()
    logp, old, adv, m = make_batch(seed=6)
    _, ref_grad = run(gt.gipo_loss, logp, old, adv, m, mode="never", sigma=sigma, with_metrics=False)
    gt.set_fused("always")
    grad = torch.func.grad(lambda x: gt.gipo_loss(x, old, adv, m, sigma=sigma, with_metrics=False).loss)(logp)
    torch.testing.assert_close(grad, ref_grad)


def test_never_fuses_under_vmap_torch_compile_dispatch_modes_or_jit_trace():
    logp, old, adv, m = make_batch(seed=7)

    sigma = _fresh_sigma()
    gt.set_fused("always")
    per_row = torch.func.vmap(lambda a, b, c, d: gt.gipo_loss(a, b, c, d, sigma=sigma, with_metrics=False).loss)(
        logp, old, adv, m
    )
    gt.set_fused("never")
    expected = [gt.gipo_loss(*(x[i : i + 1] for x in (logp, old, adv, m)), sigma=sigma).loss for i in range(6)]
    torch.testing.assert_close(per_row, torch.stack(expected))
    assert not _kernel_built("gipo_loss", sigma=sigma)

    sigma = _fresh_sigma()
    ref, ref_grad = run(gt.gipo_loss, logp, old, adv, m, mode="never", sigma=sigma, with_metrics=False)
    compiled = torch.compile(gt.GIPOLoss(sigma=sigma, with_metrics=False), fullgraph=True, backend="aot_eager")
    out, grad = run(compiled, logp, old, adv, m, mode="always")
    torch.testing.assert_close(out.loss, ref.loss)
    torch.testing.assert_close(grad, ref_grad)
    assert not _kernel_built("gipo_loss", sigma=sigma)

    from torch.utils._python_dispatch import TorchDispatchMode

    class Passthrough(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    sigma = _fresh_sigma()
    with Passthrough():
        out = gt.gipo_loss(logp, old, adv, m, sigma=sigma, with_metrics=False)
    assert torch.isfinite(out.loss)
    assert not _kernel_built("gipo_loss", sigma=sigma)

    # torch.jit.trace refuses dynamo-compiled code: the kernel must not be tried there (trying it would warn
    # and give up the kernel for this option set).
    sigma = _fresh_sigma()
    gt.set_fused("never")
    expected = gt.gipo_loss(logp, old, adv, m, sigma=sigma, with_metrics=False).loss
    gt.set_fused("always")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        traced = torch.jit.trace(
            lambda *x: gt.gipo_loss(*x, sigma=sigma, with_metrics=False).loss, (logp, old, adv, m), check_trace=False
        )
    assert not [w for w in caught if "fused loss kernel" in str(w.message)]
    torch.testing.assert_close(traced(logp, old, adv, m), expected)
    gt.gipo_loss(logp, old, adv, m, sigma=sigma, with_metrics=False)
    assert _kernel_built("gipo_loss", sigma=sigma)


def test_fused_path_refuses_double_backward():
    gt.set_fused("always")
    logp, old, adv, m = make_batch(seed=8)
    x = logp.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(gt.gipo_loss(x, old, adv, m).loss, x, create_graph=True)
    with pytest.raises(RuntimeError, match="`gipo_loss`: double backward"):
        torch.autograd.grad(grad.sum(), x)


def test_fused_path_inside_autocast_computes_in_float32():
    logp, old, adv, m = make_batch(seed=9)
    ref, ref_grad = run(gt.gipo_loss, logp, old, adv, m, mode="always")
    x = logp.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = gt.gipo_loss(x, old, adv, m)
    out.loss.backward()
    assert out.loss.dtype == torch.float32 and x.grad.dtype == torch.float32
    torch.testing.assert_close(out.loss, ref.loss, rtol=0, atol=0)
    torch.testing.assert_close(x.grad, ref_grad, rtol=0, atol=0)


def test_a_compiler_failure_warns_once_and_falls_back(monkeypatch):
    def broken(spec):
        def kernel(*arrays):
            raise RuntimeError("no C++ compiler (simulated)")

        return kernel

    monkeypatch.setattr(_torch_fused, "_compile", broken)
    sigma = _fresh_sigma()
    pattern = r"the fused loss kernel failed to compile or run .*\(RuntimeError: no C\+\+"
    _runs_op_by_op_after_one_warning(pattern, make_batch(seed=10), sigma, then=sigma)


def _runs_op_by_op_after_one_warning(pattern: str, batch: tuple, sigma: float, *, then: float) -> None:
    """The call with ``sigma`` warns (``pattern``) and equals the op-by-op path exactly; one with ``then``
    does not warn again."""
    with pytest.warns(RuntimeWarning, match=pattern):
        out, grad = run(gt.gipo_loss, *batch, mode="always", sigma=sigma)
    ref, ref_grad = run(gt.gipo_loss, *batch, mode="never", sigma=sigma)
    torch.testing.assert_close(out.loss, ref.loss, rtol=0, atol=0)
    torch.testing.assert_close(grad, ref_grad, rtol=0, atol=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run(gt.gipo_loss, *batch, mode="always", sigma=then)


@pytest.mark.parametrize(
    ("args", "kwargs", "exc", "pattern"),
    [
        (("fast",), {}, ValueError, r"`set_fused`: `mode` must be one of 'auto', 'always', 'never'; got 'fast'"),
        (("auto",), {"min_numel": -1}, ValueError, r"`set_fused`: `min_numel` must be an int >= 0; got -1"),
        (("auto",), {"min_numel": 2.5}, TypeError, r"`set_fused`: `min_numel` must be an int >= 0; got float 2.5"),
    ],
)
def test_set_fused_rejects_bad_arguments_and_keeps_the_settings(args, kwargs, exc, pattern):
    before = gt.fused_settings()
    with pytest.raises(exc, match=pattern):
        gt.set_fused(*args, **kwargs)
    assert gt.fused_settings() == before


def test_set_fused_docstring_example_runs():
    import doctest

    runner = doctest.DocTestRunner()
    for test in doctest.DocTestFinder().find(gt.set_fused, "set_fused", globs={}):
        runner.run(test)
    assert runner.tries > 0 and runner.failures == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("mask", ["float", "bool"])
def test_fused_kernel_on_cuda_matches_cpu(mask):
    """The kernel is off on CUDA by default (``'auto'``) until this has passed on a GPU: ``'always'`` here."""
    torch.backends.cuda.matmul.allow_tf32 = False
    logp, old, adv, m = make_batch((16, 300), seed=12, mask=mask)
    ref, ref_grad = run(gt.gipo_loss, logp, old, adv, m, mode="never")
    cuda = [x.cuda() for x in (logp, old, adv, m)]
    out, grad = run(gt.gipo_loss, *cuda, mode="always")
    assert out.loss.device.type == "cuda" and grad.device.type == "cuda"
    assert _kernel_built("gipo_loss", agg="token-mean", with_metrics=True, sigma=1.0)
    torch.testing.assert_close(out.loss.cpu(), ref.loss, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(grad.cpu(), ref_grad, rtol=1e-5, atol=1e-7)
    for key in ref.metrics:
        torch.testing.assert_close(out.metrics[key].cpu(), ref.metrics[key], rtol=1e-5, atol=1e-6, msg=key)


def test_at_most_max_kernels_option_sets_are_compiled(monkeypatch):
    """A sigma that changes every step must not compile every step: past the cap, op by op, one warning."""
    monkeypatch.setattr(_torch_fused, "MAX_KERNELS", len(_torch_fused._kernels) + 1)
    monkeypatch.setattr(_torch_fused, "_warned_full", False)
    gt.set_fused("always")
    batch = make_batch(seed=14)
    first, second, third = _fresh_sigma(), _fresh_sigma(), _fresh_sigma()
    gt.gipo_loss(*batch, sigma=first)
    assert _kernel_built("gipo_loss", sigma=first)
    _runs_op_by_op_after_one_warning("fused kernels are already compiled", batch, second, then=third)
    assert not _kernel_built("gipo_loss", sigma=second) and not _kernel_built("gipo_loss", sigma=third)


def test_an_input_error_is_raised_plainly_and_keeps_the_kernel(monkeypatch):
    """If the kernel fails because of the inputs, the op-by-op path raises the inputs' own error."""
    calls = []

    def failing(spec):
        def kernel(*arrays):
            calls.append(1)
            raise RuntimeError("kernel error")

        return kernel

    monkeypatch.setattr(_torch_fused, "_compile", failing)
    monkeypatch.setattr(_torch_fused, "_plain", lambda arrays, spec: (_ for _ in ()).throw(ValueError("bad input")))
    sigma = _fresh_sigma()
    logp, old, adv, m = make_batch(seed=15)
    gt.set_fused("always")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "compiling failed" warning: the kernel was not at fault
        with pytest.raises(ValueError, match="bad input"):
            gt.gipo_loss(logp, old, adv, m, sigma=sigma)
    assert calls and any(spec.opts.get("sigma") == sigma and k is not None for (spec, _), k in _torch_fused._kernels.items())


@pytest.mark.parametrize(("value", "expected"), [("never", "never"), (" Always ", "always"), ("", "auto")])
def test_the_starting_mode_comes_from_the_environment(monkeypatch, value, expected):
    monkeypatch.setenv("GIPO_TORCH_FUSED", value)
    assert _torch_fused._mode_from_env() == expected


def test_a_bad_environment_value_names_the_variable(monkeypatch):
    monkeypatch.setenv("GIPO_TORCH_FUSED", "fast")
    with pytest.raises(ValueError, match=r"GIPO_TORCH_FUSED must be one of auto, always, never; got 'fast'"):
        _torch_fused._mode_from_env()


def _graphs_compiled() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def test_a_denominator_that_changes_every_step_never_recompiles(monkeypatch):
    """Issue 12, item 9: a per-step global token count, as an int, a float or a tensor, compiles nothing new.

    Before, every new number was a new option set: one compile per value, and a warning after 16 values."""
    sigma = _fresh_sigma()
    gt.set_fused("always")
    logp, old, adv, m = make_batch(seed=21)
    monkeypatch.setattr(_torch_fused, "MAX_KERNELS", len(_torch_fused._kernels) + 2)
    loss_fn = gt.GIPOLoss(sigma=sigma, with_metrics=False)
    denominators = [200 + 7 * i for i in range(7)] + [150.5 + i for i in range(7)]
    denominators += [torch.tensor(300.0 + i) for i in range(3)] + [torch.tensor(400 + i) for i in range(3)]
    assert len(denominators) == 20
    run(loss_fn, logp, old, adv, m, mode="always", denominator=1.0)  # the one compile of this signature
    before, kernels = _graphs_compiled(), len(_torch_fused._kernels)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "already compiled" or "failed" warning either
        for d in denominators:
            lp = logp.clone().requires_grad_(True)
            out = loss_fn(lp, old, adv, m, denominator=d)
            out.loss.backward()
            ref, ref_grad = run(loss_fn, logp, old, adv, m, mode="never", denominator=d)
            gt.set_fused("always")
            torch.testing.assert_close(out.loss, ref.loss)
            torch.testing.assert_close(lp.grad, ref_grad)
    assert _graphs_compiled() == before, "a denominator value compiled a new graph"
    assert len(_torch_fused._kernels) == kernels


def test_call_signatures_of_one_option_set_each_compile_once_without_hitting_the_recompile_limit(monkeypatch):
    """Call signatures of one option set (mask None/bool/float, dtype, rank, behavior_weights) used to share
    one compiled function and exhaust dynamo's recompile limit (8; 2 here, to keep the test short), then warn
    that compiling failed: each signature is now a kernel of its own, compiled once."""
    monkeypatch.setattr(torch._dynamo.config, "recompile_limit", 2)
    monkeypatch.setattr(_torch_fused, "MAX_KERNELS", len(_torch_fused._kernels) + 8)
    sigma = _fresh_sigma()
    logp, old, adv, m = make_batch(seed=22, mask="bool", plant_nan=False)
    variants = [
        (logp, old, adv, None, None),
        (logp, old, adv, m, None),
        (logp.reshape(2, 3, -1), old.reshape(2, 3, -1), adv.reshape(2, 3, -1), m.reshape(2, 3, -1), None),
        (logp, old, adv, m.float(), torch.full(logp.shape, 0.5)),
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for round_ in range(2):  # the second round compiles nothing
            before = _graphs_compiled()
            for lp, o, a, mask, bw in variants:
                out, grad = run(gt.gipo_loss, lp, o, a, mask, mode="always", sigma=sigma, behavior_weights=bw)
                ref, ref_grad = run(gt.gipo_loss, lp, o, a, mask, mode="never", sigma=sigma, behavior_weights=bw)
                torch.testing.assert_close(out.loss, ref.loss)
                torch.testing.assert_close(grad, ref_grad)
            if round_ == 0:
                assert _graphs_compiled() - before == len(variants)
        assert _graphs_compiled() == before
    assert all(_torch_fused._kernels[k] is not None for k in _torch_fused._kernels if k[0].opts.get("sigma") == sigma)
