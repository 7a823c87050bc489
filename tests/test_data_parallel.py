"""Data-parallel training is exact: per-rank losses with the global ``denominator`` give the full-batch gradient.

The rule under test: ``denominator`` is the whole number the weighted sum is divided by. Each rank passes the
global value (the one table below) divided by the world size W; the framework's gradient averaging across
ranks (DDP, ``pmean``, a MEAN all-reduce) then gives exactly the gradient of the single-process full-batch
loss. Where the framework sums the ranks' gradients instead (TensorFlow's custom-loop convention, ``psum``),
each rank passes the global value itself.

Three engines, each in fresh processes so that every one of them starts as a real job would:

- PyTorch: 2 processes, ``torch.distributed`` with gloo, the policy wrapped in ``DistributedDataParallel``;
  the ranks' batches are padded to different lengths (dynamic padding) and have uneven numbers of valid
  tokens, one sequence with none.
- JAX: one process with 8 host devices (``--xla_force_host_platform_device_count=8``), the batch sharded over
  them with ``shard_map`` and the parameter gradients ``pmean``-ed.
- TensorFlow: ``tf.distribute.MirroredStrategy`` over 2 logical CPU devices, gradients all-reduced in the
  replica context (MEAN with global / W, SUM with the global value).

Each engine compares its data-parallel gradient with its own single-device full-batch gradient to 1e-6 in
float32, for every aggregation mode and two objectives, and checks that the ranks' own (local) normalisation
would have given a different gradient, so that the comparison can fail.

This file is also the workers' entry point: ``python test_data_parallel.py ENGINE OUT_DIR [RANK]``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

import gipo_core
from gipo_core import AGG_MODES

from subprocess_helpers import run_python

WORLD = 2  # torch and TensorFlow ranks
JAX_DEVICES = 8
HORIZON = 10  # T: the time axis of the full batch
OBS_DIM, N_ACTIONS = 3, 4


def _n_seq(mask):
    """Sequences with at least one valid token."""
    return (mask.sum(-1) > 0).sum()


#: The global ``denominator`` of each aggregation mode: the whole number the full batch's weighted sum is divided
#: by, from the full batch's mask (n_seq, T) and the horizon T. Each rank passes this value / W under averaging.
GLOBAL_DENOMINATOR = {
    "token-mean": lambda mask, horizon: mask.sum(),
    "seq-mean-token-sum": lambda mask, horizon: _n_seq(mask),
    "seq-mean-token-mean": lambda mask, horizon: _n_seq(mask),
    "seq-mean-token-sum-norm": lambda mask, horizon: _n_seq(mask) * horizon,
    "token-sum": lambda mask, horizon: 1,
}

#: (objective function name, options): GIPO with an asymmetric sigma, PPO-clip with a dual clip.
OBJECTIVES = [("gipo_loss", {"sigma": 0.5, "sigma_neg": 0.3}), ("ppo_clip_loss", {"dual_clip": 3.0})]


def make_batch(lengths, seed=0):
    """A float32 batch of ``len(lengths)`` sequences padded to HORIZON: obs, actions, old_logp, adv, mask.

    ``lengths`` sets each row's last valid step; a few interior steps are masked too, and a length 0 row has
    no valid token at all.
    """
    rng = np.random.default_rng(seed)
    n = len(lengths)
    obs = rng.normal(0.0, 1.0, (n, HORIZON, OBS_DIM)).astype(np.float32)
    actions = rng.integers(0, N_ACTIONS, (n, HORIZON))
    old_logp = (np.log(1.0 / N_ACTIONS) + rng.normal(0.0, 0.4, (n, HORIZON))).astype(np.float32)
    adv = rng.normal(0.0, 1.0, (n, 1)).astype(np.float32)
    mask = np.arange(HORIZON) < np.asarray(lengths)[:, None]
    mask &= rng.random((n, HORIZON)) > 0.15
    mask[np.asarray(lengths) > 0, 0] = True
    return {"obs": obs, "actions": actions, "old_logp": old_logp, "adv": adv, "mask": mask}


def full_batch(n):
    """The full batch of ``n`` rows: the first half long sequences, the second half short ones, one empty."""
    lengths = [HORIZON - (i % 3) for i in range(n // 2)] + [2 + (i % 4) for i in range(n // 2)]
    lengths[-2] = 0
    return make_batch(lengths)


def init_params(seed=1):
    """The policy's initial weights, (OBS_DIM, N_ACTIONS) and (N_ACTIONS,), float32."""
    rng = np.random.default_rng(seed)
    return rng.normal(0.0, 0.5, (OBS_DIM, N_ACTIONS)).astype(np.float32), np.zeros(N_ACTIONS, np.float32)


