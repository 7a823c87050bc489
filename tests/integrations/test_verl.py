"""gipo-core's objectives in verl's policy-loss registry, against the real verl package.

Runs in the verl test environment (verl pins tensordict<=0.10, which torchrl cannot share): see
tests/integrations/conftest.py and the README's test command.
"""

from __future__ import annotations

import importlib
import json
import os
import pathlib
import re
import subprocess
import sys

import pytest
import torch
from omegaconf import OmegaConf
from tensordict import TensorDict
from verl.trainer.ppo import core_algos
from verl.utils import tensordict_utils
from verl.utils.metric import AggregationType, Metric
from verl.workers.config import ActorConfig
from verl.workers.utils.losses import ppo_loss

import gipo_core
import gipo_core.torch as gt
from gipo_core.integrations import verl as gv

VERL_MODES = ("token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")
README = pathlib.Path(__file__).resolve().parents[2] / "README.md"


def actor_config(loss_mode: str, options: dict | None = None, **fields) -> ActorConfig:
    """verl's actor config as its workers build it, with gipo-core options under policy_loss."""
    policy_loss = gv.policy_loss_config(loss_mode=loss_mode, **(options or {}))
    return ActorConfig(strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=1, policy_loss=policy_loss, **fields)


def make_batch(seed: int, rows: int = 7, time: int = 9, dtype=torch.float64):
    """Uneven response lengths (one empty row), log-ratios wide enough to clip and dual-clip, IS weights."""
    g = torch.Generator().manual_seed(seed)
    log_prob = (torch.randn(rows, time, generator=g, dtype=dtype) * 0.3 - 1.0).requires_grad_()
    log_ratio = torch.randn(rows, time, generator=g, dtype=dtype) * 0.6
    log_ratio[0, :3] = torch.tensor([1.4, -1.3, 2.0], dtype=dtype)  # rho 4.1, 0.27, 7.4: past c = 3 and below 0.8
    old_log_prob = log_prob.detach() - log_ratio
    advantages = torch.randn(rows, time, generator=g, dtype=dtype)
    advantages[0, :3] = -1.0
    lengths = torch.randint(1, time + 1, (rows,), generator=g)
    lengths[2] = 0
    mask = torch.arange(time)[None, :] < lengths[:, None]
    weights = torch.rand(rows, time, generator=g, dtype=dtype) * 1.5 + 0.25
    return log_prob, old_log_prob, advantages, mask, weights


def shards(mask: torch.Tensor, dp: int) -> list[slice]:
    """Uneven data-parallel row shards: rank 0 gets 2 rows, the rest share the others."""
    if dp == 1:
        return [slice(None)]
    return [slice(0, 2), slice(2, None)]


def global_info(mask: torch.Tensor, dp: int, loss_scale_factor=None) -> dict:
    """verl's global_batch_info for a mini-batch split over dp ranks (as verl's ppo_loss fills it: the token
    count all-reduced over ranks, the mini-batch's sequence count, the actor's loss_scale_factor)."""
    return {
        "dp_size": dp,
        "batch_num_tokens": int(mask.sum()),
        "global_batch_size": mask.shape[0],
        "loss_scale_factor": loss_scale_factor,
    }


def run_loss(name, config, log_prob, old_log_prob, advantages, mask, mode, weights):
    """One rank's loss and its gradient wrt log_prob, through verl's registry."""
    lp = log_prob.detach().clone().requires_grad_()
    fn = core_algos.get_policy_loss_fn(name)
    loss, metrics = fn(old_log_prob, lp, advantages, mask, mode, config, weights)
    loss.backward()
    return loss.detach(), lp.grad, metrics


def literal_gipo(log_prob, old_log_prob, advantages, sigma, sigma_neg):
    """The GIPO per-token loss as written in trainers: -stopgrad(w) * rho * A, w Gaussian in log rho."""
    ell = log_prob - old_log_prob
    s = torch.where(advantages > 0, torch.full_like(ell, sigma), torch.full_like(ell, sigma_neg))
    w = torch.exp(-(ell.detach() ** 2) / (2 * s**2))
    return -w * torch.exp(ell) * advantages


# ------------------------------------------------------------------------------------------- registration


