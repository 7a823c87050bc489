"""The PyTorch backend: autograd wiring, dtypes, transforms, compilation, devices, modules, data parallelism.

The values themselves are checked against the NumPy backend (float64) as the oracle; the conformance suite
checks both against golden data.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import gipo_core.numpy as gnp  # noqa: E402
import gipo_core.torch as gt  # noqa: E402
from gipo_core import AGG_MODES, METRIC_NAMES  # noqa: E402
from params import AGG_PARAMS  # noqa: E402

LOSSES = ["gipo_loss", "ppo_clip_loss", "no_clip_loss", "sapo_loss", "cispo_loss"]
OPTIONS = {
    "gipo_loss": [{}, {"sigma": 0.5, "sigma_neg": 0.25}, {"kernel": "laplace"}, {"kernel": "cauchy", "sigma": 2.0}],
    "ppo_clip_loss": [{}, {"clip_low": 0.1, "clip_high": 0.3, "dual_clip": 3.0}],
    "no_clip_loss": [{}],
    "sapo_loss": [{}, {"tau_neg": 2.0}],
    "cispo_loss": [{}, {"clip_max": 1.5}],
}
CASES = [(name, opts) for name in LOSSES for opts in OPTIONS[name]]
CASE_IDS = [f"{name}-{i}" for name in LOSSES for i in range(len(OPTIONS[name]))]


def make_batch(shape=(4, 6), *, seed=0, dtype=torch.float32, per_seq=False, mask="bool", spread=0.5):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(shape, generator=g, dtype=torch.float64) * 3.0
    logp = old + spread * torch.randn(shape, generator=g, dtype=torch.float64)
    adv_shape = shape[:-1] + (1,) if per_seq else shape
    adv = torch.randn(adv_shape, generator=g, dtype=torch.float64)
    m = torch.rand(shape, generator=g) < 0.75
    if len(shape) >= 2:
        m[0] = False  # one fully masked row
    if mask == "bool":
        m_out = m
    elif mask == "float":
        m_out = m.to(dtype)
    else:
        m_out = None
    return logp.to(dtype), old.to(dtype), adv.to(dtype), m_out


def oracle(name, logp, old, adv, mask, **kw):
    """Loss, gradient and metrics from the NumPy backend in float64."""

    def np64(x):
        if x is None or not isinstance(x, torch.Tensor):
            return x
        return x.detach().cpu().numpy() if x.dtype == torch.bool else x.detach().cpu().double().numpy()

    kw = {k: np64(v) for k, v in kw.items()}
    out, grad = gnp.value_and_grad(getattr(gnp, name))(np64(logp), np64(old), np64(adv), np64(mask), **kw)
    return float(out.loss), grad, {k: float(v) for k, v in out.metrics.items()}


def loss_and_grad(fn, logp, *args, **kw):
    x = logp.detach().clone().requires_grad_(True)
    out = fn(x, *args, **kw)
    (grad,) = torch.autograd.grad(out.loss, x)
    return out, grad


# --------------------------------------------------------------------------------------- values and grads


@pytest.mark.parametrize(("name", "opts"), CASES, ids=CASE_IDS)
@pytest.mark.parametrize("agg", AGG_PARAMS)
def test_matches_numpy_oracle_float64(name, opts, agg):
    logp, old, adv, mask = make_batch(dtype=torch.float64, per_seq=(agg != "token-mean"))
    out, grad = loss_and_grad(getattr(gt, name), logp, old, adv, mask, agg=agg, **opts)
    ref_loss, ref_grad, ref_metrics = oracle(name, logp, old, adv, mask, agg=agg, **opts)
    assert out.loss.dtype == torch.float64 and grad.dtype == torch.float64
    np.testing.assert_allclose(out.loss.item(), ref_loss, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(grad.numpy(), ref_grad, rtol=1e-12, atol=1e-14)
    assert list(out.metrics) == list(METRIC_NAMES)
    for key in METRIC_NAMES:
        np.testing.assert_allclose(out.metrics[key].item(), ref_metrics[key], rtol=1e-12, atol=1e-14, err_msg=key)


@pytest.mark.parametrize(("name", "opts"), CASES, ids=CASE_IDS)
@pytest.mark.parametrize("mask", ["none", "float"])
def test_float32_close_to_float64_oracle(name, opts, mask):
    logp, old, adv, m = make_batch((3, 5), seed=1, dtype=torch.float32, mask=mask)
    out, grad = loss_and_grad(getattr(gt, name), logp, old, adv, m, denominator=11.0, **opts)
    ref_loss, ref_grad, _ = oracle(name, logp, old, adv, m, denominator=11.0, **opts)
    assert out.loss.dtype == torch.float32 and grad.dtype == torch.float32
    np.testing.assert_allclose(out.loss.item(), ref_loss, rtol=2e-6, atol=1e-7)
    np.testing.assert_allclose(grad.numpy(), ref_grad, rtol=2e-6, atol=1e-7)


def test_custom_gradient_matches_plain_autograd_of_the_formula():
    """GIPO's closed-form gradient against autograd of the straightforward (stable-range) formula."""
    logp, old, adv, mask = make_batch((5, 7), seed=2, dtype=torch.float64, mask="float")
    sigma = 0.7
    x = logp.clone().requires_grad_(True)
    ratio = torch.exp(x - old)
    weight = torch.exp(-0.5 * (torch.log(ratio.detach()) / sigma) ** 2)
    ref = -(weight * ratio * adv * mask).sum() / mask.sum()
    (ref_grad,) = torch.autograd.grad(ref, x)
    out, grad = loss_and_grad(gt.gipo_loss, logp, old, adv, mask, sigma=sigma)
    torch.testing.assert_close(out.loss, ref.detach(), rtol=1e-13, atol=1e-15)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-13, atol=1e-15)