def shard(batch, rank, n_ranks, trim=False):
    """Rank ``rank``'s rows; with ``trim`` padded only to its own longest valid row (dynamic padding)."""
    rows = len(batch["mask"]) // n_ranks
    part = {k: v[rank * rows : (rank + 1) * rows] for k, v in batch.items()}
    if trim:
        valid_steps = np.nonzero(part["mask"].any(0))[0]
        t = int(valid_steps.max()) + 1 if valid_steps.size else 1
        part = {k: v if k == "adv" else v[:, :t] for k, v in part.items()}
    return part


def global_denominators(batch):
    """{agg: global denominator} for the aggregation modes this gipo-core has."""
    missing = sorted(set(AGG_MODES) - set(GLOBAL_DENOMINATOR))
    assert not missing, f"add the global denominator of {missing} to GLOBAL_DENOMINATOR"
    return {agg: float(GLOBAL_DENOMINATOR[agg](batch["mask"], HORIZON)) for agg in AGG_MODES}


def cases(objectives=OBJECTIVES):
    """(key, function name, options, agg) for every objective and aggregation mode."""
    return [(f"{name}/{agg}", name, opts, agg) for name, opts in objectives for agg in AGG_MODES]


# ------------------------------------------------------------------------------------------------- workers


def torch_worker(out: Path, rank: int) -> None:
    """One DDP rank: the averaged gradient of every case with denominator = global / W, and with none."""
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    import gipo_core.torch as gt

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{out / 'store'}", rank=rank, world_size=WORLD)
    batch = full_batch(WORLD * 4)
    denominators = global_denominators(batch)
    w, b = init_params()

    def policy():
        model = torch.nn.Linear(OBS_DIM, N_ACTIONS)
        with torch.no_grad():
            model.weight.copy_(torch.from_numpy(w.T))
            model.bias.copy_(torch.from_numpy(b))
        return model

    def grads(model, data, fn, opts, agg, denominator):
        t = {k: torch.from_numpy(v) for k, v in data.items()}
        model.zero_grad()
        logp = torch.log_softmax(model(t["obs"]), -1).gather(-1, t["actions"][..., None]).squeeze(-1)
        loss = fn(logp, t["old_logp"], t["adv"], t["mask"], agg=agg, denominator=denominator, **opts).loss
        loss.backward()
        return loss.detach(), np.concatenate([p.grad.numpy().ravel() for p in model.parameters()])

    ddp = DDP(policy())
    part = shard(batch, rank, WORLD, trim=True)
    results = {}
    for key, name, opts, agg in cases():
        fn = getattr(gt, name)
        loss, grad = grads(ddp, part, fn, opts, agg, denominators[agg] / WORLD)
        dist.all_reduce(loss)  # the ranks' losses add up to W x the full-batch loss
        results[key + "/dp"] = grad
        results[key + "/dp_loss"] = loss.numpy() / WORLD
        results[key + "/naive"] = grads(ddp, part, fn, opts, agg, None)[1]
        if rank == 0:  # the single-process reference on the full batch, the library's own normalisation
            full_loss, full_grad = grads(policy(), batch, fn, opts, agg, None)
            results[key + "/full"], results[key + "/full_loss"] = full_grad, full_loss.numpy()
    np.savez(out / f"torch{rank}.npz", **results)
    dist.destroy_process_group()


