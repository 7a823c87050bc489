"""Stale-replay study on Meta-World MT1 tasks: GIPO against PPO-clip, SAPO and No-Clip, with robust statistics.

Every objective trains the same PyTorch actor-critic (a Gaussian MLP policy with a state-independent log
standard deviation, and an MLP critic) with the same seeds, environments and optimiser; only the policy loss
differs, and it always comes from :mod:`gipo_core.torch` (the objectives of :data:`demo.OBJECTIVES`).

The staleness knob is the one of :mod:`gipo_core.experiments.demo`: a replay buffer of the rollouts of the last
``K`` policy versions. Each iteration collects one rollout with the current policy (storing the raw
observations, the actions, the behaviour log-probabilities and the behaviour's mean and log standard deviation,
and GAE advantages computed with the critic of that moment), appends it to the buffer (dropping the oldest beyond
``K``), and takes a fixed number of minibatch gradient steps on minibatches drawn uniformly from the whole
buffer, always against the stored behaviour log-probabilities. ``K = 1`` is near on-policy PPO-style training;
larger ``K`` is the stale regime. The compute per iteration does not depend on ``K``.

The loss is the authors' (policy loss + 0.5 * 0.5 * value MSE - entropy_coef * entropy + kl_coef *
KL(pi_old || pi_theta)), with the exact KL between the stored behaviour Gaussian and the current one.
Rewards are divided by a running standard deviation of the discounted return, fixed into the stored advantages
at collection time. Observations are normalised by running statistics updated after each fresh rollout; the
buffer keeps them raw and every update normalises them with the current statistics (the stored behaviour
log-probabilities keep the normaliser of their time, which is part of the behaviour policy).

Evaluation: after training, the deterministic policy (the Gaussian's mean) runs ``eval_episodes`` episodes of
an MT1 environment built from a different seed, so its 50 goal and object configurations were never seen in
training; an episode is a success if the task's success flag is raised before the time limit (Meta-World's
own evaluation rule). The learning curves are the success rate of the last 20 training episodes.

Each run is saved as one JSON file under ``<out>/runs/`` when it finishes; a study that is started again with
the same configuration and output folder skips the runs already saved. The aggregate over tasks and seeds is
the interquartile mean (IQM) of the held-out success rate with a 95% stratified-bootstrap interval, and the
probability that GIPO improves on each baseline (:mod:`gipo_core.experiments.stats`).

Examples
--------
>>> from gipo_core.experiments.metaworld import MetaWorldConfig, run_study     # doctest: +SKIP
>>> run_study(MetaWorldConfig.quick(), "gipo-out/metaworld")                   # doctest: +SKIP
"""

from __future__ import annotations

import csv
import functools
import hashlib
import io
import json
import math
import os
import time
import warnings
from dataclasses import asdict, dataclass, replace
from typing import Any, Sequence

import numpy as np

from . import stats
from .demo import (DIAGNOSTICS, OBJECTIVES, _gae, _loss_functions, _mlp, run_parallel, t_interval,
                   validate_training_config, write_tables)

__all__ = ["MetaWorldConfig", "train_one", "run_study", "summarize", "write_outputs", "PAPER_IQM"]

#: The paper's headline (10 Meta-World tasks x 5 seeds, stale regime, VLA policy): IQM success per method.
PAPER_IQM = {"gipo-1": 0.730, "ppo-clip": 0.180}

_CURVE_WINDOW = 20  # training episodes in the running success rate
_TRAIN_GOALS_SEED = 0  # the 50 goal configurations of training (MT1's own construction from a seed)
_EVAL_GOALS_SEED = 1  # another 50, for the held-out evaluation
_EVAL_SEED_OFFSET = 100_000