def test_behavior_weights_and_tensor_denominator():
    logp, old, adv, mask = make_batch((4, 5), seed=3, dtype=torch.float64)
    bw = torch.rand(4, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    den = torch.tensor(13.0, dtype=torch.float64)
    out, grad = loss_and_grad(gt.ppo_clip_loss, logp, old, adv, mask, behavior_weights=bw, denominator=den)
    ref_loss, ref_grad, _ = oracle("ppo_clip_loss", logp, old, adv, mask, behavior_weights=bw, denominator=13.0)
    np.testing.assert_allclose(out.loss.item(), ref_loss, rtol=1e-12)
    np.testing.assert_allclose(grad.numpy(), ref_grad, rtol=1e-12)


# --------------------------------------------------------------------------------------- autograd wiring


def test_only_logp_receives_a_gradient():
    logp, old, adv, mask = make_batch(dtype=torch.float32, mask="float")
    x = logp.clone().requires_grad_(True)
    leaves = [t.clone().requires_grad_(True) for t in (old, adv, mask)]
    bw = torch.ones_like(logp, requires_grad=True)
    den = torch.tensor(7.0, requires_grad=True)
    out = gt.gipo_loss(x, *leaves, behavior_weights=bw, denominator=den)
    out.loss.backward()
    assert x.grad is not None and torch.count_nonzero(x.grad) > 0
    for t in (*leaves, bw, den):
        assert t.grad is None
    assert all(not v.requires_grad for v in out.metrics.values())


@pytest.mark.parametrize("fused", ["never", "always"])
def test_backward_keeps_one_input_sized_tensor(fused):
    """Op by op and through the fused kernel (``set_fused``) alike."""
    logp, old, adv, mask = make_batch((8, 16), dtype=torch.float32, mask="bool")
    x = logp.clone().requires_grad_(True)
    before = gt.fused_settings()
    gt.set_fused(fused)
    packed = []

    def pack(t):
        packed.append((tuple(t.shape), t.dtype))
        return t

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = gt.gipo_loss(x, old, adv, mask)
    finally:
        gt.set_fused(**before)
    assert packed == [((8, 16), torch.float32)]
    out.loss.backward()


def test_backward_scales_with_the_upstream_gradient():
    logp, old, adv, mask = make_batch(dtype=torch.float32)
    _, grad = loss_and_grad(gt.sapo_loss, logp, old, adv, mask)
    x = logp.clone().requires_grad_(True)
    (3.5 * gt.sapo_loss(x, old, adv, mask).loss).backward()
    torch.testing.assert_close(x.grad, 3.5 * grad)


def test_double_backward_raises_a_clear_error():
    logp, old, adv, mask = make_batch(dtype=torch.float64)
    x = logp.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(gt.gipo_loss(x, old, adv, mask).loss, x, create_graph=True)
    with pytest.raises(RuntimeError, match="`gipo_loss`: double backward"):
        torch.autograd.grad(grad.sum(), x)
    with pytest.raises(RuntimeError, match="`ppo_clip_loss`: double backward"):
        torch.func.jacrev(torch.func.grad(lambda y: gt.ppo_clip_loss(y, old, adv, mask).loss))(logp)


def test_torch_func_grad_and_vmap():
    logp, old, adv, _ = make_batch((3, 4, 5), seed=4, dtype=torch.float64, mask="none")
    mask = torch.rand(3, 4, 5, generator=torch.Generator().manual_seed(1)) < 0.8

    def loss(lp, o, a, m):
        return gt.gipo_loss(lp, o, a, m, sigma=0.5).loss

    per_problem = torch.func.vmap(torch.func.grad(loss))(logp, old, adv, mask)
    for i in range(3):
        _, expected = loss_and_grad(gt.gipo_loss, logp[i], old[i], adv[i], mask[i], sigma=0.5)
        torch.testing.assert_close(per_problem[i], expected)
    values = torch.func.vmap(loss)(logp, old, adv, mask)
    torch.testing.assert_close(values[1], loss(logp[1], old[1], adv[1], mask[1]))


# --------------------------------------------------------------------------------------- dtypes and AMP


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", LOSSES)
def test_half_precision_is_computed_in_float32(dtype, name):
    logp, old, adv, mask = make_batch((4, 8), seed=5, dtype=dtype)
    out, grad = loss_and_grad(getattr(gt, name), logp, old, adv, mask)
    assert out.loss.dtype == torch.float32 and grad.dtype == dtype
    assert all(v.dtype == torch.float32 for v in out.metrics.values())
    # The same rounded inputs, upcast by the caller, give the same numbers.
    up = [t.float() for t in (logp, old, adv)]
    ref, ref_grad = loss_and_grad(getattr(gt, name), *up, mask)
    torch.testing.assert_close(out.loss, ref.loss, rtol=0, atol=0)
    torch.testing.assert_close(grad, ref_grad.to(dtype), rtol=0, atol=0)


def test_float16_large_log_ratio_stays_finite():
    logp = torch.tensor([[12.0, -12.0, 0.0]], dtype=torch.float16)
    old = torch.zeros_like(logp)
    out, grad = loss_and_grad(gt.gipo_loss, logp, old, torch.ones(1, 1, dtype=torch.float16), sigma=1.0)
    assert torch.isfinite(out.loss) and torch.isfinite(grad).all()


def test_autocast_region_computes_in_float32():
    logp, old, adv, mask = make_batch((4, 8), seed=6, dtype=torch.float32)
    ref, ref_grad = loss_and_grad(gt.gipo_loss, logp, old, adv, mask)
    x = logp.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = gt.GIPOLoss()(x, old, adv, mask)
    out.loss.backward()
    assert out.loss.dtype == torch.float32 and x.grad.dtype == torch.float32
    torch.testing.assert_close(out.loss, ref.loss, rtol=0, atol=0)
    torch.testing.assert_close(x.grad, ref_grad, rtol=0, atol=0)


# --------------------------------------------------------------------------------------- devices, sync


def test_no_host_synchronisation_in_forward_or_backward():
    """``.item()``, ``bool(tensor)`` and friends all go through aten::_local_scalar_dense: none may run."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Record(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    logp, old, adv, mask = make_batch((4, 8), dtype=torch.float16, mask="float")
    den = torch.tensor(20.0)
    for name in LOSSES:
        x = logp.clone().requires_grad_(True)
        with Record() as rec:
            out = getattr(gt, name)(x, old, adv, mask, denominator=den, agg="seq-mean-token-mean")
            out.loss.backward()
        assert rec.ops, "the recorder saw nothing"
        assert not [op for op in rec.ops if "_local_scalar_dense" in op], name


def test_outputs_follow_the_input_device_meta():
    """On the meta device (no data at all) everything stays on the inputs' device."""
    logp = torch.empty(4, 8, device="meta", requires_grad=True)
    other = torch.empty(4, 8, device="meta")
    out = gt.gipo_loss(logp, other, other, other > 0)
    assert out.loss.device.type == "meta"
    assert {v.device.type for v in out.metrics.values()} == {"meta"}
    (grad,) = torch.autograd.grad(out.loss, logp)
    assert grad.device.type == "meta"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_stays_on_device_without_sync():
    logp, old, adv, mask = (t.cuda() if t is not None else None for t in make_batch((64, 128), seed=7))
    x = logp.clone().requires_grad_(True)
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = gt.GIPOLoss()(x, old, adv, mask)
        out.loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert out.loss.is_cuda and x.grad.is_cuda and all(v.is_cuda for v in out.metrics.values())
    ref, ref_grad = loss_and_grad(gt.gipo_loss, logp.cpu(), old.cpu(), adv.cpu(), mask.cpu())
    torch.testing.assert_close(out.loss.cpu(), ref.loss)
    torch.testing.assert_close(x.grad.cpu(), ref_grad)


def test_arrays_on_two_devices_are_rejected():
    logp = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="`gipo_loss`: `old_logp` is on device meta"):
        gt.gipo_loss(logp, torch.zeros(2, 3, device="meta"), torch.zeros(2, 3))


