"""gipo-core's objectives in verl's policy-loss registry.

Importing this module registers one verl policy loss per gipo-core objective:

    loss_mode            gipo-core function
    ``gipo``             ``gipo_loss``
    ``gipo_core_ppo_clip``  ``ppo_clip_loss``
    ``gipo_core_no_clip``   ``no_clip_loss``
    ``gipo_core_sapo``      ``sapo_loss``
    ``gipo_core_cispo``     ``cispo_loss``

verl imports it by itself: gipo-core declares it in verl's ``verl.plugins`` entry-point group, which
``import verl`` loads in every process (the driver and each Ray worker). Select a loss with
``actor_rollout_ref.actor.policy_loss.loss_mode=gipo``.

Options. verl's ``PolicyLossConfig`` accepts no key it does not declare, so gipo-core options reach the loss
through :func:`policy_loss_config`, a drop-in Hydra target for the ``policy_loss`` node::

    actor_rollout_ref.actor.policy_loss._target_=gipo_core.integrations.verl.policy_loss_config
    actor_rollout_ref.actor.policy_loss.loss_mode=gipo
    +actor_rollout_ref.actor.policy_loss.sigma=0.5
    +actor_rollout_ref.actor.policy_loss.kernel=laplace

Every keyword option of the selected gipo-core function can be set that way (read from its signature, so
options that gipo-core adds later need nothing here). Where verl already has a setting with the same meaning it
is the default: PPO-clip takes ``clip_low``/``clip_high``/``dual_clip`` from the actor's
``clip_ratio_low``/``clip_ratio_high`` (or ``clip_ratio``) and ``clip_ratio_c``, SAPO takes ``tau_pos`` and
``tau_neg`` from the actor's ``tau_pos``/``tau_neg``; an option set under ``policy_loss`` wins.

Aggregation follows verl exactly: the actor's ``loss_agg_mode`` and verl's ``config.global_batch_info``
(data-parallel size, global token and sequence counts, ``loss_scale_factor``) become gipo-core's ``agg`` and
``denominator``, so each rank's loss is what verl's ``agg_loss`` gives. verl's ``rollout_is_weights`` become
gipo-core's ``behavior_weights``.
"""

from __future__ import annotations

import inspect
import operator
import warnings
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Mapping

try:
    import torch
    from verl.trainer.ppo import core_algos as _core_algos
    from verl.workers.config import PolicyLossConfig as _VerlPolicyLossConfig
except ImportError as exc:  # tested with verl hidden from the import system
    raise ImportError(
        "gipo_core.integrations.verl needs verl and torch; install them with "
        "`pip install 'gipo-core[verl]'` (verl pins tensordict<=0.10: use an environment of its own). "
        f"Import failed with: {exc}"
    ) from exc

from .. import torch as _gipo_torch
from .._api import PUBLIC_LOSSES

__all__ = [
    "LOSS_MODES",
    "AGG_MODES",
    "PolicyLossConfig",
    "policy_loss_config",
    "gipo_core_options",
    "verl_denominator",
    "make_policy_loss",
    "register",
]

#: verl ``loss_agg_mode`` -> gipo-core ``agg``. verl's ``token-sum`` is gipo-core's ``token-mean`` divided by
#: ``1 / dp_size`` (see :func:`verl_denominator`); every other mode keeps its name.
AGG_MODES: dict[str, str] = {
    "token-mean": "token-mean",
    "token-sum": "token-mean",
    "seq-mean-token-sum": "seq-mean-token-sum",
    "seq-mean-token-mean": "seq-mean-token-mean",
    "seq-mean-token-sum-norm": "seq-mean-token-sum-norm",
}

#: Arguments of a gipo-core loss that the plug-in fills from verl's call, never from the config.
_FILLED = frozenset({"logp", "old_logp", "advantages", "mask", "agg", "denominator", "behavior_weights",
                     "with_metrics", "rollout_logp"})

#: verl loss_mode -> gipo-core objective key ("gipo" keeps its name, the baselines get a prefix so that they
#: never shadow verl's own ``sapo`` or ``cispo``).
LOSS_MODES: dict[str, str] = {("gipo" if key == "gipo" else f"gipo_core_{key}"): key for key in PUBLIC_LOSSES.values()}

