"""The same results under the framework's compilers, without retracing; per-example vectorising maps."""

from __future__ import annotations

import numpy as np
import pytest

from . import harness, registry
from .registry import compare, offpolicy_samples, one_per_objective, rounded_inputs


@pytest.mark.conformance(cases=lambda: one_per_objective() + offpolicy_samples(), dtypes=("float32",))
def test_compiled_matches_oracle(target, dtype, compiler, case) -> None:
    """torch.compile(fullgraph=True) (a graph break is an error), jax.jit, tf.function with and without
    jit_compile: loss, gradient and diagnostics still equal the oracle's, with the off-policy options too."""
    got, _ = harness.run_case(target, case, dtype, compiler=compiler)
    problems = compare(got, registry.expected(case, dtype), dtype)
    assert not problems, "\n".join(problems)


def _per_example_inputs(case, dtype: str, shift: float = 0.0) -> dict:
    """logp, old_logp and advantages of a case as a (B, T) batch (a 1-D case becomes two examples)."""
    inputs = {k: v for k, v in rounded_inputs(case, dtype).items() if k in ("logp", "old_logp", "advantages")}
    inputs["logp"] = registry.oracle.round_to(inputs["logp"] + shift, dtype)
    if inputs["logp"].ndim == 1:
        inputs = {k: np.stack([v, v[::-1]]) for k, v in inputs.items()}
    return inputs


@pytest.mark.conformance(cases=one_per_objective, dtypes=("float32",), needs=("traces",))
def test_no_retracing(target, dtype, compiler, case) -> None:
    """Calls with new values of the same shapes and dtypes reuse one trace (also through jax.vmap)."""
    d = target.driver
    kwargs = dict(case.opts, agg=case.agg)
    calls, batched_calls = [], []
    for shift in (0.0, 0.125, -0.25):
        inputs = rounded_inputs(case, dtype)
        inputs["logp"] = registry.oracle.round_to(inputs["logp"] + shift, dtype)
        logp, args, _ = harness.make_arrays(target, inputs, dtype)
        calls.append((logp, args))
        logp, args, _ = harness.make_arrays(target, _per_example_inputs(case, dtype, shift), dtype)
        batched_calls.append((logp, args[:2]))
    assert d.count_traces(target.module, case.fn_name, calls, kwargs, compiler) == 1
    if d.vectorizes:
        assert d.count_traces(target.module, case.fn_name, batched_calls, kwargs, compiler, batched=True) == 1


@pytest.mark.conformance(cases=one_per_objective, dtypes=("float32", "float64"), needs=("vectorizes",))
def test_per_example_vectorized(target, dtype, case) -> None:
    """jax.vmap / torch.func.vmap over the batch axis: each example's loss and gradient equal the oracle's
    for that example alone."""
    inputs = _per_example_inputs(case, dtype)
    logp, args, _ = harness.make_arrays(target, inputs, dtype)
    d = target.driver
    losses, grads = d.per_example(target.module, case.fn_name, logp, args[:2], dict(case.opts, agg=case.agg))
    losses, grads = d.to_numpy(losses), d.to_numpy(grads)
    assert losses.shape == inputs["logp"].shape[:1] and grads.shape == inputs["logp"].shape
    for i in range(losses.shape[0]):
        exp = registry.oracle.evaluate(case.objective, case.opts, case.agg, inputs["logp"][i], inputs["old_logp"][i],
                                       inputs["advantages"][i], None, None, None, registry.oracle.work_dtype(dtype))
        got = {"loss": losses[i], "grad": grads[i], "metrics": {}}
        exp = dict(exp, metrics={})
        problems = compare(got, exp, dtype)
        assert not problems, f"example {i}: " + "\n".join(problems)
