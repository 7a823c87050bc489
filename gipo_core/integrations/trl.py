"""GIPO, and every other gipo-core objective, as the policy loss of TRL's ``GRPOTrainer``.

    from trl import GRPOConfig
    from gipo_core.integrations.trl import GIPOTrainer

    trainer = GIPOTrainer(model=..., reward_funcs=..., args=GRPOConfig(...), train_dataset=...,
                          gipo=dict(objective="gipo", sigma=1.0))
    trainer.train()

:class:`GIPOTrainer` is a ``trl.GRPOTrainer`` whose policy term is one gipo-core call; everything else is
TRL's: generation, rewards, advantages, the KL penalty (``beta``), the entropy bonus, the MoE router loss, the
high-entropy token mask, off-policy sequence masking and TRL's own metrics. No formula lives here: the module
maps TRL's inputs and configuration onto gipo-core's arguments and maps the result back.

========================================  ===================================================================
TRL                                       gipo-core
========================================  ===================================================================
per-token log-probs of the policy         ``logp``
``old_per_token_logps`` (else the         ``old_logp``
log-probs themselves, detached)
``advantages`` (B,) or (B, T)             ``advantages`` (B, 1) or (B, T)
``completion_mask`` x ``tool_mask``       ``mask``
``importance_sampling_level``             ``ratio_level``
``sampling_per_token_logps`` (vLLM)       ``rollout_logp``, with ``rollout_is`` / ``rollout_is_bounds`` from
                                          ``vllm_importance_sampling_mode`` / ``_clip_min`` / ``_clip_max``
``loss_type`` and ``num_items_in_batch``  ``agg`` and ``denominator`` (TRL's normalisation, see below)
high-entropy mask, off-policy mask        ``behavior_weights`` (they scale a token's loss, not the counts)
``epsilon``, ``epsilon_high``             ``clip_low``, ``clip_high`` of ``ppo_clip`` unless given in ``gipo``
``sapo_temperature_pos`` / ``_neg``       ``tau_pos``, ``tau_neg`` of ``sapo`` unless given in ``gipo``
========================================  ===================================================================

Normalisation (TRL 1.16's, exactly; ``B`` rows in the micro-batch, ``G`` the gradient-accumulation steps in
training, 1 in evaluation):

- ``dapo``: ``token-mean`` over ``num_items_in_batch / num_processes * G / steps_per_generation`` tokens (in
  evaluation ``num_items_in_batch / num_processes``);
- ``bnpo``: ``token-mean`` over the micro-batch's tokens, then divided by ``G``;
- ``grpo``: ``seq-mean-token-mean`` over all ``B`` rows (empty rows count, as in TRL), then divided by ``G``;
- ``dr_grpo``: ``seq-mean-token-sum-norm`` with ``B * max_completion_length``, then divided by ``G``;
- ``luspo``: ``seq-mean-token-sum`` over all ``B`` rows, then divided by ``G``.

Requires ``trl`` (tested with 1.16.0 and transformers 5.24.0): ``pip install "gipo-core[trl]"``.
"""

from __future__ import annotations

import inspect
import math
from typing import Any

try:
    import torch
    from trl import GRPOTrainer
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "gipo_core.integrations.trl needs TRL and PyTorch: pip install 'gipo-core[trl]'"
    ) from exc

from .. import torch as gipo_torch

__all__ = ["GIPOTrainer", "LOSS_FUNCTIONS", "AGGREGATION"]

#: ``gipo["objective"]`` -> the gipo-core function that computes it.
LOSS_FUNCTIONS = {
    "gipo": gipo_torch.gipo_loss,
    "ppo_clip": gipo_torch.ppo_clip_loss,
    "sapo": gipo_torch.sapo_loss,
    "cispo": gipo_torch.cispo_loss,
    "no_clip": gipo_torch.no_clip_loss,
}

#: TRL ``loss_type`` -> gipo-core ``agg``. TRL's other loss types name an objective (``sapo``, ``cispo``,
#: ``vespo``): choose the objective with ``gipo["objective"]`` and the normalisation here.
AGGREGATION = {
    "dapo": "token-mean",
    "bnpo": "token-mean",
    "grpo": "seq-mean-token-mean",
    "dr_grpo": "seq-mean-token-sum-norm",
    "luspo": "seq-mean-token-sum",
}

#: Arguments the trainer fills from TRL's inputs and config, with the TRL setting that controls each.
_FILLED_BY_TRL = {
    "agg": "GRPOConfig(loss_type=...)",
    "denominator": "GRPOConfig(loss_type=...) and TRL's num_items_in_batch",
    "mask": "the completion (and tool) mask",
    "behavior_weights": "GRPOConfig(top_entropy_quantile=..., off_policy_mask_threshold=...)",
    "ratio_level": "GRPOConfig(importance_sampling_level=...)",
    "rollout_logp": "TRL's sampling_per_token_logps (vLLM generation)",
}

