"""The torchrl plug-in: a PPO loop on CartPole through torchrl's gym wrapper, and equality with ClipPPOLoss.

Oracles: torchrl's own ``ClipPPOLoss`` on the same tensordict (PPO-clip settings: loss values and gradients),
and direct gipo-core calls on the log-probabilities torchrl's actor gives (every objective and aggregation).
"""

from __future__ import annotations

import pytest
import torch
from tensordict.nn import TensorDictModule
from torch import nn
from torchrl.collectors import Collector
from torchrl.envs import GymEnv
from torchrl.modules import MLP, ProbabilisticActor, ValueOperator
from torchrl.objectives import ClipPPOLoss
from torchrl.objectives.value import GAE

import gipo_core.torch as gt
from gipo_core import AGG_MODES, METRIC_NAMES
from gipo_core.integrations.torchrl import OBJECTIVE_NAMES, GIPOPPOLoss

#: (objective, options) for every objective, with options off their defaults.
OBJECTIVE_CASES = [
    ("gipo", {"sigma": 0.5, "sigma_neg": 0.3}),
    ("gipo", {"kernel": "laplace"}),
    ("ppo_clip", {"clip_low": 0.2, "clip_high": 0.28, "dual_clip": 3.0}),
    ("no_clip", {}),
    ("sapo", {"tau_pos": 1.0, "tau_neg": 2.0}),
    ("cispo", {"clip_max": 1.2}),
]
CASE_IDS = [name + "".join(f"-{k}={v}" for k, v in opts.items()) for name, opts in OBJECTIVE_CASES]
TORCHRL_KEYS = ("loss_objective", "loss_critic", "loss_entropy", "entropy", "clip_fraction", "ESS", "kl_approx")


def make_env(seed=0):
    env = GymEnv("CartPole-v1")
    env.set_seed(seed)
    return env


def make_agent(env, seed=0):
    """A categorical actor writing ``action_log_prob`` and a value network, both small MLPs."""
    torch.manual_seed(seed)
    n_obs = env.observation_spec["observation"].shape[-1]
    n_act = env.action_spec.shape[-1]
    logits = TensorDictModule(
        MLP(in_features=n_obs, out_features=n_act, num_cells=[32]), in_keys=["observation"], out_keys=["logits"]
    )
    actor = ProbabilisticActor(
        logits,
        in_keys=["logits"],
        distribution_class=torch.distributions.OneHotCategorical,
        spec=env.action_spec,
        return_log_prob=True,
    )
    critic = ValueOperator(MLP(in_features=n_obs, out_features=1, num_cells=[32]), in_keys=["observation"])
    return actor, critic


@pytest.fixture(scope="module")
def batch():
    """One collected CartPole batch with GAE advantages, and an actor moved away from the one that collected
    it (so that ratios leave the clip band: the comparison with ClipPPOLoss must exercise the clip)."""
    env = make_env()
    actor, critic = make_agent(env)
    collector = Collector(env, actor, frames_per_batch=128, total_frames=128, auto_register_policy_transforms=False)
    data = next(iter(collector))
    collector.shutdown()
    with torch.no_grad():
        GAE(gamma=0.99, lmbda=0.95, value_network=critic)(data)
        generator = torch.Generator().manual_seed(1)
        for p in actor.parameters():
            p.add_(0.5 * torch.randn(p.shape, generator=generator))
    return actor, critic, data


def grads(loss, params):
    return torch.autograd.grad(loss, params, retain_graph=True)


@pytest.mark.parametrize(("objective", "options"), OBJECTIVE_CASES, ids=CASE_IDS)
def test_ppo_loop_on_cartpole_trains_with_every_objective(objective, options):
    env = make_env()
    actor, critic = make_agent(env)
    collector = Collector(
        env, actor, frames_per_batch=64, total_frames=64 * 3, auto_register_policy_transforms=False
    )
    advantage = GAE(gamma=0.99, lmbda=0.95, value_network=critic)
    loss_module = GIPOPPOLoss(actor, critic, objective=objective, options=options, entropy_coeff=0.01)
    optimizer = torch.optim.Adam(loss_module.parameters(), lr=3e-3)
    before = [p.detach().clone() for p in loss_module.parameters()]
    for data in collector:
        with torch.no_grad():
            advantage(data)
        for _ in range(2):
            losses = loss_module(data)
            loss = losses["loss_objective"] + losses["loss_critic"] + losses["loss_entropy"]
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        collector.update_policy_weights_()
    collector.shutdown()
    assert set(TORCHRL_KEYS) | set(METRIC_NAMES) <= set(losses.keys())
    assert all(bool(torch.isfinite(v).all()) for v in losses.values()), dict(losses.items())
    assert losses["n_valid"].item() == 64
    changed = [not torch.equal(b, p.detach()) for b, p in zip(before, loss_module.parameters())]
    assert all(changed)


