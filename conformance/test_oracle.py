"""Values, gradients and diagnostics against the mpmath oracle: the golden data and the registry's cases."""

from __future__ import annotations

import pytest

from . import harness, registry
from .registry import REGISTRY, compare, golden_cases, golden_expected, golden_inputs


def _golden_id_cases() -> list:
    return [_Golden(c) for c in golden_cases()]


class _Golden:
    """A golden case, with an id for the test name."""

    def __init__(self, data: dict) -> None:
        self.data = data
        self.id = data["id"]

    def __repr__(self) -> str:
        return self.id


def test_golden_data_is_present() -> None:
    """The committed golden data loads and covers every objective (an empty file would make the suite toothless)."""
    objectives = {c["objective"] for c in golden_cases()}
    assert objectives == set(registry.PUBLIC), f"golden data covers {sorted(objectives)}"


def test_superseded_golden_entries_are_replaced() -> None:
    """Every golden entry set aside for an old convention names a stored replacement (the data is append-only:
    old entries stay in the file, listed under ``superseded``, and are not compared)."""
    stored = {c["id"] for c in registry.GOLDEN["cases"]}
    gone = registry.superseded()
    assert set(gone) == set(registry.oracle.SUPERSEDED), "the file and make_golden.SUPERSEDED disagree"
    for old, entry in gone.items():
        assert old in stored and entry["by"] in stored, f"{old} -> {entry['by']}: missing from the golden data"
        assert entry["by"] in {c["id"] for c in golden_cases()}


@pytest.mark.conformance(cases=_golden_id_cases)
def test_golden(target, dtype, case) -> None:
    """Loss, gradient and diagnostics equal the oracle's on the golden inputs rounded to ``dtype``."""
    data = case.data
    inputs = golden_inputs(data, dtype)
    got, _ = harness.run(
        target, registry.PUBLIC[data["objective"]], inputs, dtype, data["options"], data["agg"], data["denominator"]
    )
    problems = compare(got, golden_expected(data, dtype), dtype)
    assert not problems, "\n".join(problems)


@pytest.mark.conformance(cases=lambda: REGISTRY)
def test_registry(target, dtype, case) -> None:
    """Each registry case equals the oracle, and a repeated call gives bit-identical results."""
    got, _ = harness.run_case(target, case, dtype)
    problems = compare(got, registry.expected(case, dtype), dtype)
    assert not problems, "\n".join(problems)
    again, _ = harness.run_case(target, case, dtype)
    assert harness.bits(again) == harness.bits(got), "a repeated call gave different bits"