#: TRL metrics of its own policy term; TRL computes them with the advantages set to zero, so they are dropped.
_TRL_POLICY_METRICS = ("clip_ratio/", "cispo_clip_ratio", "vespo/")


def _accepts(fn: Any, name: str) -> bool:
    return name in inspect.signature(fn).parameters


class GIPOTrainer(GRPOTrainer):
    """``trl.GRPOTrainer`` with a gipo-core objective as its policy loss.

    Parameters
    ----------
    *args, **kwargs
        Everything ``trl.GRPOTrainer`` takes (``model``, ``reward_funcs``, ``args=GRPOConfig(...)``,
        ``train_dataset``, ``processing_class``, ...), unchanged.
    gipo : dict, optional
        ``objective`` (``"gipo"`` by default, or ``"ppo_clip"``, ``"sapo"``, ``"cispo"``, ``"no_clip"``) and
        that objective's options as gipo-core names them (``sigma``, ``sigma_neg``, ``kernel``; ``clip_low``,
        ``clip_high``, ``dual_clip``; ``tau_pos``, ``tau_neg``; ``clip_max``), plus ``with_metrics`` and,
        where the installed gipo-core has them, ``rollout_is``, ``rollout_is_bounds`` and ``opsm_delta``.
        ``ppo_clip`` takes ``clip_low`` / ``clip_high`` from ``GRPOConfig.epsilon`` / ``epsilon_high`` and
        ``sapo`` its temperatures from ``GRPOConfig.sapo_temperature_pos`` / ``_neg`` unless given here.

    Notes
    -----
    The per-step loss is TRL's own ``_compute_loss`` run with the advantages set to zero, which makes TRL's
    policy term exactly zero in value and gradient and leaves the KL penalty, the entropy bonus and the MoE
    router loss as TRL computes them, plus the gipo-core objective on the same log-probabilities (one forward
    pass), normalised as TRL normalises ``loss_type`` (see the module docstring). TRL's clip-ratio metrics
    are replaced by gipo-core's diagnostics, logged as ``gipo/<name>`` (means weighted by ``n_valid`` across
    processes, maxima and minima reduced as such); ``policy_loss`` (logged by TRL with an entropy bonus) gets
    the gipo-core term added.

    ``use_liger_kernel=True`` works unchanged: in TRL 1.16 it only swaps the model's layer kernels and never
    bypasses ``_compute_loss``.

    Raises
    ------
    TypeError
        ``gipo`` not a dict; an unknown key in it.
    ValueError
        An unknown objective; a key that TRL's config controls (``agg``, ``denominator``, ...); a ``loss_type``
        that names an objective (``sapo``, ``cispo``, ``vespo``); ``GRPOConfig.delta`` set (TRL's two-sided
        clip of its own loss, with no gipo-core counterpart); ``opsm_delta`` together with
        ``off_policy_mask_threshold``; ``rollout_is`` or ``rollout_is_bounds`` without vLLM importance
        sampling; an option gipo-core rejects.
    NotImplementedError
        ``importance_sampling_level="sequence"`` with a gipo-core that has no ``ratio_level``.

    Examples
    --------
    >>> from gipo_core.integrations.trl import GIPOTrainer   # doctest: +SKIP
    >>> trainer = GIPOTrainer(model=model, reward_funcs=reward, args=GRPOConfig(loss_type="dapo"),
    ...                       train_dataset=dataset, gipo=dict(objective="gipo", sigma=1.0))  # doctest: +SKIP
    >>> trainer.train()  # doctest: +SKIP
    """

    _gipo_captured: dict | None = None

    def __init__(self, *args: Any, gipo: dict | None = None, **kwargs: Any) -> None:
        if gipo is None:
            gipo = {}
        if not isinstance(gipo, dict):
            raise TypeError(
                f"`GIPOTrainer`: `gipo` must be a dict such as dict(objective='gipo', sigma=1.0); "
                f"got {type(gipo).__name__}"
            )
        super().__init__(*args, **kwargs)
        self._gipo_objective, self._gipo_fn, self._gipo_options = self._gipo_setup(dict(gipo))

    # ------------------------------------------------------------------------------------------- setup
    def _gipo_setup(self, gipo: dict) -> tuple[str, Any, dict]:
        objective = gipo.pop("objective", "gipo")
        if objective not in LOSS_FUNCTIONS:
            raise ValueError(
                f"`GIPOTrainer`: `gipo['objective']` must be one of {', '.join(map(repr, LOSS_FUNCTIONS))}; "
                f"got {objective!r}"
            )
        fn = LOSS_FUNCTIONS[objective]
        args: Any = self.args  # a GRPOConfig
        for key in gipo:
            if key in _FILLED_BY_TRL:
                raise ValueError(
                    f"`GIPOTrainer`: `gipo[{key!r}]` is set from {_FILLED_BY_TRL[key]}; remove it from `gipo`"
                )
        accepted = [
            name
            for name, p in inspect.signature(fn).parameters.items()
            if p.kind is inspect.Parameter.KEYWORD_ONLY and name not in _FILLED_BY_TRL
        ]
        unknown = sorted(set(gipo) - set(accepted))
        if unknown:
            raise TypeError(
                f"`GIPOTrainer`: unknown key(s) {', '.join(map(repr, unknown))} in `gipo` for objective "
                f"{objective!r}; valid: 'objective', {', '.join(map(repr, accepted))}"
            )
        if self.loss_type not in AGGREGATION:
            raise ValueError(
                f"`GIPOTrainer`: `GRPOConfig.loss_type` sets the normalisation and must be one of "
                f"{', '.join(map(repr, AGGREGATION))}; got {self.loss_type!r}. Choose the objective with "
                f"`gipo=dict(objective=...)`"
            )
        if args.delta is not None:
            raise ValueError(
                f"`GIPOTrainer`: `GRPOConfig.delta` (TRL's two-sided clip of its own loss) has no gipo-core "
                f"counterpart; got {args.delta!r}. Leave it None (ppo_clip has `dual_clip`)"
            )
        if args.off_policy_mask_threshold is not None and gipo.get("opsm_delta") is not None:
            raise ValueError(
                "`GIPOTrainer`: set off-policy sequence masking once, either "
                "`GRPOConfig.off_policy_mask_threshold` or `gipo['opsm_delta']`, not both"
            )
        rollout_keys = sorted({"rollout_is", "rollout_is_bounds"} & set(gipo))
        if rollout_keys and not (self.use_vllm and self.vllm_importance_sampling_correction):
            raise ValueError(
                f"`GIPOTrainer`: `gipo[{rollout_keys[0]!r}]` corrects for the inference engine and needs "
                "`GRPOConfig(use_vllm=True, vllm_importance_sampling_correction=True)`: only then does TRL provide "
                "sampling_per_token_logps"
            )
        if self.importance_sampling_level != "token" and not _accepts(fn, "ratio_level"):
            raise NotImplementedError(
                f"`GIPOTrainer`: `GRPOConfig.importance_sampling_level={self.importance_sampling_level!r}` needs "
                f"a gipo-core whose `{fn.__name__}` has `ratio_level`; this one has not"
            )
        if objective == "ppo_clip":
            gipo.setdefault("clip_low", self.epsilon_low)
            gipo.setdefault("clip_high", self.epsilon_high)
        elif objective == "sapo":
            gipo.setdefault("tau_pos", args.sapo_temperature_pos)
            gipo.setdefault("tau_neg", args.sapo_temperature_neg)
        if self.importance_sampling_level != "token":
            gipo["ratio_level"] = self.importance_sampling_level
        # gipo-core checks its options on every call: one call on a 1x1 batch reports a bad one now.
        one = torch.zeros((1, 1))
        trial = {k: v for k, v in gipo.items() if k != "with_metrics"}
        if rollout_keys:
            trial["rollout_logp"] = one
        try:
            fn(one, one, one, with_metrics=False, **trial)
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"`GIPOTrainer`: `gipo`: {exc}") from exc
        return objective, fn, gipo

    # --------------------------------------------------------------------- hooks into TRL's own loss
    def _get_per_token_logps_and_entropies(self, *args: Any, **kwargs: Any) -> Any:
        out = super()._get_per_token_logps_and_entropies(*args, **kwargs)
        if self._gipo_captured is not None and "logps" not in self._gipo_captured:
            self._gipo_captured["logps"] = out[0]
        return out

    def get_high_entropy_mask(self, entropies: torch.Tensor, mask: torch.Tensor, threshold: float) -> torch.Tensor:
        out = super().get_high_entropy_mask(entropies, mask, threshold)
        if self._gipo_captured is not None:
            self._gipo_captured["entropy_mask"] = out
        return out

    # ------------------------------------------------------------------------------------------ loss
    def _compute_loss(self, model: Any, inputs: dict) -> torch.Tensor:
        trained: Any = self.model
        mode = "train" if trained.training else "eval"
        metrics = self._metrics[mode]
        logged = {key: len(values) for key, values in metrics.items()}

        # TRL's loss with zero advantages: its policy term is exactly 0 (value and gradient); the KL penalty,
        # entropy bonus, router loss and TRL's metrics remain. Its ratio is 1 unless the KL term needs it.
        trl_inputs = dict(inputs)
        trl_inputs["advantages"] = torch.zeros_like(inputs["advantages"])
        args: Any = self.args
        if not (self.beta != 0.0 and args.use_bias_correction_kl):
            trl_inputs.pop("old_per_token_logps", None)
        captured: dict[str, Any] = {}
        self._gipo_captured = captured
        try:
            trl_loss = super()._compute_loss(model, trl_inputs)
        finally:
            self._gipo_captured = None

        out, divisor = self._gipo_policy_loss(inputs, captured, mode)
        policy = out.loss / divisor

        for key in list(metrics):
            if key.startswith(_TRL_POLICY_METRICS):
                del metrics[key][logged.get(key, 0) :]
                if not metrics[key]:
                    del metrics[key]  # else TRL logs None for it
        if len(metrics.get("policy_loss", ())) > logged.get("policy_loss", 0):
            metrics["policy_loss"][-1] += self.accelerator.gather(out.loss.detach()).nanmean().item()
        if out.metrics:
            self._gipo_log_metrics(out.metrics, metrics)
        return trl_loss + policy

    def _gipo_policy_loss(self, inputs: dict, captured: dict, mode: str) -> tuple[Any, Any]:
        """The gipo-core call on TRL's inputs and the number TRL divides the aggregated loss by afterwards."""
        logp = captured["logps"]
        mask = inputs["completion_mask"]
        if "tool_mask" in inputs:
            mask = mask * inputs["tool_mask"]
        old = inputs.get("old_per_token_logps")
        old = logp.detach() if old is None else old
        advantages = inputs["advantages"]
        if advantages.dim() == 1:
            advantages = advantages.unsqueeze(1)

        weights = []  # what TRL multiplies into each token's loss
        if captured.get("entropy_mask") is not None:
            weights.append(captured["entropy_mask"])
        sampling = inputs.get("sampling_per_token_logps")
        if self.off_policy_mask_threshold is not None:
            weights.append(
                self.get_off_policy_mask(
                    advantages=advantages,
                    per_token_logps=logp,
                    sampling_per_token_logps=old if sampling is None else sampling,
                    mask=mask,
                    off_policy_threshold=self.off_policy_mask_threshold,
                )
            )
        options = dict(self._gipo_options)
        if self.use_vllm and self.vllm_importance_sampling_correction:
            if sampling is not None and _accepts(self._gipo_fn, "rollout_logp"):
                # Tokens the inference engine could not score (NaN) get no correction, as in TRL.
                options["rollout_logp"] = torch.where(torch.isnan(sampling), old, sampling)
                options.setdefault("rollout_is", self.vllm_importance_sampling_mode.replace("_", "-"))
                low, high = self.vllm_importance_sampling_clip_min, self.vllm_importance_sampling_clip_max
                bounds = (0.0 if low is None else low, math.inf if high is None else high)
                options.setdefault("rollout_is_bounds", bounds)
            else:
                weights.append(inputs["importance_sampling_ratio"])
        behavior_weights = None
        for w in weights:
            w = w.to(logp.dtype).expand_as(logp)
            behavior_weights = w if behavior_weights is None else behavior_weights * w

        accumulation = self.current_gradient_accumulation_steps if mode == "train" else 1
        rows = logp.size(0)
        divisor: Any = accumulation
        if self.loss_type == "dapo":
            denominator = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
            if mode == "train":
                args: Any = self.args
                denominator = denominator * accumulation / args.steps_per_generation
            divisor = 1
        elif self.loss_type == "bnpo":
            denominator = None  # gipo-core's token-mean counts the micro-batch's tokens, as TRL does
        elif self.loss_type == "dr_grpo":
            denominator = float(rows * self.max_completion_length)
        else:  # grpo, luspo: every row counts, empty ones included
            denominator = float(rows)
        out = self._gipo_fn(
            logp,
            old,
            advantages,
            mask.bool(),
            agg=AGGREGATION[self.loss_type],
            denominator=denominator,
            behavior_weights=behavior_weights,
            **options,
        )
        return out, divisor

    def _gipo_log_metrics(self, values: dict, metrics: dict) -> None:
        """gipo-core's diagnostics, reduced over processes, under ``gipo/<name>`` in TRL's metrics."""
        names = list(values)
        local = torch.stack([values[name].detach().float() for name in names])
        table = self.accelerator.gather(local[None]).reshape(-1, len(names))  # (processes, metrics)
        counts = table[:, names.index("n_valid")]
        total = counts.sum()
        reduced = []
        for i, name in enumerate(names):
            column = table[:, i]
            if name == "n_valid":
                reduced.append(total)
            elif name.endswith("_max"):
                reduced.append(column.max())
            elif name.endswith("_min"):
                reduced.append(column.min())
            else:
                reduced.append((column * counts).sum() / total.clamp(min=1.0))
        for name, value in zip(names, torch.stack(reduced).tolist()):  # one host transfer
            metrics[f"gipo/{name}"].append(value)