@pytest.mark.parametrize("clip", [0.2, (0.2, 0.28)], ids=["symmetric", "clip-higher"])
@pytest.mark.parametrize("masked", [False, True], ids=["no-mask", "shifted_valid"])
def test_ppo_clip_settings_equal_clip_ppo_loss(batch, clip, masked):
    actor, critic, data = batch
    if masked:  # torchrl's own validity mask: both modules must leave the same elements out
        data = data.clone()
        data["shifted_valid"] = torch.arange(data.numel()) % 5 != 0
    low, high = (clip, clip) if isinstance(clip, float) else clip
    reference = ClipPPOLoss(actor, critic, clip_epsilon=clip, entropy_coeff=0.01)
    module = GIPOPPOLoss(
        actor, critic, objective="ppo_clip", options={"clip_low": low, "clip_high": high}, entropy_coeff=0.01
    )
    expected, got = reference(data), module(data)
    for key in ("loss_objective", "loss_critic", "loss_entropy", "entropy", "explained_variance"):
        torch.testing.assert_close(got[key], expected[key], rtol=1e-6, atol=1e-7)
    if not masked:  # torchrl reports these over every element, gipo-core over the valid ones
        for key in ("kl_approx", "max_ratio", "mean_ratio"):
            torch.testing.assert_close(got[key], expected[key], rtol=1e-6, atol=1e-7)
    assert expected["clip_fraction"] > 0.1  # the clip is active on a good part of the batch
    params = list(actor.parameters()) + list(critic.parameters())
    for key in ("loss_objective",):
        g_expected = grads(expected[key], list(actor.parameters()))
        g_got = grads(got[key], list(actor.parameters()))
        for a, b in zip(g_got, g_expected):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    total = [sum(out[k] for k in ("loss_objective", "loss_critic", "loss_entropy")) for out in (got, expected)]
    for a, b in zip(grads(total[0], params), grads(total[1], params)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_clip_fraction_counts_what_the_clip_silences(batch):
    # torchrl's ClipPPOLoss counts every ratio outside the band; the plug-in's clip_fraction is gipo-core's
    # low_weight_frac: the elements whose gradient the clip sets to zero (the band on the advantage's side).
    actor, critic, data = batch
    module = GIPOPPOLoss(actor, critic, objective="ppo_clip")
    out = module(data)
    with torch.no_grad():
        ratio = torch.exp(actor.get_dist(data).log_prob(data["action"]) - data["action_log_prob"])
        adv = data["advantage"].squeeze(-1)
        silenced = ((ratio > 1.2) & (adv > 0)) | ((ratio < 0.8) & (adv < 0))
    torch.testing.assert_close(out["clip_fraction"], silenced.float().mean())
    assert out["clip_fraction"] < ClipPPOLoss(actor, critic)(data)["clip_fraction"]


def test_no_clip_ess_is_torchrls_ess(batch):
    actor, critic, data = batch
    got = GIPOPPOLoss(actor, critic, objective="no_clip")(data)
    torch.testing.assert_close(got["ESS"], ClipPPOLoss(actor, critic)(data)["ESS"], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("agg", AGG_MODES)
@pytest.mark.parametrize(("objective", "options"), OBJECTIVE_CASES, ids=CASE_IDS)
def test_loss_objective_is_the_gipo_core_call_on_torchrls_log_probs(batch, objective, options, agg):
    # A (8, 16) batch: the last axis is the time axis of the sequence aggregations; a global denominator.
    actor, critic, flat = batch
    data = flat.reshape(8, 16)
    data["shifted_valid"] = torch.arange(16).expand(8, 16) < torch.tensor([16, 3, 9, 16, 1, 12, 16, 7])[:, None]
    module = GIPOPPOLoss(actor, critic, objective=objective, options=options, agg=agg, denominator=40.0)
    out = module(data)
    logp = actor.get_dist(data).log_prob(data["action"])
    fn = getattr(gt, f"{objective}_loss")
    expected = fn(
        logp, data["action_log_prob"], data["advantage"].squeeze(-1), data["shifted_valid"], agg=agg,
        denominator=40.0, **options,
    )
    torch.testing.assert_close(out["loss_objective"], expected.loss)
    for name in METRIC_NAMES:
        torch.testing.assert_close(out[name], expected.metrics[name])
    for a, b in zip(grads(out["loss_objective"], list(actor.parameters())), grads(expected.loss, list(actor.parameters()))):
        torch.testing.assert_close(a, b)


def test_denominator_is_an_attribute_set_per_step(batch):
    actor, critic, data = batch
    module = GIPOPPOLoss(actor, critic, objective="no_clip")
    local = module(data)["loss_objective"]
    module.denominator = 2.0 * data.numel()  # e.g. the global count of two equal ranks
    torch.testing.assert_close(module(data)["loss_objective"], local / 2)


def test_with_metrics_false_returns_only_the_losses(batch):
    actor, critic, data = batch
    out = GIPOPPOLoss(actor, critic, with_metrics=False)(data)
    assert set(out.keys()) == {"loss_objective", "loss_critic", "loss_entropy", "entropy", "explained_variance"}


def test_the_objectives_are_gipo_cores():
    assert OBJECTIVE_NAMES == ("gipo", "ppo_clip", "no_clip", "sapo", "cispo")
    assert {name for name, _ in OBJECTIVE_CASES} == set(OBJECTIVE_NAMES)


def test_bad_arguments_are_named(batch):
    actor, critic, data = batch
    with pytest.raises(ValueError, match="`GIPOPPOLoss`: `objective` must be one of"):
        GIPOPPOLoss(actor, critic, objective="grpo")
    with pytest.raises(TypeError, match="sigmaa"):
        GIPOPPOLoss(actor, critic, options={"sigmaa": 1.0})
    with pytest.raises(ValueError, match="sigma"):
        GIPOPPOLoss(actor, critic, options={"sigma": -1.0})
    with pytest.raises(ValueError, match="agg"):
        GIPOPPOLoss(actor, critic, agg="mean")
    with pytest.raises(TypeError, match="`GIPOPPOLoss`: unexpected keyword argument.*sigma"):
        GIPOPPOLoss(actor, critic, sigma=1.0)  # ClipPPOLoss would drop it silently
    with pytest.raises(TypeError, match="`options` must be a mapping"):
        GIPOPPOLoss(actor, critic, options=1.0)
    with pytest.raises(ValueError, match="reduction='none'"):
        GIPOPPOLoss(actor, critic, reduction="none")
    with pytest.raises(ValueError, match="`clip_epsilon` only sets the value-clip threshold"):
        GIPOPPOLoss(actor, critic, objective="ppo_clip", clip_epsilon=0.1)  # would leave the policy clip at 0.2
    GIPOPPOLoss(actor, critic, clip_epsilon=0.1, clip_value=True)  # the value clip: allowed
    with pytest.raises(ValueError, match="delay_actor"):
        GIPOPPOLoss(actor, critic, delay_actor=True)
    with pytest.raises(ValueError, match="max_importance_ratio"):
        GIPOPPOLoss(actor, critic, max_importance_ratio=10.0)
    bad = data.clone()
    bad["advantage"] = bad["advantage"].expand(-1, 3).clone()
    with pytest.raises(ValueError, match=r"`GIPOPPOLoss`: the advantage has shape \(128, 3\)"):
        GIPOPPOLoss(actor, critic)(bad)


def test_importing_the_package_does_not_import_torchrl():
    import subprocess
    import sys

    code = "import sys, gipo_core, gipo_core.integrations; print('torchrl' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "False\n"


@pytest.mark.parametrize("with_metrics", [True, False])
def test_out_keys_are_the_keys_of_the_output(batch, with_metrics):
    actor, critic, data = batch
    module = GIPOPPOLoss(actor, critic, objective="sapo", with_metrics=with_metrics)
    assert set(module.out_keys) == set(module(data).keys())
