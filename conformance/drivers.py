"""Drivers: what the suite needs to know about one array framework, and nothing about the implementation.

A driver makes arrays on a device in a dtype, reads them back, takes the gradient of a loss with respect to
``logp`` (the framework's own way), and wraps a call in the framework's compilers. The implementation under
test is any module exposing the public API (``gipo_loss``, ``ppo_clip_loss``, ``no_clip_loss``, ``sapo_loss``,
``cispo_loss``; for the NumPy drivers also ``value_and_grad``); the suite passes it to :meth:`Driver.run`.

See conformance/README.md for the interface, and ``DRIVERS`` at the end for the registered ones.
"""

from __future__ import annotations

import contextlib
import importlib
from typing import Any, Callable, Iterator

import numpy as np

__all__ = ["Driver", "DRIVERS", "Ops"]

#: Names the suite uses for devices, whatever the framework calls them.
DEVICES = ("cpu", "cuda")


class Ops:
    """The handful of differentiable framework ops the straightforward reference (``reference.py``) uses."""

    def __init__(self, **fns: Callable) -> None:
        self.__dict__.update(fns)


class Driver:
    """Base class: override the methods below for one framework.

    Attributes
    ----------
    name : str
        The driver's name on the command line (``--backend=NAME`` or ``NAME:MODULE``).
    framework : str
        The module to import for the framework (its absence skips the backend).
    default_module : str
        The implementation tested when no ``:MODULE`` is given.
    dtypes : tuple of str
        Floating dtypes the framework has, among float16, bfloat16, float32, float64.
    compilers : tuple of str
        Names accepted by :meth:`run`'s ``compiler`` argument (empty: eager only).
    autodiff : bool
        Whether :meth:`grad` (plain autodiff of a reference) is available.
    """

    name = ""
    framework = ""
    default_module = ""
    dtypes: tuple[str, ...] = ("float16", "bfloat16", "float32", "float64")
    compilers: tuple[str, ...] = ()
    #: Compilers so slow to compile that the suite runs them on the first case and dtype of a test only.
    expensive_compilers: tuple[str, ...] = ()
    autodiff = False
    #: Whether :meth:`per_example` and :meth:`count_traces` are available.
    vectorizes = False
    traces = False

    def load(self) -> None:
        """Import the framework (ImportError when it is not installed)."""
        self.fw = importlib.import_module(self.framework)

    def devices(self) -> list[str]:
        """The devices present on this machine, by the suite's names ('cpu', 'cuda')."""
        return ["cpu"]

    def prepare_device(self, device: str) -> None:
        """Called once before a device is used: turn off reduced-precision matmul modes (TF32)."""

    @contextlib.contextmanager
    def scope(self, dtype: str | None) -> Iterator[None]:
        """A context every test body runs in (JAX turns on 64-bit types there for float64)."""
        yield

    def asarray(self, x: np.ndarray, dtype: str, device: str) -> Any:
        """``x`` (float64 values exactly representable in ``dtype``, or bool) as an array of ``dtype``
        ('float16', 'bfloat16', 'float32', 'float64', 'bool', 'int32') on ``device``."""
        raise NotImplementedError

    def to_numpy(self, x: Any) -> np.ndarray:
        """Any array of the framework as a NumPy array (float64 for floating dtypes)."""
        raise NotImplementedError

    def dtype_name(self, x: Any) -> str:
        """The dtype of ``x`` by the suite's names."""
        return str(x.dtype).split(".")[-1]

    def device_name(self, x: Any) -> str:
        """The device of ``x`` by the suite's names."""
        return "cpu"

    def run(
        self, module: Any, fn_name: str, logp: Any, args: tuple, kwargs: dict, compiler: str | None = None
    ) -> tuple[Any, dict, Any]:
        """``(loss, metrics, grad_logp)`` of ``module.<fn_name>(logp, *args, **kwargs)``.

        The gradient is of ``loss`` with respect to ``logp``, taken the framework's way; ``compiler`` is one
        of :attr:`compilers` (the whole value-and-gradient computation is compiled) or None for eager.
        """
        raise NotImplementedError

    def grad(self, f: Callable[[Any], Any], x: Any) -> Any:
        """Plain autodiff: the gradient of the scalar ``f(x)`` with respect to ``x``."""
        raise NotImplementedError

    def ops(self) -> Ops:
        """exp, log1p, abs, where, sum (x, axis=None, keepdims=False), minimum, maximum,
        stop_gradient, astype(x, like) for the reference written with framework ops."""
        raise NotImplementedError

    def per_example(self, module: Any, fn_name: str, logp: Any, args: tuple, kwargs: dict) -> tuple[Any, Any]:
        """``(losses, grads)`` with the framework's vectorising map over axis 0 of every array (jax.vmap,
        torch.func.vmap): one loss and one gradient per example. Only where :attr:`vectorizes`."""
        raise NotImplementedError

    def count_traces(
        self, module: Any, fn_name: str, calls: list, kwargs: dict, compiler: str, batched: bool = False
    ) -> int:
        """How many times the compiled value-and-gradient function is traced over ``calls`` (a list of
        ``(logp, args)`` of one shape and dtype, different values); with ``batched``, of its per-example
        vectorised map (where :attr:`vectorizes`). Only where :attr:`traces`."""
        raise NotImplementedError

    def foreign(self, x: np.ndarray) -> Any:
        """An array of *another* library (to check that mixing libraries is refused): NumPy by default."""
        return np.asarray(x)


