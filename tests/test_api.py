"""The public API as users and their tools see it, in every backend (issue 12).

- typed: one signature per objective, the same in every backend, seen by ``inspect`` and by pyright;
- each backend takes its own library's arrays and names the right module for others;
- numbers are numbers (NumPy scalars included), options are checked once in a class, and every option has
  a working range outside which it is rejected by name;
- no silent wrong derivative: second derivatives and forward mode raise in JAX and TensorFlow;
- a one-element ``denominator`` of any shape never changes the gradient's shape.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import gipo_core
import gipo_core.numpy as gn
from gipo_core import _api, _codegen, _typing
from gipo_core._core.objectives import OBJECTIVES, SCALE_RANGE
from gipo_core._core.signature import COMMON_OPTIONS, DENOMINATOR_RANGE

torch = pytest.importorskip("torch")
jax = pytest.importorskip("jax")
tf = pytest.importorskip("tensorflow")
strict = pytest.importorskip("array_api_strict")

import gipo_core.jax as gj  # noqa: E402
import gipo_core.tf as gtf  # noqa: E402
import gipo_core.torch as gt  # noqa: E402

jnp = jax.numpy
ROOT = Path(__file__).resolve().parents[1]
BACKENDS = {"numpy": gn, "torch": gt, "jax": gj, "tf": gtf}
FUNCTIONS = list(_typing.FUNCTIONS)
CLASSES = list(_typing.CLASSES)


def to(backend: str, x: np.ndarray, dtype: str = "float32"):
    x = np.asarray(x, dtype=dtype)
    return {"numpy": np.asarray, "torch": torch.tensor, "jax": jnp.asarray, "tf": tf.constant}[backend](x)


def loss_and_grad(backend: str, fn_name: str, logp: np.ndarray, old, adv, mask=None, **kw):
    """(loss, grad) as NumPy float64, from the backend's own autodiff."""
    mod = BACKENDS[backend]
    fn = getattr(mod, fn_name)
    args = [to(backend, a) for a in (old, adv)]
    m = None if mask is None else to(backend, mask, "bool")
    if backend == "numpy":
        out, g = gn.value_and_grad(fn)(to(backend, logp), *args, m, **kw)
    elif backend == "torch":
        x = torch.tensor(np.asarray(logp, np.float32), requires_grad=True)
        out = fn(x, *args, m, **kw)
        (g,) = torch.autograd.grad(out.loss, x)
    elif backend == "jax":
        out = fn(to(backend, logp), *args, m, **kw)
        g = jax.grad(lambda x: fn(x, *args, m, **kw).loss)(to(backend, logp))
    else:
        x = tf.Variable(np.asarray(logp, np.float32))
        with tf.GradientTape() as tape:
            out = fn(x, *args, m, **kw)
        g = tape.gradient(out.loss, x)
    if backend == "torch":
        return float(out.loss.detach()), g.detach().double().numpy()
    return float(np.asarray(out.loss)), np.asarray(g, dtype=np.float64)


# ------------------------------------------------------------------------------------------- signatures


def test_generated_declarations_are_current():
    """``gipo_core/_typing.py`` and the backends' generated blocks equal what the registry generates."""
    assert _codegen.main(["--check"]) == 0, "run: python -m gipo_core._codegen"


@pytest.mark.parametrize("name", FUNCTIONS + ["gaussian_trust_weight"])
def test_every_backend_has_the_same_signature_as_the_typed_protocol(name):
    """Issue 12, item 10: ``inspect.signature`` shows the real parameters, the same in every backend and in
    the protocol type checkers read."""
    sigs = {b: inspect.signature(getattr(mod, name)) for b, mod in BACKENDS.items()}
    assert len({str(s) for s in sigs.values()}) == 1, sigs
    sig = sigs["numpy"]
    assert "kwargs" not in str(sig) and "args" not in str(sig)
    protocol = getattr(_typing, _codegen.protocol_name(name)) if name != "gaussian_trust_weight" else (
        _typing.GaussianTrustWeightFunction
    )
    want = list(inspect.signature(protocol.__call__).parameters.values())[1:]
    assert [(p.name, p.kind, p.default) for p in sig.parameters.values()] == [
        (p.name, p.kind, p.default) for p in want
    ]
    if name != "gaussian_trust_weight":
        objective = OBJECTIVES[_typing.FUNCTIONS[name]]
        names = list(sig.parameters)
        assert names[:4] == ["logp", "old_logp", "advantages", "mask"]
        assert set(objective.option_names) | {o.name for o in COMMON_OPTIONS} <= set(names)
        for b, mod in BACKENDS.items():
            assert getattr(mod, name).__module__ == mod.__name__ and getattr(mod, name).__name__ == name


