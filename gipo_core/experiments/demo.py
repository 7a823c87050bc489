"""Stale-replay training comparison on CartPole-v1: GIPO against PPO-clip, SAPO and No-Clip.

Every objective trains the same small PyTorch actor-critic (two MLPs, categorical actions) with the same
seeds, data and optimiser; only the policy loss differs, and it always comes from :mod:`gipo_core.torch`.

The staleness knob is a replay buffer that holds the rollouts of the last ``K`` policy versions. Each
iteration collects one fresh rollout with the current policy (storing the behaviour log-probabilities,
the behaviour's full action distribution and GAE advantages computed with the critic of that moment),
appends it to the buffer (dropping the oldest beyond ``K``), then takes a fixed number of minibatch
gradient steps on minibatches drawn uniformly from the whole buffer. The behaviour log-probabilities are
always the stored ones, so with ``K = 1`` the loop is ordinary PPO-style near-on-policy training and with
``K = 64`` most samples come from policies dozens of updates old. The compute per iteration does not depend
on ``K``.

The full loss is the authors' (REFERENCE section 1): policy loss + ``value_coef`` * 0.5 * value MSE
- ``entropy_coef`` * entropy + ``kl_coef`` * KL(pi_old || pi_theta), the exact categorical KL against the
stored behaviour distribution; each extra term can be switched off with a coefficient of 0.

Learning curves are the mean return of the last 20 training episodes finished, sampled once per
iteration. Per cell (objective, K) the table reports the final return (mean of the curve over the last 10%
of iterations) and the area under the curve (mean of the whole curve), each as the mean over seeds with a
two-sided 95% Student-t confidence interval over seeds.

Examples
--------
>>> from gipo_core.experiments.demo import DemoConfig, run_demo          # doctest: +SKIP
>>> run_demo(DemoConfig.quick(), "gipo-out/demo")                       # doctest: +SKIP
"""

from __future__ import annotations

import csv
import datetime
import io
import json
import math
import os
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable, Sequence

import numpy as np

__all__ = ["OBJECTIVES", "DemoConfig", "train_one", "run_demo", "summarize", "t_interval", "t_quantile_975", "DIAGNOSTICS",
           "run_parallel", "validate_training_config", "write_tables"]

#: Demo objective key -> (label, gipo_core.torch loss function name, options).
OBJECTIVES: dict[str, tuple[str, str, dict]] = {
    "gipo-0.5": ("GIPO sigma=0.5", "gipo_loss", {"sigma": 0.5}),
    "gipo-1": ("GIPO sigma=1", "gipo_loss", {"sigma": 1.0}),
    "ppo-clip": ("PPO-clip eps=0.2", "ppo_clip_loss", {"clip_low": 0.2, "clip_high": 0.2}),
    "sapo": ("SAPO tau=1/1.05", "sapo_loss", {"tau_pos": 1.0, "tau_neg": 1.05}),
    "no-clip": ("No-Clip", "no_clip_loss", {}),
}

#: Library metrics recorded over training (mean over the iteration's minibatch steps).
DIAGNOSTICS = ("weight_mean", "low_weight_frac", "ess", "kl_k3")

_CURVE_WINDOW = 20  # episodes in the running mean of returns
_DIAG_WINDOW = 5  # iterations in the trailing mean that smooths the plotted diagnostics


def _trailing_mean(x: np.ndarray, window: int) -> np.ndarray:
    """Mean of the last ``window`` entries (fewer at the start) along the last axis."""
    c = np.cumsum(x, axis=-1)
    out = c.copy()
    out[..., window:] = c[..., window:] - c[..., :-window]
    counts = np.minimum(np.arange(1, x.shape[-1] + 1), window)
    return out / counts