def _np_dtype(dtype: str) -> Any:
    return {"float16": np.float16, "float32": np.float32, "float64": np.float64, "bool": bool, "int32": np.int32}[
        dtype
    ]


class NumpyDriver(Driver):
    name = "numpy"
    framework = "numpy"
    default_module = "gipo_core.numpy"
    dtypes = ("float16", "float32", "float64")

    def asarray(self, x: np.ndarray, dtype: str, device: str) -> Any:
        return np.asarray(x).astype(_np_dtype(dtype))

    def to_numpy(self, x: Any) -> np.ndarray:
        a = np.asarray(x)
        return a if a.dtype == bool else a.astype(np.float64)

    def run(self, module, fn_name, logp, args, kwargs, compiler=None):
        out, g = module.value_and_grad(getattr(module, fn_name))(logp, *args, **kwargs)
        return out.loss, out.metrics, g

    def foreign(self, x: np.ndarray) -> Any:
        try:
            import array_api_strict as xp
        except ImportError:
            return x
        return xp.asarray(x)


class ArrayApiStrictDriver(NumpyDriver):
    name = "array_api_strict"
    framework = "array_api_strict"
    default_module = "gipo_core.numpy"
    dtypes = ("float32", "float64")
    foreign = Driver.foreign  # NumPy arrays: another library than array_api_strict

    def asarray(self, x: np.ndarray, dtype: str, device: str) -> Any:
        xp = self.fw
        return xp.asarray(np.asarray(x).astype(_np_dtype(dtype)), dtype=getattr(xp, dtype))

    def to_numpy(self, x: Any) -> np.ndarray:
        a = np.from_dlpack(x)
        return a if a.dtype == bool else a.astype(np.float64)


