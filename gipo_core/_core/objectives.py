"""Per-element policy objectives: GIPO and the baselines it is compared with.

Every objective is a pure function of the masked log-ratio ``ell`` (= logp - old_logp, already set to 0 at
masked elements), the advantages ``adv`` (already 0 at masked elements, broadcast to ``ell``'s shape or of size 1
on the last axis) and Python options. It returns

``loss``
    the per-element loss ``L``;
``grad``
    ``dL/dlogp``, in closed form, with the method's stop-gradients applied (for GIPO the trust weight is a
    constant), or ``None`` when it equals ``loss`` (GIPO and No-Clip), which saves a pass over the data;
``mult``
    the gradient multiplier ``u`` with ``grad = -adv * u`` (for GIPO ``u = omega * rho``), used by the
    diagnostics.

``weight`` gives the method's trust weight ``omega = u / rho`` for the diagnostics; it is computed only when
metrics are asked for.

Only standard array-API calls are used, with no branching on array values, so the same code runs eagerly
and under ``jax.jit``, ``torch.compile`` and ``tf.function(jit_compile=True)``. Functions used from ``xp``:
``exp, expm1, log, log1p, abs, where, maximum, minimum, ones_like, full_like, sum, max, min, astype,
isdtype, reshape`` and the dtypes ``bool, float32, float64``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from .options import Option, choice, number_in, option, optional

__all__ = ["ElementTerms", "Objective", "OBJECTIVES", "KERNELS", "SCALE_RANGE", "neg_adv_times"]

#: The trust-weight shapes of GIPO.
KERNELS = ("gaussian", "laplace", "cauchy")

#: The working range of every width, temperature and ratio bound: within it no backend overflows in float16,
#: bfloat16, float32 or float64 (1 / sigma^2 and tau * (rho - 1) stay finite, a bound converts to float32).
SCALE_RANGE = (1e-6, 1e6)


@dataclass(frozen=True)
class ElementTerms:
    loss: Any
    grad: Any  # None: equal to ``loss``
    mult: Any


@dataclass(frozen=True)
class Objective:
    """One policy objective: everything about it, in one place.

    Attributes
    ----------
    name : str
        The registry key (``LossSpec.objective``).
    public_name : str
        The loss function's name in every backend (``gipo_loss``).
    class_name : str
        The loss class's name in torch, JAX and TensorFlow (``GIPOLoss``).
    options : tuple of Option
        The objective's own options, in signature order: name, default, type, doc and range check.
    terms, weight : callable
        The per-element math (see the module docstring).
    summary, math : str
        The first docstring line, and the formulas for the ``Notes`` section.
    uses_logp : bool
        The per-element loss reads ``logp`` itself (CISPO), not only the log-ratio.
    check : callable, optional
        ``check(fn, options)``: rules between options (``clip_min < clip_max``), after each option's own check.
    example : str
        A doctest of the loss class (torch), ``{cls}`` standing for the class name.
    """

    name: str
    public_name: str
    class_name: str
    options: tuple[Option, ...]
    terms: Callable[..., ElementTerms]
    weight: Callable[..., Any]
    summary: str
    math: str
    uses_logp: bool = False
    check: Callable[[str, dict[str, Any]], None] | None = None

    @property
    def option_names(self) -> tuple[str, ...]:
        return tuple(o.name for o in self.options)

    @property
    def defaults(self) -> tuple[tuple[str, Any], ...]:
        """``(name, default)`` of each option, in signature order."""
        return tuple((o.name, o.default) for o in self.options)

    def check_options(self, fn: str, values: Mapping[str, Any]) -> tuple[tuple[str, Any], ...]:
        """The options, checked and normalised, as ``LossSpec.options`` holds them."""
        checked = {o.name: o.check(fn, values.get(o.name, o.default)) for o in self.options}
        if self.check is not None:
            self.check(fn, checked)
        return tuple(checked.items())


#: log of the largest finite float32 / float64, less a margin for rounding.
_LOG_MAX_F32 = 88.0
_LOG_MAX_F64 = 709.0


def neg_adv_times(adv: Any, u: Any, xp: Any) -> Any:
    """``-adv * u`` that is exactly 0 where ``adv`` is 0, even where ``u`` overflowed to inf (0 * inf = NaN)."""
    return xp.where(adv == 0, 0.0, -adv * u)


def _per_sign(adv: Any, pos: float, neg: float, xp: Any) -> Any:
    """``pos`` where ``adv > 0``, else ``neg`` (a Python float when both are equal: nothing materialised)."""
    if pos == neg:
        return pos
    # full_like fixes dtype and device: where() of two Python scalars would give the default float dtype.
    return xp.where(adv > 0, xp.full_like(adv, pos), neg)


# --------------------------------------------------------------------------------------------------- GIPO


def _gipo_log_weight(ell: Any, adv: Any, opts: Mapping[str, Any], xp: Any) -> Any:
    """``log omega`` for the chosen kernel, per element."""
    sigma = opts["sigma"]
    sigma_neg = opts["sigma_neg"] if opts["sigma_neg"] is not None else sigma
    kernel = opts["kernel"]
    if kernel == "gaussian":
        # -l^2 / (2 sigma^2), with the factor folded into one multiplier per sign of A.
        half_inv_var = _per_sign(adv, 0.5 / (sigma * sigma), 0.5 / (sigma_neg * sigma_neg), xp)
        return -(ell * ell) * half_inv_var
    if kernel == "laplace":
        inv_sigma = _per_sign(adv, 1.0 / sigma, 1.0 / sigma_neg, xp)
        return -xp.abs(ell) * inv_sigma
    # cauchy: -log1p(r^2), r = l / sigma, without overflowing r^2: for |r| >= 1 it is
    # -(2 log|r| + log1p(1/r^2)).
    inv_sigma = _per_sign(adv, 1.0 / sigma, 1.0 / sigma_neg, xp)
    r = xp.abs(ell) * inv_sigma
    small = r < 1.0
    r_big = xp.where(small, 1.0, r)
    big = 2.0 * xp.log(r_big) + xp.log1p(1.0 / (r_big * r_big))
    return -xp.where(small, xp.log1p(r * r), big)


def _gipo_terms(ell: Any, adv: Any, logp: Any, opts: Mapping[str, Any], xp: Any) -> ElementTerms:
    if opts["kernel"] == "gaussian":
        sigma = opts["sigma"]
        sigma_neg = opts["sigma_neg"] if opts["sigma_neg"] is not None else sigma
        # u = exp(l - l^2/(2 s^2)) = exp(l * (1 - l/(2 s^2))): one exp, finite for every finite l, and the
        # factored exponent stays -inf (never inf - inf) if l itself overflowed.
        k = _per_sign(adv, 0.5 / (sigma * sigma), 0.5 / (sigma_neg * sigma_neg), xp)
        u = xp.exp(ell * (1.0 - ell * k))
        # u <= exp(sigma^2 / 2): when that bound is finite in the work dtype, u never overflows and
        # -A * u needs no guard against 0 * inf (decided from Python options, not from data).
        log_max = _LOG_MAX_F64 if ell.dtype == xp.float64 else _LOG_MAX_F32
        if max(sigma, sigma_neg) ** 2 / 2.0 < log_max:
            return ElementTerms(loss=-adv * u, grad=None, mult=u)
    else:
        u = xp.exp(ell + _gipo_log_weight(ell, adv, opts, xp))
    return ElementTerms(loss=neg_adv_times(adv, u, xp), grad=None, mult=u)


def _gipo_weight(ell: Any, adv: Any, opts: Mapping[str, Any], xp: Any) -> Any:
    return xp.exp(_gipo_log_weight(ell, adv, opts, xp))


# ---------------------------------------------------------------------------------------------- PPO-clip


def _ppo_active(ell: Any, adv: Any, opts: Mapping[str, Any], xp: Any) -> tuple[Any, Any, Any]:
    """Per-element (loss, rho, active): ``active`` is where the gradient flows.

    Tie rule, the same in every backend: the band is inclusive. The gradient flows unless the clipped
    term is strictly the larger one (so at rho == 1 + clip_high exactly it flows), and with dual clip it
    stops only where ``-c * A`` is strictly below the clipped loss.
    """
    rho = xp.exp(ell)
    lo, hi = 1.0 - opts["clip_low"], 1.0 + opts["clip_high"]
    unclipped = neg_adv_times(adv, rho, xp)
    clipped = -adv * xp.minimum(xp.maximum(rho, lo), hi)
    active = unclipped >= clipped
    loss = xp.where(active, unclipped, clipped)
    dual = opts["dual_clip"]
    if dual is not None:
        cap = -dual * adv
        capped = (adv < 0) & (cap < loss)
        loss = xp.where(capped, cap, loss)
        active = active & ~capped
    return loss, rho, active


def _ppo_terms(ell: Any, adv: Any, logp: Any, opts: Mapping[str, Any], xp: Any) -> ElementTerms:
    loss, rho, active = _ppo_active(ell, adv, opts, xp)
    u = xp.where(active, rho, 0.0)
    return ElementTerms(loss=loss, grad=neg_adv_times(adv, u, xp), mult=u)


def _ppo_weight(ell: Any, adv: Any, opts: Mapping[str, Any], xp: Any) -> Any:
    _, rho, active = _ppo_active(ell, adv, opts, xp)
    return xp.astype(active, rho.dtype)


# ---------------------------------------------------------------------------------------------- No-Clip


def _no_clip_terms(ell: Any, adv: Any, logp: Any, opts: Mapping[str, Any], xp: Any) -> ElementTerms:
    rho = xp.exp(ell)
    return ElementTerms(loss=neg_adv_times(adv, rho, xp), grad=None, mult=rho)


def _no_clip_weight(ell: Any, adv: Any, opts: Mapping[str, Any], xp: Any) -> Any:
    return xp.ones_like(ell)


# ------------------------------------------------------------------------------------------------- SAPO


def _sapo_parts(ell: Any, adv: Any, opts: Mapping[str, Any], xp: Any) -> tuple[Any, Any, Any]:
    """(tau, z, log(4 p (1 - p))) with p = sigmoid(z), z = tau (rho - 1), computed without overflow."""
    tau = _per_sign(adv, opts["tau_pos"], opts["tau_neg"], xp)
    z = tau * xp.expm1(ell)  # rho - 1 without cancellation near rho = 1
    az = xp.abs(z)
    log_4pq = math.log(4.0) - az - 2.0 * xp.log1p(xp.exp(-az))
    return tau, z, log_4pq


def _sapo_terms(ell: Any, adv: Any, logp: Any, opts: Mapping[str, Any], xp: Any) -> ElementTerms:
    tau, z, log_4pq = _sapo_parts(ell, adv, opts, xp)
    # f(rho) = 4/tau * sigmoid(z); z >= -tau, so exp(-z) <= e^tau never overflows.
    gate = (4.0 / tau) / (1.0 + xp.exp(-z))
    u = xp.exp(ell + log_4pq)  # 4 p (1 - p) rho: exp(l - |z| ...) stays finite where rho alone overflows
    return ElementTerms(loss=-adv * gate, grad=neg_adv_times(adv, u, xp), mult=u)


def _sapo_weight(ell: Any, adv: Any, opts: Mapping[str, Any], xp: Any) -> Any:
    return xp.exp(_sapo_parts(ell, adv, opts, xp)[2])


# ------------------------------------------------------------------------------------------------ CISPO


def _cispo_log_u(ell: Any, opts: Mapping[str, Any], xp: Any) -> Any:
    """``log clip(rho, clip_min, clip_max)`` (no lower clip when ``clip_min`` is None)."""
    clipped = xp.minimum(ell, math.log(opts["clip_max"]))
    if opts.get("clip_min") is not None:
        clipped = xp.maximum(clipped, math.log(opts["clip_min"]))
    return clipped


def _cispo_terms(ell: Any, adv: Any, logp: Any, opts: Mapping[str, Any], xp: Any) -> ElementTerms:
    # stopgrad(clip(rho, eps_min, eps_max)) computed as exp(clip(l, log eps_min, log eps_max)): never overflows.
    u = xp.exp(_cispo_log_u(ell, opts, xp))
    grad = neg_adv_times(adv, u, xp)
    return ElementTerms(loss=grad * logp, grad=grad, mult=u)


def _cispo_weight(ell: Any, adv: Any, opts: Mapping[str, Any], xp: Any) -> Any:
    return xp.exp(_cispo_log_u(ell, opts, xp) - ell)


_SCALE = f"[{SCALE_RANGE[0]:g}, {SCALE_RANGE[1]:g}]"
_scale = number_in(*SCALE_RANGE)


def _cispo_check(fn: str, opts: dict[str, Any]) -> None:
    if opts["clip_min"] is not None and opts["clip_min"] >= opts["clip_max"]:
        raise ValueError(f"`{fn}`: `clip_min` must be < `clip_max` ({opts['clip_max']!r}); got {opts['clip_min']!r}")


OBJECTIVES: dict[str, Objective] = {
    "gipo": Objective(
        name="gipo",
        public_name="gipo_loss",
        class_name="GIPOLoss",
        options=(
            option(
                "sigma", 1.0, "float",
                f"Width of the trust weight in log-ratio units, in {_SCALE}. Large sigma -> plain\n"
                "importance sampling.",
                _scale,
            ),
            option(
                "sigma_neg", None, "float | None",
                f"Width used where the advantage is <= 0, in {_SCALE} (default: ``sigma``).",
                optional(_scale),
            ),
            option(
                "kernel", "gaussian", 'Literal["gaussian", "laplace", "cauchy"]',
                "Shape of the trust weight in log-ratio space.",
                choice(KERNELS),
            ),
        ),
        terms=_gipo_terms,
        weight=_gipo_weight,
        summary="GIPO policy loss: importance ratio times a Gaussian trust weight held constant in backprop.",
        math=(
            "L = -w(rho) * rho * A with w = exp(-l^2 / (2 sigma^2)) held constant (stop-gradient), l = log rho.\n"
            "dL/dlogp = -A * u with u = w * rho = exp(l * (1 - l / (2 sigma^2))), computed with one exp,\n"
            "finite for every finite l and bounded by exp(sigma^2 / 2) (reached at l = sigma^2).\n"
            "sigma_neg replaces sigma where A <= 0. kernel='laplace' uses w = exp(-|l| / sigma),\n"
            "kernel='cauchy' w = 1 / (1 + (l / sigma)^2); neither bounds u."
        ),
    ),
    "ppo_clip": Objective(
        name="ppo_clip",
        public_name="ppo_clip_loss",
        class_name="PPOClipLoss",
        options=(
            option("clip_low", 0.2, "float", "The ratio is clipped below at 1 - clip_low; in (0, 1).",
                   number_in(0.0, 1.0, low_open=True, high_open=True)),
            option(
                "clip_high", 0.2, "float",
                f"The ratio is clipped above at 1 + clip_high; in (0, {SCALE_RANGE[1]:g}].",
                number_in(0.0, SCALE_RANGE[1], low_open=True),
            ),
            option(
                "dual_clip", None, "float | None",
                f"Dual-clip constant c in (1, {SCALE_RANGE[1]:g}] (3.0 is common): the loss of\n"
                "A < 0 elements is capped at -c A.",
                optional(number_in(1.0, SCALE_RANGE[1], low_open=True)),
            ),
        ),
        terms=_ppo_terms,
        weight=_ppo_weight,
        summary="PPO clipped surrogate loss, with optional dual clip for negative advantages.",
        math=(
            "L = max(-A * rho, -A * clip(rho, 1 - clip_low, 1 + clip_high)); with dual_clip = c > 1,\n"
            "L = min(L, -c * A) where A < 0. dL/dlogp = -A * rho where the unclipped term is active, else 0.\n"
            "Ties: the band is inclusive, the gradient flows at rho == 1 +- clip exactly."
        ),
    ),
    "no_clip": Objective(
        name="no_clip",
        public_name="no_clip_loss",
        class_name="NoClipLoss",
        options=(),
        terms=_no_clip_terms,
        weight=_no_clip_weight,
        summary="Plain importance-sampling policy loss (no clipping, no trust weight).",
        math="L = -A * rho; dL/dlogp = -A * rho. Overflows (inf) where rho itself does.",
    ),
    "sapo": Objective(
        name="sapo",
        public_name="sapo_loss",
        class_name="SAPOLoss",
        options=(
            option("tau_pos", 1.0, "float", f"Gate temperature where A > 0, in {_SCALE}.", _scale),
            option("tau_neg", 1.05, "float", f"Gate temperature where A <= 0, in {_SCALE}.", _scale),
        ),
        terms=_sapo_terms,
        weight=_sapo_weight,
        summary="SAPO soft-gated policy loss (sigmoid gate on the ratio, temperature per advantage sign).",
        math=(
            "L = -A * (4 / tau) * sigmoid(tau * (rho - 1)), tau = tau_pos where A > 0 else tau_neg.\n"
            "dL/dlogp = -A * 4 p (1 - p) * rho with p = sigmoid(tau (rho - 1)), computed in log space."
        ),
    ),
    "cispo": Objective(
        name="cispo",
        public_name="cispo_loss",
        class_name="CISPOLoss",
        options=(
            option("clip_max", 5.0, "float", f"Upper bound on the detached importance ratio, in {_SCALE}.", _scale),
            option(
                "clip_min", None, "float | None",
                f"Lower bound on the detached importance ratio, in {_SCALE} and below\n"
                "``clip_max`` (default: no lower bound).",
                optional(_scale),
            ),
        ),
        check=_cispo_check,
        terms=_cispo_terms,
        weight=_cispo_weight,
        summary="CISPO loss: REINFORCE on logp weighted by the detached, clipped importance ratio.",
        uses_logp=True,
        math=(
            "L = -stopgrad(clip(rho, clip_min, clip_max)) * A * logp; dL/dlogp = -A * clip(rho, clip_min, clip_max),\n"
            "computed as exp(clip(l, log clip_min, log clip_max)), which never overflows; clip_min=None (the\n"
            "default, as in TRL and MiniMax-M1) clips only above; verl's CISPO clips both sides."
        ),
    ),
}