@dataclass(frozen=True)
class DemoConfig:
    """Everything that defines a demo run. ``quick()`` and ``full()`` are the two presets.

    Parameters
    ----------
    objectives : tuple of str
        Keys of :data:`OBJECTIVES`.
    staleness : tuple of int
        Buffer sizes K (policy versions kept), each >= 1.
    seeds : int
        Seeds per (objective, K) cell; seed s gives every objective the same initial networks and episodes.
    iterations : int
        Policy versions per run; each collects ``num_envs * rollout_len`` environment steps.
    num_envs, rollout_len : int
        Each iteration's rollout: ``rollout_len`` steps of ``num_envs`` vectorised environments.
    updates_per_iteration, minibatch : int
        Gradient steps per iteration and samples per step, drawn uniformly (with replacement) from the buffer.
    hidden : int
        Width of the two hidden tanh layers of the actor and of the critic.
    lr, gamma, gae_lambda, max_grad_norm : float
        Adam step size, discount, GAE lambda and the global gradient-norm clip.
    value_coef, entropy_coef, kl_coef : float
        Coefficients of 0.5 * value MSE, of the entropy bonus and of KL(pi_old || pi_theta); 0 switches a
        term off. Defaults: the GIPO authors' 0.5, 0.01 (their Meta-World runs) and 0.1.
    workers : int
        Parallel processes (0: one per CPU core); each uses one torch thread.
    env_id : str
        A gymnasium environment with a vectorised entry point, discrete actions and box observations.
    first_seed : int
        Seeds are ``first_seed, ..., first_seed + seeds - 1``.
    """

    objectives: tuple[str, ...] = tuple(OBJECTIVES)
    staleness: tuple[int, ...] = (1, 4, 16, 64)
    seeds: int = 3
    iterations: int = 100
    num_envs: int = 32
    rollout_len: int = 8
    updates_per_iteration: int = 4
    minibatch: int = 256
    hidden: int = 64
    lr: float = 1e-3
    gamma: float = 0.99
    gae_lambda: float = 0.95
    value_coef: float = 0.5
    entropy_coef: float = 0.01
    kl_coef: float = 0.1
    max_grad_norm: float = 0.5
    workers: int = 0  # 0: one per CPU core
    env_id: str = "CartPole-v1"
    first_seed: int = 0

    @classmethod
    def quick(cls, **overrides: Any) -> "DemoConfig":
        """The README's preset: 3 seeds x 5 objectives x K in {1, 4, 16, 64}, 25,600 env steps a run."""
        return replace(cls(), **overrides)

    @classmethod
    def full(cls, **overrides: Any) -> "DemoConfig":
        """5 seeds and 3x the training budget (76,800 env steps a run)."""
        return replace(cls(seeds=5, iterations=300), **overrides)

    def validate(self) -> "DemoConfig":
        """Raise ValueError naming the field for anything out of range; return self."""
        return validate_training_config(self, ("seeds", "iterations", "num_envs", "rollout_len",
                                               "updates_per_iteration", "minibatch", "hidden"))

    @property
    def steps_per_iteration(self) -> int:
        return self.num_envs * self.rollout_len


def validate_training_config(config: Any, positive_ints: Sequence[str]) -> Any:
    """The checks every stale-replay config shares: ``objectives`` a non-empty subset of :data:`OBJECTIVES`,
    ``staleness`` integers >= 1, each of ``positive_ints`` an integer >= 1, and the loss coefficients >= 0.

    Raises ValueError naming the config class and the field; returns ``config``.
    """
    who = type(config).__name__
    bad = [k for k in config.objectives if k not in OBJECTIVES]
    if bad or not config.objectives:
        raise ValueError(f"`{who}`: `objectives` must be a non-empty subset of {list(OBJECTIVES)}; got {bad or []}")
    if not config.staleness or any(not isinstance(k, int) or k < 1 for k in config.staleness):
        raise ValueError(f"`{who}`: `staleness` must be integers >= 1; got {config.staleness!r}")
    for name in positive_ints:
        value = getattr(config, name)
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"`{who}`: `{name}` must be an integer >= 1; got {value!r}")
    for name in ("value_coef", "entropy_coef", "kl_coef"):
        if not getattr(config, name) >= 0:
            raise ValueError(f"`{who}`: `{name}` must be >= 0; got {getattr(config, name)!r}")
    return config


