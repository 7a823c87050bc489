"""Experiments that reproduce the GIPO paper's claims with this library.

- :mod:`gipo_core.experiments.gridworld`: the exact 2x2 GridWorld bias-variance study (``gipo gridworld``).
- :mod:`gipo_core.experiments.demo`: a stale-replay CartPole training comparison through
  :mod:`gipo_core.torch` (``gipo demo``; needs the ``demo`` extra).
- :mod:`gipo_core.experiments.metaworld`: a stale-replay study on Meta-World MT1 tasks with robust statistics
  (``gipo metaworld``; needs the ``metaworld`` extra), aggregated by :mod:`gipo_core.experiments.stats` (IQM,
  stratified bootstrap, probability of improvement).
- :mod:`gipo_core.experiments.cli`: the ``gipo`` console script.

Importing this package imports neither torch nor matplotlib.
"""