@pytest.mark.parametrize("name", CLASSES)
def test_loss_classes_have_the_same_typed_constructor_and_call_in_every_backend(name):
    sigs = {b: inspect.signature(getattr(mod, name)) for b, mod in BACKENDS.items() if b != "numpy"}
    assert len({str(s) for s in sigs.values()}) == 1, sigs
    objective = OBJECTIVES[_typing.CLASSES[name]]
    params = list(sigs["torch"].parameters.values())
    assert [(p.name, p.default) for p in params if p.kind is p.POSITIONAL_OR_KEYWORD] == list(objective.defaults)
    assert [p.name for p in params if p.kind is p.KEYWORD_ONLY] == [o.name for o in COMMON_OPTIONS]
    call = inspect.signature(_api.LossClass.forward)
    assert [(p.name, p.kind, p.default) for p in list(call.parameters.values())[1:]] == [
        (p.name, p.kind, p.default) for p in _api.call_signature().parameters.values()
    ]
    assert inspect.signature(getattr(gj, name)().__call__) == inspect.signature(getattr(gt, name)().forward)


_TYPED_EXAMPLE = """
    import numpy as np
    import torch
    from gipo_core.numpy import gipo_loss, ppo_clip_loss
    from gipo_core.torch import GIPOLoss, SAPOLoss

    lp = np.zeros((2, 3))
    out = gipo_loss(lp, lp, np.ones((2, 1)), {gipo})
    out2 = ppo_clip_loss(lp, lp, lp, {ppo})
    loss_fn = GIPOLoss({cls})
    other = SAPOLoss(tau_neg=2.0, agg="seq-mean-token-mean")
    value: float = float(out.loss)
"""


def _pyright(tmp_path: Path, source: str) -> tuple[int, str]:
    exe = shutil.which("pyright", path=os.path.dirname(sys.executable)) or shutil.which("pyright")
    assert exe, "pyright is not installed: it is part of the test extra (pip install -e '.[test]')"
    (tmp_path / "example.py").write_text(textwrap.dedent(source))
    config = {"extraPaths": [str(ROOT)], "pythonVersion": "3.11", "typeCheckingMode": "basic"}
    (tmp_path / "pyrightconfig.json").write_text(json.dumps(config))
    proc = subprocess.run(
        [exe, "-p", str(tmp_path / "pyrightconfig.json"), "--pythonpath", sys.executable, str(tmp_path / "example.py")],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )
    return proc.returncode, proc.stdout + proc.stderr


@pytest.mark.slow
def test_type_checker_accepts_a_correct_call_and_rejects_misspelt_options(tmp_path):
    """Issue 12, item 10: a misspelt option is a type error (pyright), a correct example type-checks."""
    good = _TYPED_EXAMPLE.format(gipo='sigma=0.5, agg="seq-mean-token-sum"', ppo="clip_high=0.28, denominator=4.0",
                                 cls="sigma=1.0, with_metrics=False")
    code, out = _pyright(tmp_path, good)
    assert code == 0, out
    bad = _TYPED_EXAMPLE.format(gipo="sigmaa=0.5", ppo='agg="token_mean"', cls="kernal='laplace'")
    code, out = _pyright(tmp_path, bad)
    assert code != 0
    for word in ('"sigmaa"', "'token_mean'", '"kernal"'):
        assert word in out, out
    assert "3 errors" in out, out


# ------------------------------------------------------------------------------------- foreign arrays

FOREIGN = {
    "numpy": lambda x: np.asarray(x),
    "strict": lambda x: strict.asarray(np.asarray(x)),
    "torch": lambda x: torch.tensor(np.asarray(x)),
    "jax": lambda x: jnp.asarray(np.asarray(x)),
    "tf": lambda x: tf.constant(np.asarray(x)),
}
TAKES = {"numpy": {"numpy", "strict"}, "torch": {"torch"}, "jax": {"jax", "numpy"}, "tf": {"tf"}}
MODULE_OF = {"numpy": "gipo_core.numpy", "strict": "gipo_core.numpy", "torch": "gipo_core.torch",
             "jax": "gipo_core.jax", "tf": "gipo_core.tf"}


