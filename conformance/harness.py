"""Running one call of the implementation under test through its driver, and reading the result back."""

from __future__ import annotations

from typing import Any

import numpy as np


def make_arrays(target: Any, inputs: dict, dtype: str, denominator: Any = None, denominator_array: bool = False):
    """``(logp, args, kwargs)`` for a call: arrays of ``dtype`` on the target's device (masks keep bool)."""
    d = target.driver
    conv = {k: d.asarray(v, "bool" if v.dtype == bool else dtype, target.device) for k, v in inputs.items()}
    kwargs = {}
    for key in ("behavior_weights", "rollout_logp"):
        if key in conv:
            kwargs[key] = conv[key]
    if denominator is not None:
        kwargs["denominator"] = (
            d.asarray(np.asarray(denominator, dtype=np.float64), dtype, target.device)
            if denominator_array
            else denominator
        )
    args = (conv["old_logp"], conv["advantages"], conv.get("mask"))
    return conv["logp"], args, kwargs


def run(
    target: Any,
    fn_name: str,
    inputs: dict,
    dtype: str,
    options: dict,
    agg: str,
    denominator: Any = None,
    denominator_array: bool = False,
    compiler: str | None = None,
) -> tuple[dict, tuple]:
    """Call ``fn_name`` and return ``(result as float64 NumPy, raw (loss, metrics, grad))``."""
    logp, args, kwargs = make_arrays(target, inputs, dtype, denominator, denominator_array)
    kwargs.update(options, agg=agg)
    if isinstance(kwargs.get("rollout_is_bounds"), list):  # from JSON
        kwargs["rollout_is_bounds"] = tuple(kwargs["rollout_is_bounds"])
    raw = target.driver.run(target.module, fn_name, logp, args, kwargs, compiler=compiler)
    return to_numpy(target, raw), raw


def to_numpy(target: Any, raw: tuple) -> dict:
    loss, metrics, grad = raw
    tn = target.driver.to_numpy
    return {"loss": tn(loss), "grad": tn(grad), "metrics": {k: tn(v) for k, v in metrics.items()}}


def run_case(target: Any, case: Any, dtype: str, inputs: dict | None = None, compiler: str | None = None):
    """Run a registry case (inputs rounded to ``dtype`` unless given)."""
    from .registry import denominator_value, rounded_inputs

    inputs = rounded_inputs(case, dtype) if inputs is None else inputs
    return run(
        target, case.fn_name, inputs, dtype, case.opts, case.agg, denominator_value(case, inputs),
        case.denominator == "array", compiler,
    )


def bits(result: dict) -> list[bytes]:
    """A result's exact bit patterns, to compare repeated calls."""
    return [np.asarray(result["loss"]).tobytes(), np.asarray(result["grad"]).tobytes()] + [
        np.asarray(v).tobytes() for _, v in sorted(result["metrics"].items())
    ]
