"""Off-policy options of the core: sequence-level ratios, rollout correction, OPSM, and their diagnostics.

The conformance suite holds every option to the mpmath oracle in every backend; these are the properties
stated in the documentation, checked directly.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import gipo_core.numpy as gnp
from gipo_core._core.engine import BASIC_METRIC_NAMES, METRIC_NAMES, ROLLOUT_METRIC_NAMES

LOSSES = {
    "gipo": gnp.gipo_loss,
    "ppo_clip": gnp.ppo_clip_loss,
    "no_clip": gnp.no_clip_loss,
    "sapo": gnp.sapo_loss,
    "cispo": gnp.cispo_loss,
}
MODES = ("token-truncate", "token-mask", "sequence-truncate", "sequence-mask", "geometric-mask")


def _batch(seed=0, shape=(4, 6), per_sequence=True):
    rng = np.random.default_rng(seed)
    logp = -rng.uniform(0.1, 2.0, shape)
    old = logp - rng.normal(0.0, 0.3, shape)
    adv = rng.normal(size=shape[:-1] + (1,) if per_sequence else shape)
    rollout = old - rng.normal(0.0, 0.3, shape)
    mask = rng.uniform(size=shape) < 0.8
    mask[1] = False
    mask[:, 0] |= np.arange(shape[0]) != 1
    return logp, old, adv, mask, rollout


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_sequence_weights_of_4096_tokens_never_overflow(dtype, sign):
    """A sequence sum of 4,096 token log-weights of 0.05 (e^204.8 overflows float32) gives the capped weight
    2 (truncate) or a dropped sequence (mask), in float16 inputs too: finite loss, finite gradient."""
    t = 4096
    logp = np.full((2, t), -1.0, dtype=dtype)
    old = logp.copy()
    rollout = (old.astype(np.float64) - sign * 0.05).astype(dtype)
    adv = np.array([[1.0], [-0.5]], dtype=dtype)
    plain, plain_grad = gnp.value_and_grad(gnp.gipo_loss)(logp, old, adv)
    trunc, trunc_grad = gnp.value_and_grad(gnp.gipo_loss)(logp, old, adv, rollout_logp=rollout,
                                                          rollout_is="sequence-truncate")
    masked, masked_grad = gnp.value_and_grad(gnp.gipo_loss)(logp, old, adv, rollout_logp=rollout,
                                                            rollout_is="sequence-mask")
    for out, grad in ((trunc, trunc_grad), (masked, masked_grad)):
        assert np.isfinite(out.loss) and np.all(np.isfinite(grad.astype(np.float64)))
        assert all(np.isfinite(v) for v in out.metrics.values())
    if sign > 0:  # weight e^{+204.8}: capped at 2, masked out by the (0.5, 2) band
        assert math.isclose(float(trunc.loss), 2.0 * float(plain.loss), rel_tol=1e-6)
        assert float(masked.loss) == 0.0 and np.all(masked_grad == 0)
        assert float(masked.metrics["rollout_masked_seq_frac"]) == 1.0
    else:  # weight e^{-204.8} = 0 in float32: nothing left, no NaN
        assert float(trunc.loss) == 0.0 and np.all(trunc_grad == 0)
        assert float(masked.loss) == 0.0 and np.all(masked_grad == 0)
    assert np.all(plain_grad != 0)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_sequence_level_equals_token_level_when_every_token_has_the_sequence_ratio(name):
    """With the same log-ratio at every valid token of a sequence, the sequence ratio is that ratio: the
    loss and the gradient equal the token-level ones."""
    logp, old, adv, mask, _ = _batch(1)
    per_row = np.random.default_rng(5).normal(0.0, 0.2, (4, 1))
    old = logp - per_row
    fn = gnp.value_and_grad(LOSSES[name])
    tok, g_tok = fn(logp, old, adv, mask)
    seq, g_seq = fn(logp, old, adv, mask, ratio_level="sequence")
    assert math.isclose(float(seq.loss), float(tok.loss), rel_tol=1e-13, abs_tol=1e-15)
    np.testing.assert_allclose(g_seq, g_tok, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("name", sorted(LOSSES))
@pytest.mark.parametrize("mode", MODES)
def test_empty_and_dropped_sequences_have_zero_loss_and_gradient(name, mode):
    """An all-masked sequence (NaN underneath) and a sequence the correction drops contribute nothing."""
    logp, old, adv, mask, rollout = _batch(2)
    logp[1] = np.nan
    rollout[3] = old[3] - 3.0  # every token weight e^3 = 20: outside every mask band, truncated otherwise
    out, grad = gnp.value_and_grad(LOSSES[name])(logp, old, adv, mask, rollout_logp=rollout, rollout_is=mode,
                                                 ratio_level="sequence", agg="seq-mean-token-mean")
    assert np.isfinite(out.loss)
    assert np.all(grad[1] == 0)
    if mode.endswith("mask"):
        assert np.all(grad[3] == 0)


def test_opsm_behaviour_policy_is_rollout_when_given():
    """OPSM reads mean(log mu - logp) with mu = rollout_logp when given, else old_logp; it drops only
    sequences with a negative advantage."""
    logp = np.full((3, 4), -1.0)
    old = logp + 0.05                      # behaviour - current = 0.05 through old_logp
    rollout = old + 0.2                    # 0.25 through the rollout policy
    adv = np.array([[-1.0], [1.0], [-1.0]])
    mask = np.ones((3, 4), dtype=bool)
    mask[2] = False
    kw = dict(opsm_delta=0.1, agg="seq-mean-token-sum")
    without = gnp.gipo_loss(logp, old, adv, mask, **kw).metrics
    with_ro = gnp.gipo_loss(logp, old, adv, mask, rollout_logp=rollout, **kw).metrics
    assert float(without["opsm_masked_seq_frac"]) == 0.0
    assert float(with_ro["opsm_masked_seq_frac"]) == 0.5  # row 0 only: row 1 has A > 0, row 2 is empty
    assert float(with_ro["opsm_masked_token_frac"]) == 0.5


def test_nan_at_a_valid_element_shows_in_every_diagnostic():
    """A NaN input at a valid element makes every diagnostic that reads it NaN (``ess`` was 0.0)."""
    logp, old, adv, mask, rollout = _batch(3, per_sequence=False)
    for key, arrays in (("logp", (logp.copy(), old, adv)), ("advantages", (logp, old, adv.copy()))):
        arrays[0 if key == "logp" else 2][0, 0] = np.nan
        for name, fn in LOSSES.items():
            out = fn(*arrays, mask)
            bad = [k for k, v in out.metrics.items() if k != "n_valid" and not np.isnan(v)]
            assert not bad, f"{name}, NaN in {key}: not NaN: {bad}"
            assert float(out.metrics["n_valid"]) == mask.sum()
    rollout = rollout.copy()
    rollout[0, 0] = np.nan
    out = gnp.gipo_loss(logp, old, adv, mask, rollout_logp=rollout)
    assert all(np.isnan(out.metrics[k]) for k in ROLLOUT_METRIC_NAMES)
    assert not np.isnan(out.metrics["weight_mean"])


def test_nan_under_the_mask_changes_nothing_with_every_option():
    logp, old, adv, mask, rollout = _batch(4)
    opts = dict(ratio_level="sequence", rollout_is="geometric-mask", rollout_is_bounds=(0.5, 2.0), opsm_delta=0.0)
    clean = gnp.value_and_grad(gnp.sapo_loss)(logp, old, adv, mask, rollout_logp=rollout, **opts)
    dirty_in = [np.where(mask, x, v) for x, v in ((logp, np.nan), (old, -np.inf), (rollout, np.inf))]
    dirty = gnp.value_and_grad(gnp.sapo_loss)(dirty_in[0], dirty_in[1], adv, mask, rollout_logp=dirty_in[2], **opts)
    assert float(dirty[0].loss) == float(clean[0].loss)
    np.testing.assert_array_equal(dirty[1], clean[1])
    assert {k: float(v) for k, v in dirty[0].metrics.items()} == {k: float(v) for k, v in clean[0].metrics.items()}


def test_metric_sets():
    """The full set by default, BASIC_METRIC_NAMES with ``with_metrics='basic'`` (the same values), the
    option's own diagnostics added when it is on, none with False."""
    logp, old, adv, mask, rollout = _batch(5)
    full = gnp.ppo_clip_loss(logp, old, adv, mask, dual_clip=3.0).metrics
    assert tuple(full) == METRIC_NAMES
    basic = gnp.ppo_clip_loss(logp, old, adv, mask, dual_clip=3.0, with_metrics="basic").metrics
    assert tuple(basic) == BASIC_METRIC_NAMES
    assert {k: float(basic[k]) for k in basic} == {k: float(full[k]) for k in basic}
    seq = gnp.gipo_loss(logp, old, adv, mask, ratio_level="sequence", rollout_logp=rollout, opsm_delta=0.1,
                        with_metrics="basic").metrics
    assert tuple(seq) == BASIC_METRIC_NAMES + ("seq_ratio_max", "seq_ratio_min") + ROLLOUT_METRIC_NAMES + (
        "opsm_masked_token_frac", "opsm_masked_seq_frac")
    assert gnp.gipo_loss(logp, old, adv, mask, with_metrics=False).metrics == {}