@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("kind", list(FOREIGN))
@pytest.mark.parametrize("argument", ["logp", "old_logp", "advantages", "mask", "rollout_logp", "denominator"])
def test_each_backend_takes_its_own_arrays_and_names_the_module_for_others(backend, kind, argument):
    """Issue 12, items 1 and 7: one TypeError naming the argument, what it got and the module to use."""
    base = np.array([[-1.0, -0.5]], np.float32)
    own = {k: to(backend, v) for k, v in (("logp", base), ("old_logp", base - 1), ("advantages", np.ones((1, 1))))}
    value = {"mask": np.ones((1, 2), bool), "denominator": np.ones((), np.float32)}.get(argument, base)
    kwargs = dict(own)
    kwargs[argument] = FOREIGN[kind](value)
    fn = BACKENDS[backend].gipo_loss
    if backend == "numpy" and kind == "strict":  # both taken, but not mixed in one call
        with pytest.raises(TypeError, match="`gipo_loss`: expected arrays of one array-API library"):
            fn(**kwargs)
        return
    if kind in TAKES[backend]:
        if argument == "rollout_logp":
            return  # accepted; the off-policy engine implements it
        out = fn(**kwargs)
        assert math.isfinite(float(np.asarray(out.loss)))
        return
    with pytest.raises(TypeError) as info:
        fn(**kwargs)
    msg = str(info.value)
    assert msg.startswith("`gipo_loss`: ") and f"`{argument}`" in msg, msg
    assert BACKENDS[backend].__name__ in msg
    if MODULE_OF[kind] != BACKENDS[backend].__name__:
        assert f"use {MODULE_OF[kind]}" in msg, msg


def test_numpy_backend_refuses_torch_tensors_instead_of_a_wrong_gradient():
    """Issue 12, item 1: torch autograd through gipo_core.numpy differentiated through the trust weight."""
    lp = torch.tensor([[-1.0, -0.5]], requires_grad=True)
    with pytest.raises(TypeError, match=r"`gipo_loss`: `logp` must be a NumPy .* use gipo_core.torch"):
        gn.gipo_loss(lp, torch.tensor([[-2.0, -0.5]]), torch.ones(1, 1))
    out = gt.gipo_loss(lp, torch.tensor([[-2.0, -0.5]]), torch.ones(1, 1))
    out.loss.backward()
    np.testing.assert_allclose(lp.grad.numpy(), [[-0.824361, -0.5]], rtol=1e-5)


@pytest.mark.parametrize("kind", ["ragged", "sparse"])
def test_tf_ragged_and_sparse_tensors_are_refused_by_name(kind):
    dense = tf.constant([[-1.0, -0.5]])
    other = tf.RaggedTensor.from_tensor(dense) if kind == "ragged" else tf.sparse.from_dense(dense)
    with pytest.raises(TypeError, match=r"`gipo_loss`: `old_logp` must be a dense tf.Tensor .*got .*(Ragged|Sparse)"):
        gtf.gipo_loss(dense, other, tf.ones((1, 1)))


def test_a_list_is_refused_with_the_argument_name():
    with pytest.raises(TypeError, match=r"`ppo_clip_loss`: `advantages` must be a torch.Tensor .*got builtins.list"):
        gt.ppo_clip_loss(torch.zeros(1, 2), torch.zeros(1, 2), [[1.0, 1.0]])


# ------------------------------------------------------------------------------------ numbers are numbers

NUMBERS = [np.float64(8.0), np.float32(8.0), np.int64(8), 8, 8.0]


@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("value", NUMBERS, ids=lambda v: type(v).__name__)
def test_numpy_scalars_are_numbers_everywhere(backend, value):
    """Issue 12, item 8: NumPy scalar denominators and options, in every backend, keep float32 float32."""
    rng = np.random.default_rng(0)
    logp, old = rng.normal(size=(2, 4)) - 1, rng.normal(size=(2, 4)) - 1
    adv = rng.normal(size=(2, 1))
    want = loss_and_grad("numpy", "ppo_clip_loss", logp, old, adv, denominator=8.0, clip_low=0.2)
    got = loss_and_grad(backend, "ppo_clip_loss", logp, old, adv, denominator=value,
                        clip_low=np.float32(0.2) if not isinstance(value, int) else 0.2)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
    np.testing.assert_allclose(got[1], want[1], rtol=1e-5, atol=1e-7)
    out = BACKENDS[backend].gipo_loss(to(backend, logp), to(backend, old), to(backend, adv), sigma=np.int64(2))
    assert "float32" in str(out.loss.dtype)


@pytest.mark.xfail(strict=True, reason="known gap: dynamo traces a NumPy scalar as an array, whose value cannot be "
                   "read at trace time; under torch.compile(fullgraph=True) pass float(sigma)")