_METRIC_PREFIX = "actor/gipo_core/"

#: gipo-core options that need the rollout policy's log-probs, which verl does not pass to a policy loss (it
#: applies its own rollout correction, ``algorithm.rollout_correction``, and passes the resulting weights).
_NEEDS_ROLLOUT_LOGP = frozenset({"rollout_is", "rollout_is_bounds"})


def _loss_function(objective: str) -> Callable:
    public = {key: name for name, key in PUBLIC_LOSSES.items()}[objective]
    return getattr(_gipo_torch, public)


def _option_names(objective: str) -> tuple[str, ...]:
    """The keyword options of a gipo-core loss that a verl config may set, read from its signature."""
    params = inspect.signature(_loss_function(objective)).parameters.values()
    skip = _FILLED | _NEEDS_ROLLOUT_LOGP
    return tuple(p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name not in skip)


def _all_option_names() -> frozenset[str]:
    return frozenset(name for key in LOSS_MODES.values() for name in _option_names(key))


def _reject_rollout_options(where: str, options: Mapping[str, Any]) -> None:
    given = sorted(_NEEDS_ROLLOUT_LOGP & set(options))
    if given:
        raise TypeError(
            f"`{where}`: policy_loss sets {', '.join(given)}, which needs the rollout policy's log-probs; verl "
            "does not pass them to a policy loss. Use verl's algorithm.rollout_correction.* instead: its weights "
            "reach gipo-core as behavior_weights"
        )


# ------------------------------------------------------------------------------------------------- config


@dataclass
class PolicyLossConfig(_VerlPolicyLossConfig):
    """verl's ``PolicyLossConfig`` plus ``options``: the gipo-core options set under ``policy_loss``.

    Build it with :func:`policy_loss_config` (the Hydra target), which sorts the keys of the ``policy_loss``
    node into verl's fields and gipo-core options.
    """

    options: dict = field(default_factory=dict)


_VERL_FIELDS = frozenset(f.name for f in fields(_VerlPolicyLossConfig))


def policy_loss_config(**kwargs: Any) -> PolicyLossConfig:
    """Hydra target for ``actor_rollout_ref.actor.policy_loss``: verl's fields plus gipo-core options.

    Keys that verl's ``PolicyLossConfig`` declares (``loss_mode``, ``rollout_correction``, ...) go to it; every
    other key must be a keyword option of a gipo-core loss (``sigma``, ``sigma_neg``, ``kernel``,
    ``clip_low``, ``dual_clip``, ``tau_pos``, ``clip_max``, ...) and is kept in ``options``.

    Parameters
    ----------
    **kwargs
        The ``policy_loss`` node's keys, as Hydra passes them.

    Returns
    -------
    PolicyLossConfig
        A subclass of verl's ``PolicyLossConfig``: verl's own losses read it as before.

    Raises
    ------
    TypeError
        A key that is neither a verl field nor a gipo-core option.

    Examples
    --------
    On the command line of ``python -m verl.trainer.main_ppo``::

        actor_rollout_ref.actor.policy_loss._target_=gipo_core.integrations.verl.policy_loss_config
        actor_rollout_ref.actor.policy_loss.loss_mode=gipo
        +actor_rollout_ref.actor.policy_loss.sigma=0.5
    """
    verl_kwargs = {k: v for k, v in kwargs.items() if k in _VERL_FIELDS}
    options = {k: v for k, v in kwargs.items() if k not in _VERL_FIELDS}
    _reject_rollout_options("gipo_core.integrations.verl.policy_loss_config", options)
    known = _all_option_names()
    unknown = sorted(set(options) - known)
    if unknown:
        raise TypeError(
            f"`gipo_core.integrations.verl.policy_loss_config`: unknown key(s) {', '.join(unknown)} under "
            f"policy_loss; expected verl's fields ({', '.join(sorted(_VERL_FIELDS - {'_target_'}))}) or gipo-core "
            f"options ({', '.join(sorted(known))})"
        )
    return PolicyLossConfig(**verl_kwargs, options={k: _plain(v) for k, v in options.items()})


def _plain(value: Any) -> Any:
    """Hydra/OmegaConf lists as tuples (gipo-core options must be hashable)."""
    if isinstance(value, (list, tuple)) or type(value).__name__ == "ListConfig":
        return tuple(_plain(v) for v in value)
    return value


