"""gipo-core's objectives as a torchrl loss module: :class:`GIPOPPOLoss`, a drop-in for ``ClipPPOLoss``.

Install with ``pip install "gipo-core[torchrl]"``. The module subclasses torchrl's
:class:`~torchrl.objectives.ClipPPOLoss`, as torchrl's own PPO variants do, and keeps everything of it that
is not the policy objective: the actor and critic handling (functional parameters, composite action heads),
the value estimator (GAE by default) that fills ``"advantage"`` when the input lacks it, advantage
normalisation, the entropy bonus, the critic loss (with value clipping), torchrl's validity masks and its
tensordict keys. Only ``loss_objective`` is replaced: one call to a gipo-core loss function with

    logp         the current policy's log-probability of the stored action (``dist.log_prob(action)``)
    old_logp     the ``sample_log_prob`` entry (``"action_log_prob"`` with torchrl's defaults)
    advantages   the ``advantage`` entry, its trailing feature axis of size 1 dropped
    mask         the validity masks torchrl's own reduction reads (``loss_mask_key``, by default
                 ``("collector", "mask")`` and ``"shifted_valid"`` where present)

Nothing here computes a loss or a diagnostic: those come from gipo-core (the objective and its metrics) or
from torchrl (entropy, critic).

Examples
--------
>>> from gipo_core.integrations.torchrl import GIPOPPOLoss
>>> loss_module = GIPOPPOLoss(actor, critic, objective="gipo", options={"sigma": 1.0})  # doctest: +SKIP
>>> losses = loss_module(data)                                                          # doctest: +SKIP
>>> loss = losses["loss_objective"] + losses["loss_critic"] + losses["loss_entropy"]   # doctest: +SKIP
"""

from __future__ import annotations

import inspect
from typing import Any, Mapping

try:
    import torch
    from tensordict import TensorDict, TensorDictBase, is_tensor_collection
    from tensordict.nn import dispatch
    from torchrl.objectives import ClipPPOLoss, PPOLoss
    from torchrl.objectives.utils import _maybe_get_or_select, _sum_td_features
except ImportError as err:  # pragma: no cover - the message is the point
    raise ImportError(
        f"gipo_core.integrations.torchrl needs torchrl and tensordict ({err}); "
        "install them with: pip install 'gipo-core[torchrl]'"
    ) from err

import gipo_core.torch as _gt
from gipo_core._core.objectives import OBJECTIVES

__all__ = ["GIPOPPOLoss", "OBJECTIVE_NAMES"]

#: The objectives :class:`GIPOPPOLoss` accepts, each with its gipo-core function.
OBJECTIVE_NAMES = tuple(OBJECTIVES)

#: torchrl's output keys that carry a gipo-core diagnostic, and the diagnostic.
TORCHRL_METRIC_KEYS = {
    "clip_fraction": "low_weight_frac",
    "ESS": "ess",
    "kl_approx": "kl_k1",
    "max_ratio": "ratio_max",
    "mean_ratio": "ratio_mean",
}

_NAME = "GIPOPPOLoss"
_UNSUPPORTED = {
    "delay_actor": (False, "the proximal policy of PPO-EWMA is not mapped onto gipo-core"),
    "max_importance_ratio": (None, "use a gipo-core objective's own bound on the ratio instead"),
}
_PPO_KEYWORDS = frozenset(inspect.signature(ClipPPOLoss.__init__).parameters) | frozenset(
    inspect.signature(PPOLoss.__init__).parameters
)