def test_numpy_scalar_option_under_torch_compile_fullgraph():
    gt.set_fused("never")
    try:
        f = torch.compile(lambda lp, o, a: gt.gipo_loss(lp, o, a, sigma=np.float32(0.5)).loss, fullgraph=True)
        lp = torch.zeros(2, 3)
        torch.testing.assert_close(f(lp, lp - 0.1, torch.ones(2, 1)), gt.gipo_loss(lp, lp - 0.1, torch.ones(2, 1),
                                                                                    sigma=0.5).loss)
    finally:
        gt.set_fused()


# ------------------------------------------------------------------------------------------ option ranges

#: (function, option, lowest, highest) of every number option; the ranges are documented in the README.
RANGES = [
    ("gipo_loss", "sigma", *SCALE_RANGE),
    ("gipo_loss", "sigma_neg", *SCALE_RANGE),
    ("ppo_clip_loss", "clip_low", 1e-12, 1 - 1e-7),
    ("ppo_clip_loss", "clip_high", 1e-12, SCALE_RANGE[1]),
    ("ppo_clip_loss", "dual_clip", 1 + 1e-7, SCALE_RANGE[1]),
    ("sapo_loss", "tau_pos", *SCALE_RANGE),
    ("sapo_loss", "tau_neg", *SCALE_RANGE),
    ("cispo_loss", "clip_max", *SCALE_RANGE),
    ("cispo_loss", "clip_min", SCALE_RANGE[0], 4.0),
]
OUTSIDE = {
    "sigma": [3.8e-20, 1e-200, 1e155, 0.0, -1.0, math.inf],
    "sigma_neg": [1e-30, 1e7],
    "clip_low": [0.0, 1.0],
    "clip_high": [1e300, 0.0],
    "dual_clip": [1.0, 1e300],
    "tau_pos": [0.0, 1e7],
    "tau_neg": [3.4e38, 1e-7],
    "clip_max": [1e300, 0.0],
    "clip_min": [0.0],
}


def _values(r):
    return r.values if hasattr(r, "values") else r


@pytest.mark.parametrize(("fn", "name", "low", "high"), RANGES, ids=[_values(r)[1] for r in RANGES])
@pytest.mark.parametrize("backend", list(BACKENDS))
def test_options_at_the_ends_of_their_range_give_finite_results(backend, fn, name, low, high):
    """Issue 12, item 5: inside its documented range every option computes without overflow, in every backend,
    at log-ratio 0 (where 0 * inf used to give NaN), at large log-ratios and at masked NaN inputs."""
    logp = np.array([[-1.0, -0.5, -3.0, np.nan]])
    old = np.array([[-1.0, -2.5, -0.1, 0.0]])
    mask = np.array([[True, True, True, False]])
    for adv in (np.array([[1.0]]), np.array([[-1.0]])):
        for value in (low, high):
            loss, grad = loss_and_grad(backend, fn, logp, old, adv, mask, **{name: value})
            assert math.isfinite(loss) and np.isfinite(grad).all(), (value, loss, grad)


@pytest.mark.parametrize("name", list(OUTSIDE))
def test_options_outside_their_range_are_rejected_naming_the_range(name):
    fn = next(_values(r)[0] for r in RANGES if _values(r)[1] == name)
    for backend, mod in BACKENDS.items():
        for value in OUTSIDE[name]:
            with pytest.raises(ValueError, match=rf"`{fn}`: `{name}` must be a number in [\[(].*; got"):
                getattr(mod, fn)(to(backend, np.zeros((1, 2))), to(backend, np.zeros((1, 2))),
                                 to(backend, np.ones((1, 1))), **{name: value})


def test_denominator_range():
    z = np.zeros((1, 2))
    for value in (DENOMINATOR_RANGE[0], DENOMINATOR_RANGE[1]):
        _, g = gn.value_and_grad(gn.gipo_loss)(z, z, np.ones((1, 2)), denominator=value)
        assert np.isfinite(g).all()
    for value in (0.0, 1e-300, 1e300, math.nan):
        with pytest.raises(ValueError, match=r"`denominator` must be a number in \[1e-06, 1e\+12\]"):
            gn.gipo_loss(z, z, z, denominator=value)


# ----------------------------------------------------------------------------------- validated once