# --------------------------------------------------------------------------------------- torch.compile


def test_compile_fullgraph_no_graph_break_with_metrics():
    logp, old, adv, mask = make_batch((4, 8), seed=8, dtype=torch.float32)
    module = gt.GIPOLoss(sigma=0.5, agg="seq-mean-token-mean")
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
    ref, ref_grad = loss_and_grad(module, logp, old, adv, mask)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out, grad = loss_and_grad(compiled, logp, old, adv, mask)
    assert not [str(w.message) for w in caught if "Dynamo" in str(w.message)]
    torch.testing.assert_close(out.loss, ref.loss)
    torch.testing.assert_close(grad, ref_grad)
    for key in METRIC_NAMES:
        torch.testing.assert_close(out.metrics[key], ref.metrics[key])


def test_compile_dynamic_shapes_follow_eager():
    """dynamic=True: one graph for every batch shape; the module's float options stay constants."""
    module = gt.SAPOLoss(tau_neg=2.0, agg="seq-mean-token-mean")
    compiled = torch.compile(module, fullgraph=True, dynamic=True, backend="aot_eager")
    for seed, shape in enumerate([(4, 8), (3, 5), (6, 7)]):
        logp, old, adv, mask = make_batch(shape, seed=seed, per_seq=True)
        ref, ref_grad = loss_and_grad(module, logp, old, adv, mask)
        out, grad = loss_and_grad(compiled, logp, old, adv, mask)
        torch.testing.assert_close(out.loss, ref.loss)
        torch.testing.assert_close(grad, ref_grad)
        torch.testing.assert_close(out.metrics["ess"], ref.metrics["ess"])