class TorchDriver(Driver):
    name = "torch"
    framework = "torch"
    default_module = "gipo_core.torch"
    #: "compile" is torch.compile(fullgraph=True) with the default (inductor) backend; "compile-aot_eager"
    #: captures the same full graph and autograd graph without code generation, cheap enough for every case.
    compilers = ("compile", "compile-aot_eager")
    expensive_compilers = ("compile",)
    autodiff = True

    def devices(self) -> list[str]:
        return ["cpu"] + (["cuda"] if self.fw.cuda.is_available() else [])

    def prepare_device(self, device: str) -> None:
        if device == "cuda":
            self.fw.backends.cuda.matmul.allow_tf32 = False
            self.fw.backends.cudnn.allow_tf32 = False

    def asarray(self, x, dtype, device):
        torch = self.fw
        x = np.asarray(x)
        if dtype in ("bool", "int32"):
            return torch.from_numpy(x.astype(_np_dtype(dtype))).to(device)
        return torch.from_numpy(x.astype(np.float64)).to(device=device, dtype=getattr(torch, dtype))

    def to_numpy(self, x):
        x = x.detach().cpu()
        return x.numpy() if x.dtype == self.fw.bool else x.to(self.fw.float64).numpy()

    def dtype_name(self, x):
        return str(x.dtype).replace("torch.", "")

    def device_name(self, x):
        return x.device.type

    def run(self, module, fn_name, logp, args, kwargs, compiler=None):
        torch = self.fw
        fn = getattr(module, fn_name)

        def f(logp, *args):
            out = fn(logp, *args, **kwargs)
            return out.loss, out.metrics

        if compiler is not None:
            torch._dynamo.reset()
            backend = "aot_eager" if compiler == "compile-aot_eager" else "inductor"
            f = torch.compile(f, fullgraph=True, dynamic=False, backend=backend)
        logp = logp.detach().clone().requires_grad_(True)
        loss, metrics = f(logp, *args)
        (g,) = torch.autograd.grad(loss, logp)
        return loss.detach(), {k: v.detach() for k, v in metrics.items()}, g

    def grad(self, f, x):
        x = x.detach().clone().requires_grad_(True)
        (g,) = self.fw.autograd.grad(f(x), x)
        return g

    def ops(self):
        torch = self.fw
        return Ops(
            exp=torch.exp, log1p=torch.log1p, abs=torch.abs, where=torch.where, minimum=torch.minimum,
            maximum=torch.maximum, stop_gradient=lambda x: x.detach(),
            sum=lambda x, axis=None, keepdims=False: x.sum() if axis is None else x.sum(dim=axis, keepdim=keepdims),
            full_like=torch.full_like,
        )

    vectorizes = True

    def per_example(self, module, fn_name, logp, args, kwargs):
        fn = getattr(module, fn_name)
        func = self.fw.func

        def f(logp, *args):
            return fn(logp, *args, **kwargs).loss

        grads, losses = func.vmap(func.grad_and_value(f))(logp, *args)
        return losses, grads


class JaxDriver(Driver):
    name = "jax"
    framework = "jax"
    default_module = "gipo_core.jax"
    compilers = ("jit",)
    autodiff = True

    def load(self):
        super().load()
        import jax.numpy as jnp

        self.jnp = jnp

    def devices(self):
        platforms = {d.platform for d in self.fw.devices()} | {"cpu"}
        return ["cpu"] + (["cuda"] if "gpu" in platforms else [])

    def prepare_device(self, device):
        if device == "cuda":
            self.fw.config.update("jax_default_matmul_precision", "highest")

    @contextlib.contextmanager
    def scope(self, dtype):
        with self.fw.enable_x64(dtype == "float64"):
            yield

    def _device(self, device):
        return self.fw.devices("cpu" if device == "cpu" else "gpu")[0]

    def asarray(self, x, dtype, device):
        jnp = self.jnp
        x = np.asarray(x)
        if dtype in ("bool", "int32"):
            arr = jnp.asarray(x.astype(_np_dtype(dtype)))
        elif dtype == "float64":
            arr = jnp.asarray(x.astype(np.float64), dtype=jnp.float64)
        else:
            arr = jnp.asarray(x.astype(np.float32)).astype(getattr(jnp, dtype))
        return self.fw.device_put(arr, self._device(device))

    def to_numpy(self, x):
        a = np.asarray(x)
        return a if a.dtype == bool else a.astype(np.float64)

    def device_name(self, x):
        (d,) = x.devices()
        return "cpu" if d.platform == "cpu" else "cuda"

    def run(self, module, fn_name, logp, args, kwargs, compiler=None):
        jax = self.fw
        fn = getattr(module, fn_name)

        def f(logp, args):
            out = fn(logp, *args, **kwargs)
            return out.loss, out.metrics

        vg = jax.value_and_grad(f, has_aux=True)
        if compiler == "jit":
            vg = jax.jit(vg)
        (loss, metrics), g = vg(logp, args)
        return loss, metrics, g

    def grad(self, f, x):
        return self.fw.grad(f)(x)

    def ops(self):
        jnp, lax = self.jnp, self.fw.lax
        return Ops(
            exp=jnp.exp, log1p=jnp.log1p, abs=jnp.abs, where=jnp.where, minimum=jnp.minimum, maximum=jnp.maximum,
            stop_gradient=lax.stop_gradient,
            sum=lambda x, axis=None, keepdims=False: jnp.sum(x, axis=axis, keepdims=keepdims),
            full_like=jnp.full_like,
        )

    vectorizes = True
    traces = True

    def per_example(self, module, fn_name, logp, args, kwargs):
        jax = self.fw
        fn = getattr(module, fn_name)

        def f(logp, *args):
            return fn(logp, *args, **kwargs).loss

        losses, grads = jax.jit(jax.vmap(jax.value_and_grad(f)))(logp, *args)
        return losses, grads

    def count_traces(self, module, fn_name, calls, kwargs, compiler, batched=False):
        jax = self.fw
        fn = getattr(module, fn_name)
        traced = []

        def f(logp, args):
            traced.append(1)
            out = fn(logp, *args, **kwargs)
            return out.loss, out.metrics

        vg = jax.value_and_grad(f, has_aux=True)
        vg = jax.jit(jax.vmap(vg) if batched else vg)
        for logp, args in calls:
            jax.block_until_ready(vg(logp, args))
        return len(traced)


