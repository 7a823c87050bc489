"""Shared test parameters."""

import pytest

from gipo_core import AGG_MODES

#: Every aggregation mode; the ones the core does not implement yet are strict xfails (none now).
NOT_IMPLEMENTED_AGG: dict[str, str] = {}
AGG_PARAMS = [
    pytest.param(a, marks=pytest.mark.xfail(raises=NotImplementedError, strict=True, reason=NOT_IMPLEMENTED_AGG[a]))
    if a in NOT_IMPLEMENTED_AGG
    else a
    for a in AGG_MODES
]
IMPLEMENTED_AGG = tuple(a for a in AGG_MODES if a not in NOT_IMPLEMENTED_AGG)