@pytest.mark.parametrize("backend", ["torch", "jax", "tf"])
def test_a_loss_class_checks_its_options_once(backend, monkeypatch):
    """Issue 12, item 11: per call, a class checks only the arrays."""
    calls = []
    real = _api.make_spec
    monkeypatch.setattr(_api, "make_spec", lambda *a, **k: calls.append(1) or real(*a, **k))
    loss_fn = BACKENDS[backend].GIPOLoss(sigma=0.5, agg="seq-mean-token-mean")
    assert len(calls) == 1
    x = to(backend, np.zeros((2, 3)))
    for _ in range(3):
        loss_fn(x, x, to(backend, np.ones((2, 1))), denominator=2.0)
    assert len(calls) == 1
    assert loss_fn.options == {"sigma": 0.5, "sigma_neg": None, "kernel": "gaussian"}
    assert loss_fn.agg == "seq-mean-token-mean" and loss_fn.sigma == 0.5


# --------------------------------------------------------------------------------- derivatives


def _f_jax(lp):
    return gj.gipo_loss(lp, jnp.array([[-2.0, -0.5]]), jnp.ones((1, 1))).loss


@pytest.mark.parametrize("transform", ["hessian", "jacrev(grad)", "jacfwd(grad)", "grad(grad of sum)"])
def test_jax_second_derivatives_raise(transform):
    """Issue 12, item 3: they returned the derivative through the trust weight, silently."""
    x = jnp.array([[-1.0, -0.5]])
    fn = {
        "hessian": jax.hessian(_f_jax),
        "jacrev(grad)": jax.jacrev(jax.grad(_f_jax)),
        "jacfwd(grad)": jax.jacfwd(jax.grad(_f_jax)),
        "grad(grad of sum)": jax.grad(lambda x: jax.grad(_f_jax)(x).sum()),
    }[transform]
    with pytest.raises(NotImplementedError, match=r"`gipo_loss`: a second derivative .* not supported"):
        fn(x)
    np.testing.assert_allclose(jax.jit(jax.grad(_f_jax))(x), [[-0.824361, -0.5]], rtol=1e-5)


def test_tf_forward_mode_and_second_derivatives_raise():
    """Issue 12, items 2 and 3: ForwardAccumulator and nested tapes differentiated through the weight."""
    x = tf.constant([[-1.0, -0.5]])
    old, adv = tf.constant([[-2.0, -0.5]]), tf.ones((1, 1))
    with pytest.raises(NotImplementedError, match=r"`gipo_loss`: forward-mode .*ForwardAccumulator"):
        with tf.autodiff.ForwardAccumulator(x, tf.constant([[1.0, 0.0]])):
            gtf.gipo_loss(x, old, adv)
    v = tf.Variable([[-1.0, -0.5]])
    with tf.GradientTape() as outer:
        with tf.GradientTape() as inner:
            loss = gtf.gipo_loss(v, old, adv).loss
        g = inner.gradient(loss, v)
    np.testing.assert_allclose(g.numpy(), [[-0.824361, -0.5]], rtol=1e-5)
    with pytest.raises(NotImplementedError, match=r"second derivative"):
        outer.gradient(g, v)
    with tf.GradientTape(persistent=True) as tape:  # first order from a persistent tape still works
        loss = gtf.gipo_loss(v, old, adv).loss
    np.testing.assert_allclose(tape.gradient(loss, v).numpy(), g.numpy())
    np.testing.assert_allclose(tape.gradient(loss, v).numpy(), g.numpy())


@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("shape", [(1, 1, 1), (1, 1), (1,)])
def test_a_one_element_denominator_keeps_the_gradient_shape(backend, shape):
    """Issue 12, item 4: a (1, 1, 1) denominator broadcast the gradient to (1, B, T) (NumPy, TF) or failed
    inside custom_vjp (JAX)."""
    rng = np.random.default_rng(1)
    logp, old, adv = rng.normal(size=(2, 3)) - 1, rng.normal(size=(2, 3)) - 1, rng.normal(size=(2, 3))
    d = to(backend, np.full(shape, 4.0))
    loss, grad = loss_and_grad(backend, "gipo_loss", logp, old, adv, denominator=d)
    want_loss, want_grad = loss_and_grad("numpy", "gipo_loss", logp, old, adv, denominator=4.0)
    assert grad.shape == (2, 3)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
    np.testing.assert_allclose(grad, want_grad, rtol=1e-5, atol=1e-7)
    lp1 = logp[0]
    _, g1 = loss_and_grad(backend, "gipo_loss", lp1, old[0], adv[0], denominator=to(backend, np.full((1, 1), 4.0)))
    assert g1.shape == (3,)
