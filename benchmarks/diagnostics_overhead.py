"""What the diagnostics cost, as ratios measured in one run (run: python benchmarks/diagnostics_overhead.py).

Each timed call is a forward + backward of ``GIPOLoss`` (``torch.autograd.grad`` of the loss with respect to
``logp``) on float32 inputs of 2^22 elements (1024 sequences x 4096 tokens, per-sequence advantages, a
bool mask with 80% valid tokens), eager PyTorch on the CPU, with a device synchronisation. For each path, the
time with ``with_metrics=True`` (every diagnostic), ``with_metrics="basic"`` and a loss with off-policy
options on (``ratio_level="sequence"``, ``rollout_is="token-mask"``, ``opsm_delta``, full diagnostics) is
divided by the time with ``with_metrics=False`` of the same path, measured in the same run (interleaved
repeats; medians, and minima, which a machine shared with other work disturbs less).

Paths: "fused" is the library's default dispatch on the CPU (the core's forward as one kernel built by
``torch.compile`` for inputs of 2^16 elements or more); "op by op" forces ``set_fused("never")`` (the path
CUDA tensors and small inputs take). Target: diagnostics cost less than 1.5x the call without them, with the
full set on the fused path, with the basic set on the op-by-op path.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from gipo_core.torch import GIPOLoss, fused_settings, set_fused


def _inputs(log2_n: int, seed: int = 0) -> dict:
    n = 1 << log2_n
    t = min(4096, n)
    b = n // t
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(b, t, generator=g) * 3.0
    old = logp - torch.randn(b, t, generator=g) * 0.3
    rollout = old - torch.randn(b, t, generator=g) * 0.1
    adv = torch.randn(b, 1, generator=g)
    mask = torch.rand(b, t, generator=g) < 0.8
    return {"logp": logp.requires_grad_(True), "old": old, "adv": adv, "mask": mask, "rollout": rollout}


def _step(loss_fn, x: dict, **call) -> None:
    out = loss_fn(x["logp"], x["old"], x["adv"], x["mask"], **call)
    torch.autograd.grad(out.loss, x["logp"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--log2-n", type=int, default=22, help="elements per call as a power of 2 (default 22)")
    parser.add_argument("--repeat", type=int, default=7, help="timed repeats per variant (default 7)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    x = _inputs(args.log2_n)
    variants = {
        "none": (GIPOLoss(with_metrics=False), {}),
        "full": (GIPOLoss(with_metrics=True), {}),
        "basic": (GIPOLoss(with_metrics="basic"), {}),
        "off-policy full": (
            GIPOLoss(with_metrics=True, ratio_level="sequence", rollout_is="token-mask", opsm_delta=0.5),
            {"rollout_logp": x["rollout"]},
        ),
    }
    saved = fused_settings()
    print(f"GIPOLoss forward + backward, 2^{args.log2_n} float32 elements, eager CPU, "
          f"{torch.get_num_threads()} threads; median of {args.repeat}")
    print(f"{'path':10s} {'variant':16s} {'median ms':>10s} {'x none':>7s} {'min ms':>8s} {'x none':>7s}")
    try:
        for path, mode in (("fused", "auto"), ("op by op", "never")):
            set_fused(mode)
            for loss_fn, call in variants.values():  # warm-up (the fused path compiles here)
                _step(loss_fn, x, **call)
                _step(loss_fn, x, **call)
            times: dict[str, list[float]] = {name: [] for name in variants}
            for _ in range(args.repeat):  # interleaved: slow drifts of the machine hit every variant alike
                for name, (loss_fn, call) in variants.items():
                    t0 = time.perf_counter()
                    _step(loss_fn, x, **call)
                    times[name].append(time.perf_counter() - t0)
            med = {name: statistics.median(ts) for name, ts in times.items()}
            low = {name: min(ts) for name, ts in times.items()}
            for name in variants:
                print(f"{path:10s} {name:16s} {med[name] * 1e3:10.1f} {med[name] / med['none']:7.2f} "
                      f"{low[name] * 1e3:8.1f} {low[name] / low['none']:7.2f}")
    finally:
        set_fused(saved["mode"], min_numel=saved["min_numel"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