def _loss_functions() -> Any:
    """The torch adapter, imported only when a run starts (importing this module does not import torch)."""
    from .. import torch as gt

    return gt


def _mlp(n_in: int, hidden: int, n_out: int, out_gain: float) -> Any:
    import torch
    from torch import nn

    layers = [nn.Linear(n_in, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(), nn.Linear(hidden, n_out)]
    for layer in layers:
        if isinstance(layer, nn.Linear):
            nn.init.orthogonal_(layer.weight, gain=math.sqrt(2.0) if layer is not layers[-1] else out_gain)
            nn.init.zeros_(layer.bias)
    return nn.Sequential(*layers).to(torch.float32)


def _gae(rewards: np.ndarray, values: np.ndarray, next_values: np.ndarray, terminated: np.ndarray,
         done: np.ndarray, gamma: float, lam: float) -> np.ndarray:
    """GAE over a (time, envs) rollout; ``done`` (terminated or truncated) cuts the recursion, only
    ``terminated`` cuts the bootstrap (a time-limit truncation bootstraps from the final observation)."""
    adv = np.zeros_like(rewards)
    running = np.zeros(rewards.shape[1], dtype=rewards.dtype)
    for t in range(rewards.shape[0] - 1, -1, -1):
        delta = rewards[t] + gamma * next_values[t] * (1.0 - terminated[t]) - values[t]
        running = delta + gamma * lam * (1.0 - done[t]) * running
        adv[t] = running
    return adv


def train_one(objective: str, staleness: int, seed: int, config: DemoConfig) -> dict[str, Any]:
    """Train one (objective, K, seed) run; return its learning curve and diagnostics per iteration.

    Returns
    -------
    dict
        ``{"objective", "staleness", "seed", "steps": (iterations,), "returns": (iterations,),
        "<diagnostic>": (iterations,) for each of DIAGNOSTICS, "seconds"}`` (lists of floats).
    """
    import gymnasium as gym
    import torch

    torch.set_num_threads(1)
    start = time.perf_counter()
    cfg = config
    _, loss_name, options = OBJECTIVES[objective]
    loss_fn = getattr(_loss_functions(), loss_name)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed + 1_000_003 * staleness)  # minibatch draws
    env = gym.make_vec(cfg.env_id, num_envs=cfg.num_envs, vectorization_mode="vector_entry_point")
    obs, _ = env.reset(seed=seed)
    n_obs = int(np.prod(env.single_observation_space.shape))
    n_act = int(env.single_action_space.n)
    actor = _mlp(n_obs, cfg.hidden, n_act, 0.01)
    critic = _mlp(n_obs, cfg.hidden, 1, 1.0)
    params = list(actor.parameters()) + list(critic.parameters())
    opt = torch.optim.Adam(params, lr=cfg.lr, eps=1e-5, foreach=True)

    buffer: list[dict[str, torch.Tensor]] = []
    prev_done = np.zeros(cfg.num_envs, dtype=bool)  # NEXT_STEP autoreset: the step after a done is a reset
    ep_return = np.zeros(cfg.num_envs)
    finished: list[float] = []
    curve = {k: [] for k in ("steps", "returns", *DIAGNOSTICS)}
    T, N = cfg.rollout_len, cfg.num_envs
    for it in range(cfg.iterations):
        # ---- collect one rollout with the current policy (version it)
        o_buf = np.zeros((T, N, n_obs), dtype=np.float32)
        next_o = np.zeros_like(o_buf)
        a_buf = np.zeros((T, N), dtype=np.int64)
        logp_all_buf = np.zeros((T, N, n_act), dtype=np.float32)
        r_buf = np.zeros((T, N), dtype=np.float32)
        term_buf = np.zeros((T, N), dtype=np.float32)
        done_buf = np.zeros((T, N), dtype=np.float32)
        valid = np.zeros((T, N), dtype=bool)
        with torch.no_grad():
            for t in range(T):
                logits = actor(torch.from_numpy(obs))
                logp_all = torch.log_softmax(logits, dim=-1)
                action = torch.multinomial(logp_all.exp(), 1).squeeze(-1).numpy()
                nxt, reward, terminated, truncated, _ = env.step(action)
                o_buf[t], next_o[t], a_buf[t], logp_all_buf[t] = obs, nxt, action, logp_all.numpy()
                r_buf[t], term_buf[t] = reward, terminated
                done = terminated | truncated
                done_buf[t] = done
                valid[t] = ~prev_done
                ep_return += np.where(prev_done, 0.0, reward)
                for i in np.flatnonzero(done & ~prev_done):
                    finished.append(float(ep_return[i]))
                ep_return[done] = 0.0
                prev_done = done
                obs = nxt
            values = critic(torch.from_numpy(o_buf)).squeeze(-1).numpy()
            next_values = critic(torch.from_numpy(next_o)).squeeze(-1).numpy()
        adv = _gae(r_buf, values, next_values, term_buf, done_buf, cfg.gamma, cfg.gae_lambda)
        keep = valid.reshape(-1)
        rollout = {
            "obs": torch.from_numpy(o_buf.reshape(T * N, n_obs)[keep]),
            "action": torch.from_numpy(a_buf.reshape(-1)[keep]),
            "logp_all": torch.from_numpy(logp_all_buf.reshape(T * N, n_act)[keep]),
            "adv": torch.from_numpy(adv.reshape(-1)[keep]),
            "ret": torch.from_numpy((adv + values).reshape(-1)[keep]),
        }
        buffer.append(rollout)
        del buffer[: max(0, len(buffer) - staleness)]
        data = {k: torch.cat([b[k] for b in buffer]) for k in rollout} if len(buffer) > 1 else rollout

        # ---- a fixed number of minibatch steps on the buffer, behaviour log-probs as stored
        n = data["obs"].shape[0]
        sums = {k: 0.0 for k in DIAGNOSTICS}
        for _ in range(cfg.updates_per_iteration):
            idx = torch.from_numpy(rng.integers(0, n, size=min(cfg.minibatch, n)))
            o, a = data["obs"][idx], data["action"][idx]
            old_all = data["logp_all"][idx]
            adv_b = data["adv"][idx]
            adv_b = (adv_b - adv_b.mean()) / (adv_b.std() + 1e-8)
            logp_all = torch.log_softmax(actor(o), dim=-1)
            logp = logp_all.gather(-1, a[:, None]).squeeze(-1)
            old_logp = old_all.gather(-1, a[:, None]).squeeze(-1)
            out = loss_fn(logp, old_logp, adv_b, **options)
            loss = out.loss
            if cfg.value_coef:
                loss = loss + cfg.value_coef * 0.5 * ((critic(o).squeeze(-1) - data["ret"][idx]) ** 2).mean()
            if cfg.entropy_coef:
                loss = loss + cfg.entropy_coef * (logp_all.exp() * logp_all).sum(-1).mean()
            if cfg.kl_coef:
                loss = loss + cfg.kl_coef * (old_all.exp() * (old_all - logp_all)).sum(-1).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            opt.step()
            for k in DIAGNOSTICS:
                sums[k] += float(out.metrics[k])
        curve["steps"].append((it + 1) * cfg.steps_per_iteration)
        recent = finished[-_CURVE_WINDOW:]
        curve["returns"].append(float(np.mean(recent)) if recent else float("nan"))
        for k in DIAGNOSTICS:
            curve[k].append(sums[k] / cfg.updates_per_iteration)
    env.close()
    # Before the first episode ends there is no return yet: use the first one that exists.
    r = np.array(curve["returns"])
    first = np.flatnonzero(~np.isnan(r))
    r[: first[0] if first.size else r.size] = r[first[0]] if first.size else 0.0
    curve["returns"] = r.tolist()
    return {"objective": objective, "staleness": staleness, "seed": seed, **curve,
            "seconds": time.perf_counter() - start}