class GIPOPPOLoss(ClipPPOLoss):
    """torchrl's PPO loss with its policy objective replaced by any gipo-core objective.

    Parameters
    ----------
    actor_network : ProbabilisticTensorDictSequential
        The policy, as for ``ClipPPOLoss``.
    critic_network : TensorDictModule, optional
        The value network, as for ``ClipPPOLoss``.
    objective : {'gipo', 'ppo_clip', 'no_clip', 'sapo', 'cispo'}, default 'gipo'
        The gipo-core objective computing ``loss_objective``.
    options : mapping, optional
        Keyword options of that objective, passed unchanged to its gipo-core function (``sigma``,
        ``sigma_neg``, ``kernel`` for GIPO; ``clip_low``, ``clip_high``, ``dual_clip`` for PPO-clip;
        ``tau_pos``, ``tau_neg`` for SAPO; ``clip_max`` for CISPO; and any further option the installed
        gipo-core has). Checked here, at construction.
    agg : str, default 'token-mean'
        gipo-core's aggregation of the per-element objective (see ``gipo_core.AGG_MODES``). The last axis of
        the batch is the time axis of the ``seq-mean-*`` modes; ``token-mean`` is torchrl's masked mean.
    denominator : float or 0-d Tensor, optional
        The global count to divide by under data parallelism or gradient accumulation (see gipo-core's
        loss functions). Also an attribute: set ``loss_module.denominator`` before each step.
    with_metrics : bool, default True
        Compute gipo-core's diagnostics (returned under their own names, and under torchrl's for
        ``clip_fraction``, ``ESS``, ``kl_approx``, ``max_ratio``, ``mean_ratio``). With False those keys are
        absent.
    **ppo_kwargs
        Every other keyword of ``ClipPPOLoss`` (``entropy_coeff``, ``critic_coeff``, ``loss_critic_type``,
        ``normalize_advantage``, ``clip_value``, ``separate_losses``, ``functional``, ``reduction``, ...).
        ``clip_epsilon`` only sets the value-clip threshold of ``clip_value=True`` (passed without it, it is an
        error: it would change nothing); the policy objective's clip is ``options``' ``clip_low`` /
        ``clip_high``. ``reduction`` applies to torchrl's entropy and
        critic terms; the objective is reduced by ``agg``.

    Returns
    -------
    TensorDict
        ``loss_objective`` (gipo-core's loss), ``loss_critic`` and ``loss_entropy`` (torchrl's, when enabled),
        ``entropy`` and ``explained_variance`` (torchrl's), ``clip_fraction``, ``ESS``, ``kl_approx``,
        ``max_ratio``, ``mean_ratio`` and gipo-core's diagnostics (``weight_mean``, ``ess``, ``kl_k3``, ...),
        all 0-d, the diagnostics detached.

    Raises
    ------
    ValueError
        An unknown ``objective``; an option gipo-core rejects; ``reduction='none'`` (the objective is one
        number); ``delay_actor=True`` or ``max_importance_ratio``; ``clip_epsilon`` without
        ``clip_value=True``.
    TypeError
        A keyword that neither this class nor ``ClipPPOLoss`` knows (torchrl would drop it silently), or an
        unknown option of the objective.

    Notes
    -----
    Where torchrl's conventions and gipo-core's differ:

    - ``clip_fraction`` is gipo-core's ``low_weight_frac``: the fraction of valid elements whose trust weight
      is below 1/2. For PPO-clip that is the fraction the clip silences (ratio out of the band *on the side
      the advantage pushes*); torchrl's ``ClipPPOLoss`` counts every ratio out of the band, whatever the
      advantage's sign, and counts masked elements too.
    - ``ESS`` is gipo-core's ``ess``, the effective sample size of the gradient multipliers ``u`` (a clipped
      element counts as weight 0); torchrl's is that of the ratios. They agree for ``no_clip``.
    - ``kl_approx``, ``max_ratio`` and ``mean_ratio`` have torchrl's definitions, taken over valid elements.
    - torchrl's optional ``delay_actor`` (PPO-EWMA) and ``max_importance_ratio`` are refused.
    """

    def __init__(
        self,
        actor_network: Any = None,
        critic_network: Any = None,
        *,
        objective: str = "gipo",
        options: Mapping[str, Any] | None = None,
        agg: str = "token-mean",
        denominator: float | torch.Tensor | None = None,
        with_metrics: bool = True,
        **ppo_kwargs: Any,
    ) -> None:
        unknown = sorted(set(ppo_kwargs) - _PPO_KEYWORDS - {"kwargs", "self"})
        if unknown:
            raise TypeError(
                f"`{_NAME}`: unexpected keyword argument(s) {', '.join(unknown)}; pass the objective's options "
                f"as `options={{...}}` and torchrl's as keywords of ClipPPOLoss"
            )
        for key, (default, why) in _UNSUPPORTED.items():
            if ppo_kwargs.get(key, default) != default:
                raise ValueError(f"`{_NAME}`: `{key}={ppo_kwargs[key]!r}` is not supported: {why}")
        if "clip_epsilon" in ppo_kwargs and ppo_kwargs.get("clip_value") is not True:
            raise ValueError(
                f"`{_NAME}`: `clip_epsilon` only sets the value-clip threshold of `clip_value=True` here; the "
                "policy objective's clip is `options={'clip_low': ..., 'clip_high': ...}` (objective='ppo_clip')"
            )
        if ppo_kwargs.get("reduction") == "none":
            raise ValueError(
                f"`{_NAME}`: `reduction='none'` is not supported: gipo-core reduces the objective by `agg` "
                "(use reduction='mean' or 'sum' for the entropy and critic terms)"
            )
        if objective not in OBJECTIVES:
            raise ValueError(f"`{_NAME}`: `objective` must be one of {OBJECTIVE_NAMES}; got {objective!r}")
        if options is not None and not isinstance(options, Mapping):
            raise TypeError(f"`{_NAME}`: `options` must be a mapping of option names to values; got {options!r}")
        super().__init__(actor_network, critic_network, **ppo_kwargs)
        self.objective = objective
        self.options = dict(options or {})
        self.agg = agg
        self.denominator = denominator
        self.with_metrics = with_metrics
        self._loss_fn = getattr(_gt, OBJECTIVES[objective].public_name)
        # gipo-core checks the options, agg and with_metrics on a one-element call, so a typo fails here; the
        # call also tells which diagnostics these options produce.
        zero = torch.zeros(1)
        probe = self._loss_fn(zero, zero, zero, agg=agg, with_metrics=with_metrics, **self.options)
        self._metric_names = tuple(probe.metrics)

    @property
    def out_keys(self) -> list:
        if self._out_keys is None:
            keys = ["loss_objective"]
            if self.entropy_bonus:
                keys.extend(["entropy", "loss_entropy"])
            if self._has_critic:
                keys.append("loss_critic")
                if self.log_explained_variance:
                    keys.append("explained_variance")
            if self.clip_value:
                keys.append("value_clip_fraction")
            keys.extend(key for key, name in TORCHRL_METRIC_KEYS.items() if name in self._metric_names)
            keys.extend(self._metric_names)
            self._out_keys = keys
        return self._out_keys

    @out_keys.setter
    def out_keys(self, values: list) -> None:
        self._out_keys = values

    def _log_probs(self, tensordict: TensorDictBase, adv_shape: torch.Size) -> tuple:
        """(logp, old_logp, dist): the current and stored log-probabilities of the action, joint over heads."""
        old_logp = _maybe_get_or_select(tensordict, self.tensor_keys.sample_log_prob, adv_shape)
        if old_logp is None:
            raise KeyError(f"`{_NAME}`: the input has no `{self.tensor_keys.sample_log_prob}` entry (old_logp)")
        if old_logp.requires_grad:
            raise RuntimeError(f"`{_NAME}`: the stored `{self.tensor_keys.sample_log_prob}` requires grad")
        logp, dist, _ = self._get_cur_log_prob(tensordict)
        # Composite action heads: the joint log-probability, as ClipPPOLoss sums them.
        logp, old_logp = (_sum_td_features(x) if is_tensor_collection(x) else x for x in (logp, old_logp))
        return logp, old_logp, dist

    def _advantages_for(self, advantage: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
        """torchrl's (*batch, 1) advantage in gipo-core's shape: that of ``logp``, or (..., 1) per sequence."""
        if advantage.shape == logp.shape + (1,):
            return advantage.squeeze(-1)
        if advantage.shape[-1] == 1 and advantage.shape[:-1] == logp.shape[:-1]:
            return advantage  # one advantage per row of a (..., time) batch
        raise ValueError(
            f"`{_NAME}`: the advantage has shape {tuple(advantage.shape)} but the log-probability "
            f"{tuple(logp.shape)}; expected {tuple(logp.shape) + (1,)} (torchrl's trailing feature axis) or "
            f"{tuple(logp.shape[:-1]) + (1,)} (one per sequence)"
        )

    def _valid_mask(self, tensordict: TensorDictBase, like: torch.Tensor) -> torch.Tensor | None:
        """The AND of the validity masks torchrl's own reduction would apply (``loss_mask_key``), or None."""
        mask = None
        for key in self._loss_mask_keys():
            entry = tensordict.get(key, default=None)
            if entry is not None:
                entry = self._expand_loss_mask(entry, like)
                mask = entry if mask is None else mask & entry
        return mask

    @dispatch
    def forward(self, tensordict: TensorDictBase) -> TensorDictBase:
        """The losses and diagnostics of one batch (see the class docstring for the keys)."""
        tensordict = tensordict.clone(False)
        advantage = tensordict.get(self.tensor_keys.advantage, None, as_padded_tensor=True)
        update_norm = advantage is None
        if advantage is None:
            if self.critic_network is None:
                raise RuntimeError(f"`{_NAME}`: no advantage in the input and no critic to compute it")
            self.value_estimator(
                tensordict,
                params=self._cached_critic_network_params_detached,
                target_params=self.target_critic_network_params,
            )
            advantage = tensordict.get(self.tensor_keys.advantage)
        advantage = self._maybe_normalize_advantage(advantage, tensordict, update_norm=update_norm)

        logp, old_logp, dist = self._log_probs(tensordict, advantage.shape[:-1])
        out = self._loss_fn(
            logp,
            old_logp,
            self._advantages_for(advantage, logp),
            self._valid_mask(tensordict, logp),
            agg=self.agg,
            denominator=self.denominator,
            with_metrics=self.with_metrics,
            **self.options,
        )
        td_out = TensorDict({"loss_objective": out.loss})
        metrics = {name: value.detach() for name, value in out.metrics.items()}
        for torchrl_key, name in TORCHRL_METRIC_KEYS.items():
            if name in metrics:
                td_out.set(torchrl_key, metrics[name])
        for name, value in metrics.items():
            td_out.set(name, value)

        if self.entropy_bonus:  # torchrl's entropy bonus, unchanged
            entropy = self._get_entropy(dist, adv_shape=advantage.shape[:-1])
            if is_tensor_collection(entropy):
                td_out.set("composite_entropy", entropy.detach())
                td_out.set("entropy", _sum_td_features(entropy).detach().mean())
            else:
                td_out.set("entropy", entropy.detach().mean())
            td_out.set("loss_entropy", self._weighted_loss_entropy(entropy))
        if self._has_critic:  # torchrl's critic loss, unchanged
            loss_critic, value_clip_fraction, explained_variance = self.loss_critic(tensordict)
            td_out.set("loss_critic", loss_critic)
            if value_clip_fraction is not None:
                td_out.set("value_clip_fraction", value_clip_fraction)
            if explained_variance is not None:
                td_out.set("explained_variance", explained_variance)
        # torchrl's reduction for its own terms; loss_objective is already reduced by gipo-core.
        td_out = td_out.named_apply(
            lambda name, value: self._reduce_loss(value, tensordict).squeeze(-1)
            if name.startswith("loss_") and name != "loss_objective"
            else value,
        )
        self._clear_weakrefs(
            tensordict,
            td_out,
            "actor_network_params",
            "critic_network_params",
            "target_actor_network_params",
            "target_critic_network_params",
        )
        return td_out