def test_ppo_clip_fractions_at_the_loss_band():
    """ppo_clip_frac counts at the loss's own clip_low / clip_high; ppo_clip_frac_lower what the dual clip caps
    (at 3, verl's default, for a loss without one)."""
    ell = np.log(np.array([1.1, 1.25, 0.85, 0.95, 4.0, 1.0]))
    adv = np.array([1.0, 1.0, -1.0, -1.0, -1.0, 1.0])
    out = gnp.ppo_clip_loss(ell, np.zeros(6), adv, clip_low=0.1, clip_high=0.28, dual_clip=3.0).metrics
    # silenced in the band [0.9, 1.28]: rho = 0.85 with A < 0 (1.25 with A > 0 is inside; 4 with A < 0 is not)
    assert math.isclose(float(out["ppo_clip_frac"]), 1 / 6)
    assert math.isclose(float(out["ppo_clip_frac_lower"]), 1 / 6)  # rho = 4 > 3 with A < 0
    assert float(gnp.ppo_clip_loss(ell, np.zeros(6), adv, dual_clip=5.0).metrics["ppo_clip_frac_lower"]) == 0.0
    assert math.isclose(float(gnp.gipo_loss(ell, np.zeros(6), adv).metrics["ppo_clip_frac_lower"]), 1 / 6)