def _get(config: Any, key: str, default: Any = None) -> Any:
    """``config.key`` for verl's dataclass configs (``BaseConfig.get``), DictConfigs and plain dicts alike."""
    getter = getattr(config, "get", None)
    return getter(key, default) if callable(getter) else getattr(config, key, default)


def _user_options(policy_loss: Any) -> dict[str, Any]:
    """gipo-core options set under ``policy_loss``: the ``options`` of :class:`PolicyLossConfig`, or the keys
    of a plain mapping (a DictConfig built without the dataclasses) that name a gipo-core option."""
    if policy_loss is None:
        return {}
    if isinstance(policy_loss, PolicyLossConfig):
        return dict(policy_loss.options)
    if isinstance(policy_loss, _VerlPolicyLossConfig):
        return {}
    known = _all_option_names()
    if isinstance(policy_loss, Mapping) or hasattr(policy_loss, "keys"):
        return {k: _plain(policy_loss[k]) for k in policy_loss.keys() if k in known}
    return {}


def _verl_defaults(objective: str, config: Any) -> dict[str, Any]:
    """gipo-core options that verl's actor config already sets, in verl's meaning."""
    if objective == "ppo_clip":
        clip = _get(config, "clip_ratio", 0.2)
        low = _get(config, "clip_ratio_low")
        high = _get(config, "clip_ratio_high")
        return {
            "clip_low": clip if low is None else low,
            "clip_high": clip if high is None else high,
            "dual_clip": _get(config, "clip_ratio_c", 3.0),
        }
    if objective == "sapo":
        return {"tau_pos": _get(config, "tau_pos", 1.0), "tau_neg": _get(config, "tau_neg", 1.05)}
    return {}


def gipo_core_options(objective: str, config: Any, loss_mode: str | None = None) -> dict[str, Any]:
    """The keyword options a verl actor config gives gipo-core's ``objective``.

    Parameters
    ----------
    objective : str
        A gipo-core objective key (``"gipo"``, ``"ppo_clip"``, ``"no_clip"``, ``"sapo"``, ``"cispo"``).
    config : ActorConfig, DictConfig or dict
        verl's actor config (the ``config`` verl passes to a policy loss).
    loss_mode : str, optional
        The verl loss name, for error messages.

    Returns
    -------
    dict
        verl's own settings where they mean the same thing (see the module notes), overridden by the options
        set under ``policy_loss``.

    Raises
    ------
    TypeError
        An option under ``policy_loss`` that this objective does not take.
    """
    allowed = _option_names(objective)
    user = _user_options(_get(config, "policy_loss"))
    _reject_rollout_options(f"verl loss_mode {loss_mode or objective}", user)
    wrong = sorted(set(user) - set(allowed))
    if wrong:
        name = loss_mode or objective
        raise TypeError(
            f"verl loss_mode `{name}`: policy_loss sets {', '.join(wrong)}, which "
            f"`{_loss_function(objective).__name__}` does not take; its options: {', '.join(allowed) or 'none'}"
        )
    options = {k: v for k, v in _verl_defaults(objective, config).items() if k in allowed}
    options.update(user)
    return options


# ---------------------------------------------------------------------------------------------- aggregation


