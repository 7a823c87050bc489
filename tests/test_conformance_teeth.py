"""The conformance suite has teeth: each deliberately broken implementation in conformance/mutants fails it,
while gipo_core.numpy passes the same selection."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # the conformance package sits at the repository root, beside tests/
    sys.path.insert(0, str(ROOT))

from conformance.mutants import MUTANTS  # noqa: E402


def _pytest(backend: str, keyword: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "pytest", "conformance", "-q", "-x", "-p", "no:cacheprovider",
           "-p", "no:randomly", f"--backend={backend}", "--device=cpu", "-k", keyword]
    env = dict(os.environ, PYTHONPATH=str(ROOT))  # a module that fails to import is skipped: exit 0 or 5
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.fixture(scope="module")
def runs() -> dict:
    """Every mutant's run and the control run, started together (each takes a few seconds)."""
    procs = {name: _pytest(f"numpy:conformance.mutants.{name}", kw) for name, kw in MUTANTS.items()}
    union = " or ".join(f"({kw})" for kw in MUTANTS.values())
    procs["control"] = _pytest("numpy", union)
    return {name: (p.wait(timeout=300), p.stdout.read()) for name, p in procs.items()}


def test_the_real_implementation_passes_every_selection(runs) -> None:
    rc, out = runs["control"]
    assert rc == 0, out[-3000:]
    assert " passed" in out and "failed" not in out


@pytest.mark.parametrize("mutant", sorted(MUTANTS))
def test_mutant_fails_the_suite(runs, mutant) -> None:
    rc, out = runs[mutant]
    # rc 1: tests ran and failed (not 2-5: interrupted, internal or usage error, nothing collected)
    assert rc == 1, f"conformance.mutants.{mutant} was not caught (exit {rc}):\n{out[-3000:]}"
    assert "1 failed" in out, out[-3000:]
