"""The ``gipo`` command: ``gipo gridworld`` (exact bias-variance study), ``gipo demo`` (stale replay on CartPole)
and ``gipo metaworld`` (stale replay on Meta-World, robust statistics).

Examples
--------
>>> from gipo_core.experiments.cli import main
>>> main(["gridworld", "--out", "/tmp/gipo-doctest-gw", "--no-figure", "--quiet"])
0
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Sequence

__all__ = ["main", "build_parser"]


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text!r}")
    return value


def _named_numbers(count: int, what: str):
    def parse(text: str) -> tuple[str, list[float]]:
        name, sep, rest = text.partition("=")
        try:
            values = [float(v) for v in rest.split(",")]
        except ValueError:
            values = []
        if not sep or not name or len(values) != count:
            raise argparse.ArgumentTypeError(f"expected NAME={what} ({count} comma-separated numbers), got {text!r}")
        return name, values

    return parse


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        values = ()
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected comma-separated integers >= 1, got {text!r}")
    return values


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``gipo`` and its subcommands."""
    from .demo import OBJECTIVES

    parser = argparse.ArgumentParser(
        prog="gipo",
        description="Reproduce the GIPO paper's claims with gipo-core: an exact GridWorld bias-variance "
        "study and a stale-replay training comparison.",
    )
    sub = parser.add_subparsers(dest="command", metavar="{gridworld,demo,metaworld}")
    sub.required = True

    gw = sub.add_parser(
        "gridworld",
        help="exact 2x2 GridWorld bias-variance study (tables, CSV, JSON, figure)",
        description="Exact bias, variance and MSE of one-sample policy-gradient estimates in the 2x2 GridWorld "
        "(REFERENCE section 6), for No-Clip, GIPO over a sigma sweep, PPO-clip and SAPO, under behaviour "
        "policies A-D. Each method's gradient coefficient comes from gipo_core.numpy.value_and_grad.",
    )
    gw.add_argument("--out", default="gipo-out/gridworld", help="output folder (default: %(default)s)")
    gw.add_argument("--sigma", type=_positive_float, action="append", default=[], metavar="S",
                    help="add a GIPO sigma to the sweep {0.1, 0.3, 0.5, 1, 2} (repeatable)")
    gw.add_argument("--mixture", type=_named_numbers(3, "W_UNIFORM,W_RIGHT,W_DOWN"), action="append", default=[],
                    metavar="NAME=W0,W1,W2",
                    help="add a behaviour case mu = w0 uniform + w1 softmax(0,0,0,1) + w2 softmax(0,1,0,0) "
                    "(weights normalised; repeatable)")
    gw.add_argument("--mu", type=_named_numbers(4, "P_UP,P_DOWN,P_LEFT,P_RIGHT"), action="append", default=[],
                    metavar="NAME=PU,PD,PL,PR", help="add a behaviour case given as mu(.|S0) directly (repeatable)")
    gw.add_argument("--no-figure", action="store_true", help="skip the PNG (no matplotlib needed)")
    gw.add_argument("--quiet", action="store_true", help="do not print the tables")

    demo = sub.add_parser(
        "demo",
        help="stale-replay CartPole training comparison through gipo_core.torch",
        description="Train a small PyTorch actor-critic on CartPole-v1 with each objective, replaying the last K "
        "policy versions' samples with their stored behaviour log-probabilities. Writes learning curves per K, "
        "a table of final and AUC returns with 95% Student-t intervals over seeds, and diagnostics. "
        "Needs the demo extra: pip install 'gipo-core[demo]'.",
    )
    size = demo.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="the small preset (3 seeds; about 2-3 minutes on 2 cores)")
    size.add_argument("--full", action="store_true", help="the full preset (5 seeds, 3x the steps; under 20 minutes "
                      "on 2 cores); this is the default")
    demo.add_argument("--out", default="gipo-out/demo", help="output folder (default: %(default)s)")
    demo.add_argument("--objectives", type=lambda t: tuple(t.split(",")), default=None,
                      metavar="A,B", help=f"subset of {','.join(OBJECTIVES)}")
    demo.add_argument("--staleness", type=_int_list, default=None, metavar="K1,K2",
                      help="replay sizes K in policy versions (default 1,4,16,64)")
    demo.add_argument("--seeds", type=int, default=None, help="seeds per cell")
    demo.add_argument("--iterations", type=int, default=None, help="policy versions per run")
    demo.add_argument("--workers", type=int, default=None, help="parallel processes (default: one per CPU core)")
    for name, help_text in (("value-coef", "value-loss coefficient (0 disables; default 0.5)"),
                            ("entropy-coef", "entropy-bonus coefficient (default 0.01)"),
                            ("kl-coef", "KL(pi_old || pi_theta) coefficient (0 disables; default 0.1)")):
        demo.add_argument(f"--{name}", type=float, default=None, help=help_text)
    demo.add_argument("--no-progress", action="store_true", help="no progress bar")

    mw = sub.add_parser(
        "metaworld",
        help="stale-replay Meta-World MT1 study with IQM and probability of improvement",
        description="Train a Gaussian MLP actor-critic on Meta-World MT1 tasks with each objective, replaying the "
        "last K policy versions' rollouts with their stored behaviour log-probabilities; evaluate the success rate "
        "on held-out goals. Reports the IQM of success with 95%% stratified-bootstrap intervals across tasks and "
        "seeds, the probability of improvement of GIPO over each baseline, and learning curves. Each run is saved "
        "as it finishes: the same command continues an interrupted study. Needs the metaworld extra: "
        "pip install 'gipo-core[metaworld]'.",
    )
    size = mw.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="one task, 2 seeds, K=8 (a few minutes on 2 cores)")
    size.add_argument("--full", action="store_true", help="3 tasks x 5 seeds x K in {1, 8} (150 runs; about 70 "
                      "minutes on 2 cores); this is the default")
    mw.add_argument("--out", default="gipo-out/metaworld", help="output folder (default: %(default)s)")
    mw.add_argument("--tasks", type=lambda t: tuple(t.split(",")), default=None, metavar="T1,T2",
                    help="Meta-World v3 task names (default drawer-close-v3,handle-press-v3,reach-v3)")
    mw.add_argument("--objectives", type=lambda t: tuple(t.split(",")), default=None,
                    metavar="A,B", help=f"subset of {','.join(OBJECTIVES)}")
    mw.add_argument("--staleness", type=_int_list, default=None, metavar="K1,K2",
                    help="replay sizes K in policy versions (default 1,8)")
    for name, help_text in (("seeds", "seeds per cell"), ("iterations", "policy versions per run"),
                            ("num-envs", "environments stepped per iteration"),
                            ("rollout-len", "steps of each environment per iteration"),
                            ("max-episode-steps", "episode time limit"),
                            ("eval-episodes", "held-out evaluation episodes per run"),
                            ("workers", "parallel processes (default: one per CPU core)")):
        mw.add_argument(f"--{name}", type=int, default=None, help=help_text)
    mw.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def _gridworld(args: argparse.Namespace) -> int:
    from . import gridworld

    extra = {name: (f"mu = {w[0]:g} uniform + {w[1]:g} softmax(0,0,0,1) + {w[2]:g} softmax(0,1,0,0)",
                    gridworld.mixture(w)) for name, w in args.mixture}
    for name, mu in args.mu:
        extra[name] = ("mu(.|S0) = " + ", ".join(f"{v:g}" for v in mu), mu)
    study = gridworld.run_study(args.sigma, extra)
    paths = gridworld.write_outputs(study, args.out, figure=not args.no_figure)
    if not args.quiet:
        print(gridworld.to_markdown(study))
        print("wrote: " + ", ".join(paths.values()))
    return 0