@pytest.mark.parametrize("mode", MODES)
def test_default_bounds(mode):
    """The documented defaults: TIS cap 2 (token and sequence), IcePop (0.5, 5), sequence mask (0.5, 2),
    geometric mask (0.999, 1.001)."""
    from gipo_core._core.engine import DEFAULT_ROLLOUT_IS_BOUNDS

    logp, old, adv, mask, rollout = _batch(6)
    default = gnp.gipo_loss(logp, old, adv, mask, rollout_logp=rollout, rollout_is=mode)
    explicit = gnp.gipo_loss(logp, old, adv, mask, rollout_logp=rollout, rollout_is=mode,
                             rollout_is_bounds=DEFAULT_ROLLOUT_IS_BOUNDS[mode])
    assert float(default.loss) == float(explicit.loss)
    assert DEFAULT_ROLLOUT_IS_BOUNDS == {
        "token-truncate": (0.0, 2.0), "token-mask": (0.5, 5.0), "sequence-truncate": (0.0, 2.0),
        "sequence-mask": (0.5, 2.0), "geometric-mask": (0.999, 1.001)}


def test_torch_fused_kernel_equals_op_by_op_with_every_option():
    """The eager torch path that runs the core as one torch.compile-built kernel gives the op-by-op results
    with the off-policy options on (diagnostics included)."""
    import torch

    import gipo_core.torch as gt

    g = torch.Generator().manual_seed(0)
    lp = (-torch.rand(8, 32, generator=g) * 2).requires_grad_()
    old = lp.detach() - torch.randn(8, 32, generator=g) * 0.3
    rollout = old - torch.randn(8, 32, generator=g) * 0.3
    adv = torch.randn(8, 1, generator=g)
    mask = torch.rand(8, 32, generator=g) < 0.8
    opts = dict(ratio_level="sequence", rollout_is="sequence-mask", opsm_delta=0.1, agg="seq-mean-token-sum-norm")
    results = []
    saved = gt.fused_settings()
    try:
        for mode in ("never", "always"):
            gt.set_fused(mode)
            out = gt.ppo_clip_loss(lp, old, adv, mask, rollout_logp=rollout, dual_clip=3.0, **opts)
            (grad,) = torch.autograd.grad(out.loss, lp)
            results.append((out.loss.detach(), grad, out.metrics))
    finally:
        gt.set_fused(saved["mode"], min_numel=saved["min_numel"])
    (loss_a, grad_a, met_a), (loss_b, grad_b, met_b) = results
    torch.testing.assert_close(loss_b, loss_a)
    torch.testing.assert_close(grad_b, grad_a)
    assert list(met_b) == list(met_a)
    for name in met_a:
        torch.testing.assert_close(met_b[name], met_a[name])
