"""Speed of ``gipo_core.jax`` against the literal GIPO formula and the memory-streaming floor, in one run.

Every case is jitted, warmed up and timed to ``block_until_ready``, the cases taking turns; the table gives median times and ratios
within this one run (absolute times on a shared machine mean little):

- ``/ literal``: over the authors' literal form ``mean(-stopgrad(exp(-log(rho)^2 / 2 sigma^2)) * rho * A)``
  with its gradient from ``jax.value_and_grad`` (the issue's CPU target: gipo_loss <= 0.6);
- ``/ floor``: over one jitted pass that reads the three inputs and writes one array of their size, the
  least memory traffic a fused loss + gradient can have (read logp, old_logp, advantages; write the
  gradient);
- ``of copy bw``: the bandwidth the case reaches, counting that least traffic (4 arrays), as a fraction of
  the device's copy bandwidth measured in the same run (``x -> x + 1``, 2 arrays): the GPU target is >= 0.6
  at 2^26 elements.

Usage: ``python benchmarks/jax_targets.py [--log2-size N] [--repeats R] [--dtype float32]`` (N defaults to 22
on CPU, 26 on a GPU).
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp

from gipo_core.jax import gipo_loss, ppo_clip_loss


def literal_gipo(logp, old_logp, adv, sigma=1.0):
    ratio = jnp.exp(logp - old_logp)
    weight = jax.lax.stop_gradient(jnp.exp(-0.5 * (jnp.log(ratio) / sigma) ** 2))
    return jnp.mean(-weight * ratio * adv)


def timed(fns, args, repeats):
    """Median time of each function; the repeats are interleaved (one call of each per round), so that
    load from other processes on a shared machine falls on every case alike."""
    for fn in fns.values():
        jax.block_until_ready(fn(*args))  # compile
        jax.block_until_ready(fn(*args))
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn(*args))
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--log2-size", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    args = parser.parse_args()
    device = jax.devices()[0]
    log2 = args.log2_size if args.log2_size is not None else (22 if device.platform == "cpu" else 26)
    n = 2**log2
    shape = (n // 1024, 1024)
    dtype = jnp.dtype(args.dtype)
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    logp = (jax.random.normal(k1, shape) * 0.1 - 1.0).astype(dtype)
    old_logp = (logp + jax.random.normal(k2, shape) * 0.1).astype(dtype)
    adv = jax.random.normal(k3, shape).astype(dtype)
    data = (logp, old_logp, adv)

    def vg(loss, has_aux=False):
        return jax.jit(jax.value_and_grad(loss, has_aux=has_aux))

    cases = {
        "copy (read 1, write 1)": (jax.jit(lambda lp, o, a: lp + 1), 2),
        "floor (read 3, write 1)": (jax.jit(lambda lp, o, a: lp * o + a), 4),
        "literal formula": (vg(literal_gipo), 4),
        "gipo_loss, no metrics": (vg(lambda lp, o, a: gipo_loss(lp, o, a, with_metrics=False).loss), 4),
        "gipo_loss, metrics unused": (vg(lambda lp, o, a: gipo_loss(lp, o, a).loss), 4),
        "gipo_loss, metrics returned": (vg(lambda lp, o, a: tuple(gipo_loss(lp, o, a)), has_aux=True), 4),
        "ppo_clip_loss, no metrics": (vg(lambda lp, o, a: ppo_clip_loss(lp, o, a, with_metrics=False).loss), 4),
    }
    times = timed({name: fn for name, (fn, _) in cases.items()}, data, args.repeats)
    t_copy = times["copy (read 1, write 1)"]
    t_floor = times["floor (read 3, write 1)"]
    t_lit = times["literal formula"]
    copy_bw = 2 * n * dtype.itemsize / t_copy
    print(f"jax {jax.__version__} on {device.device_kind} ({device.platform}), {args.dtype}, 2^{log2} elements; "
          f"copy bandwidth {copy_bw / 1e9:.1f} GB/s")
    print(f"{'case':30s} {'median ms':>10s} {'/ literal':>10s} {'/ floor':>8s} {'of copy bw':>11s}")
    for name, t in times.items():
        frac = cases[name][1] * n * dtype.itemsize / t / copy_bw
        print(f"{name:30s} {t * 1e3:10.3f} {t / t_lit:10.2f} {t / t_floor:8.2f} {frac:11.2f}")


if __name__ == "__main__":
    main()