def verl_denominator(
    loss_agg_mode: str,
    response_mask: Any,
    *,
    dp_size: int = 1,
    batch_num_tokens: Any = None,
    global_batch_size: Any = None,
    loss_scale_factor: Any = None,
) -> tuple[str, Any]:
    """gipo-core's ``(agg, denominator)`` for verl's ``agg_loss(loss_agg_mode, **global_batch_info)``.

    verl divides each rank's masked sum by a global count and multiplies by ``dp_size`` (data-parallel
    gradient averaging divides it again); gipo-core divides the weighted sum by ``denominator``. So

    ======================== =========================== ==============================================
    verl ``loss_agg_mode``   gipo-core ``agg``            ``denominator``
    ======================== =========================== ==============================================
    token-mean               token-mean                  ``batch_num_tokens / dp_size``
    token-sum                token-mean                  ``1 / dp_size``
    seq-mean-token-sum       seq-mean-token-sum          ``global_batch_size / dp_size``
    seq-mean-token-mean      seq-mean-token-mean         ``global_batch_size / dp_size``
    seq-mean-token-sum-norm  seq-mean-token-sum-norm     ``global_batch_size * C / dp_size``
    ======================== =========================== ==============================================

    with ``C = loss_scale_factor``, or the mask's last dimension when it is None. Without global counts
    (``dp_size == 1`` only, as in verl) the local ones are used: gipo-core's own count for ``token-mean`` and
    the ``seq-mean-*`` modes, and, for ``seq-mean-token-sum-norm``, the number of sequences with a valid token
    times ``C`` (a 0-d tensor).

    Returns
    -------
    (str, float or 0-d tensor or None)

    Raises
    ------
    ValueError
        An unknown ``loss_agg_mode``; ``dp_size > 1`` without the global count the mode needs (verl raises
        the same).
    """
    fn = "gipo_core.integrations.verl"
    if loss_agg_mode not in AGG_MODES:
        raise ValueError(f"`{fn}`: unknown loss_agg_mode {loss_agg_mode!r}; expected one of {', '.join(AGG_MODES)}")
    try:
        dp = 1 if dp_size is None else operator.index(dp_size)
    except TypeError:
        dp = 0
    if isinstance(dp_size, bool) or dp < 1:
        raise ValueError(f"`{fn}`: global_batch_info dp_size must be an int >= 1; got {dp_size!r}")
    agg = AGG_MODES[loss_agg_mode]
    if loss_agg_mode == "token-sum":
        return agg, 1.0 / dp
    if loss_agg_mode == "token-mean":
        if batch_num_tokens is None:
            if dp > 1:
                raise ValueError(f"`{fn}`: token-mean with dp_size {dp} needs global_batch_info batch_num_tokens")
            return agg, None
        return agg, batch_num_tokens / dp
    if global_batch_size is None and dp > 1:
        raise ValueError(f"`{fn}`: {loss_agg_mode} with dp_size {dp} needs global_batch_info global_batch_size")
    if loss_agg_mode != "seq-mean-token-sum-norm":
        return agg, None if global_batch_size is None else global_batch_size / dp
    horizon = response_mask.shape[-1] if loss_scale_factor is None else loss_scale_factor
    if global_batch_size is None:
        n_seq = (response_mask.sum(dim=-1) > 0).sum()
        return agg, n_seq * float(horizon)
    return agg, global_batch_size * horizon / dp


def _as_denominator(value: Any, like: Any) -> Any:
    """A 0-d tensor on ``like``'s device: a count that changes every step must not become a new option set of
    gipo-core's compiled kernel, and ``torch.full`` writes it on the device without a host-to-device copy."""
    if value is None:
        return None
    dtype = torch.float64 if like.dtype == torch.float64 else torch.float32
    if isinstance(value, torch.Tensor):
        return value.to(device=like.device, dtype=dtype).reshape(())
    return torch.full((), float(value), dtype=dtype, device=like.device)


# ------------------------------------------------------------------------------------------------- metrics


def _verl_metrics(
    objective: str, options: Mapping[str, Any], metrics: Mapping[str, Any], log_prob: Any, old_log_prob: Any,
    advantages: Any, mask: Any,
) -> dict[str, float]:
    """verl's metric names plus gipo-core's diagnostics, as Python floats read with one device transfer.

    verl turns every policy-loss metric into a float itself (``Metric.append`` calls ``.item()`` on each
    tensor: one device sync per metric); stacking them first makes that one sync per call.

    ``actor/pg_clipfrac``: for PPO-clip the fraction the clip silences at the loss's own band (verl's
    meaning), for the other objectives gipo-core's ``low_weight_frac`` (trust weight below 1/2).
    ``actor/pg_clipfrac_lower`` (PPO-clip with a dual clip only): the fraction the dual clip caps. With
    ``with_metrics="basic"`` only the names whose diagnostics were computed are reported. ``actor/ppo_kl``:
    ``kl_k1``, the mean of ``old_log_prob - log_prob``.
    """
    ref = metrics["kl_k1"]
    verl: dict[str, Any] = {}
    if objective == "ppo_clip":
        if "ppo_clip_frac" in metrics:
            verl["actor/pg_clipfrac"] = metrics["ppo_clip_frac"]
        if options.get("dual_clip") is not None and "ppo_clip_frac_lower" in metrics:
            verl["actor/pg_clipfrac_lower"] = metrics["ppo_clip_frac_lower"]
    elif "low_weight_frac" in metrics:
        verl["actor/pg_clipfrac"] = metrics["low_weight_frac"]
    verl["actor/ppo_kl"] = metrics["kl_k1"]
    verl.update({_METRIC_PREFIX + key: value for key, value in metrics.items()})
    host = torch.stack([v.detach().reshape(()).to(ref.dtype) for v in verl.values()]).tolist()
    return dict(zip(verl, host))