def _demo(args: argparse.Namespace) -> int:
    from .demo import DemoConfig, run_demo

    overrides = {
        k: v
        for k, v in {
            "objectives": args.objectives,
            "staleness": args.staleness,
            "seeds": args.seeds,
            "iterations": args.iterations,
            "workers": args.workers,
            "value_coef": args.value_coef,
            "entropy_coef": args.entropy_coef,
            "kl_coef": args.kl_coef,
        }.items()
        if v is not None
    }
    config = (DemoConfig.quick if args.quick else DemoConfig.full)(**overrides)
    config.validate()
    start = time.perf_counter()
    runs, paths = run_demo(config, args.out, progress=not args.no_progress, command=args.command_line)
    return _report(paths, f"{len(runs)} runs in {time.perf_counter() - start:.0f} s", args.out)


def _report(paths: dict[str, str], what: str, out: str) -> int:
    """Print the markdown table and the paths written."""
    with open(paths["table_markdown"], encoding="utf-8") as f:
        print(f.read())
    print(f"\n{what}; outputs in {out}:")
    for p in paths.values():
        print(f"  {p}")
    return 0


def _metaworld(args: argparse.Namespace) -> int:
    from .metaworld import MetaWorldConfig, run_study

    names = ("tasks", "objectives", "staleness", "seeds", "iterations", "num_envs", "rollout_len",
             "max_episode_steps", "eval_episodes", "workers")
    overrides = {k: getattr(args, k) for k in names if getattr(args, k) is not None}
    config = (MetaWorldConfig.quick if args.quick else MetaWorldConfig.full)(**overrides)
    config.validate()
    start = time.perf_counter()
    runs, paths = run_study(config, args.out, progress=not args.no_progress)
    return _report(paths, f"{len(runs)} runs ({time.perf_counter() - start:.0f} s in this call)", args.out)


_COMMANDS = {"gridworld": _gridworld, "demo": _demo, "metaworld": _metaworld}
_EXTRAS = {"gridworld": "demo", "demo": "demo", "metaworld": "metaworld"}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``gipo`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    args.command_line = " ".join(["gipo", *(sys.argv[1:] if argv is None else argv)])
    try:
        return _COMMANDS[args.command](args)
    except ValueError as exc:
        parser.exit(2, f"gipo {args.command}: error: {exc}\n")
    except ImportError as exc:
        extra = _EXTRAS[args.command]
        parser.exit(2, f"gipo {args.command}: error: {exc}; install the {extra} extra: "
                       f"pip install 'gipo-core[{extra}]'\n")
    return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
