"""gipo_core.torch.fused_linear_loss against the unfused path (logits -> log_softmax -> gather -> array loss)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap

import pytest

torch = pytest.importorskip("torch")

import gipo_core.torch as gt  # noqa: E402
from gipo_core._api import AGG_MODES  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

OBJECTIVES = {
    "gipo": {"sigma": 0.7, "sigma_neg": 0.4},
    "ppo_clip": {"clip_low": 0.2, "clip_high": 0.28, "dual_clip": 3.0},
    "sapo": {"tau_pos": 1.0, "tau_neg": 1.05},
    "cispo": {"clip_max": 2.0},
    "no_clip": {},
}


def unfused(hidden, weight, ids, old_logp, adv, mask=None, *, objective="gipo", bias=None, temperature=1.0, **kw):
    """The reference: full logits, log_softmax in float32 (float64 for float64), gather, the array-level loss."""
    logits = hidden @ weight.T
    if bias is not None:
        logits = logits + bias
    logits = logits / temperature if temperature != 1.0 else logits
    wd = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    logprobs = torch.log_softmax(logits.to(wd), -1)
    logp = logprobs.gather(-1, ids[..., None]).squeeze(-1)
    entropy = -(logprobs.exp() * logprobs).sum(-1)
    fn = getattr(gt, f"{objective}_loss")
    return fn(logp, old_logp, adv, mask, **kw), logp, entropy


def data(b=3, t=7, h=8, v=37, dtype=torch.float64, seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(b, t, h, generator=g, dtype=dtype)
    weight = torch.randn(v, h, generator=g, dtype=dtype) * 0.5
    bvec = torch.randn(v, generator=g, dtype=dtype) if bias else None
    ids = torch.randint(0, v, (b, t), generator=g)
    old = torch.randn(b, t, generator=g, dtype=torch.float64).to(dtype) * 0.5 - 3.5
    adv = torch.randn(b, 1, generator=g, dtype=torch.float64).to(dtype)
    mask = torch.rand(b, t, generator=g) > 0.3
    mask[1] = False  # an empty row
    return hidden, weight, bvec, ids, old, adv, mask


def leaves(*tensors):
    return [None if x is None else x.detach().clone().requires_grad_() for x in tensors]


def grads(loss, tensors):
    return torch.autograd.grad(loss, [x for x in tensors if x is not None])


@pytest.mark.parametrize("objective", list(OBJECTIVES))
def test_every_aggregation_matches_unfused_in_float64(objective):
    hidden, weight, bias, ids, old, adv, mask = data()
    opts = OBJECTIVES[objective]
    for agg in AGG_MODES:
        h1, w1, b1 = leaves(hidden, weight, bias)
        out = gt.fused_linear_loss(
            h1, w1, ids, old, adv, mask, objective=objective, bias=b1, temperature=0.8, chunk_size=4, agg=agg,
            with_entropy=True, **opts,
        )  # 21 tokens, chunks of 4: the last chunk is partial
        h2, w2, b2 = leaves(hidden, weight, bias)
        ref, logp, entropy = unfused(h2, w2, ids, old, adv, mask, objective=objective, bias=b2, temperature=0.8,
                                     agg=agg, **opts)
        assert out.loss.dtype == torch.float64
        torch.testing.assert_close(out.loss, ref.loss, rtol=0, atol=1e-10)
        for got, want in zip(grads(out.loss, (h1, w1, b1)), grads(ref.loss, (h2, w2, b2))):
            torch.testing.assert_close(got, want, rtol=0, atol=1e-10)
        torch.testing.assert_close(out.logp, logp.detach(), rtol=0, atol=1e-12)
        torch.testing.assert_close(out.entropy, entropy.detach(), rtol=0, atol=1e-12)
        assert list(out.metrics) == list(ref.metrics)
        for name in ref.metrics:
            torch.testing.assert_close(out.metrics[name], ref.metrics[name], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"denominator": 11.0},
        {"agg": "seq-mean-token-mean", "denominator": torch.tensor(5.0, dtype=torch.float64)},
        {"behavior_weights": "random"},
        {"float_mask": True},
        {"per_token_adv": True, "kernel": "laplace"},
        {"no_mask": True, "agg": "seq-mean-token-sum"},
    ],
    ids=["denominator", "array-denominator", "behavior-weights", "float-mask", "per-token-adv", "no-mask"],
)
def test_options_match_unfused(kwargs):
    kwargs = dict(kwargs)
    hidden, weight, _, ids, old, adv, mask = data(seed=1, bias=False)
    g = torch.Generator().manual_seed(3)
    if kwargs.pop("behavior_weights", None):
        kwargs["behavior_weights"] = torch.rand(mask.shape, generator=g, dtype=torch.float64)
    if kwargs.pop("float_mask", False):
        mask = mask * torch.rand(mask.shape, generator=g, dtype=torch.float64)
    if kwargs.pop("per_token_adv", False):
        adv = torch.randn(mask.shape, generator=g, dtype=torch.float64)
    if kwargs.pop("no_mask", False):
        mask = None
    h1, w1 = leaves(hidden, weight)
    out = gt.fused_linear_loss(h1, w1, ids, old, adv, mask, chunk_size=5, **kwargs)
    h2, w2 = leaves(hidden, weight)
    ref, _, _ = unfused(h2, w2, ids, old, adv, mask, **kwargs)
    torch.testing.assert_close(out.loss, ref.loss, rtol=0, atol=1e-10)
    for got, want in zip(grads(out.loss, (h1, w1)), grads(ref.loss, (h2, w2))):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-10)


#: Off-policy options: the token-level ones run in the single pass, the rest in the two-pass mode.
OFF_POLICY = [
    {"rollout_is": "token-truncate", "rollout_is_bounds": (0.0, 1.1)},
    {"rollout_is": "token-mask", "rollout_is_bounds": (0.8, 1.25), "agg": "token-sum"},
    {"rollout_is": "sequence-truncate", "rollout_is_bounds": (0.0, 1.5)},
    {"rollout_is": "sequence-mask", "rollout_is_bounds": (0.5, 2.0), "agg": "seq-mean-token-mean"},
    {"rollout_is": "geometric-mask", "rollout_is_bounds": (0.9, 1.1)},
    {"ratio_level": "sequence", "objective": "ppo_clip", "clip_low": 0.1, "clip_high": 0.1},
    {"opsm_delta": 0.4, "no_rollout": True, "negative_adv": True},
    {"ratio_level": "sequence", "rollout_is": "token-mask", "rollout_is_bounds": (0.8, 1.25), "opsm_delta": 0.0,
     "agg": "seq-mean-token-sum-norm", "with_metrics": "basic"},
]


@pytest.mark.parametrize("kwargs", OFF_POLICY, ids=lambda kw: "-".join(str(v) for v in kw.values()))
def test_off_policy_options_match_unfused_in_float64(kwargs):
    kwargs = dict(kwargs)
    hidden, weight, bias, ids, old, adv, mask = data(seed=2)
    g = torch.Generator().manual_seed(4)
    rollout = None if kwargs.pop("no_rollout", False) else old + 0.3 * torch.randn(old.shape, generator=g, dtype=old.dtype)
    if kwargs.pop("negative_adv", False):  # sequences 0 and 2 (1 is empty) negative: opsm_delta can drop them
        adv = -adv.abs()
    h1, w1, b1 = leaves(hidden, weight, bias)
    out = gt.fused_linear_loss(
        h1, w1, ids, old, adv, mask, bias=b1, chunk_size=4, rollout_logp=rollout, with_entropy=True, **kwargs
    )
    h2, w2, b2 = leaves(hidden, weight, bias)
    ref, logp, entropy = unfused(h2, w2, ids, old, adv, mask, bias=b2, rollout_logp=rollout, **kwargs)
    torch.testing.assert_close(out.logp, logp.detach(), rtol=0, atol=1e-12)
    torch.testing.assert_close(out.entropy, entropy.detach(), rtol=0, atol=1e-12)
    torch.testing.assert_close(out.loss, ref.loss, rtol=0, atol=1e-10)
    for got, want in zip(grads(out.loss, (h1, w1, b1)), grads(ref.loss, (h2, w2, b2))):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-10)
    assert list(out.metrics) == list(ref.metrics)
    for name in ref.metrics:
        torch.testing.assert_close(out.metrics[name], ref.metrics[name], rtol=1e-12, atol=1e-12)
    if "opsm_delta" in kwargs:  # the masking acts on these data (a test that can fail)
        assert out.metrics["opsm_masked_seq_frac"] > 0
    # The module form takes the same options at construction.
    objective = kwargs.pop("objective", "gipo")
    module = gt.FusedLinearLoss(objective, chunk_size=4, **kwargs)
    h3, w3, b3 = leaves(hidden, weight, bias)
    out3 = module(h3, w3, ids, old, adv, mask, bias=b3, rollout_logp=rollout)
    torch.testing.assert_close(out3.loss, ref.loss, rtol=0, atol=1e-10)


def test_rollout_is_without_rollout_logp_raises():
    hidden, weight, _, ids, old, adv, mask = data()
    with pytest.raises(ValueError, match="`fused_linear_loss`: `rollout_is='token-mask'` corrects with `rollout_logp`"):
        gt.fused_linear_loss(hidden, weight, ids, old, adv, mask, rollout_is="token-mask")
    with pytest.raises(ValueError, match="`FusedLinearLoss`: `ratio_level` must be one of"):
        gt.FusedLinearLoss(ratio_level="seq")


def test_chunk_size_does_not_change_the_result():
    hidden, weight, bias, ids, old, adv, mask = data(seed=2)
    results = []
    for chunk in (None, 1, 6, 21, 1000):
        h1, w1, b1 = leaves(hidden, weight, bias)
        out = gt.fused_linear_loss(h1, w1, ids, old, adv, mask, bias=b1, chunk_size=chunk)
        results.append((out.loss, *grads(out.loss, (h1, w1, b1))))
    for other in results[1:]:
        for got, want in zip(other, results[0]):
            torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_low_precision_within_the_unfused_float32_tolerance():
    # bfloat16 / float16 hidden states and weight: the fused path is as close to the float64 truth as the
    # unfused path with the same inputs, and float32 inputs are within float32 rounding.
    hidden, weight, _, ids, old, adv, mask = data(b=4, t=16, h=32, v=300, seed=4, bias=False)
    old, adv = old.float(), adv.float()
    h0, w0 = leaves(hidden, weight)
    truth, _, _ = unfused(h0, w0, ids, old.double(), adv.double(), mask)
    truth_grads = grads(truth.loss, (h0, w0))
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, None), (torch.float16, None)):
        h1, w1 = leaves(hidden.to(dtype), weight.to(dtype))
        out = gt.fused_linear_loss(h1, w1, ids, old, adv, mask, chunk_size=7)
        assert out.loss.dtype == torch.float32 and out.logp.dtype == torch.float32
        fused_grads = grads(out.loss, (h1, w1))
        assert fused_grads[0].dtype == dtype and fused_grads[1].dtype == dtype
        h2, w2 = leaves(hidden.to(dtype), weight.to(dtype))
        ref, _, _ = unfused(h2, w2, ids, old, adv, mask)
        ref_grads = grads(ref.loss, (h2, w2))
        for got, want, true in zip(fused_grads, ref_grads, truth_grads):
            scale = true.abs().max()
            err_fused = float((got.double() - true).abs().max() / scale)
            err_unfused = float((want.double() - true).abs().max() / scale)
            if tol is None:
                assert err_fused <= 2 * err_unfused + 1e-3, (dtype, err_fused, err_unfused)
            else:
                assert err_fused <= tol, (dtype, err_fused)
        err_loss = abs(float(out.loss.detach()) - float(truth.loss.detach()))
        assert err_loss <= 2 * abs(float(ref.loss.detach()) - float(truth.loss.detach())) + 1e-5


def test_extreme_logits_stay_finite():
    hidden, weight, _, ids, old, adv, mask = data(b=2, t=6, h=8, v=50, seed=5, bias=False, dtype=torch.float32)
    hidden[..., 0] = 0.0  # only the first two tokens see the extreme column of the weight
    hidden[0, 0] = 0.0
    hidden[0, 0, 0] = 1.0
    mask[0, :2] = True
    hidden[0, 1] = hidden[0, 0]
    weight[:, 0] = 0.0
    weight[ids[0, 0], 0] = 1e4  # token (0, 0): its target's logit at +1e4
    weight[(ids[0, 1] + 1) % 50, 0] = -1e4  # and a logit at -1e4; token (0, 1): its target 1e4 below the top
    old[0, :2] = torch.tensor([0.0, -1e4])  # log-ratios near 0: the diagnostics stay finite too
    for dtype in (torch.float32, torch.bfloat16):
        h1, w1 = leaves(hidden.to(dtype), weight.to(dtype))
        out = gt.fused_linear_loss(h1, w1, ids, old, adv, mask, chunk_size=5, with_entropy=True)
        out.loss.backward()
        for x in (out.loss, out.logp, out.entropy, h1.grad, w1.grad, *out.metrics.values()):
            assert torch.isfinite(x).all(), x
        top = float(w1.detach()[ids[0, 0], 0])  # 1e4 as the dtype holds it
        assert float(out.logp[0, 0]) == 0.0 and float(out.logp[0, 1]) == -top


def test_under_torch_compile_fullgraph():
    hidden, weight, _, ids, old, adv, mask = data(b=2, t=8, h=16, v=64, seed=6, bias=False, dtype=torch.float32)

    def step(h, w):
        out = gt.fused_linear_loss(h, w, ids, old, adv, mask, objective="ppo_clip", chunk_size=10, with_metrics=False)
        return out.loss, out.logp

    h1, w1 = leaves(hidden, weight)
    # aot_eager: dynamo (fullgraph: no graph break) and AOT autograd, without inductor's C++ build (slow on CI).
    loss, logp = torch.compile(step, fullgraph=True, backend="aot_eager")(h1, w1)
    loss.backward()
    h2, w2 = leaves(hidden, weight)
    loss2, logp2 = step(h2, w2)
    loss2.backward()
    torch.testing.assert_close(loss, loss2)
    torch.testing.assert_close(logp, logp2)
    torch.testing.assert_close(h1.grad, h2.grad)
    torch.testing.assert_close(w1.grad, w2.grad)


class _LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor an op returns."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for x in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(x, torch.Tensor):
                self.largest = max(self.largest, x.numel())
        return out


def test_never_a_tokens_by_vocab_array():
    hidden, weight, bias, ids, old, adv, mask = data(b=4, t=16, h=8, v=200, seed=7, dtype=torch.float32)
    h1, w1, b1 = leaves(hidden, weight, bias)
    with _LargestTensor() as mode:
        out = gt.fused_linear_loss(h1, w1, ids, old, adv, mask, bias=b1, chunk_size=8, with_entropy=True)
        out.loss.backward()
    assert mode.largest == 8 * 200, mode.largest  # one chunk's logits; the weight (200 x 8) is as large
    with _LargestTensor() as mode:
        unfused(*leaves(hidden, weight), ids, old, adv, mask)[0].loss.backward()
    assert mode.largest == 64 * 200  # the unfused path holds all the logits


def test_gradients_only_where_required_and_no_grad_mode():
    hidden, weight, bias, ids, old, adv, mask = data(seed=8)
    w1 = weight.clone().requires_grad_()
    out = gt.fused_linear_loss(hidden, w1, ids, old, adv, mask, bias=bias)
    (gw,) = torch.autograd.grad(out.loss, w1)
    h2, w2 = leaves(hidden, weight)
    ref, _, _ = unfused(h2, w2, ids, old, adv, mask, bias=bias)
    torch.testing.assert_close(gw, grads(ref.loss, (w2,))[0], rtol=0, atol=1e-10)
    with torch.no_grad():
        out2 = gt.fused_linear_loss(*leaves(hidden, weight), ids, old, adv, mask, bias=bias, with_entropy=True)
    assert out2.loss.grad_fn is None
    torch.testing.assert_close(out2.loss, ref.loss.detach(), rtol=0, atol=1e-10)
    assert gt.fused_linear_loss(hidden, weight, ids, old, adv, mask).entropy is None


def test_upstream_gradient_scales_and_accumulates():
    hidden, weight, _, ids, old, adv, mask = data(seed=9, bias=False)
    h1, w1 = leaves(hidden, weight)
    (3.0 * gt.fused_linear_loss(h1, w1, ids, old, adv, mask).loss).backward()
    gt.fused_linear_loss(h1, w1, ids, old, adv, mask).loss.backward()  # accumulates into .grad
    h2, w2 = leaves(hidden, weight)
    (4.0 * unfused(h2, w2, ids, old, adv, mask)[0].loss).backward()
    torch.testing.assert_close(h1.grad, h2.grad, rtol=0, atol=1e-10)
    torch.testing.assert_close(w1.grad, w2.grad, rtol=0, atol=1e-10)


def test_tied_embedding_weight():
    # The weight is both the input embedding and lm_head: both gradients reach it.
    g = torch.Generator().manual_seed(10)
    v, d = 40, 8
    table = torch.randn(v, d, generator=g, dtype=torch.float64)
    proj = torch.randn(d, d, generator=g, dtype=torch.float64)
    tokens = torch.randint(0, v, (3, 6), generator=g)
    ids = torch.randint(0, v, (3, 6), generator=g)
    old = torch.full((3, 6), -3.7, dtype=torch.float64)
    adv = torch.randn(3, 1, generator=g, dtype=torch.float64)

    def run(fused):
        w = table.clone().requires_grad_()
        hidden = torch.tanh(torch.nn.functional.embedding(tokens, w) @ proj)
        if fused:
            loss = gt.fused_linear_loss(hidden, w, ids, old, adv, chunk_size=5).loss
        else:
            loss = unfused(hidden, w, ids, old, adv)[0].loss
        loss.backward()
        return w.grad

    torch.testing.assert_close(run(True), run(False), rtol=0, atol=1e-10)


def test_module_forms():
    hidden, weight, _, ids, old, adv, mask = data(seed=11, bias=False)
    loss_fn = gt.FusedLinearLoss("ppo_clip", clip_high=0.28, chunk_size=4, agg="seq-mean-token-mean", with_entropy=True)
    out = loss_fn(hidden, weight, ids, old, adv, mask)
    ref = gt.fused_linear_loss(hidden, weight, ids, old, adv, mask, objective="ppo_clip", clip_high=0.28,
                               agg="seq-mean-token-mean")
    torch.testing.assert_close(out.loss, ref.loss, rtol=0, atol=1e-12)
    assert out.entropy.shape == ids.shape
    assert loss_fn.options == {"clip_low": 0.2, "clip_high": 0.28, "dual_clip": None}
    gipo = gt.FusedLinearGIPOLoss(sigma=0.5, temperature=0.7)
    ref = gt.fused_linear_loss(hidden, weight, ids, old, adv, mask, sigma=0.5, temperature=0.7)
    torch.testing.assert_close(gipo(hidden, weight, ids, old, adv, mask).loss, ref.loss, rtol=0, atol=1e-12)
    assert "sigma=0.5" in repr(gipo)
    with pytest.raises(TypeError, match="FusedLinearLoss.*sigma.*ppo_clip"):
        gt.FusedLinearLoss("ppo_clip", sigma=1.0)
    with pytest.raises(ValueError, match="FusedLinearGIPOLoss.*sigma"):
        gt.FusedLinearGIPOLoss(sigma=-1.0)
    with pytest.raises(ValueError, match="objective"):
        gt.FusedLinearLoss("grpo")


def test_bad_arguments_raise_clear_errors():
    hidden, weight, bias, ids, old, adv, mask = data(seed=12)
    call = gt.fused_linear_loss
    cases = [
        (TypeError, "`hidden` must be a torch.Tensor", lambda: call(hidden.numpy(), weight, ids, old, adv)),
        (ValueError, "`weight` must have shape \\(vocab, hidden_dim\\)", lambda: call(hidden, weight.T, ids, old, adv)),
        (TypeError, "`weight` has dtype torch.float32", lambda: call(hidden, weight.float(), ids, old, adv)),
        (TypeError, "`target_ids` must have an integer dtype", lambda: call(hidden, weight, ids.double(), old, adv)),
        (ValueError, "`target_ids` has shape \\(3, 6\\)", lambda: call(hidden, weight, ids[:, :6], old, adv)),
        (ValueError, "`old_logp` has shape \\(3,\\)", lambda: call(hidden, weight, ids, old[:, 0], adv)),
        (ValueError, "`advantages` has shape \\(3,\\)", lambda: call(hidden, weight, ids, old, adv[:, 0])),
        (ValueError, "`mask` has shape", lambda: call(hidden, weight, ids, old, adv, mask[:2])),
        (ValueError, "`bias` must have shape \\(37,\\)", lambda: call(hidden, weight, ids, old, adv, bias=bias[:3])),
        (ValueError, "`objective` must be one of", lambda: call(hidden, weight, ids, old, adv, objective="grpo")),
        (TypeError, "unexpected option\\(s\\) sigma for objective='sapo'",
         lambda: call(hidden, weight, ids, old, adv, objective="sapo", sigma=1.0)),
        (ValueError, "`sigma` must be a number in", lambda: call(hidden, weight, ids, old, adv, sigma=0.0)),
        (ValueError, "`temperature` must be a finite number > 0",
         lambda: call(hidden, weight, ids, old, adv, temperature=0)),
        (ValueError, "`chunk_size` must be None or an int >= 1",
         lambda: call(hidden, weight, ids, old, adv, chunk_size=0)),
        (ValueError, "`agg` must be one of", lambda: call(hidden, weight, ids, old, adv, agg="mean")),
        (ValueError, "`hidden` must have shape \\(..., time, hidden_dim\\)",
         lambda: call(hidden[0, 0], weight, ids, old, adv)),
        (TypeError, "`with_entropy` must be True or False",
         lambda: call(hidden, weight, ids, old, adv, with_entropy=1)),
    ]
    for exc, message, fn in cases:
        with pytest.raises(exc, match="fused_linear_loss.*" + message if "fused" not in message else message):
            fn()


_DDP_SCRIPT = textwrap.dedent(
    """
    import os, sys, torch, torch.distributed as dist
    import gipo_core.torch as gt

    class Policy(torch.nn.Module):  # returns hidden states; lm_head is applied by the fused loss
        def __init__(self):
            super().__init__()
            self.trunk = torch.nn.Linear(8, 8)
            self.lm_head = torch.nn.Linear(8, 30, bias=False)

        def forward(self, x):
            return torch.tanh(self.trunk(x))

    def main(rank, world, port):
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world)
        g = torch.Generator().manual_seed(0)
        x = torch.randn(4, 6, 8, generator=g, dtype=torch.float64)
        ids = torch.randint(0, 30, (4, 6), generator=g)
        old = torch.full((4, 6), -3.4, dtype=torch.float64)
        adv = torch.randn(4, 1, generator=g, dtype=torch.float64)
        mask = torch.rand(4, 6, generator=g) > 0.3
        torch.manual_seed(1)
        policy = Policy().double()
        ref = Policy().double()
        ref.load_state_dict(policy.state_dict())
        gt.fused_linear_loss(ref(x), ref.lm_head.weight, ids, old, adv, mask).loss.backward()
        ddp = torch.nn.parallel.DistributedDataParallel(policy)
        rows = slice(2 * rank, 2 * rank + 2)
        # Each rank: its own rows, the global token count divided by the world size (DDP averages gradients).
        out = gt.fused_linear_loss(ddp(x[rows]), policy.lm_head.weight, ids[rows], old[rows], adv[rows], mask[rows],
                                   denominator=mask.sum().double() / world)
        out.loss.backward()
        for p, q in zip(policy.parameters(), ref.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=1e-12)
        dist.destroy_process_group()
        if rank == 0:
            print("ok")

    if __name__ == "__main__":
        torch.multiprocessing.start_processes(main, args=(2, int(sys.argv[1])), nprocs=2, start_method="fork")
    """
)


def test_ddp_two_processes(tmp_path):
    script = tmp_path / "ddp.py"
    script.write_text(_DDP_SCRIPT)
    port = 29500 + os.getpid() % 1000
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    result = subprocess.run([sys.executable, str(script), str(port)], capture_output=True, text=True, timeout=300,
                            env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ok" in result.stdout


def test_target_ids_at_masked_positions_are_ignored():
    hidden, weight, _, ids, old, adv, mask = data(seed=13, bias=False)
    out = gt.fused_linear_loss(hidden, weight.requires_grad_(), ids, old, adv, mask)
    padded = torch.where(mask, ids, -100)  # the usual ignore index
    out2 = gt.fused_linear_loss(hidden, weight, padded, old, adv, mask)
    torch.testing.assert_close(out2.loss, out.loss, rtol=0, atol=0)
    torch.testing.assert_close(grads(out2.loss, (weight,))[0], grads(out.loss, (weight,))[0], rtol=0, atol=0)


def test_second_backward_through_one_call_raises():
    hidden, weight, _, ids, old, adv, mask = data(seed=14, bias=False)
    w = weight.clone().requires_grad_()
    out = gt.fused_linear_loss(hidden, w, ids, old, adv, mask)
    out.loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="fused_linear_loss.*twice"):
        out.loss.backward()


def test_benchmark_script_runs_and_compares_like_with_like():
    # benchmarks/fused_linear.py at its tiny configuration: every variant gives the same loss.
    pytest.importorskip("jax")
    script = os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks", "fused_linear.py")
    variants = "torch-unfused,torch-fused-ppo,jax-unfused,jax-fused-ppo"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    result = subprocess.run(
        [sys.executable, script, "--config", "tiny", "--variants", variants, "--repeats", "1"],
        capture_output=True, text=True, timeout=600, env=env,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    losses = re.findall(r" loss ([-+][0-9.]+)", result.stdout)
    assert len(losses) == 4 and len(set(losses)) == 1, result.stdout
    assert "torch-fused-ppo / torch-unfused: time" in result.stdout
    assert "failed" not in result.stdout, result.stdout


def test_autocast_region_keeps_the_input_dtype():
    hidden, weight, _, ids, old, adv, mask = data(seed=15, bias=False, dtype=torch.float32)
    h1, w1 = leaves(hidden, weight)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = gt.fused_linear_loss(h1, w1, ids, old, adv, mask)
    out.loss.backward()
    h2, w2 = leaves(hidden, weight)
    ref = gt.fused_linear_loss(h2, w2, ids, old, adv, mask)
    ref.loss.backward()
    torch.testing.assert_close(out.loss, ref.loss, rtol=0, atol=0)
    torch.testing.assert_close(w1.grad, w2.grad, rtol=0, atol=0)


def test_readme_examples_of_the_fused_section_run():
    # The README's "LLM scale: fused linear loss" section: its python blocks run as written.
    pytest.importorskip("jax")
    readme = open(os.path.join(os.path.dirname(__file__), os.pardir, "README.md"), encoding="utf-8").read()
    section = readme[readme.index("## LLM scale: fused linear loss"):]
    section = section[: section.index("\n## ", 1)]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 2
    for code in blocks:
        exec(compile(code, "README.md", "exec"), {"__name__": "readme_example"})