@dataclass(frozen=True)
class MetaWorldConfig:
    """Everything that defines a Meta-World study. ``quick()`` and ``full()`` are the two presets.

    Parameters
    ----------
    tasks : tuple of str
        Meta-World v3 task names (MT1), e.g. ``"reach-v3"``.
    objectives : tuple of str
        Keys of :data:`gipo_core.experiments.demo.OBJECTIVES`.
    staleness : tuple of int
        Buffer sizes K (policy versions kept), each >= 1.
    seeds : int
        Seeds per (task, objective, K) cell; seed s gives every objective the same initial networks and goals.
    iterations : int
        Policy versions per run; each collects ``num_envs * rollout_len`` environment steps.
    num_envs, rollout_len : int
        Each iteration's rollout: ``rollout_len`` steps of each of ``num_envs`` environments.
    max_episode_steps : int
        Time limit of an episode (training and evaluation).
    updates_per_iteration, minibatch : int
        Gradient steps per iteration and samples per step, drawn uniformly (with replacement) from the buffer.
    hidden : int
        Width of the two hidden tanh layers of the actor and of the critic.
    init_log_std : float
        Initial log standard deviation of every action dimension.
    lr, gamma, gae_lambda, max_grad_norm : float
        Adam step size, discount, GAE lambda and the global gradient-norm clip.
    value_coef, entropy_coef, kl_coef : float
        Coefficients of 0.5 * value MSE, of the entropy bonus and of KL(pi_old || pi_theta); 0 switches a
        term off. Defaults: the GIPO authors' 0.5, 0.01 and 0.1.
    eval_episodes : int
        Held-out evaluation episodes at the end of each run.
    workers : int
        Parallel processes (0: one per CPU core); each uses one torch thread.
    first_seed : int
        Seeds are ``first_seed, ..., first_seed + seeds - 1``.
    """

    tasks: tuple[str, ...] = ("drawer-close-v3", "handle-press-v3", "reach-v3")
    objectives: tuple[str, ...] = tuple(OBJECTIVES)
    staleness: tuple[int, ...] = (1, 8)
    seeds: int = 5
    iterations: int = 20
    num_envs: int = 4
    rollout_len: int = 64
    max_episode_steps: int = 100
    updates_per_iteration: int = 16
    minibatch: int = 256
    hidden: int = 64
    init_log_std: float = -0.5
    lr: float = 1e-3
    gamma: float = 0.99
    gae_lambda: float = 0.95
    value_coef: float = 0.5
    entropy_coef: float = 0.01
    kl_coef: float = 0.1
    max_grad_norm: float = 0.5
    eval_episodes: int = 10
    workers: int = 0
    first_seed: int = 0

    @classmethod
    def quick(cls, **overrides: Any) -> "MetaWorldConfig":
        """One task, 2 seeds, one K (K = 8), every objective: a few minutes on 2 cores."""
        return replace(cls(tasks=("drawer-close-v3",), staleness=(8,), seeds=2), **overrides)

    @classmethod
    def full(cls, **overrides: Any) -> "MetaWorldConfig":
        """The study of the README: 3 tasks x 5 seeds x K in {1, 8} x 5 objectives (150 runs)."""
        return replace(cls(), **overrides)

    def validate(self) -> "MetaWorldConfig":
        """Raise ValueError naming the field for anything out of range; return self."""
        if not self.tasks or any(not isinstance(t, str) or not t.endswith("-v3") for t in self.tasks):
            raise ValueError(f"`MetaWorldConfig`: `tasks` must be Meta-World v3 task names like 'reach-v3'; "
                             f"got {self.tasks!r}")
        if not isinstance(self.workers, int) or self.workers < 0:
            raise ValueError(f"`MetaWorldConfig`: `workers` must be an integer >= 0; got {self.workers!r}")
        return validate_training_config(self, ("seeds", "iterations", "num_envs", "rollout_len", "max_episode_steps",
                                               "updates_per_iteration", "minibatch", "hidden", "eval_episodes"))

    @property
    def steps_per_iteration(self) -> int:
        return self.num_envs * self.rollout_len

    def fingerprint(self) -> str:
        """A hash of every field that changes a run's result (not ``workers``, ``tasks``, ``seeds``...)."""
        fields = asdict(self)
        for k in ("tasks", "objectives", "staleness", "seeds", "workers", "first_seed"):
            del fields[k]
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


