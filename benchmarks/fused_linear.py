"""Fused linear loss against the unfused path: peak memory and time of one forward + backward step.

    python benchmarks/fused_linear.py                     # CPU: float32, 4,096 tokens, hidden 1,024, vocab 32,768
    python benchmarks/fused_linear.py --config gpu        # CUDA: bfloat16, 16,384 tokens, hidden 4,096, vocab 128,256
    python benchmarks/fused_linear.py --variants torch-unfused,torch-fused-ppo --repeats 3 --json out.json

Variants (each runs in a fresh subprocess, one after the other):

- ``torch-unfused``: ``logits = hidden @ W.T``, ``log_softmax`` in float32, ``gather``, ``ppo_clip_loss``;
- ``torch-fused-ppo`` / ``torch-fused-gipo``: ``gipo_core.torch.fused_linear_loss`` (PPO-clip / GIPO);
- ``liger-eager`` / ``liger-compiled``: Liger-Kernel's ``LigerFusedLinearGRPOLoss`` at the equivalent settings
  (``loss_type="dapo"``: PPO-clip at 0.2/0.2, token-mean over the batch's valid tokens; ``beta=0``, no
  reference model; ``compiled=False`` / ``True``, which compiles its loss math);
- ``jax-unfused`` / ``jax-fused-ppo``: the same two paths in JAX, each a jitted ``value_and_grad``.

Every step computes the loss and the gradients with respect to the hidden states and the weight (the diagnostics
on, as a trainer logs them). Inputs: one advantage per sequence, a mask with padded tails (7/8 of the tokens
valid), ``old_logp`` near the current log-probabilities.

**Memory** is the peak of what the step allocates above what was live before it, measured the same way for
every variant. CPU: the resident set of the subprocess, with glibc told to serve every allocation over 64 KiB by
``mmap`` (``MALLOC_MMAP_THRESHOLD_``, so freed buffers go back to the system and reused ones are counted); after
a warm-up step (compilation) the kernel's high-water mark is reset (``/proc/self/clear_refs``), and the peak is
``VmHWM`` during the measured step minus ``VmRSS`` just before it. It counts every buffer any library allocates
(PyTorch, Inductor, XLA), the gradients included. CUDA: ``torch.cuda.max_memory_allocated`` above the allocated
bytes before the step; JAX on GPU: ``peak_bytes_in_use`` of the device. For JAX the compiled program's own
``memory_analysis()`` (temporaries + outputs) is printed too.

**Time** is the median of ``--repeats`` steps after the warm-up (CUDA: synchronised). Ratios are taken within
this one run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

CONFIGS = {
    "cpu": {"batch": 4, "time": 1024, "hidden": 1024, "vocab": 32768, "dtype": "float32", "device": "cpu"},
    "gpu": {"batch": 16, "time": 1024, "hidden": 4096, "vocab": 128256, "dtype": "bfloat16", "device": "cuda"},
    "tiny": {"batch": 2, "time": 64, "hidden": 64, "vocab": 512, "dtype": "float32", "device": "cpu"},
}

VARIANTS = (
    "torch-unfused",
    "torch-fused-ppo",
    "torch-fused-gipo",
    "liger-eager",
    "liger-compiled",
    "jax-unfused",
    "jax-fused-ppo",
)


# --------------------------------------------------------------------------------------------- measuring


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident set


class _Meter:
    """Peak bytes above the state at ``start`` and the wall time of what runs in between."""

    def __init__(self, device: str, framework: str):
        self.device, self.framework = device, framework

    def start(self) -> None:
        import gc

        gc.collect()
        if self.device == "cuda" and self.framework == "torch":
            import torch

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        elif self.device == "cuda":
            self.base = None  # JAX on GPU: the device's peak counter (not resettable) is read at the end
        else:
            _reset_peak()
            self.base = _status_kib("VmRSS") * 1024
        self.t0 = time.perf_counter()

    def stop(self, result) -> tuple[float, int]:
        if self.framework == "torch" and self.device == "cuda":
            import torch

            torch.cuda.synchronize()
        if self.framework == "jax":
            import jax

            jax.block_until_ready(result)
        elapsed = time.perf_counter() - self.t0
        if self.device == "cuda" and self.framework == "torch":
            import torch

            peak = torch.cuda.max_memory_allocated() - self.base
        elif self.device == "cuda":
            import jax

            peak = jax.devices()[0].memory_stats()["peak_bytes_in_use"]
        else:
            peak = _status_kib("VmHWM") * 1024 - self.base
        return elapsed, peak


# ---------------------------------------------------------------------------------------------- variants


def _numpy_inputs(cfg: dict):
    import numpy as np

    rng = np.random.default_rng(0)
    b, t, h, v = cfg["batch"], cfg["time"], cfg["hidden"], cfg["vocab"]
    hidden = rng.standard_normal((b, t, h), dtype=np.float32)
    weight = rng.standard_normal((v, h), dtype=np.float32) * (1.0 / h**0.5)
    ids = rng.integers(0, v, (b, t))
    lengths = rng.integers(t * 3 // 4, t + 1, b)
    lengths[0] = t
    mask = np.arange(t)[None, :] < lengths[:, None]
    adv = rng.standard_normal((b, 1)).astype(np.float32)
    noise = (rng.standard_normal((b, t)) * 0.1).astype(np.float32)
    return hidden, weight, ids, mask, adv, noise


def _torch_setup(cfg: dict, variant: str):
    import torch

    import gipo_core.torch as gt

    torch.manual_seed(0)
    device, dtype = cfg["device"], getattr(torch, cfg["dtype"])
    hidden_np, weight_np, ids_np, mask_np, adv_np, noise_np = _numpy_inputs(cfg)
    hidden = torch.from_numpy(hidden_np).to(device, dtype).requires_grad_()
    weight = torch.from_numpy(weight_np).to(device, dtype).requires_grad_()
    ids = torch.from_numpy(ids_np).to(device)
    mask = torch.from_numpy(mask_np).to(device)
    adv = torch.from_numpy(adv_np).to(device)
    with torch.no_grad():  # old_logp: the current log-probabilities plus noise (ratios near 1, some clipped)
        logp = gt.fused_linear_loss(hidden, weight, ids, torch.zeros(ids.shape, device=device), adv).logp
        old = logp + torch.from_numpy(noise_np).to(device)
    del logp

    if variant == "torch-unfused":

        def step():
            logits = hidden @ weight.T
            logp = torch.log_softmax(logits.float(), -1).gather(-1, ids[..., None]).squeeze(-1)
            out = gt.ppo_clip_loss(logp, old, adv, mask)
            out.loss.backward()
            return out.loss

    elif variant.startswith("torch-fused"):
        objective = "ppo_clip" if variant.endswith("ppo") else "gipo"

        def step():
            out = gt.fused_linear_loss(hidden, weight, ids, old, adv, mask, objective=objective)
            out.loss.backward()
            return out.loss

    else:
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

        liger = LigerFusedLinearGRPOLoss(
            beta=0.0, use_ref_model=False, loss_type="dapo", epsilon_low=0.2, epsilon_high=0.2,
            compiled=variant == "liger-compiled",
        )
        adv1 = adv[:, 0]

        def step():
            loss = liger(hidden, weight, ids, mask, adv1, old_per_token_logps=old)[0]
            loss.backward()
            return loss

    def run():
        hidden.grad = None
        weight.grad = None
        return step()

    def reset():
        hidden.grad = None
        weight.grad = None

    return run, reset


def _jax_setup(cfg: dict, variant: str):
    import jax
    import jax.numpy as jnp

    import gipo_core.jax as gj

    dtype = getattr(jnp, cfg["dtype"])
    hidden_np, weight_np, ids_np, mask_np, adv_np, noise_np = _numpy_inputs(cfg)
    hidden, weight = jnp.asarray(hidden_np, dtype), jnp.asarray(weight_np, dtype)
    ids, mask, adv = jnp.asarray(ids_np, jnp.int32), jnp.asarray(mask_np), jnp.asarray(adv_np)
    logp = jax.jit(lambda h, w: gj.fused_linear_loss(h, w, ids, jnp.zeros(ids.shape), adv).logp)(hidden, weight)
    old = logp + jnp.asarray(noise_np)

    if variant == "jax-unfused":

        def loss_fn(h, w):
            logits = h @ w.T
            logp = jnp.take_along_axis(jax.nn.log_softmax(logits.astype(jnp.float32), -1), ids[..., None], -1)[..., 0]
            out = gj.ppo_clip_loss(logp, old, adv, mask)
            return out.loss, out.metrics

    else:

        def loss_fn(h, w):
            out = gj.fused_linear_loss(h, w, ids, old, adv, mask, objective="ppo_clip")
            return out.loss, out.metrics

    step = jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True))
    analysis = step.lower(hidden, weight).compile().memory_analysis()
    extra = {}
    if analysis is not None:
        extra = {
            "xla_temp_bytes": int(analysis.temp_size_in_bytes),
            "xla_output_bytes": int(analysis.output_size_in_bytes),
        }

    def run():
        return step(hidden, weight)

    return run, (lambda: None), extra


def _child(variant: str, config: str, repeats: int) -> dict:
    cfg = CONFIGS[config]
    framework = "jax" if variant.startswith("jax") else "torch"
    extra: dict = {}
    if framework == "jax":
        run, reset, extra = _jax_setup(cfg, variant)
    else:
        run, reset = _torch_setup(cfg, variant)
    meter = _Meter(cfg["device"], framework)
    result = run()  # warm-up: compilation, first-touch allocations
    if framework == "jax":
        import jax

        jax.block_until_ready(result)
    del result
    reset()
    times, peaks = [], []
    for _ in range(repeats):
        meter.start()
        result = run()
        elapsed, peak = meter.stop(result)
        loss = float(result[0][0] if framework == "jax" else result)
        del result
        reset()
        times.append(elapsed)
        peaks.append(peak)
    return {"variant": variant, "time_s": statistics.median(times), "times_s": times, "peak_bytes": max(peaks),
            "loss": loss, **extra}


# ------------------------------------------------------------------------------------------------ parent


def _run_variant(variant: str, config: str, repeats: int) -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    if CONFIGS[config]["device"] == "cuda":
        env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    else:
        env.setdefault("JAX_PLATFORMS", "cpu")
    cmd = [sys.executable, __file__, "--child", variant, "--config", config, "--repeats", str(repeats)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
        return {"variant": variant, "error": tail[:300]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _ratio(results: dict, num: str, den: str, key: str) -> str:
    a, b = results.get(num, {}), results.get(den, {})
    if key not in a or key not in b or not b[key]:
        return "n/a"
    return f"{a[key] / b[key]:.2f}x"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", choices=sorted(CONFIGS), default="cpu")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated, from: " + ", ".join(VARIANTS))
    parser.add_argument("--repeats", type=int, default=2, help="measured steps per variant (after one warm-up)")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(_child(args.child, args.config, args.repeats)))
        return 0
    variants = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    cfg = CONFIGS[args.config]
    tokens = cfg["batch"] * cfg["time"]
    print(
        f"config {args.config}: {tokens} tokens ({cfg['batch']} x {cfg['time']}), hidden {cfg['hidden']}, "
        f"vocab {cfg['vocab']}, {cfg['dtype']} on {cfg['device']}; forward + backward; {args.repeats} measured steps"
    )
    results: dict = {}
    for variant in variants:
        res = _run_variant(variant, args.config, args.repeats)
        results[variant] = res
        if "error" in res:
            print(f"  {variant:18s} failed: {res['error']}", flush=True)
            continue
        xla = f"  (XLA temp {res['xla_temp_bytes'] / 2**20:,.0f} MiB)" if "xla_temp_bytes" in res else ""
        print(
            f"  {variant:18s} time {res['time_s']:7.2f} s   peak {res['peak_bytes'] / 2**20:8,.0f} MiB   "
            f"loss {res['loss']:+.6f}{xla}",
            flush=True,
        )
    print("ratios (this run):")
    for num, den in (
        ("torch-fused-ppo", "torch-unfused"),
        ("torch-fused-gipo", "torch-unfused"),
        ("jax-fused-ppo", "jax-unfused"),
        ("torch-fused-ppo", "liger-eager"),
        ("torch-fused-ppo", "liger-compiled"),
        ("liger-compiled", "torch-unfused"),
    ):
        if num in results and den in results:
            print(
                f"  {num} / {den}: time {_ratio(results, num, den, 'time_s')}, "
                f"peak memory {_ratio(results, num, den, 'peak_bytes')}"
            )
    if "jax-fused-ppo" in results and "jax-unfused" in results:
        xla = _ratio(results, "jax-fused-ppo", "jax-unfused", "xla_temp_bytes")
        print(f"  jax-fused-ppo / jax-unfused: XLA temporaries {xla}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": args.config, **cfg, "results": results}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
