"""Speed of ``gipo_core.tf`` against the literal GIPO formula and the memory-streaming floor, in one run.

Every case is one ``tf.function(jit_compile=True)`` (XLA) step computing the masked token-mean loss and its
gradient with ``tf.GradientTape``, warmed up before timing; each timed call ends with a host read of the loss,
so it waits for the computation. The inputs are ``benchmarks/legs.py``'s (fixed seed, shape (n / 1024, 1024),
about 10 % padding). Printed: median wall time and its ratios to

- the literal formula, in two writings of the same math that XLA compiles very differently on the CPU:
  ``literal, weight detached`` is ``-stopgrad(exp(-log(rho)^2 / 2 sigma^2)) * rho * A`` (the form of
  ``benchmarks/jax_targets.py``), ``literal, trainer form`` the authors' trainer's
  ``-(exp(-0.5 (log(stopgrad(rho)) / sigma)^2) * rho * A)`` (the form of ``benchmarks/legs.py``);
  both with ``rho = exp(logp - old_logp)``, a masked mean, and the tape's gradient;
- ``floor``: a compiled pass that reads the four inputs and writes one array of their size (the least
  traffic a fused forward + backward can have: read logp, old_logp, advantages, mask, write the gradient).
- ``minimal custom gradient``: GIPO's closed form with nothing else (no masking before the exp, no guards,
  sigma fixed), as a yardstick. XLA's CPU backend compiles it, like ``gipo_loss``, into three passes: the
  mask count, one fusion that writes the gradient (the backward multiply fused in), and a reduction of that
  array for the loss. It does not fuse a reduction into the elementwise pass that produces its input, so
  seven array-sized reads and writes are the least for this step, against twelve for the trainer-form
  literal (forward and backward in separate fusions): about 0.6x from memory traffic alone.

The rounds interleave the cases, so drift in machine load hits every case alike.

Usage: ``python benchmarks/tf_targets.py [--log2-size 22] [--repeats 30] [--dtype float32]``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402

from gipo_core.tf import gipo_loss, ppo_clip_loss  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from legs import make_inputs  # noqa: E402

SIGMA = 1.0


def literal_detached_weight(logp, old_logp, adv, mask):
    ratio = tf.exp(logp - old_logp)
    weight = tf.stop_gradient(tf.exp(-0.5 * (tf.math.log(ratio) / SIGMA) ** 2))
    return tf.reduce_sum(-weight * ratio * adv * mask) / tf.reduce_sum(mask)


def literal_trainer_form(logp, old_logp, adv, mask):
    ratio = tf.exp(logp - old_logp)
    weight = tf.exp(-0.5 * (tf.math.log(tf.stop_gradient(ratio)) / SIGMA) ** 2)
    pg_losses = -(weight * ratio * adv)
    return tf.reduce_sum(pg_losses * mask) / tf.reduce_sum(mask)


def minimal_custom_gradient(logp, old_logp, adv, mask):
    """The least a closed-form gradient can do (token-mean, sigma = 1, no NaN masking, no guards): a yardstick
    for what XLA's CPU fusion allows, not a usable loss."""

    @tf.custom_gradient
    def loss(lp):
        ell = lp - old_logp
        saved = (mask * (-1.0 / tf.reduce_sum(mask))) * adv * tf.exp(ell * (1.0 - 0.5 * ell))
        return tf.reduce_sum(saved), lambda g: g * saved

    return loss(logp)


def value_and_grad(loss_fn):
    """A compiled step returning (loss, d loss / d logp)."""

    def step(logp, old_logp, adv, mask):
        with tf.GradientTape() as tape:
            tape.watch(logp)
            loss = loss_fn(logp, old_logp, adv, mask)
        return loss, tape.gradient(loss, logp)

    return tf.function(step, jit_compile=True)


def metrics_step(logp, old_logp, adv, mask):
    """Loss, gradient and every diagnostic returned from the compiled step."""
    with tf.GradientTape() as tape:
        tape.watch(logp)
        out = gipo_loss(logp, old_logp, adv, mask)
    return out.loss, tape.gradient(out.loss, logp), out.metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--log2-size", type=int, default=22)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16", "float64"])
    args = parser.parse_args()
    n = 2**args.log2_size
    dtype = getattr(tf, args.dtype)
    inputs = make_inputs(n)
    data = tuple(tf.cast(inputs[k], dtype) for k in ("logp", "old_logp", "advantages", "mask"))
    shape = tuple(data[0].shape)
    floor = "floor (read 4, write 1)"
    cases = {
        floor: tf.function(lambda a, b, c, d: a * b + c * d, jit_compile=True),
        "literal, weight detached": value_and_grad(literal_detached_weight),
        "literal, trainer form": value_and_grad(literal_trainer_form),
        "gipo_loss, no metrics": value_and_grad(lambda *x: gipo_loss(*x, sigma=SIGMA, with_metrics=False).loss),
        "gipo_loss, metrics returned": tf.function(metrics_step, jit_compile=True),
        "ppo_clip_loss, no metrics": value_and_grad(lambda *x: ppo_clip_loss(*x, with_metrics=False).loss),
        "minimal custom gradient": value_and_grad(minimal_custom_gradient),
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
    lit_a, lit_b = median["literal, weight detached"], median["literal, trainer form"]
    device = "GPU" if tf.config.list_physical_devices("GPU") else "CPU"
    print(f"tensorflow {tf.__version__}, XLA on {device}, {args.dtype}, 2^{args.log2_size} elements, shape {shape}")
    print(f"{'case':30s} {'median ms':>10s} {'/ lit. detached':>16s} {'/ lit. trainer':>15s} {'/ floor':>8s}")
    for name, t in median.items():
        print(f"{name:30s} {t * 1e3:10.2f} {t / lit_a:16.2f} {t / lit_b:15.2f} {t / median[floor]:8.2f}")


if __name__ == "__main__":
    main()