@functools.lru_cache(maxsize=None)
def _benchmark(task: str, goals_seed: int) -> Any:
    """The MT1 benchmark of ``task`` (its 50 goal configurations come from ``goals_seed``), once per process."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import metaworld

        if task not in metaworld.MT1.ENV_NAMES:
            raise ValueError(f"`MetaWorldConfig`: unknown Meta-World task {task!r}; expected one of "
                             f"{metaworld.MT1.ENV_NAMES}")
        return metaworld.MT1(task, seed=goals_seed)


_ENV_CACHE: dict[tuple[str, int], Any] = {}


class _MT1Env:
    """One Meta-World MT1 task: each episode draws one of the 50 goal configurations made from ``goals_seed``.

    ``step`` returns ``(obs, reward, terminated, truncated, success)``: ``truncated`` at ``max_episode_steps``;
    ``terminated`` only with ``stop_on_success`` (evaluation), when the task's success flag is raised. The
    simulator objects are reused between runs of one process (``slot`` tells the envs of one run apart); every
    episode starts from a full reset, so a reused simulator carries nothing over.
    """

    def __init__(self, task: str, goals_seed: int, max_episode_steps: int, seed: int, *, slot: int = 0,
                 stop_on_success: bool = False):
        self.benchmark = _benchmark(task, goals_seed)
        if (task, slot) not in _ENV_CACHE:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                _ENV_CACHE[(task, slot)] = self.benchmark.train_classes[task]()
        self.env = _ENV_CACHE[(task, slot)]
        self.env.seed(seed)
        self.goals = self.benchmark.train_tasks
        self.rng = np.random.default_rng(seed)
        self.max_episode_steps = max_episode_steps
        self.stop_on_success = stop_on_success
        self.t = 0

    @property
    def action_dim(self) -> int:
        return int(np.prod(self.env.action_space.shape))

    def reset(self) -> np.ndarray:
        self.env.set_task(self.goals[int(self.rng.integers(len(self.goals)))])
        obs, _ = self.env.reset()
        self.t = 0
        return np.asarray(obs, dtype=np.float64)

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, bool]:
        obs, reward, _, _, info = self.env.step(action)
        self.t += 1
        success = bool(info["success"])
        return (np.asarray(obs, dtype=np.float64), float(reward), self.stop_on_success and success,
                self.t >= self.max_episode_steps, success)


class _RunningMeanStd:
    """Running mean and variance (parallel merge of batch moments)."""

    def __init__(self, shape: tuple[int, ...]):
        self.mean = np.zeros(shape)
        self.var = np.ones(shape)
        self.count = 1e-4

    def update(self, x: np.ndarray) -> None:
        x = np.asarray(x, dtype=np.float64).reshape(-1, *self.mean.shape)
        b_mean, b_var, b_count = x.mean(axis=0), x.var(axis=0), x.shape[0]
        delta = b_mean - self.mean
        total = self.count + b_count
        self.mean = self.mean + delta * b_count / total
        m2 = self.var * self.count + b_var * b_count + delta**2 * self.count * b_count / total
        self.var = m2 / total
        self.count = total


def _gaussian_logp(mean: Any, log_std: Any, action: Any) -> Any:
    return (-0.5 * ((action - mean) / log_std.exp()) ** 2 - log_std - 0.5 * math.log(2 * math.pi)).sum(-1)


def _gaussian_kl(mean_p: Any, log_std_p: Any, mean_q: Any, log_std_q: Any) -> Any:
    """KL(p || q) of diagonal Gaussians, summed over the action dimensions."""
    var_p, var_q = (2 * log_std_p).exp(), (2 * log_std_q).exp()
    return (log_std_q - log_std_p + (var_p + (mean_p - mean_q) ** 2) / (2 * var_q) - 0.5).sum(-1)


def _evaluate(actor: Any, normalize: Any, task: str, seed: int, config: MetaWorldConfig) -> tuple[float, float]:
    """Held-out success rate and mean return of the deterministic policy over ``config.eval_episodes``."""
    import torch

    env = _MT1Env(task, _EVAL_GOALS_SEED, config.max_episode_steps, seed + _EVAL_SEED_OFFSET, stop_on_success=True)
    successes, returns = 0, []
    for _ in range(config.eval_episodes):
        obs = env.reset()
        total, success = 0.0, False
        while True:
            with torch.no_grad():
                action = actor(normalize(obs[None]))[0].clamp(-1, 1).numpy()
            obs, reward, terminated, truncated, hit = env.step(action)
            total += reward
            success = success or hit
            if terminated or truncated:
                break
        successes += success
        returns.append(total)
    return successes / config.eval_episodes, float(np.mean(returns))


def train_one(task: str, objective: str, staleness: int, seed: int, config: MetaWorldConfig) -> dict[str, Any]:
    """Train one (task, objective, K, seed) run and evaluate it on held-out episodes.

    Returns
    -------
    dict
        ``{"task", "objective", "staleness", "seed", "fingerprint", "steps": (iterations,),
        "train_success": (iterations,), "train_return": (iterations,), "<diagnostic>": (iterations,) for each
        of DIAGNOSTICS, "eval_success", "eval_return", "seconds", "env_steps_per_second"}``.
    """
    import torch

    torch.set_num_threads(1)
    start = time.perf_counter()
    cfg = config
    _, loss_name, options = OBJECTIVES[objective]
    loss_fn = getattr(_loss_functions(), loss_name)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed + 1_000_003 * staleness)  # minibatch draws
    N, T = cfg.num_envs, cfg.rollout_len
    envs = [_MT1Env(task, _TRAIN_GOALS_SEED, cfg.max_episode_steps, seed * 1000 + i, slot=i) for i in range(N)]
    obs = np.stack([e.reset() for e in envs])
    n_obs = obs.shape[1]
    n_act = envs[0].action_dim
    actor = _mlp(n_obs, cfg.hidden, n_act, 0.01)
    log_std = torch.nn.Parameter(torch.full((n_act,), float(cfg.init_log_std)))
    critic = _mlp(n_obs, cfg.hidden, 1, 1.0)
    params = [*actor.parameters(), log_std, *critic.parameters()]
    opt = torch.optim.Adam(params, lr=cfg.lr, eps=1e-5, foreach=True)

    obs_rms = _RunningMeanStd((n_obs,))
    obs_rms.update(obs)
    ret_rms = _RunningMeanStd(())
    disc_ret = np.zeros(N)

    def normalize(o: np.ndarray) -> Any:
        z = (o - obs_rms.mean) / np.sqrt(obs_rms.var + 1e-8)
        return torch.from_numpy(np.clip(z, -10, 10).astype(np.float32))

    buffer: list[dict[str, Any]] = []
    ep_return, ep_success = np.zeros(N), np.zeros(N, dtype=bool)
    finished_success: list[float] = []
    finished_return: list[float] = []
    curve: dict[str, list[float]] = {k: [] for k in ("steps", "train_success", "train_return", *DIAGNOSTICS)}
    for it in range(cfg.iterations):
        # ---- collect one rollout with the current policy (version it); normalisers frozen for the rollout
        o_buf = np.zeros((T, N, n_obs))
        next_o = np.zeros((T, N, n_obs))
        a_buf = np.zeros((T, N, n_act), dtype=np.float32)
        mean_buf = np.zeros((T, N, n_act), dtype=np.float32)
        r_buf = np.zeros((T, N), dtype=np.float32)
        term_buf = np.zeros((T, N), dtype=np.float32)
        done_buf = np.zeros((T, N), dtype=np.float32)
        r_scale = math.sqrt(ret_rms.var + 1e-8)
        with torch.no_grad():
            behaviour_log_std = log_std.detach().clone()
            for t in range(T):
                mean = actor(normalize(obs))
                action = (mean + behaviour_log_std.exp() * torch.randn_like(mean)).numpy()
                clipped = np.clip(action, -1.0, 1.0)
                o_buf[t], a_buf[t], mean_buf[t] = obs, action, mean.numpy()
                for i, env in enumerate(envs):
                    nxt, reward, terminated, truncated, success = env.step(clipped[i])
                    r_buf[t, i], term_buf[t, i] = reward / r_scale, terminated
                    done_buf[t, i] = terminated or truncated
                    next_o[t, i] = nxt
                    ep_return[i] += reward
                    ep_success[i] |= success
                    disc_ret[i] = disc_ret[i] * cfg.gamma + reward
                    if terminated or truncated:
                        finished_success.append(float(ep_success[i]))
                        finished_return.append(float(ep_return[i]))
                        ep_return[i], ep_success[i], disc_ret[i] = 0.0, False, 0.0
                        nxt = env.reset()
                    obs[i] = nxt
                ret_rms.update(disc_ret)
            values = critic(normalize(o_buf)).squeeze(-1).numpy()
            next_values = critic(normalize(next_o)).squeeze(-1).numpy()
        adv = _gae(r_buf, values, next_values, term_buf, done_buf, cfg.gamma, cfg.gae_lambda)
        a_t = torch.from_numpy(a_buf.reshape(T * N, n_act))
        mean_t = torch.from_numpy(mean_buf.reshape(T * N, n_act))
        std_t = behaviour_log_std.expand(T * N, n_act).clone()
        rollout = {
            "obs": torch.from_numpy(o_buf.reshape(T * N, n_obs)),
            "action": a_t,
            "mean": mean_t,
            "log_std": std_t,
            "logp": _gaussian_logp(mean_t, std_t, a_t),
            "adv": torch.from_numpy(adv.reshape(-1)),
            "ret": torch.from_numpy((adv + values).reshape(-1)),
        }
        obs_rms.update(o_buf.reshape(T * N, n_obs))
        buffer.append(rollout)
        del buffer[: max(0, len(buffer) - staleness)]
        data = {k: torch.cat([b[k] for b in buffer]) for k in rollout} if len(buffer) > 1 else rollout
        # The current normaliser applies to every stored observation (the behaviour's log-probabilities were
        # computed with the normaliser of their time, which is part of the behaviour policy).
        data_obs = normalize(data["obs"].numpy())

        # ---- a fixed number of minibatch steps on the buffer, behaviour log-probs as stored
        n = data_obs.shape[0]
        sums = {k: 0.0 for k in DIAGNOSTICS}
        for _ in range(cfg.updates_per_iteration):
            idx = torch.from_numpy(rng.integers(0, n, size=min(cfg.minibatch, n)))
            o, a = data_obs[idx], data["action"][idx]
            adv_b = data["adv"][idx].float()
            adv_b = (adv_b - adv_b.mean()) / (adv_b.std() + 1e-8)
            mean = actor(o)
            ls = log_std.expand_as(mean)
            logp = _gaussian_logp(mean, ls, a)
            out = loss_fn(logp, data["logp"][idx], adv_b, **options)
            loss = out.loss
            if cfg.value_coef:
                ret_b = data["ret"][idx].float()
                loss = loss + cfg.value_coef * 0.5 * ((critic(o).squeeze(-1) - ret_b) ** 2).mean()
            if cfg.entropy_coef:
                loss = loss - cfg.entropy_coef * (log_std + 0.5 * math.log(2 * math.pi * math.e)).sum()
            if cfg.kl_coef:
                kl = _gaussian_kl(data["mean"][idx], data["log_std"][idx], mean, ls).mean()
                loss = loss + cfg.kl_coef * kl
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            opt.step()
            for k in DIAGNOSTICS:
                sums[k] += float(out.metrics[k])
        curve["steps"].append((it + 1) * cfg.steps_per_iteration)
        for key, values_list in (("train_success", finished_success), ("train_return", finished_return)):
            recent = values_list[-_CURVE_WINDOW:]
            curve[key].append(float(np.mean(recent)) if recent else float("nan"))
        for k in DIAGNOSTICS:
            curve[k].append(sums[k] / cfg.updates_per_iteration)
    train_seconds = time.perf_counter() - start
    eval_success, eval_return = _evaluate(actor, normalize, task, seed, cfg)
    for key in ("train_success", "train_return"):  # before the first episode ends: the first value that exists
        r = np.array(curve[key])
        first = np.flatnonzero(~np.isnan(r))
        r[: first[0] if first.size else r.size] = r[first[0]] if first.size else 0.0
        curve[key] = r.tolist()
    return {"task": task, "objective": objective, "staleness": staleness, "seed": seed,
            "fingerprint": cfg.fingerprint(), **curve, "eval_success": eval_success, "eval_return": eval_return,
            "seconds": time.perf_counter() - start,
            "env_steps_per_second": cfg.iterations * cfg.steps_per_iteration / train_seconds}


# ------------------------------------------------------------------------------------------- resumable runs


def _run_path(out_dir: str, task: str, objective: str, staleness: int, seed: int) -> str:
    return os.path.join(out_dir, "runs", f"{task}__{objective}__K{staleness}__seed{seed}.json")


def _save_run(out_dir: str, run: dict[str, Any]) -> None:
    path = _run_path(out_dir, run["task"], run["objective"], run["staleness"], run["seed"])
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(run, f)
    os.replace(tmp, path)  # atomic: an interrupted write never leaves a half run behind


def _load_run(path: str, fingerprint: str) -> dict[str, Any] | None:
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        run = json.load(f)
    if run.get("fingerprint") != fingerprint:
        raise ValueError(f"`run_study`: {path} was produced with another configuration (fingerprint "
                         f"{run.get('fingerprint')!r}, expected {fingerprint!r}); use another output folder")
    return run


def _run_task(task: str, objective: str, staleness: int, seed: int, config: MetaWorldConfig) -> dict[str, Any]:
    """One run, in a worker process (warnings of the environments silenced there)."""
    warnings.filterwarnings("ignore", module="gymnasium")
    return train_one(task, objective, staleness, seed, config)


def run_study(
    config: MetaWorldConfig, out_dir: str, *, progress: bool = True
) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """Run every (task, objective, K, seed) cell not already saved in ``out_dir``, then write the outputs.

    Runs go to parallel processes (``config.workers``), each saved to ``<out_dir>/runs/`` as it finishes, so an
    interrupted study continues where it stopped. Returns all runs and the paths of the outputs.
    """
    config.validate()
    os.makedirs(os.path.join(out_dir, "runs"), exist_ok=True)
    fp = config.fingerprint()
    cells = [(t, o, k, config.first_seed + s) for s in range(config.seeds) for t in config.tasks
             for k in config.staleness for o in config.objectives]
    runs, todo = [], []
    for cell in cells:
        run = _load_run(_run_path(out_dir, *cell), fp)
        (runs.append(run) if run is not None else todo.append((*cell, config)))
    runs += run_parallel(_run_task, todo, config.workers, progress=progress, desc="gipo metaworld",
                         on_result=lambda r: _save_run(out_dir, r))
    order = {c: i for i, c in enumerate(cells)}
    runs.sort(key=lambda r: order[(r["task"], r["objective"], r["staleness"], r["seed"])])
    return runs, write_outputs(runs, config, out_dir)


# -------------------------------------------------------------------------------------------------- summary


def _scores(runs: Sequence[dict[str, Any]], config: MetaWorldConfig, objective: str, k: int) -> np.ndarray:
    """Held-out success as a (tasks, seeds) array for one (objective, K)."""
    by = {(r["task"], r["seed"]): r["eval_success"] for r in runs if r["objective"] == objective
          and r["staleness"] == k}
    seeds = [config.first_seed + s for s in range(config.seeds)]
    return np.array([[by[(t, s)] for s in seeds] for t in config.tasks], dtype=np.float64)


def summarize(runs: Sequence[dict[str, Any]], config: MetaWorldConfig, *, reps: int = 2000) -> dict[str, Any]:
    """IQM [95% stratified-bootstrap CI] per (objective, K), per-task means, and P(GIPO > baseline)."""
    gipos = [o for o in config.objectives if o.startswith("gipo")]
    table: dict[str, dict[int, dict[str, Any]]] = {}
    for o in config.objectives:
        table[o] = {}
        for k in config.staleness:
            s = _scores(runs, config, o, k)
            point, lo, hi = stats.interval_estimates(stats.iqm, s, reps=reps, seed=1)
            mean, mlo, mhi = stats.interval_estimates(lambda x: x.mean(), s, reps=reps, seed=2)
            table[o][k] = {"iqm": point, "iqm_lo": lo, "iqm_hi": hi, "mean": mean, "mean_lo": mlo, "mean_hi": mhi,
                           "per_task": {t: float(v) for t, v in zip(config.tasks, s.mean(axis=1))},
                           "runs": int(s.size)}
    improvement: dict[str, dict[str, dict[int, dict[str, float]]]] = {}
    for g in gipos:
        improvement[g] = {}
        for b in config.objectives:
            if b in gipos:
                continue
            improvement[g][b] = {}
            for k in config.staleness:
                p, lo, hi = stats.interval_estimates(stats.probability_of_improvement, _scores(runs, config, g, k),
                                                     _scores(runs, config, b, k), reps=reps, seed=3)
                improvement[g][b][k] = {"p": p, "lo": lo, "hi": hi}
    curves: dict[tuple[str, int], dict[str, dict[str, np.ndarray]]] = {}
    for t in config.tasks:
        for k in config.staleness:
            curves[(t, k)] = {}
            for o in config.objectives:
                cell = sorted((r for r in runs if (r["task"], r["objective"], r["staleness"]) == (t, o, k)),
                              key=lambda r: r["seed"])
                c_mean, c_lo, c_hi = t_interval(np.array([r["train_success"] for r in cell]))
                curves[(t, k)][o] = {"x": np.array(cell[0]["steps"], dtype=np.float64), "mean": c_mean, "lo": c_lo,
                                     "hi": c_hi}
    return {"table": table, "improvement": improvement, "curves": curves}


def table_markdown(summary: dict[str, Any], config: MetaWorldConfig) -> str:
    """IQM of held-out success [95% CI] per objective and K, and the per-task means."""
    steps = config.iterations * config.steps_per_iteration
    lines = [
        f"Held-out success rate, IQM over {len(config.tasks)} tasks x {config.seeds} seeds "
        f"[95% stratified-bootstrap interval]; {steps:,} environment steps per run, {config.eval_episodes} "
        "evaluation episodes per run on goals never seen in training.",
        "",
        "| objective | " + " | ".join(f"K={k} IQM [CI]" for k in config.staleness) + " | "
        + " | ".join(f"K={k} {t}" for k in config.staleness for t in config.tasks) + " |",
        "|---|" + "---:|" * (len(config.staleness) * (1 + len(config.tasks))),
    ]
    for o in config.objectives:
        row = summary["table"][o]
        cells = [f"{row[k]['iqm']:.3f} [{row[k]['iqm_lo']:.3f}, {row[k]['iqm_hi']:.3f}]" for k in config.staleness]
        cells += [f"{row[k]['per_task'][t]:.2f}" for k in config.staleness for t in config.tasks]
        lines.append(f"| {OBJECTIVES[o][0]} | " + " | ".join(cells) + " |")
    if summary["improvement"]:
        lines += ["", "Probability of improvement P(GIPO > baseline) [95% stratified-bootstrap interval]:", "",
                  "| GIPO vs baseline | " + " | ".join(f"K={k}" for k in config.staleness) + " |",
                  "|---|" + "---:|" * len(config.staleness)]
        for g, rows in summary["improvement"].items():
            for b, per_k in rows.items():
                cells = [f"{per_k[k]['p']:.2f} [{per_k[k]['lo']:.2f}, {per_k[k]['hi']:.2f}]" for k in config.staleness]
                lines.append(f"| {OBJECTIVES[g][0]} vs {OBJECTIVES[b][0]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _table_csv(summary: dict[str, Any], config: MetaWorldConfig) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["objective", "label", "staleness", "runs", "iqm", "iqm_lo", "iqm_hi", "mean", "mean_lo", "mean_hi",
                *(f"mean_{t}" for t in config.tasks)])
    for o in config.objectives:
        for k in config.staleness:
            r = summary["table"][o][k]
            w.writerow([o, OBJECTIVES[o][0], k, r["runs"], r["iqm"], r["iqm_lo"], r["iqm_hi"], r["mean"], r["mean_lo"],
                        r["mean_hi"], *(r["per_task"][t] for t in config.tasks)])
    return buf.getvalue()


def write_outputs(runs: Sequence[dict[str, Any]], config: MetaWorldConfig, out_dir: str) -> dict[str, str]:
    """Figures (PNG), table (markdown, CSV) and summary (JSON) into ``out_dir``; returns the paths."""
    from . import plotting

    os.makedirs(out_dir, exist_ok=True)
    summary = summarize(runs, config)
    labels = {o: OBJECTIVES[o][0] for o in config.objectives}
    steps = config.iterations * config.steps_per_iteration
    paths: dict[str, str] = {}
    paths["iqm_figure"] = os.path.join(out_dir, "metaworld_iqm.png")
    plotting.summary_figure(
        {labels[o]: {k: {"final_mean": v["iqm"], "final_lo": v["iqm_lo"], "final_hi": v["iqm_hi"],
                         "auc_mean": v["mean"], "auc_lo": v["mean_lo"], "auc_hi": v["mean_hi"]}
                     for k, v in summary["table"][o].items()} for o in config.objectives},
        list(config.staleness), paths["iqm_figure"],
        title=f"Meta-World MT1 ({', '.join(config.tasks)}; {config.seeds} seeds): held-out success, "
              "95% stratified-bootstrap intervals",
        ylabels=("IQM of held-out success", "mean held-out success"),
    )
    paths["curves"] = os.path.join(out_dir, "metaworld_curves.png")
    panels = {(t, f"K={k}"): {labels[o]: summary["curves"][(t, k)][o] for o in config.objectives}
              for t in config.tasks for k in config.staleness}
    plotting.diagnostics_figure(
        panels, list(config.tasks), [f"K={k}" for k in config.staleness], paths["curves"],
        title=f"Training success rate (last {_CURVE_WINDOW} episodes), mean of {config.seeds} seeds and 95% "
              f"t-interval; {steps:,} steps per run",
    )
    if summary["improvement"]:
        paths["improvement_figure"] = os.path.join(out_dir, "metaworld_probability_of_improvement.png")
        plotting.probability_of_improvement_figure(
            {(labels[g], labels[b]): per_k for g, rows in summary["improvement"].items() for b, per_k in rows.items()},
            list(config.staleness), paths["improvement_figure"],
            title="P(GIPO > baseline) on held-out success, 95% stratified-bootstrap intervals",
        )
    paths.update(write_tables(
        out_dir, "metaworld_results", table_markdown(summary, config), _table_csv(summary, config),
        {"config": asdict(config), "objectives": {o: OBJECTIVES[o] for o in config.objectives}, "paper_iqm": PAPER_IQM,
         "table": {o: {str(k): v for k, v in t.items()} for o, t in summary["table"].items()},
         "improvement": {g: {b: {str(k): v for k, v in per_k.items()} for b, per_k in rows.items()}
                         for g, rows in summary["improvement"].items()},
         "seconds_per_run": float(np.mean([r["seconds"] for r in runs])),
         "env_steps_per_second": float(np.mean([r["env_steps_per_second"] for r in runs]))},
        json_stem="metaworld_summary", indent=1,
    ))
    return paths
