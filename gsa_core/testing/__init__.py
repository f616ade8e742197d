"""Conformance kit: hypothesis strategies and one check function per protocol.

A plugin author tests a new component in one line, e.g. ``check_backend(MyBackend())`` or
``check_birth_policy(MyBirth())``. The pytest fixture ``gsa_registry`` (installed as a pytest
plugin) gives each test a fresh registry.
"""

from gsa_core.testing.backend_checks import (
    check_absorb_readout,
    check_backend,
    check_causal,
    check_empty_sequences,
    check_extend_splits,
    check_extreme_inputs,
    check_gradcheck,
    check_matches_reference,
    check_non_finite_inputs,
    check_padding,
    check_permutation_equivariance,
    check_prefill_then_step,
    check_recurrent,
    check_state_batching,
    reference_backend,
    relative_rmse,
)
from gsa_core.testing.policy_checks import (
    adaptation_stats,
    apply_births,
    check_adapter,
    check_birth_policy,
    check_controller,
    check_death_policy,
    check_initializer,
    check_scheduler,
)
from gsa_core.testing.position_checks import check_position_extension, position_tables
from gsa_core.testing.recall_checks import check_recall_policy, recall_candidates, reference_recall_attention
from gsa_core.testing.strategies import BankSpec, bank_specs, padding_mask, random_qkv, random_stats

CHECKS = {
    "initializer": check_initializer,
    "birth": check_birth_policy,
    "death": check_death_policy,
    "scheduler": check_scheduler,
    "backend": check_backend,
    "positions": check_position_extension,
    "recall": check_recall_policy,
}


def check_component(kind: str, component: object, **kwargs: object) -> None:
    """Run the conformance check of ``kind`` on ``component`` (adapters need :func:`check_adapter`)."""
    if kind not in CHECKS:
        raise ValueError(f"no one-argument check for kind {kind!r}; kinds: {', '.join(CHECKS)} "
                         "(adapters: use check_adapter with a model factory)")
    CHECKS[kind](component, **kwargs)  # type: ignore[operator]


__all__ = [
    "CHECKS", "BankSpec", "adaptation_stats", "apply_births", "bank_specs", "check_absorb_readout", "check_adapter",
    "check_backend", "check_birth_policy", "check_causal", "check_component", "check_controller",
    "check_death_policy", "check_empty_sequences", "check_extend_splits", "check_extreme_inputs", "check_gradcheck",
    "check_initializer", "check_matches_reference", "check_non_finite_inputs", "check_padding",
    "check_permutation_equivariance", "check_position_extension", "check_prefill_then_step", "check_recall_policy",
    "check_recurrent", "check_scheduler", "check_state_batching", "padding_mask", "position_tables", "random_qkv",
    "random_stats", "recall_candidates", "reference_backend", "reference_recall_attention", "relative_rmse",
]