def test_every_objective_registered_under_its_loss_mode():
    assert set(gv.LOSS_MODES) == {"gipo", "gipo_core_ppo_clip", "gipo_core_no_clip", "gipo_core_sapo", "gipo_core_cispo"}
    for mode in gv.LOSS_MODES:
        assert core_algos.get_policy_loss_fn(mode).__module__ == "gipo_core.integrations.verl"
    # verl's own losses are left alone
    assert core_algos.get_policy_loss_fn("vanilla") is core_algos.compute_policy_loss_vanilla
    assert core_algos.get_policy_loss_fn("sapo") is core_algos.compute_policy_loss_sapo


def test_a_fresh_interpreter_that_only_imports_verl_finds_the_losses():
    """What a Ray worker does: import verl, whose plug-in loader imports gipo-core's module via the
    `verl.plugins` entry point. No gipo-core import, no environment variable."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("VERL_USE_EXTERNAL")}
    code = (
        "import json, sys, verl\n"
        "from verl.trainer.ppo.core_algos import POLICY_LOSS_REGISTRY as R\n"
        "print(json.dumps({'losses': {k: R[k].__module__ for k in R},"
        " 'gipo_core': getattr(sys.modules.get('gipo_core'), '__file__', None)}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    found = json.loads(out.stdout.strip().splitlines()[-1])
    for mode in gv.LOSS_MODES:
        assert found["losses"].get(mode) == "gipo_core.integrations.verl", (mode, found["losses"])
    # the entry point resolved to the gipo-core under test, not another installed copy
    assert found["gipo_core"] == gipo_core.__file__


def test_importing_without_verl_names_the_extra(monkeypatch):
    monkeypatch.delitem(sys.modules, "gipo_core.integrations.verl")
    monkeypatch.setitem(sys.modules, "verl.trainer.ppo", None)
    with pytest.raises(ImportError, match=r"gipo-core\[verl\]"):
        importlib.import_module("gipo_core.integrations.verl")


# -------------------------------------------------------------------------- GIPO under verl's normalisation


@pytest.mark.parametrize("dp", [1, 2])
@pytest.mark.parametrize("mode", VERL_MODES)
def test_gipo_is_gipo_core_under_verls_normalisation(mode, dp):
    """Each rank's loss and gradient are verl's agg_loss of GIPO's per-token loss; averaged over the ranks
    (data-parallel gradient averaging) they are one direct gipo-core call on the whole batch."""
    sigma, sigma_neg = 0.7, 0.4
    log_prob, old, adv, mask, weights = make_batch(1)
    config = actor_config("gipo", {"sigma": sigma, "sigma_neg": sigma_neg}, loss_agg_mode=mode)
    info = global_info(mask, dp, loss_scale_factor=12 if dp == 2 else None)
    losses, grads = [], torch.zeros_like(log_prob)
    for rows in shards(mask, dp):
        config.global_batch_info.clear()
        if dp > 1 or mode == "token-mean":
            config.global_batch_info.update(info)
        loss, grad, _ = run_loss("gipo", config, log_prob[rows], old[rows], adv[rows], mask[rows], mode, weights[rows])
        # verl's own aggregation of the literal per-token loss, with the same global_batch_info
        lp = log_prob[rows].detach().clone().requires_grad_()
        ref = core_algos.agg_loss(
            literal_gipo(lp, old[rows], adv[rows], sigma, sigma_neg) * weights[rows],
            mask[rows],
            mode,
            **config.global_batch_info,
        )
        ref.backward()
        torch.testing.assert_close(loss, ref.detach(), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(grad, lp.grad, rtol=1e-12, atol=1e-12)
        losses.append(loss)
        grads[rows] = grad / dp  # what DDP / FSDP averaging leaves of this rank's gradient
    # the whole batch in one direct gipo-core call, normalised by the whole batch's count
    agg, denominator = {
        "token-mean": ("token-mean", None),
        "token-sum": ("token-mean", 1.0),
        "seq-mean-token-sum": ("seq-mean-token-sum", mask.shape[0] if dp > 1 else None),
        "seq-mean-token-mean": ("seq-mean-token-mean", mask.shape[0] if dp > 1 else None),
        "seq-mean-token-sum-norm": (
            "seq-mean-token-sum-norm",
            mask.shape[0] * 12 if dp > 1 else int((mask.sum(-1) > 0).sum()) * mask.shape[-1],
        ),
    }[mode]
    lp = log_prob.detach().clone().requires_grad_()
    direct = gt.gipo_loss(
        lp, old, adv, mask, sigma=sigma, sigma_neg=sigma_neg, agg=agg, denominator=denominator,
        behavior_weights=weights,
    )
    direct.loss.backward()
    torch.testing.assert_close(torch.stack(losses).mean(), direct.loss.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grads, lp.grad, rtol=1e-12, atol=1e-12)


def test_float32_and_float_mask_as_verl_passes_them():
    log_prob, old, adv, mask, weights = make_batch(2, dtype=torch.float32)
    config = actor_config("gipo", {"sigma": 0.5})
    loss, grad, _ = run_loss("gipo", config, log_prob, old, adv, mask.float(), "token-mean", weights)
    direct = gt.gipo_loss(log_prob, old, adv, mask, sigma=0.5, behavior_weights=weights)
    assert loss.dtype == torch.float32 and grad.dtype == torch.float32
    torch.testing.assert_close(loss, direct.loss.detach())


# ---------------------------------------------------------------------------- PPO-clip against verl vanilla


@pytest.mark.parametrize("with_weights", [False, True])
@pytest.mark.parametrize("dp", [1, 2])
@pytest.mark.parametrize("mode", VERL_MODES)
def test_ppo_clip_equals_verls_vanilla(mode, dp, with_weights):
    """Same actor config (clip_ratio_low/high, clip_ratio_c), same inputs: verl's `vanilla` and gipo-core's
    PPO-clip give the same loss, gradient and verl metrics."""
    log_prob, old, adv, mask, weights = make_batch(3)
    weights = weights if with_weights else None
    config = actor_config("gipo_core_ppo_clip", clip_ratio_low=0.2, clip_ratio_high=0.28, clip_ratio_c=3.0,
                          loss_agg_mode=mode)
    info = global_info(mask, dp, loss_scale_factor=16 if dp == 2 else None)
    dual_clipped = []
    for rows in shards(mask, dp):
        config.global_batch_info.clear()
        if dp > 1:
            config.global_batch_info.update(info)
        args = (log_prob[rows], old[rows], adv[rows], mask[rows], mode, None if weights is None else weights[rows])
        ours, our_grad, our_metrics = run_loss("gipo_core_ppo_clip", config, *args)
        theirs, their_grad, their_metrics = run_loss("vanilla", config, *args)
        torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(our_grad, their_grad, rtol=1e-12, atol=1e-12)
        for key in ("actor/pg_clipfrac", "actor/ppo_kl", "actor/pg_clipfrac_lower"):
            assert our_metrics[key] == pytest.approx(their_metrics[key], rel=1e-6, abs=1e-7), key
        dual_clipped.append(their_metrics["actor/pg_clipfrac_lower"])
    assert dual_clipped[0] > 0  # the dual clip acted (row 0 has rho > c with A < 0)


def through_verls_ppo_loss(loss_mode, log_prob, old_log_prob, advantages, mask, weights, mode, batch_info):
    """verl's actor loss (``verl.workers.utils.losses.ppo_loss``) on a micro-batch as its engine hands it over:
    the model's log-probs flat over prompt + response tokens, global counts as non-tensor data."""
    rows, time = mask.shape
    prompt = 2
    lp = log_prob.detach().clone().requires_grad_()
    # verl reads the log-prob of response token t at flat position prompt - 1 + t of its sequence
    before, after = torch.zeros(prompt - 1, dtype=lp.dtype), torch.zeros(1, dtype=lp.dtype)
    flat = torch.cat([torch.cat([before, lp[i, : int(n)], after]) for i, n in enumerate(mask.sum(-1))])
    data = TensorDict(
        {
            "prompts": torch.ones(rows, prompt, dtype=torch.long),
            "responses": torch.ones(rows, time, dtype=torch.long),
            "attention_mask": torch.cat([torch.ones(rows, prompt, dtype=torch.long), mask.long()], -1),
            "response_mask": mask.long(),
            "old_log_probs": old_log_prob,
            "advantages": advantages,
            "rollout_is_weights": weights,
        },
        batch_size=[rows],
    )
    tensordict_utils.assign_non_tensor(data, **batch_info)
    config = actor_config(loss_mode, loss_agg_mode=mode, clip_ratio_high=0.28)
    loss, metrics = ppo_loss(config, {"log_probs": flat}, data)
    loss.backward()
    return loss.detach(), lp.grad, {k: v.aggregate() for k, v in metrics.items()}


