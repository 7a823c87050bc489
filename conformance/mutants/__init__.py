"""Deliberately broken implementations: each must fail the suite (tests/test_conformance_teeth.py checks it).

Each module here is gipo_core.numpy with one bug of a kind real implementations have, planted by patching
gipo_core in the importing process (the suite runs each in its own pytest process)::

    pytest conformance --backend=numpy:conformance.mutants.literal_exp

``MUTANTS`` maps each module name to the keyword selection (``-k``) that catches it quickly.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

MUTANTS = {
    "literal_exp": "test_golden and float32 and gipo-gaussian",
    "grad_through_weight": "test_finite_differences and gipo",
    "mask_after_exp": "test_masked_values_never_leak",
    "wrong_denominator": "test_golden and gipo-batch-seq-mean-token-sum-boolmask",
    "rel_error_1e5": "test_golden and float64",
    "nan_all_masked": "test_empty_batch_gives_zeros",
    "ignored_sigma_neg": "test_golden and sneg",
    "broadcast_advantages": "test_advantage_broadcasting",
    "per_token_sequence_mask": "test_golden and offpolicy-rollout-sequence-mask",
    "mean_over_padding": "test_golden and offpolicy-seq-gipo-s1-",
    "rollout_weight_with_gradient": "test_golden and offpolicy-rollout-token-truncate-gipo",
    "sequence_weight_from_mean": "test_golden and offpolicy-rollout-sequence-",
    "geometric_weight_from_sum": "test_golden and offpolicy-rollout-geometric-mask",
    "opsm_positive_advantages": "test_golden and offpolicy-opsm-",
}

PUBLIC = ("gipo_loss", "ppo_clip_loss", "no_clip_loss", "sapo_loss", "cispo_loss", "gaussian_trust_weight",
          "value_and_grad", "LossOutput")


def export(namespace: dict) -> None:
    """Re-export gipo_core.numpy's public API (after the caller's patch) into a mutant module."""
    import gipo_core.numpy as np_backend

    for name in PUBLIC:
        namespace[name] = getattr(np_backend, name)


def patch_forward(wrap: Callable[[Callable], Callable]) -> None:
    """Replace the core's forward as the NumPy backend calls it by ``wrap(original)``."""
    import gipo_core.numpy as np_backend

    np_backend.forward = wrap(np_backend.forward)


def with_options(spec: Any, **changes: Any) -> Any:
    """``spec`` with some objective options changed."""
    return dataclasses.replace(spec, options=tuple((k, changes.get(k, v)) for k, v in spec.options))
