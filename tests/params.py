"""Shared test parameters."""

import pytest

from gipo_core import AGG_MODES

#: Every aggregation mode; the ones the core does not implement yet are strict xfails.
NOT_IMPLEMENTED_AGG = {"token-sum": "agg='token-sum' lands with the off-policy engine (issue 13)"}
AGG_PARAMS = [
    pytest.param(a, marks=pytest.mark.xfail(raises=NotImplementedError, strict=True, reason=NOT_IMPLEMENTED_AGG[a]))
    if a in NOT_IMPLEMENTED_AGG
    else a
    for a in AGG_MODES
]
IMPLEMENTED_AGG = tuple(a for a in AGG_MODES if a not in NOT_IMPLEMENTED_AGG)