@pytest.mark.parametrize("mode", VERL_MODES)
def test_ppo_clip_equals_vanilla_through_verls_actor_loss(mode):
    """The call site verl's workers use: the global counts verl puts in the micro-batch reach the loss, and
    verl's metric bookkeeping takes the plug-in's metrics."""
    log_prob, old, adv, mask, weights = make_batch(12)
    info = {"dp_size": 2, "batch_num_tokens": int(mask.sum()) + 5, "global_batch_size": 12}  # rank 0 of 2
    ours, our_grad, our_metrics = through_verls_ppo_loss("gipo_core_ppo_clip", log_prob, old, adv, mask, weights, mode, info)
    theirs, their_grad, their_metrics = through_verls_ppo_loss("vanilla", log_prob, old, adv, mask, weights, mode, info)
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(our_grad, their_grad, rtol=1e-12, atol=1e-12)
    for key, value in their_metrics.items():
        assert our_metrics[key] == pytest.approx(value, rel=1e-6, abs=1e-7), key
    assert "actor/gipo_core/weight_mean" in our_metrics


def test_sapo_equals_verls_sapo():
    """verl's `sapo` always aggregates with seq-mean-token-mean; with that mode and the actor's tau_pos and
    tau_neg, gipo-core's SAPO is the same loss."""
    log_prob, old, adv, mask, weights = make_batch(4)
    config = actor_config("gipo_core_sapo", tau_pos=1.0, tau_neg=1.05, loss_agg_mode="seq-mean-token-mean")
    args = (log_prob, old, adv, mask, "seq-mean-token-mean", weights)
    ours, our_grad, _ = run_loss("gipo_core_sapo", config, *args)
    theirs, their_grad, _ = run_loss("sapo", config, *args)
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(our_grad, their_grad, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------------------------------------- options


def test_policy_loss_options_override_the_actors_settings():
    log_prob, old, adv, mask, _ = make_batch(5)
    config = actor_config("gipo_core_ppo_clip", {"clip_high": 0.5, "dual_clip": None}, clip_ratio_high=0.28)
    loss, _, metrics = run_loss("gipo_core_ppo_clip", config, log_prob, old, adv, mask, "token-mean", None)
    direct = gt.ppo_clip_loss(log_prob, old, adv, mask, clip_low=0.2, clip_high=0.5, dual_clip=None)
    torch.testing.assert_close(loss, direct.loss.detach(), rtol=1e-12, atol=1e-12)
    assert metrics.get("actor/pg_clipfrac_lower", 0.0) == 0.0


def test_options_are_read_from_the_gipo_core_signature(monkeypatch):
    """An option gipo-core adds later reaches the loss with no change to the plug-in."""
    seen = {}
    real = gt.gipo_loss

    def gipo_loss(logp, old_logp, advantages, mask=None, *, sigma=1.0, new_option=None, agg="token-mean",
                  denominator=None, behavior_weights=None, with_metrics=True):
        seen["new_option"] = new_option
        return real(logp, old_logp, advantages, mask, sigma=sigma, agg=agg, denominator=denominator,
                    behavior_weights=behavior_weights, with_metrics=with_metrics)

    monkeypatch.setattr(gt, "gipo_loss", gipo_loss)
    config = actor_config("gipo", {"new_option": 3, "sigma": 0.5})
    log_prob, old, adv, mask, _ = make_batch(6)
    loss, _ = gv.make_policy_loss("gipo")(old, log_prob, adv, mask, "token-mean", config)
    assert seen == {"new_option": 3}
    torch.testing.assert_close(loss, real(log_prob, old, adv, mask, sigma=0.5).loss)


def test_an_unknown_key_is_a_clear_error():
    with pytest.raises(TypeError, match=r"unknown key\(s\) sigmaa .*sigma"):
        gv.policy_loss_config(loss_mode="gipo", sigmaa=0.5)


def test_an_option_the_objective_does_not_take_is_a_clear_error():
    config = actor_config("gipo_core_ppo_clip", {"sigma": 0.5})
    log_prob, old, adv, mask, _ = make_batch(7)
    with pytest.raises(TypeError, match=r"gipo_core_ppo_clip.*sigma.*ppo_clip_loss"):
        core_algos.get_policy_loss_fn("gipo_core_ppo_clip")(old, log_prob, adv, mask, "token-mean", config)


def test_rollout_correction_options_point_to_verls_own():
    with pytest.raises(TypeError, match=r"rollout_is.*algorithm\.rollout_correction"):
        gv.policy_loss_config(loss_mode="gipo", rollout_is="token-truncate")


def test_a_dictconfig_actor_config_works_too():
    """verl's losses also accept a plain OmegaConf actor config; gipo-core options are then its keys."""
    log_prob, old, adv, mask, _ = make_batch(8)
    config = OmegaConf.create({"policy_loss": {"loss_mode": "gipo", "sigma": 0.3}, "global_batch_info": {}})
    loss, _ = core_algos.get_policy_loss_fn("gipo")(old, log_prob, adv, mask, "token-mean", config)
    torch.testing.assert_close(loss, gt.gipo_loss(log_prob, old, adv, mask, sigma=0.3).loss)


def test_data_parallel_without_global_counts_is_an_error_as_in_verl():
    log_prob, old, adv, mask, _ = make_batch(9)
    config = actor_config("gipo")
    config.global_batch_info.update({"dp_size": 2})
    for mode in ("token-mean", "seq-mean-token-mean"):
        with pytest.raises(ValueError, match="dp_size"):
            core_algos.agg_loss(log_prob, mask, mode, **config.global_batch_info)
        with pytest.raises(ValueError, match="dp_size 2"):
            core_algos.get_policy_loss_fn("gipo")(old, log_prob, adv, mask, mode, config)


def test_the_readme_override_configures_the_loss():
    """The override in the README's verl section, through verl's Hydra config and its dataclass conversion
    (what each worker does), gives the loss those options."""
    import hydra
    from verl.utils.config import omega_conf_to_dataclass

    section = README.read_text().split("## verl", 1)[1].split("\n## ", 1)[0]
    block = next(b for b in re.findall(r"```bash\n(.*?)```", section, re.S) if "policy_loss._target_" in b)
    overrides = [t for t in block.replace("\\\n", " ").split() if "actor_rollout_ref.actor.policy_loss" in t]
    assert any(t.startswith("+actor_rollout_ref.actor.policy_loss.") for t in overrides), overrides
    config_dir = str(pathlib.Path(core_algos.__file__).resolve().parents[1] / "config")
    with hydra.initialize_config_dir(config_dir=config_dir, version_base=None):
        cfg = hydra.compose(
            config_name="ppo_trainer", overrides=overrides + ["actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=1"]
        )
    actor = omega_conf_to_dataclass(cfg.actor_rollout_ref.actor)
    assert isinstance(actor.policy_loss, gv.PolicyLossConfig)
    options = gv.gipo_core_options("gipo", actor)
    assert options and set(options) <= {"sigma", "sigma_neg", "kernel"}
    log_prob, old, adv, mask, _ = make_batch(10, dtype=torch.float32)
    name = actor.policy_loss.loss_mode
    loss, _ = core_algos.get_policy_loss_fn(name)(old, log_prob, adv, mask, actor.loss_agg_mode, actor)
    torch.testing.assert_close(loss, gt.gipo_loss(log_prob, old, adv, mask, **options).loss)


# ------------------------------------------------------------------------------------------------- metrics


def test_metrics_are_verls_names_and_gipo_cores_as_floats():
    log_prob, old, adv, mask, _ = make_batch(11)
    config = actor_config("gipo")
    _, _, metrics = run_loss("gipo", config, log_prob, old, adv, mask, "token-mean", None)
    direct = gt.gipo_loss(log_prob, old, adv, mask).metrics
    assert {"actor/pg_clipfrac", "actor/ppo_kl"} <= set(metrics)
    for key, value in direct.items():
        assert metrics["actor/gipo_core/" + key] == pytest.approx(float(value), rel=1e-12)
    assert all(type(v) is float for v in metrics.values())
    assert metrics["actor/ppo_kl"] == pytest.approx(float(direct["kl_k1"]))
    assert metrics["actor/pg_clipfrac"] == pytest.approx(float(direct["low_weight_frac"]))
    # verl's own bookkeeping takes them as they are
    reduced = Metric.from_dict(metrics, aggregation=AggregationType.MEAN)
    assert reduced["actor/ppo_kl"].aggregate() == pytest.approx(metrics["actor/ppo_kl"])


@pytest.mark.parametrize("dp_size", [0, 1.5, True, "2"])
def test_a_bad_dp_size_is_a_clear_error(dp_size):
    mask = torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="dp_size must be an int >= 1"):
        gv.verl_denominator("token-mean", mask, dp_size=dp_size, batch_num_tokens=6)


def test_module_docstring_examples():
    """The plug-in's doctests run here, where verl is installed (the main run's doctest test leaves it out)."""
    from test_readme import check_doctests

    check_doctests("gipo_core.integrations.verl")