# 97.5% quantiles of Student's t for 1..30 degrees of freedom (two-sided 95% intervals); beyond 30 the
# Cornish-Fisher expansion around the normal quantile is used (error < 1e-4 there).
_T975 = (12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281, 2.2010, 2.1788,
         2.1604, 2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860, 2.0796, 2.0739, 2.0687, 2.0639,
         2.0595, 2.0555, 2.0518, 2.0484, 2.0452, 2.0423)


def t_quantile_975(df: int) -> float:
    """The 97.5% quantile of Student's t with ``df`` >= 1 degrees of freedom."""
    if df <= len(_T975):
        return _T975[df - 1]
    z = 1.959963984540054
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


def t_interval(
    samples: Sequence[float] | np.ndarray, axis: int = 0, bounds: tuple[float, float] | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean and two-sided 95% Student-t interval over ``axis`` (the seeds); a single sample has zero width.

    ``bounds``: the range the quantity cannot leave (a fraction in [0, 1], a return >= 0); the interval is
    clipped to it, as a symmetric t-interval can reach past it when the samples sit near an end.
    """
    x = np.asarray(samples, dtype=np.float64)
    n = x.shape[axis]
    mean = x.mean(axis=axis)
    if n < 2:
        return mean, mean.copy(), mean.copy()
    half = t_quantile_975(n - 1) * x.std(axis=axis, ddof=1) / math.sqrt(n)
    lo, hi = mean - half, mean + half
    if bounds is not None:
        lo, hi = np.clip(lo, *bounds), np.clip(hi, *bounds)
    return mean, lo, hi


#: The range each plotted quantity cannot leave (returns: CartPole's rewards are +1 per step).
BOUNDS = {
    "returns": (0.0, math.inf),
    "weight_mean": (0.0, 1.0),
    "low_weight_frac": (0.0, 1.0),
    "ess": (0.0, 1.0),
    "kl_k3": (0.0, math.inf),
}


def summarize(runs: Sequence[dict[str, Any]], config: DemoConfig) -> dict[str, Any]:
    """Aggregate runs over seeds: curves with intervals, and the final / AUC table with ranks per K."""
    tail = max(1, int(round(0.1 * config.iterations)))
    curves: dict[str, dict[int, dict[str, Any]]] = {}
    table: dict[str, dict[int, dict[str, float]]] = {}
    for obj in config.objectives:
        curves[obj], table[obj] = {}, {}
        for k in config.staleness:
            cell = sorted((r for r in runs if r["objective"] == obj and r["staleness"] == k), key=lambda r: r["seed"])
            if not cell:
                continue
            ret = np.array([r["returns"] for r in cell])
            entry = {"x": np.array(cell[0]["steps"], dtype=np.float64)}
            for key in ("returns", *DIAGNOSTICS):
                values = np.array([r[key] for r in cell])
                m, lo, hi = t_interval(
                    values if key == "returns" else _trailing_mean(values, _DIAG_WINDOW), bounds=BOUNDS[key]
                )
                entry[key] = {"mean": m, "lo": lo, "hi": hi}
            curves[obj][k] = entry
            row = {"seeds": len(cell)}
            for name, values in (("final", ret[:, -tail:].mean(axis=1)), ("auc", ret.mean(axis=1))):
                m, lo, hi = t_interval(values, bounds=BOUNDS["returns"])
                row.update({f"{name}_mean": float(m), f"{name}_lo": float(lo), f"{name}_hi": float(hi)})
                row[f"{name}_per_seed"] = values.tolist()
            table[obj][k] = row
    for k in config.staleness:
        for key in ("final", "auc"):
            order = sorted((o for o in config.objectives if k in table[o]), key=lambda o: -table[o][k][f"{key}_mean"])
            for rank, o in enumerate(order, 1):
                table[o][k][f"{key}_rank"] = rank
    return {"curves": curves, "table": table, "tail_iterations": tail}


def table_markdown(summary: dict[str, Any], config: DemoConfig) -> str:
    """Final and AUC returns per (objective, K): mean [95% t-interval over seeds] (rank within K)."""
    lines = [
        f"Final return (mean of the last {summary['tail_iterations']} iterations' running return) and AUC (mean "
        f"return over all {config.iterations} iterations, {config.iterations * config.steps_per_iteration:,} env "
        f"steps), mean over {config.seeds} seeds [95% Student-t interval] (rank within the column).",
        "",
        "| objective | " + " | ".join(f"K={k} final | K={k} AUC" for k in config.staleness) + " |",
        "|---|" + "---:|---:|" * len(config.staleness),
    ]
    for obj in config.objectives:
        cells = []
        for k in config.staleness:
            row = summary["table"][obj].get(k)
            for key in ("final", "auc"):
                cells.append(
                    "n/a" if row is None else
                    f"{row[f'{key}_mean']:.0f} [{row[f'{key}_lo']:.0f}, {row[f'{key}_hi']:.0f}] ({row[f'{key}_rank']})"
                )
        lines.append(f"| {OBJECTIVES[obj][0]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _table_csv(summary: dict[str, Any], config: DemoConfig) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    keys = ("final_mean", "final_lo", "final_hi", "final_rank", "auc_mean", "auc_lo", "auc_hi", "auc_rank")
    w.writerow(["objective", "label", "staleness", "seeds", *keys])
    for obj in config.objectives:
        for k, row in summary["table"][obj].items():
            w.writerow([obj, OBJECTIVES[obj][0], k, row["seeds"], *(row[x] for x in keys)])
    return buf.getvalue()


def _band(entry: dict[str, Any], key: str) -> dict[str, np.ndarray]:
    return {"x": entry["x"], **entry[key]}


def write_outputs(
    runs: Sequence[dict[str, Any]], config: DemoConfig, out_dir: str, command: str | None = None
) -> dict[str, str]:
    """Figures (PNG), table (markdown, CSV) and every curve (JSON) into ``out_dir``; returns the paths.

    ``results.md`` starts with the date (UTC) and the command that produced it (``command``, else the call).
    """
    from . import plotting

    os.makedirs(out_dir, exist_ok=True)
    summary = summarize(runs, config)
    labels = {o: OBJECTIVES[o][0] for o in config.objectives}
    paths: dict[str, str] = {}
    for k in config.staleness:
        curves = {labels[o]: _band(summary["curves"][o][k], "returns") for o in config.objectives}
        paths[f"curves_K{k}"] = os.path.join(out_dir, f"learning_curves_K{k}.png")
        plotting.learning_curves_figure(
            curves, paths[f"curves_K{k}"],
            title=f"{config.env_id}, replay of the last K={k} policy versions "
                  f"({config.seeds} seeds, mean and 95% t-interval)",
        )
    cols = [f"K={k}" for k in config.staleness]
    panels = {
        ("return", f"K={k}"): {labels[o]: _band(summary["curves"][o][k], "returns") for o in config.objectives}
        for k in config.staleness
    }
    paths["curves"] = os.path.join(out_dir, "learning_curves.png")
    plotting.diagnostics_figure(
        panels, ["return"], cols, paths["curves"],
        title=f"{config.env_id} learning curves by staleness (mean of {config.seeds} seeds, 95% t-interval)",
    )
    diag = {
        (d, f"K={k}"): {labels[o]: _band(summary["curves"][o][k], d) for o in config.objectives}
        for d in DIAGNOSTICS for k in config.staleness
    }
    paths["diagnostics"] = os.path.join(out_dir, "diagnostics.png")
    plotting.diagnostics_figure(
        diag, list(DIAGNOSTICS), cols, paths["diagnostics"],
        title="Diagnostics over training (gipo_core metrics of each objective's own trust weight; trailing mean "
              f"of {_DIAG_WINDOW} iterations, mean over {config.seeds} seeds and 95% t-interval)",
    )
    paths["summary_figure"] = os.path.join(out_dir, "summary.png")
    plotting.summary_figure(
        {labels[o]: summary["table"][o] for o in config.objectives}, list(config.staleness), paths["summary_figure"],
        title=f"{config.env_id}: final return and AUC by staleness ({config.seeds} seeds, 95% t-interval)",
    )
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    how = f"`{command}`" if command else f"`gipo_core.experiments.demo.run_demo` ({config})"
    paths.update(write_tables(
        out_dir, "results", f"Generated {stamp} by {how}.\n\n" + table_markdown(summary, config), _table_csv(summary, config),
        {"config": asdict(config), "objectives": {o: OBJECTIVES[o] for o in config.objectives},
         "table": {o: {str(k): v for k, v in t.items()} for o, t in summary["table"].items()}, "runs": list(runs)},
    ))
    return paths


def write_tables(out_dir: str, stem: str, markdown: str, csv_text: str, payload: dict[str, Any],
                 *, json_stem: str | None = None, indent: int | None = None) -> dict[str, str]:
    """Write ``<stem>.md``, ``<stem>.csv`` and ``<json_stem or stem>.json`` into ``out_dir``; return their paths
    under the keys ``table_markdown``, ``table_csv`` and ``json``."""
    paths = {"table_markdown": os.path.join(out_dir, f"{stem}.md"), "table_csv": os.path.join(out_dir, f"{stem}.csv"),
             "json": os.path.join(out_dir, f"{json_stem or stem}.json")}
    with open(paths["table_markdown"], "w", encoding="utf-8") as f:
        f.write(markdown + "\n")
    with open(paths["table_csv"], "w", encoding="utf-8", newline="") as f:
        f.write(csv_text)
    with open(paths["json"], "w", encoding="utf-8") as f:
        json.dump(payload, f, indent=indent)
    return paths


def _usable_cpus() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one, e.g. under taskset)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def _worker_init() -> None:
    import torch

    torch.set_num_threads(1)


def run_parallel(
    fn: Callable[..., Any],
    tasks: Sequence[tuple],
    workers: int,
    *,
    progress: bool = True,
    desc: str = "gipo",
    on_result: Callable[[Any], None] | None = None,
) -> list[Any]:
    """Call ``fn(*task)`` for every task, in ``workers`` spawned processes (one torch thread each).

    Results are returned in completion order; ``on_result`` (if given) is called with each one as it arrives, in
    the parent process (the place to save a finished run). ``workers`` 0 means one per usable CPU core; with one
    worker everything runs in this process. A tqdm progress bar counts finished tasks when ``progress``.
    """
    workers = workers or _usable_cpus()
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(tasks), desc=desc, unit="run", dynamic_ncols=True)
    results: list[Any] = []

    def done(result: Any) -> None:
        results.append(result)
        if on_result is not None:
            on_result(result)
        if bar is not None:
            bar.update(1)

    if workers == 1 or len(tasks) <= 1:
        for task in tasks:
            done(fn(*task))
    else:
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=min(workers, len(tasks)), mp_context=ctx,
                                 initializer=_worker_init) as pool:
            futures = [pool.submit(fn, *task) for task in tasks]
            for fut in as_completed(futures):
                done(fut.result())
    if bar is not None:
        bar.close()
    return results


def run_demo(
    config: DemoConfig,
    out_dir: str,
    *,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    command: str | None = None,
) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """Run every (objective, K, seed) cell, in parallel processes, and write the outputs.

    Returns the runs and the paths written.
    """
    config.validate()
    tasks = [(o, k, config.first_seed + s, config) for s in range(config.seeds) for k in config.staleness
             for o in config.objectives]
    runs = run_parallel(train_one, tasks, config.workers, progress=progress, desc="gipo demo")
    runs.sort(key=lambda r: (config.objectives.index(r["objective"]), r["staleness"], r["seed"]))
    paths = write_outputs(runs, config, out_dir, command)
    return runs, paths