class TfDriver(Driver):
    name = "tf"
    framework = "tensorflow"
    default_module = "gipo_core.tf"
    compilers = ("function", "function-xla")
    autodiff = True
    traces = True

    def devices(self):
        return ["cpu"] + (["cuda"] if self.fw.config.list_physical_devices("GPU") else [])

    def prepare_device(self, device):
        if device == "cuda":
            self.fw.config.experimental.enable_tensor_float_32_execution(False)

    def foreign(self, x: np.ndarray) -> Any:
        """gipo_core.tf converts NumPy arrays (as TensorFlow ops do): the foreign array is array-api-strict's."""
        import array_api_strict as xp

        return xp.asarray(x)

    def asarray(self, x, dtype, device):
        tf = self.fw
        x = np.asarray(x)
        with tf.device("/CPU:0" if device == "cpu" else "/GPU:0"):
            if dtype in ("bool", "int32", "float64"):
                return tf.constant(x.astype(_np_dtype(dtype)))
            return tf.cast(tf.constant(x.astype(np.float32)), getattr(tf, dtype))

    def to_numpy(self, x):
        tf = self.fw
        if x.dtype == tf.bool:
            return x.numpy()
        return tf.cast(x, tf.float64).numpy()

    def dtype_name(self, x):
        return x.dtype.name

    def device_name(self, x):
        return "cuda" if "GPU" in x.device.upper() else "cpu"

    def run(self, module, fn_name, logp, args, kwargs, compiler=None):
        tf = self.fw
        fn = getattr(module, fn_name)

        def f(logp, *args):
            with tf.GradientTape() as tape:
                tape.watch(logp)
                out = fn(logp, *args, **kwargs)
            return out.loss, out.metrics, tape.gradient(out.loss, logp)

        if compiler is not None:
            f = tf.function(f, jit_compile=compiler == "function-xla")
        return f(logp, *args)

    def grad(self, f, x):
        tf = self.fw
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = f(x)
        return tape.gradient(y, x)

    def ops(self):
        tf = self.fw
        return Ops(
            exp=tf.exp, log1p=tf.math.log1p, abs=tf.abs, where=tf.where, minimum=tf.minimum, maximum=tf.maximum,
            stop_gradient=tf.stop_gradient,
            sum=lambda x, axis=None, keepdims=False: tf.reduce_sum(x, axis=axis, keepdims=keepdims),
            full_like=lambda x, v: tf.fill(tf.shape(x), tf.constant(v, dtype=x.dtype)),
        )

    def count_traces(self, module, fn_name, calls, kwargs, compiler, batched=False):
        tf = self.fw
        fn = getattr(module, fn_name)
        traced = []

        @tf.function(jit_compile=compiler == "function-xla")
        def f(logp, *args):
            traced.append(1)
            with tf.GradientTape() as tape:
                tape.watch(logp)
                out = fn(logp, *args, **kwargs)
            return out.loss, tape.gradient(out.loss, logp)

        for logp, args in calls:
            f(logp, *args)
        return len(traced)


DRIVERS: dict[str, type[Driver]] = {
    d.name: d for d in (NumpyDriver, ArrayApiStrictDriver, TorchDriver, JaxDriver, TfDriver)
}