def jax_worker(out: Path) -> None:
    """8 host devices: per-shard gradients with denominator = global / 8, pmean-ed across the shards."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import Mesh, PartitionSpec as P

    import gipo_core.jax as gj

    assert jax.device_count() == JAX_DEVICES, jax.devices()
    batch = full_batch(JAX_DEVICES * 2)
    denominators = global_denominators(batch)
    params = dict(zip(("w", "b"), init_params()))
    mesh = Mesh(np.array(jax.devices()), ("batch",))
    keys = ("obs", "actions", "old_logp", "adv", "mask")

    def loss_of(params, data, fn, opts, agg, denominator):
        logp = jax.nn.log_softmax(data["obs"] @ params["w"] + params["b"])
        logp = jnp.take_along_axis(logp, data["actions"][..., None], axis=-1)[..., 0]
        return fn(logp, data["old_logp"], data["adv"], data["mask"], agg=agg, denominator=denominator, **opts).loss

    def flat(g):
        return np.concatenate([np.asarray(g["w"]).ravel(), np.asarray(g["b"]).ravel()])

    results = {}
    for key, name, opts, agg in cases(OBJECTIVES[:1]):  # compiles per case: GIPO only (the sums are shared)
        fn = getattr(gj, name)

        def data_parallel(denominator, reduce):
            # reduce "sum": shard_map's own rule, the gradient of the replicated params comes out psum-ed over
            # the shards (check_vma); reduce "mean": the per-shard gradient, pmean-ed by hand, as DDP does.
            def per_shard(params, *arrays):
                loss, grad = jax.value_and_grad(loss_of)(params, dict(zip(keys, arrays)), fn, opts, agg, denominator)
                if reduce == "sum":
                    return jax.lax.psum(loss, "batch"), grad
                return jax.lax.pmean(loss, "batch"), jax.lax.pmean(grad, "batch")

            step = jax.shard_map(
                per_shard,
                mesh=mesh,
                in_specs=(P(),) + (P("batch"),) * len(keys),
                out_specs=(P(), P()),
                check_vma=reduce == "sum",
            )
            loss, grad = jax.jit(step)(params, *(batch[k] for k in keys))
            return np.asarray(loss), flat(grad)

        results[key + "/dp_mean_loss"], results[key + "/dp_mean"] = data_parallel(
            jnp.float32(denominators[agg] / JAX_DEVICES), "mean"
        )
        results[key + "/dp_sum_loss"], results[key + "/dp_sum"] = data_parallel(jnp.float32(denominators[agg]), "sum")
        results[key + "/naive"] = data_parallel(None, "mean")[1]
        full_loss, full_grad = jax.value_and_grad(loss_of)(params, batch, fn, opts, agg, None)
        results[key + "/full"], results[key + "/full_loss"] = flat(full_grad), np.asarray(full_loss)
    np.savez(out / "jax.npz", **results)


def tf_worker(out: Path) -> None:
    """MirroredStrategy over 2 logical CPUs: gradients all-reduced (MEAN: global / W; SUM: the global value)."""
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * WORLD)
    import gipo_core.tf as gtf

    strategy = tf.distribute.MirroredStrategy([f"/cpu:{i}" for i in range(WORLD)])
    assert strategy.num_replicas_in_sync == WORLD
    batch = full_batch(WORLD * 4)
    denominators = global_denominators(batch)
    w0, b0 = init_params()
    with strategy.scope():
        w, b = tf.Variable(w0), tf.Variable(b0)
    keys = ("obs", "actions", "old_logp", "adv", "mask")
    parts = [shard(batch, r, WORLD, trim=True) for r in range(WORLD)]
    def replica_value(ctx, key):  # each replica's shard, on that replica's device
        with tf.device(strategy.extended.worker_devices[ctx.replica_id_in_sync_group]):
            return tf.identity(parts[ctx.replica_id_in_sync_group][key])

    per_replica = {
        k: strategy.experimental_distribute_values_from_function(lambda ctx, k=k: replica_value(ctx, k)) for k in keys
    }

    def grads(data, fn, opts, agg, denominator):
        with tf.GradientTape() as tape:
            logp = tf.gather(tf.nn.log_softmax(data["obs"] @ w + b), data["actions"], batch_dims=2)
            loss = fn(logp, data["old_logp"], data["adv"], data["mask"], agg=agg, denominator=denominator, **opts).loss
        return loss, tape.gradient(loss, [w, b])

    def flat(g):
        return np.concatenate([np.asarray(x).ravel() for x in g])

    results = {}
    for key, name, opts, agg in cases(OBJECTIVES[:1]):  # GIPO only, as for JAX
        fn = getattr(gtf, name)
        for op, denominator in (("MEAN", denominators[agg] / WORLD), ("SUM", denominators[agg]), ("MEAN", None)):

            def replica_step(data, op=op, denominator=denominator):
                loss, g = grads(data, fn, opts, agg, denominator)
                ctx = tf.distribute.get_replica_context()
                return ctx.all_reduce(op, loss), ctx.all_reduce(op, g)

            loss, g = strategy.run(replica_step, args=(per_replica,))  # eager: each replica in its thread
            loss, g = strategy.experimental_local_results(loss)[0], strategy.experimental_local_results(g)[0]
            tag = "naive" if denominator is None else f"dp_{op.lower()}"
            results[f"{key}/{tag}"], results[f"{key}/{tag}_loss"] = flat(g), np.asarray(loss)
        full_loss, full_grad = grads({k: tf.constant(v) for k, v in batch.items()}, fn, opts, agg, None)
        results[key + "/full"], results[key + "/full_loss"] = flat(full_grad), np.asarray(full_loss)
    np.savez(out / "tf.npz", **results)


WORKERS = {"torch": torch_worker, "jax": jax_worker, "tf": tf_worker}


# -------------------------------------------------------------------------------------------------- tests


def _launch(engine: str, out: Path, n_procs: int = 1, env: dict | None = None) -> list[np.lib.npyio.NpzFile]:
    """Run ``n_procs`` workers of ``engine`` at once (rank as last argument) and load what they saved."""
    repo = str(Path(gipo_core.__file__).resolve().parents[1])
    env = dict(os.environ, **(env or {}))
    env["PYTHONPATH"] = os.pathsep.join([repo, str(Path(__file__).parent), env.get("PYTHONPATH", "")])
    args = [[__file__, engine, str(out)] + ([str(r)] if n_procs > 1 else []) for r in range(n_procs)]
    run_python(args, env=env, timeout=300)
    names = [f"{engine}{r}.npz" for r in range(n_procs)] if n_procs > 1 else [f"{engine}.npz"]
    return [np.load(out / name) for name in names]


@pytest.fixture(scope="module")
def torch_results(tmp_path_factory):
    # gloo over the loopback interface: the ranks never need the machine's hostname to resolve.
    env = {"GLOO_SOCKET_IFNAME": os.environ.get("GLOO_SOCKET_IFNAME", "lo" if sys.platform == "linux" else "lo0")}
    return _launch("torch", tmp_path_factory.mktemp("ddp"), n_procs=WORLD, env=env)


@pytest.fixture(scope="module")
def jax_results(tmp_path_factory):
    flags = (os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={JAX_DEVICES}").strip()
    return _launch("jax", tmp_path_factory.mktemp("jax"), env={"XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu"})[0]


@pytest.fixture(scope="module")
def tf_results(tmp_path_factory):
    return _launch("tf", tmp_path_factory.mktemp("tf"), env={"CUDA_VISIBLE_DEVICES": ""})[0]


CASE_IDS = [key for key, *_ in cases()]
GIPO_CASE_IDS = [key for key, *_ in cases(OBJECTIVES[:1])]


def assert_exact(results, key, dp="dp"):
    """The data-parallel loss and gradient equal the full batch's to 1e-6; the local normalisation's not."""
    full = results[key + "/full"]
    np.testing.assert_allclose(results[f"{key}/{dp}"], full, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(results[f"{key}/{dp}_loss"], results[key + "/full_loss"], rtol=1e-6, atol=1e-6)
    naive_error = np.abs(results[key + "/naive"] - full).max()
    assert naive_error > 1e-3 * np.abs(full).max(), (key, naive_error)


def test_every_aggregation_mode_has_a_global_denominator():
    assert set(AGG_MODES) <= set(GLOBAL_DENOMINATOR), sorted(set(AGG_MODES) - set(GLOBAL_DENOMINATOR))


def test_the_ranks_batches_are_uneven():
    batch = full_batch(WORLD * 4)
    parts = [shard(batch, r, WORLD, trim=True) for r in range(WORLD)]
    assert [p["mask"].shape[-1] for p in parts] == [HORIZON, 5]
    assert [int(p["mask"].sum()) for p in parts][0] > 2 * [int(p["mask"].sum()) for p in parts][1]
    assert (~parts[1]["mask"].any(-1)).sum() == 1  # one sequence without a valid token


@pytest.mark.parametrize("key", CASE_IDS)
def test_torch_ddp_two_processes_equals_the_full_batch(torch_results, key):
    rank0, rank1 = torch_results
    assert_exact(rank0, key)
    np.testing.assert_array_equal(rank1[key + "/dp"], rank0[key + "/dp"])  # DDP kept the replicas in sync


@pytest.mark.parametrize("op", ["mean", "sum"])
@pytest.mark.parametrize("key", GIPO_CASE_IDS)
def test_jax_eight_device_shard_map_equals_the_full_batch(jax_results, key, op):
    assert_exact(jax_results, key, dp=f"dp_{op}")


@pytest.mark.parametrize("op", ["mean", "sum"])
@pytest.mark.parametrize("key", GIPO_CASE_IDS)
def test_tf_mirrored_strategy_equals_the_full_batch(tf_results, key, op):
    assert_exact(tf_results, key, dp=f"dp_{op}")


if __name__ == "__main__":
    WORKERS[sys.argv[1]](Path(sys.argv[2]), *map(int, sys.argv[3:]))
