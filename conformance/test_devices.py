"""Accelerators: the golden data on each device is checked by test_oracle.py; here CPU and device agree on
where results are NaN or infinite."""

from __future__ import annotations

import numpy as np
import pytest

from . import harness, registry
from .conftest import Target
from .test_oracle import _golden_id_cases


@pytest.mark.conformance(cases=_golden_id_cases, needs=("gpu",))
def test_nan_inf_positions_match_cpu(target, dtype, case) -> None:
    """Loss, gradient and diagnostics are NaN / infinite at exactly the same places on the device as on CPU."""
    data = case.data
    inputs = registry.golden_inputs(data, dtype)
    cpu = Target(target.backend, target.module_name, "cpu", target.driver, target.module)
    results = [
        harness.run(t, registry.PUBLIC[data["objective"]], inputs, dtype, data["options"], data["agg"],
                    data["denominator"])[0]
        for t in (cpu, target)
    ]

    def flags(r: dict) -> list:
        values = [np.asarray(r["loss"]), np.asarray(r["grad"])] + [np.asarray(r["metrics"][k]) for k in sorted(r["metrics"])]
        return [(np.isnan(v).tolist(), np.isposinf(v).tolist(), np.isneginf(v).tolist()) for v in values]

    assert flags(results[0]) == flags(results[1])