@pytest.mark.slow
def test_compile_inductor_matches_eager():
    logp, old, adv, mask = make_batch((8, 32), seed=9, dtype=torch.float32, mask="float")
    module = gt.PPOClipLoss(dual_clip=3.0, with_metrics=False)
    compiled = torch.compile(module, fullgraph=True)
    ref, ref_grad = loss_and_grad(module, logp, old, adv, mask)
    out, grad = loss_and_grad(compiled, logp, old, adv, mask)
    torch.testing.assert_close(out.loss, ref.loss)
    torch.testing.assert_close(grad, ref_grad)


# --------------------------------------------------------------------------------------- data parallelism


@pytest.mark.parametrize("agg", AGG_PARAMS)
@pytest.mark.parametrize("world", [2, 4])
def test_data_parallel_ranks_average_to_the_full_batch(agg, world):
    """DDP averages gradients over ranks: pass each rank the global denominator divided by the world size.

    The count itself would come from an all-reduce of each rank's local count (a tensor, never read on the
    host); here the ranks are simulated by splitting one batch along its first axis.
    """
    logp, old, adv, mask = make_batch((8, 6), seed=10, dtype=torch.float64, per_seq=True)
    full, full_grad = loss_and_grad(gt.gipo_loss, logp, old, adv, mask, agg=agg)
    if agg == "token-mean":
        local_counts = [m.sum() for m in mask.chunk(world)]
    elif agg == "token-sum":  # no count: the whole is 1, and DDP's average needs the world size undone
        local_counts = [torch.tensor(1.0 / world)] * world
    elif agg == "seq-mean-token-sum-norm":  # sequences with a valid token times the horizon T
        local_counts = [(m.sum(-1) > 0).sum() * mask.shape[-1] for m in mask.chunk(world)]
    else:
        local_counts = [(m.sum(-1) > 0).sum() for m in mask.chunk(world)]
    global_count = torch.stack(local_counts).sum().double()  # all_reduce(SUM)
    den = global_count / world
    losses, grads = [], []
    for lp, o, a, m in zip(logp.chunk(world), old.chunk(world), adv.chunk(world), mask.chunk(world)):
        out, g = loss_and_grad(gt.gipo_loss, lp, o, a, m, agg=agg, denominator=den)
        losses.append(out.loss)
        grads.append(g)
    torch.testing.assert_close(torch.stack(losses).mean(), full.loss, rtol=1e-12, atol=1e-15)
    # DDP's all-reduce averages the gradient; each rank's parameters see the mean, which for the logp
    # shards is each shard's gradient divided by the world size, i.e. the full-batch gradient.
    torch.testing.assert_close(torch.cat(grads) / world, full_grad, rtol=1e-12, atol=1e-15)


