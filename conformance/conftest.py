"""Options, targets and parametrisation of the conformance suite.

    pytest conformance --backend=numpy,array_api_strict,torch,jax,tf --device=cpu,cuda [--dtype=float32,...]
    pytest conformance --backend=numpy:my_package.my_losses          # any module with the public API
    pytest conformance --backend=torch --device=cuda --require-device # a GPU run that cannot pass by skipping

Environment variables with the same meaning: GIPO_CONFORMANCE_BACKEND, GIPO_CONFORMANCE_DEVICE,
GIPO_CONFORMANCE_DTYPE, GIPO_CONFORMANCE_REQUIRE_DEVICE=1.

Each test function carries ``@pytest.mark.conformance(cases=..., dtypes=..., needs=...)`` and takes some of the
arguments ``target`` (backend, module and device), ``dtype``, ``case`` and ``compiler``; this file expands them
into one test per combination, with ids ``backend-device-dtype-case``. A target that was asked for but is not
available here is one skipped test per function (a failure with --require-device). Known gaps of a backend
(conformance/known_gaps/<backend>.py) become strict xfails.
"""

from __future__ import annotations

import fnmatch
import importlib
import os
from dataclasses import dataclass
from typing import Any

import pytest

from .drivers import DEVICES, DRIVERS, Driver

DEFAULT_BACKENDS = ("numpy", "array_api_strict", "torch", "jax", "tf")
ALL_DTYPES = ("float16", "bfloat16", "float32", "float64")


def pytest_addoption(parser: Any) -> None:
    group = parser.getgroup("conformance", "gipo-core conformance suite")
    group.addoption(
        "--backend",
        default=os.environ.get("GIPO_CONFORMANCE_BACKEND"),
        help="comma-separated DRIVER or DRIVER:MODULE (drivers: " + ", ".join(DRIVERS) + "); default: every "
        "importable backend with its gipo_core module",
    )
    group.addoption("--device", default=os.environ.get("GIPO_CONFORMANCE_DEVICE", "cpu"),
                    help="comma-separated devices among cpu, cuda (default cpu)")
    group.addoption("--dtype", default=os.environ.get("GIPO_CONFORMANCE_DTYPE"),
                    help="comma-separated dtypes to run (default: every dtype the framework has)")
    group.addoption(
        "--require-device",
        action="store_true",
        default=os.environ.get("GIPO_CONFORMANCE_REQUIRE_DEVICE", "").lower() in ("1", "true", "yes"),
        help="a backend, module or device that was asked for but is missing fails instead of skipping",
    )


@dataclass
class Target:
    """One backend (driver + implementation module) on one device."""

    backend: str
    module_name: str
    device: str
    driver: Driver | None = None
    module: Any = None
    missing: str | None = None

    @property
    def id(self) -> str:
        return f"{self.backend}-{self.device}"

    def __repr__(self) -> str:
        return f"Target({self.id}, {self.module_name})"


_DRIVER_CACHE: dict[str, tuple[Driver | None, str | None]] = {}


def _load_driver(name: str) -> tuple[Driver | None, str | None]:
    if name not in _DRIVER_CACHE:
        driver = DRIVERS[name]()
        try:
            driver.load()
            _DRIVER_CACHE[name] = (driver, None)
        except Exception as exc:  # noqa: BLE001 - any import failure means "not available here"
            _DRIVER_CACHE[name] = (None, f"{driver.framework} is not importable ({type(exc).__name__}: {exc})")
    return _DRIVER_CACHE[name]


def build_targets(backend_opt: str | None, device_opt: str) -> list[Target]:
    specs = [s.strip() for s in (backend_opt or ",".join(DEFAULT_BACKENDS)).split(",") if s.strip()]
    devices = [d.strip() for d in device_opt.split(",") if d.strip()]
    for d in devices:
        if d not in DEVICES:
            raise pytest.UsageError(f"--device: unknown device {d!r}; use one of {', '.join(DEVICES)}")
    targets = []
    for spec in specs:
        name, _, module_name = spec.partition(":")
        if name not in DRIVERS:
            raise pytest.UsageError(f"--backend: unknown driver {name!r}; use one of {', '.join(DRIVERS)}")
        driver, missing = _load_driver(name)
        module_name = module_name or DRIVERS[name].default_module
        module = None
        if driver is not None:
            try:
                module = importlib.import_module(module_name)
            except Exception as exc:  # noqa: BLE001
                missing = f"module {module_name} is not importable ({type(exc).__name__}: {exc})"
        for device in devices:
            reason = missing
            if reason is None and device not in driver.devices():
                if device != "cpu" and name in ("numpy", "array_api_strict"):
                    continue  # a CPU-only library: there is no such device to ask for
                reason = f"{driver.framework} sees no {device} device here"
            if reason is None:
                driver.prepare_device(device)
            targets.append(Target(name, module_name, device, driver if reason is None else None, module, reason))
    return targets