# ------------------------------------------------------------------------------------------------ the loss


def make_policy_loss(objective: str, loss_mode: str | None = None) -> Callable:
    """A verl policy loss computing gipo-core's ``objective``.

    Parameters
    ----------
    objective : str
        A gipo-core objective key: ``"gipo"``, ``"ppo_clip"``, ``"no_clip"``, ``"sapo"``, ``"cispo"``.
    loss_mode : str, optional
        The name it is registered under (for error messages); default from :data:`LOSS_MODES`.

    Returns
    -------
    callable
        ``fn(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="token-mean", config=None,
        rollout_is_weights=None) -> (pg_loss, metrics)``, verl's policy-loss signature.
    """
    if objective not in PUBLIC_LOSSES.values():
        raise ValueError(
            f"`make_policy_loss`: unknown objective {objective!r}; expected one of {', '.join(PUBLIC_LOSSES.values())}"
        )
    name = loss_mode or {v: k for k, v in LOSS_MODES.items()}[objective]
    loss_fn = _loss_function(objective)

    def policy_loss(
        old_log_prob: torch.Tensor,
        log_prob: torch.Tensor,
        advantages: torch.Tensor,
        response_mask: torch.Tensor,
        loss_agg_mode: str = "token-mean",
        config: Any = None,
        rollout_is_weights: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        if config is None:
            raise TypeError(f"verl loss_mode `{name}`: `config` (the actor config) is required; got None")
        options = gipo_core_options(objective, config, name)
        info = _get(config, "global_batch_info") or {}
        agg, denominator = verl_denominator(
            loss_agg_mode,
            response_mask,
            dp_size=info.get("dp_size", 1),
            batch_num_tokens=info.get("batch_num_tokens"),
            global_batch_size=info.get("global_batch_size"),
            loss_scale_factor=info.get("loss_scale_factor"),
        )
        mask = response_mask if response_mask.dtype == torch.bool else response_mask != 0
        out = loss_fn(
            log_prob,
            old_log_prob.detach(),
            advantages.detach(),
            mask,
            agg=agg,
            denominator=_as_denominator(denominator, log_prob),
            behavior_weights=None if rollout_is_weights is None else rollout_is_weights.detach(),
            **options,
        )
        metrics = _verl_metrics(objective, options, out.metrics, log_prob, old_log_prob, advantages.detach(), mask)
        return out.loss, metrics

    policy_loss.__name__ = policy_loss.__qualname__ = f"compute_policy_loss_{name}"
    policy_loss.__doc__ = (
        f"verl policy loss `{name}`: gipo-core's `{loss_fn.__name__}` with verl's aggregation and metrics.\n\n"
        "See :mod:`gipo_core.integrations.verl` for the options and the conventions."
    )
    return policy_loss


def register() -> dict[str, Callable]:
    """Register every gipo-core objective in verl's policy-loss registry (done on import; idempotent).

    Returns
    -------
    dict
        ``loss_mode -> function`` as registered.
    """
    registry = _core_algos.POLICY_LOSS_REGISTRY
    registered = {}
    for mode, objective in LOSS_MODES.items():
        existing = registry.get(mode)
        if existing is not None and getattr(existing, "__module__", None) != __name__:
            warnings.warn(
                f"gipo_core.integrations.verl: verl already has a policy loss named {mode!r} "
                f"({existing.__module__}); gipo-core's replaces it",
                stacklevel=2,
            )
        fn = make_policy_loss(objective, mode)
        fn.__module__ = __name__
        _core_algos.register_policy_loss(mode)(fn)
        registered[mode] = fn
    return registered


register()
