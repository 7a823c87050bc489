"""gipo-core's off-policy options against verl's own functions (verl 0.9.1), value and gradient.

Runs only in the environment that has verl installed (the main test environment does not collect
``tests/integrations/test_verl*.py``)::

    PYTHONPATH=$PWD /path/to/verl-env/bin/python -m pytest tests/integrations/test_verl_conventions.py

Checked: GSPO (``ppo_clip_loss(ratio_level="sequence")``) against ``compute_policy_loss_gspo``; every
aggregation mode and the global-count arguments against ``agg_loss``; CISPO with ``clip_min`` against
``compute_policy_loss_cispo``; token and sequence truncated IS and the IcePop token mask against
``compute_rollout_correction_weights``.
"""

from __future__ import annotations

import pytest
import torch
from verl.trainer.ppo import core_algos
from verl.trainer.ppo import rollout_corr_helper as rollout_corr
from verl.workers.config import actor as actor_config

import gipo_core.torch as gt

B, T = 6, 9


def _rtol(agg: str) -> float:
    """verl's seq-mean-token-mean divides each sequence by (length + 1e-8): a relative 1e-8 / length apart."""
    return 2e-8 if agg == "seq-mean-token-mean" else 1e-12


def _inputs(seed: int, per_sequence: bool, scale: float = 0.05) -> dict:
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(B, T, generator=g, dtype=torch.float64) * 2 - 0.05
    old = logp - torch.randn(B, T, generator=g, dtype=torch.float64) * scale
    adv = torch.randn(B, 1 if per_sequence else T, generator=g, dtype=torch.float64)
    mask = torch.rand(B, T, generator=g) < 0.75
    mask[2] = False  # an empty sequence
    mask[:, 0] = mask[:, 0] | (torch.arange(B) != 2)
    rollout = old - torch.randn(B, T, generator=g, dtype=torch.float64) * 0.4
    return {"logp": logp, "old": old, "adv": adv.expand(B, T).clone() if not per_sequence else adv, "mask": mask,
            "rollout": rollout}


def _config(**kw):
    return actor_config.ActorConfig(strategy="fsdp", ppo_micro_batch_size_per_gpu=1, rollout_n=1, **kw)


def _grad(fn, logp):
    lp = logp.clone().requires_grad_(True)
    loss = fn(lp)
    (g,) = torch.autograd.grad(loss, lp)
    return loss.detach(), g


@pytest.mark.parametrize("per_sequence", [True, False])
@pytest.mark.parametrize("agg", ["seq-mean-token-mean", "token-mean"])
@pytest.mark.parametrize("bands", [(3e-4, 4e-4), (0.2, 0.28)])
def test_gspo_equals_verl(per_sequence, agg, bands) -> None:
    """ppo_clip_loss at ratio_level='sequence' is verl's GSPO: loss and gradient (no sequence reaches verl's
    clamp of the log-ratio at 10)."""
    x = _inputs(1, per_sequence)
    adv_full = x["adv"].expand(B, T)
    cfg = _config(clip_ratio_low=bands[0], clip_ratio_high=bands[1])
    ref_loss, ref_grad = _grad(
        lambda lp: core_algos.compute_policy_loss_gspo(x["old"], lp, adv_full, x["mask"].double(), agg, cfg)[0],
        x["logp"],
    )
    loss, grad = _grad(
        lambda lp: gt.ppo_clip_loss(lp, x["old"], x["adv"], x["mask"], clip_low=bands[0], clip_high=bands[1],
                                    ratio_level="sequence", agg=agg).loss,
        x["logp"],
    )
    torch.testing.assert_close(loss, ref_loss, rtol=_rtol(agg), atol=1e-14)
    torch.testing.assert_close(grad, ref_grad, rtol=_rtol(agg), atol=1e-14)


@pytest.mark.parametrize("agg", ["token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean",
                                 "seq-mean-token-sum-norm"])
@pytest.mark.parametrize("dp_size", [1, 4])
def test_aggregation_equals_agg_loss(agg, dp_size) -> None:
    """Every mode equals verl's agg_loss; with data parallelism, the local `denominator` is verl's global
    count divided by dp_size (seq-mean-token-sum-norm: global sequences x horizon / dp_size)."""
    x = _inputs(2, per_sequence=False)
    rho = torch.exp(x["logp"] - x["old"])
    mat = -x["adv"] * rho
    m = x["mask"].double()
    n_tok, n_seq = float(m.sum()) * 3, float((m.sum(-1) > 0).sum()) * 3  # "global" counts, 3x the local ones
    info = {} if dp_size == 1 else {"dp_size": dp_size, "batch_num_tokens": n_tok, "global_batch_size": n_seq}
    ref = core_algos.agg_loss(mat, m, agg, **info)
    denominator = None
    if dp_size > 1:
        denominator = {"token-mean": n_tok, "token-sum": 1.0, "seq-mean-token-sum": n_seq,
                       "seq-mean-token-mean": n_seq, "seq-mean-token-sum-norm": n_seq * T}[agg] / dp_size
    got = gt.no_clip_loss(x["logp"], x["old"], x["adv"], x["mask"], agg=agg, denominator=denominator,
                          with_metrics=False).loss
    torch.testing.assert_close(got, ref.to(got.dtype), rtol=_rtol(agg), atol=1e-14)


def test_cispo_two_sided_equals_verl() -> None:
    """cispo_loss(clip_min=1 - low, clip_max=1 + high) is verl's CISPO (verl clips both sides)."""
    x = _inputs(3, per_sequence=False, scale=0.5)
    cfg = _config(clip_ratio_low=0.2, clip_ratio_high=0.28)
    ref_loss, ref_grad = _grad(
        lambda lp: core_algos.compute_policy_loss_cispo(x["old"], lp, x["adv"], x["mask"].double(), "token-mean",
                                                        cfg)[0],
        x["logp"],
    )
    loss, grad = _grad(
        lambda lp: gt.cispo_loss(lp, x["old"], x["adv"], x["mask"], clip_min=0.8, clip_max=1.28).loss, x["logp"]
    )
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize(
    "mode, level, threshold",
    [("token-truncate", "token", 2.0), ("sequence-truncate", "sequence", 2.0), ("token-mask", "token", "0.5_5.0")],
)
def test_rollout_correction_equals_verl(mode, level, threshold) -> None:
    """rollout_is with its default bounds equals verl's decoupled correction weights at its defaults (TIS cap 2,
    IcePop band 0.5-5), applied as verl applies them (a factor on each element's loss)."""
    x = _inputs(4, per_sequence=False, scale=0.3)
    log_ratio = x["old"] - x["rollout"]
    weights, _ = rollout_corr.compute_rollout_correction_weights(
        log_ratio, x["mask"].double(), rollout_is=level, rollout_is_threshold=threshold
    )
    ref_loss, ref_grad = _grad(
        lambda lp: gt.gipo_loss(lp, x["old"], x["adv"], x["mask"], behavior_weights=weights, with_metrics=False).loss,
        x["logp"],
    )
    loss, grad = _grad(
        lambda lp: gt.gipo_loss(lp, x["old"], x["adv"], x["mask"], rollout_logp=x["rollout"], rollout_is=mode,
                                with_metrics=False).loss,
        x["logp"],
    )
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-12, atol=1e-14)
