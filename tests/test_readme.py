"""Every ```python block of README.md runs as written, and every module's docstring examples pass (issue 12,
item 14).

Each README block runs in a fresh interpreter with this checkout first on ``sys.path`` and the test
environment as it is: no block gets special treatment, so a block that needs a GPU, a cluster or a package
outside the test extras belongs in a ```bash or ```text block instead.
"""

from __future__ import annotations

import doctest
import importlib
import os
import pkgutil
import re
import subprocess
import sys
from pathlib import Path

import pytest

import gipo_core

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
BLOCKS = [
    (README.count("\n", 0, m.start()) + 2, m.group(1))
    for m in re.finditer(r"^```python\n(.*?)^```", README, re.S | re.M)
]


def test_the_readme_has_python_blocks():
    assert len(BLOCKS) >= 3


@pytest.mark.parametrize(("line", "code"), BLOCKS, ids=[f"README.md:{line}" for line, _ in BLOCKS])
def test_readme_python_block_runs_as_written(line, code, tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    env.setdefault("MPLBACKEND", "Agg")
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, f"README.md line {line}:\n{code}\n--- stderr ---\n{proc.stderr[-4000:]}"


#: Modules whose trainer needs an environment of its own (verl pins tensordict<=0.10): their doctests run
#: there, from tests/integrations/test_verl.py, through ``check_doctests``.
OWN_ENVIRONMENT = ("gipo_core.integrations.verl",)


def _modules() -> list[str]:
    names = [gipo_core.__name__]
    for info in pkgutil.walk_packages(gipo_core.__path__, prefix="gipo_core."):
        names.append(info.name)
    return sorted(n for n in names if not n.endswith("__main__") and n not in OWN_ENVIRONMENT)


@pytest.mark.parametrize("name", _modules())
def test_module_docstring_examples(name):
    """``doctest`` on every module of the package and on each public object (the loss functions are built in
    ``gipo_core._api``, which ``doctest.testmod`` alone would not search). An import failure fails too."""
    check_doctests(name)


def check_doctests(name: str) -> None:
    """Run the doctests of module ``name`` and of its public objects; fail on any failed example."""
    module = importlib.import_module(name)
    finder = doctest.DocTestFinder()
    tests = {t.name: t for t in finder.find(module)}
    for attr in getattr(module, "__all__", []):
        obj = getattr(module, attr)
        if getattr(obj, "__module__", None) == name:
            tests.update({t.name: t for t in finder.find(obj, f"{name}.{attr}", module=False, globs={})})
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    for test in tests.values():
        runner.run(test)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} doctest examples of {name} failed (see stdout)"
