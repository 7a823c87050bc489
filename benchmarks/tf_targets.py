"""Speed of ``gipo_core.tf`` against the literal GIPO formula and the memory-streaming floor, in one run.

Every case is one ``tf.function(jit_compile=True)`` (XLA) step computing the loss and its gradient with
``tf.GradientTape``, warmed up before timing; each timed call ends with a host read of the loss, so it
waits for the computation. Printed: median wall time and its ratios to

- ``literal``: the authors' literal form ``mean(-stopgrad(exp(-log(rho)^2 / 2 sigma^2)) * rho * A)`` with
  ``rho = exp(logp - old_logp)``, differentiated by the tape and compiled the same way;
- ``floor``: a compiled pass that reads the three inputs and writes one array of their size (the least
  traffic a fused forward + backward can have: read logp, old_logp, advantages, write the gradient).

The rounds interleave the cases, so drift in machine load hits every case alike.

Usage: ``python benchmarks/tf_targets.py [--log2-size 22] [--repeats 30] [--dtype float32]``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402

from gipo_core.tf import gipo_loss, ppo_clip_loss  # noqa: E402

SIGMA = 1.0


def literal_gipo(logp, old_logp, adv):
    ratio = tf.exp(logp - old_logp)
    weight = tf.stop_gradient(tf.exp(-0.5 * (tf.math.log(ratio) / SIGMA) ** 2))
    return tf.reduce_mean(-weight * ratio * adv)


def value_and_grad(loss_fn):
    """A compiled step returning (loss, d loss / d logp)."""

    def step(logp, old_logp, adv):
        with tf.GradientTape() as tape:
            tape.watch(logp)
            loss = loss_fn(logp, old_logp, adv)
        return loss, tape.gradient(loss, logp)

    return tf.function(step, jit_compile=True)


def metrics_step(logp, old_logp, adv):
    """Loss, gradient and every diagnostic returned from the compiled step."""
    with tf.GradientTape() as tape:
        tape.watch(logp)
        out = gipo_loss(logp, old_logp, adv)
    return out.loss, tape.gradient(out.loss, logp), out.metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--log2-size", type=int, default=22)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16", "float64"])
    args = parser.parse_args()
    n = 2**args.log2_size
    shape = (max(n // 1024, 1), min(n, 1024))
    dtype = getattr(tf, args.dtype)
    rng = tf.random.Generator.from_seed(0)
    logp = rng.normal(shape) * 0.1 - 1.0
    data = (
        tf.cast(logp, dtype),
        tf.cast(logp + rng.normal(shape) * 0.1, dtype),
        tf.cast(rng.normal(shape), dtype),
    )
    cases = {
        "floor (read 3, write 1)": tf.function(lambda a, b, c: a * b + c, jit_compile=True),
        "literal formula": value_and_grad(literal_gipo),
        "gipo_loss, no metrics": value_and_grad(lambda lp, o, a: gipo_loss(lp, o, a, with_metrics=False).loss),
        "gipo_loss, metrics returned": tf.function(metrics_step, jit_compile=True),
        "ppo_clip_loss, no metrics": value_and_grad(
            lambda lp, o, a: ppo_clip_loss(lp, o, a, with_metrics=False).loss
        ),
    }

    def call(fn):
        out = fn(*data)
        first = out[0] if isinstance(out, tuple) else out
        first.numpy()  # waits for the result

    for fn in cases.values():  # compile and warm up
        call(fn)
        call(fn)
    times = {name: [] for name in cases}
    for _ in range(args.repeats):
        for name, fn in cases.items():
            t0 = time.perf_counter()
            call(fn)
            times[name].append(time.perf_counter() - t0)
    median = {name: statistics.median(ts) for name, ts in times.items()}
    base_floor = median["floor (read 3, write 1)"]
    base_lit = median["literal formula"]
    print(f"tensorflow {tf.__version__}, XLA on CPU, {args.dtype}, 2^{args.log2_size} elements, shape {shape}")
    print(f"{'case':32s} {'median ms':>10s} {'/ literal':>10s} {'/ floor':>9s}")
    for name, t in median.items():
        print(f"{name:32s} {t * 1e3:10.2f} {t / base_lit:10.2f} {t / base_floor:9.2f}")


if __name__ == "__main__":
    main()
