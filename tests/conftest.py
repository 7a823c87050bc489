import importlib
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

# torch._dynamo has to be imported before TensorFlow in one process: importing it after TensorFlow aborts
# the interpreter (both load their own copies of protobuf/abseil). The tests of every backend share one
# pytest process, so it is imported here, first.
try:
    import torch._dynamo  # noqa: F401
except ImportError:
    pass

#: The array libraries the main test environment installs (README's test command). ``GIPO_REQUIRE_BACKENDS=1``
#: requires all of them, ``GIPO_REQUIRE_BACKENDS=numpy,torch`` (the verl environment) those named: a missing or
#: broken one stops the run here, instead of its tests being skipped.
REQUIRED = ("numpy", "array_api_strict", "torch", "jax", "tensorflow")

_required = os.environ.get("GIPO_REQUIRE_BACKENDS", "").strip()
if _required and _required != "0":
    names = REQUIRED if _required == "1" else tuple(n.strip() for n in _required.split(",") if n.strip())
    broken = []
    for name in names:
        try:
            importlib.import_module(name)
        except Exception as exc:  # noqa: BLE001 - any import failure counts
            broken.append(f"{name} ({type(exc).__name__}: {exc})")
    if broken:
        raise RuntimeError(
            f"GIPO_REQUIRE_BACKENDS={_required}: these backends cannot be imported, so their tests would be "
            "skipped: " + "; ".join(broken)
        )
