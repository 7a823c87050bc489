"""verl's plug-in tests need an environment of their own.

verl pins ``tensordict<=0.10`` and torchrl needs ``tensordict>=0.14.3``, so verl is not installed in the main
test environment. ``tests/integrations/test_verl*.py`` are collected only where verl is installed: the README's
test command builds ``.venv-verl`` (``pip install -e ".[verl,test]"``) and runs them there; in the main run the
terminal summary says that they were left to it.
"""

import importlib.util

VERL_TESTS = "test_verl*.py"
HAS_VERL = importlib.util.find_spec("verl") is not None

collect_ignore_glob = [] if HAS_VERL else [VERL_TESTS]


def pytest_terminal_summary(terminalreporter):
    if not HAS_VERL:
        terminalreporter.write_line(
            f"tests/integrations/{VERL_TESTS}: not collected in this environment (no verl); "
            "they run in the verl environment (.venv-verl, see the README's test command)"
        )