# --------------------------------------------------------------------------------------- masking edge cases


@pytest.mark.parametrize("name", LOSSES)
def test_all_masked_gives_zero_loss_and_zero_gradient(name):
    logp, old, adv, _ = make_batch(dtype=torch.float32)
    logp[0, 0] = float("nan")
    old[1, 1] = float("inf")
    mask = torch.zeros(logp.shape, dtype=torch.bool)
    out, grad = loss_and_grad(getattr(gt, name), logp, old, adv, mask)
    assert out.loss.item() == 0.0
    assert torch.equal(grad, torch.zeros_like(grad))
    assert all(math.isfinite(v.item()) for v in out.metrics.values())


def test_nan_at_masked_positions_does_not_leak():
    logp, old, adv, mask = make_batch((4, 6), seed=11, dtype=torch.float32)
    ref, ref_grad = loss_and_grad(gt.gipo_loss, logp, old, adv, mask)
    logp2, adv2 = logp.clone(), adv.clone()
    logp2[~mask] = float("nan")
    adv2[~mask] = float("inf")
    out, grad = loss_and_grad(gt.gipo_loss, logp2, old, adv2, mask)
    torch.testing.assert_close(out.loss, ref.loss, rtol=0, atol=0)
    torch.testing.assert_close(grad, ref_grad, rtol=0, atol=0)


# --------------------------------------------------------------------------------------- modules and errors


@pytest.mark.parametrize(
    ("cls", "fn", "opts"),
    [
        (gt.GIPOLoss, "gipo_loss", {"sigma": 0.5, "sigma_neg": 0.3, "kernel": "laplace"}),
        (gt.PPOClipLoss, "ppo_clip_loss", {"clip_low": 0.1, "clip_high": 0.28, "dual_clip": 3.0}),
        (gt.NoClipLoss, "no_clip_loss", {}),
        (gt.SAPOLoss, "sapo_loss", {"tau_pos": 1.0, "tau_neg": 2.0}),
        (gt.CISPOLoss, "cispo_loss", {"clip_max": 3.0, "clip_min": None}),
    ],
)
def test_module_matches_function(cls, fn, opts):
    logp, old, adv, mask = make_batch((4, 6), seed=12, dtype=torch.float32)
    module = cls(**opts, agg="seq-mean-token-sum", with_metrics=False)
    out, grad = loss_and_grad(module, logp, old, adv, mask, denominator=3.0)
    ref, ref_grad = loss_and_grad(getattr(gt, fn), logp, old, adv, mask, agg="seq-mean-token-sum", denominator=3.0, **opts)
    assert out.metrics == {}
    torch.testing.assert_close(out.loss, ref.loss, rtol=0, atol=0)
    torch.testing.assert_close(grad, ref_grad, rtol=0, atol=0)
    assert list(module.parameters()) == [] and module.state_dict() == {}
    assert "agg='seq-mean-token-sum'" in repr(module)
    assert module.options == opts
    module.options.clear()  # a copy: the options are fixed at construction
    assert module.options == opts