def pytest_configure(config: Any) -> None:
    config.addinivalue_line(
        "markers",
        "conformance(cases=None, dtypes=None, needs=()): a conformance check, expanded per backend, device, "
        "dtype and case by conformance/conftest.py",
    )
    if getattr(config.option, "device", None) is None:
        return
    config._gipo_targets = build_targets(config.option.backend, config.option.device)
    dtype_opt = config.option.dtype
    config._gipo_dtypes = tuple(d.strip() for d in dtype_opt.split(",")) if dtype_opt else ALL_DTYPES


def _case_id(case: Any) -> str:
    if case is None:
        return ""
    if isinstance(case, dict):
        return case["id"]
    return getattr(case, "id", None) or str(case)


def pytest_generate_tests(metafunc: Any) -> None:
    marker = metafunc.definition.get_closest_marker("conformance")
    if marker is None or "target" not in metafunc.fixturenames:
        return
    config = metafunc.config
    kw = marker.kwargs
    names = [n for n in ("target", "dtype", "case", "compiler") if n in metafunc.fixturenames]
    wanted_dtypes = kw.get("dtypes") or ALL_DTYPES
    needs = tuple(kw.get("needs", ()))
    params = []
    for target in config._gipo_targets:
        if "gpu" in needs and target.device == "cpu":
            continue
        if target.missing is not None:
            values = {"target": target, "dtype": None, "case": None, "compiler": None}
            params.append(pytest.param(*[values[n] for n in names], id=f"{target.id}-unavailable"))
            continue
        driver = target.driver
        if any(not getattr(driver, need) for need in needs if need != "gpu"):
            continue  # a capability the framework does not have (autodiff, vectorizes, traces)
        dtypes = [d for d in driver.dtypes if d in wanted_dtypes and d in config._gipo_dtypes]
        if "dtype" not in names:
            dtypes = [None]
        compilers = list(driver.compilers) if "compiler" in names else [None]
        cases = kw.get("cases")
        case_list = (cases() if callable(cases) else list(cases)) if cases is not None else [None]
        for i, dtype in enumerate(dtypes):
            for j, case in enumerate(case_list):
                for compiler in compilers:
                    if compiler in driver.expensive_compilers and (i or j):
                        continue
                    values = {"target": target, "dtype": dtype, "case": case, "compiler": compiler}
                    pid = "-".join(p for p in (target.id, dtype, compiler, _case_id(case)) if p)
                    params.append(pytest.param(*[values[n] for n in names], id=pid))
    if not params:
        params = [pytest.param(*[None] * len(names), id="not-applicable",
                               marks=pytest.mark.skip(reason="no requested backend has this capability"))]
    metafunc.parametrize(",".join(names), params)


def _gaps(backend: str) -> list[tuple[str, str]]:
    try:
        module = importlib.import_module(f"{__package__}.known_gaps.{backend}")
    except ModuleNotFoundError:
        return []
    return list(module.GAPS)


def pytest_collection_modifyitems(config: Any, items: list) -> None:
    for item in items:
        callspec = getattr(item, "callspec", None)
        target = callspec.params.get("target") if callspec else None
        if not isinstance(target, Target):
            continue
        for pattern, reason in _gaps(target.backend):
            if fnmatch.fnmatchcase(f"{item.originalname}[{callspec.id}]", pattern):
                item.add_marker(pytest.mark.xfail(strict=True, reason=f"known gap: {reason}"))


@pytest.fixture(autouse=True)
def _conformance_target(request: Any) -> Any:
    """Skip (or fail, with --require-device) an unavailable target; run the test in its driver's scope."""
    callspec = getattr(request.node, "callspec", None)
    target = callspec.params.get("target") if callspec else None
    if not isinstance(target, Target):
        yield
        return
    if target.missing is not None:
        if request.config.option.require_device:
            pytest.fail(f"{target.id} was required but is unavailable: {target.missing}")
        pytest.skip(f"{target.id} unavailable: {target.missing}")
    with target.driver.scope(callspec.params.get("dtype")):
        yield