@pytest.mark.parametrize(
    ("make", "exc", "pattern"),
    [
        (lambda: gt.GIPOLoss(sigma=0.0), ValueError, r"`GIPOLoss`: `sigma` must be a number in \[1e-06, 1e\+06\]; got 0.0"),
        (lambda: gt.GIPOLoss(kernel="box"), ValueError, r"`GIPOLoss`: `kernel` must be one of"),
        (lambda: gt.PPOClipLoss(clip_low=1.5), ValueError, r"`PPOClipLoss`: `clip_low` must be a number in \(0, 1\); got 1.5"),
        (lambda: gt.PPOClipLoss(dual_clip=0.5), ValueError, r"`PPOClipLoss`: `dual_clip` must be a number in \(1, 1e\+06\]"),
        (lambda: gt.SAPOLoss(tau_neg=-1.0), ValueError, r"`SAPOLoss`: `tau_neg`"),
        (lambda: gt.CISPOLoss(clip_max=float("inf")), ValueError, r"`CISPOLoss`: `clip_max`"),
        (lambda: gt.NoClipLoss(agg="mean"), ValueError, r"`NoClipLoss`: `agg` must be one of"),
        (lambda: gt.GIPOLoss(with_metrics=1), TypeError, r"`GIPOLoss`: `with_metrics` must be True or False"),
    ],
)
def test_module_options_are_checked_at_construction(make, exc, pattern):
    with pytest.raises(exc, match=pattern):
        make()


def test_bad_inputs_name_the_function_and_argument():
    logp = torch.zeros(8, 128)
    with pytest.raises(ValueError, match=r"`gipo_loss`: `advantages` has shape \(8,\) but `logp` has shape \(8, 128\)"):
        gt.gipo_loss(logp, logp, torch.zeros(8))
    with pytest.raises(TypeError, match=r"`sapo_loss`: `old_logp` must have a real floating dtype"):
        gt.sapo_loss(logp, logp.long(), logp)
    with pytest.raises(TypeError, match=r"`GIPOLoss`|`gipo_loss`"):
        gt.GIPOLoss()(logp, np.zeros((8, 128)), logp)
    with pytest.raises(TypeError, match=r"`gipo_loss`: unexpected keyword argument\(s\) sigmaa"):
        gt.gipo_loss(logp, logp, logp, sigmaa=1.0)


def test_gaussian_trust_weight_keeps_dtype():
    ell = torch.tensor([0.0, 1.0, -2.0], dtype=torch.bfloat16)
    w = gt.gaussian_trust_weight(ell, sigma=2.0)
    assert w.dtype == torch.bfloat16
    torch.testing.assert_close(w.float(), torch.exp(-ell.float() ** 2 / 8.0).bfloat16().float())


# --------------------------------------------------------------------------------------- the README loop


@pytest.mark.parametrize("make_loss", [lambda: gt.GIPOLoss(sigma=1.0), lambda: gt.PPOClipLoss(dual_clip=3.0)])
def test_ppo_style_update_loop_improves_the_surrogate(make_loss):
    """The README's update loop: minibatches of a rollout, global denominator, metrics logged as tensors."""
    torch.manual_seed(0)
    n_seq, horizon, obs_dim, n_actions, n_minibatches = 16, 8, 4, 3, 4
    obs = torch.randn(n_seq, horizon, obs_dim)
    policy = torch.nn.Sequential(torch.nn.Linear(obs_dim, 16), torch.nn.Tanh(), torch.nn.Linear(16, n_actions))
    with torch.no_grad():
        dist = torch.distributions.Categorical(logits=policy(obs))
        actions = dist.sample()
        old_logp = dist.log_prob(actions)
    advantages = torch.randn(n_seq, 1)
    mask = torch.rand(n_seq, horizon) < 0.9
    optimizer = torch.optim.Adam(policy.parameters(), lr=1e-2)
    loss_fn = make_loss()
    # Each minibatch divides by the rollout's token count over the number of minibatches, so that the
    # minibatch losses average to the full-rollout loss (the same rule as data-parallel ranks).
    denominator = mask.sum() / n_minibatches

    def surrogate():
        logp = torch.distributions.Categorical(logits=policy(obs)).log_prob(actions)
        return (torch.exp(logp - old_logp) * advantages * mask).sum() / mask.sum()

    before = surrogate().item()
    logged = []
    for _epoch in range(4):
        for idx in torch.randperm(n_seq).chunk(n_minibatches):
            logits = policy(obs[idx])
            logp = torch.log_softmax(logits, -1).gather(-1, actions[idx, :, None]).squeeze(-1)
            out = loss_fn(logp, old_logp[idx], advantages[idx], mask[idx], denominator=denominator)
            optimizer.zero_grad()
            out.loss.backward()
            optimizer.step()
            logged.append(out.metrics["ratio_max"].detach())
    assert surrogate().item() > before + 0.05
    assert torch.stack(logged).max() > 1.0  # the later minibatches were off-policy
