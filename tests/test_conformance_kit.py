"""The conformance kit: built-ins pass it, and each check catches the defect it exists for."""

from __future__ import annotations

from collections.abc import Mapping

import pytest
import torch

from gsa_core.masks import MaskSpec
from gsa_core.protocols import Births
from gsa_core.registry import get_registry
from gsa_core.testing import (
    check_absorb_readout,
    check_backend,
    check_birth_policy,
    check_causal,
    check_component,
    check_death_policy,
    check_empty_sequences,
    check_extend_splits,
    check_extreme_inputs,
    check_initializer,
    check_matches_reference,
    check_non_finite_inputs,
    check_padding,
    check_recurrent,
    check_scheduler,
    check_state_batching,
)
from gsa_plugins.backends.dense import DenseBackend
from gsa_plugins.birth import CloneBirth
from gsa_plugins.death import LowMassDeath
from gsa_plugins.initializers import RandomInit

from _recurrent_backends import (  # isort: skip
    AbsorbIgnoresPadding, CrashesOnEmpty, ForgetsStateInPieces, NaiveRecurrent, PassesNaN, StacksInReverse,
    WritesIntoItsInput,
)


@pytest.mark.parametrize("kind", ["initializer", "birth", "death", "scheduler"])
def test_every_registered_policy_passes(kind):
    registry = get_registry()
    for name in registry.names(kind):
        check_component(kind, registry.build(kind, name), max_examples=15)


def test_dense_reference_passes_the_backend_kit():
    check_backend(DenseBackend(), max_examples=10)


# ----------------------------------------------------------------------------- broken components
class LeakyBackend(DenseBackend):
    """Ignores the causal mask: must fail check_causal."""

    def forward(self, q, k, v, bank, mask):
        return super().forward(q, k, v, bank, MaskSpec(key_padding=mask.key_padding,
                                                       query_padding=mask.query_padding))


class ScaledBackend(DenseBackend):
    """Off by 1%: must fail agreement with the reference."""

    def forward(self, q, k, v, bank, mask):
        out, info = super().forward(q, k, v, bank, mask)
        return out * 1.01, info


class PaddingBlindBackend(DenseBackend):
    """Attends to padded keys: must fail the padding check."""

    def forward(self, q, k, v, bank, mask):
        return super().forward(q, k, v, bank, MaskSpec(causal=mask.causal, query_padding=mask.query_padding))


class NaiveBackend(DenseBackend):
    """Plain softmax of exp-features (no log space): overflows on extreme inputs."""

    def forward(self, q, k, v, bank, mask):
        w = torch.exp(bank.log_features(q)) @ torch.exp(bank.log_features(k)).transpose(-1, -2)
        allowed = mask.allowed(q.shape[-2], k.shape[-2])
        w = w * allowed
        return (w / w.sum(-1, keepdim=True)) @ v, {}


@pytest.mark.parametrize(
    ("backend", "check", "message"),
    [
        (LeakyBackend(), check_causal, "changed when later tokens changed"),
        (ScaledBackend(), check_matches_reference, "differs from reference"),
        (PaddingBlindBackend(), check_padding, "padded keys/values changed the output"),
        (NaiveBackend(), check_extreme_inputs, "non-finite"),
        # the recurrent contract (broken third-party backends, tests/_recurrent_backends.py)
        (ForgetsStateInPieces(), check_extend_splits, "extend over pieces"),
        (AbsorbIgnoresPadding(), check_absorb_readout, "absorb \\+ readout differs"),
        (StacksInReverse(), check_state_batching, r"split\(stack\(states\)\)"),
        (WritesIntoItsInput(), check_state_batching, "extend modified the state it was given"),
        (PassesNaN(), check_non_finite_inputs, "did not raise NonFiniteInputError"),
    ],
)
def test_backend_checks_catch_defects(backend, check, message):
    with pytest.raises(AssertionError, match=message):
        check(backend, max_examples=30)


def test_a_third_party_recurrent_backend_passes_the_kit():
    """The naive recurrent backend shares no code with kernel or sparse: the kit holds it to the contract."""
    check_backend(NaiveRecurrent(), max_examples=6)


def test_check_recurrent_runs_every_recurrent_check():
    with pytest.raises(AssertionError, match="extend over pieces"):
        check_recurrent(ForgetsStateInPieces(), max_examples=10)


def test_empty_sequence_check_catches_a_crash():
    with pytest.raises(RuntimeError, match="0 elements"):
        check_empty_sequences(CrashesOnEmpty())


class WritesDeadSlots(RandomInit):
    def initialize(self, bank, queries, keys, *, generator):
        super().initialize(bank, queries, keys, generator=generator)
        with torch.no_grad():
            bank.centers.add_(1.0)


class Unseeded(RandomInit):
    def initialize(self, bank, queries, keys, *, generator):
        super().initialize(bank, queries, keys, generator=torch.Generator().manual_seed(torch.seed() % 2**31))


class BirthIntoAlive(CloneBirth):
    def propose(self, bank, stats, *, generator):
        b = super().propose(bank, stats, generator=generator)
        alive = bank.alive.nonzero()
        d = bank.head_dim
        return Births(heads=alive[:1, 0], slots=alive[:1, 1], centers=torch.zeros(1, d),
                      log_amplitude=torch.zeros(1), shape=bank.shape_params()[:1, 0].detach().clone(),
                      sources=torch.tensor([-1]), source_log_amplitude=torch.zeros(1)) if len(b) == 0 else b


class KillsDead(LowMassDeath):
    def select(self, bank, stats):
        return ~bank.alive | super().select(bank, stats)


class RefinesAtNegativeSteps:
    def should_refine(self, step: int, signals: Mapping[str, float] | None = None) -> bool:
        return step % 10 == 0


class ReturnsInt:
    def should_refine(self, step: int, signals: Mapping[str, float] | None = None) -> bool:
        return 1 if step > 0 else 0  # type: ignore[return-value]


@pytest.mark.parametrize(
    ("component", "check", "message"),
    [
        (WritesDeadSlots(), check_initializer, "wrote a dead slot"),
        (Unseeded(), check_initializer, "same seed gave a different"),
        (BirthIntoAlive(), check_birth_policy, "birth into an alive slot"),
        (KillsDead(), check_death_policy, "already dead"),
        (RefinesAtNegativeSteps(), check_scheduler, "refined at negative step"),
        (ReturnsInt(), check_scheduler, "must return bool"),
    ],
)
def test_policy_checks_catch_defects(component, check, message):
    with pytest.raises(AssertionError, match=message):
        check(component, max_examples=40)


def test_check_component_rejects_unknown_kind():
    with pytest.raises(ValueError, match="no one-argument check for kind 'adapter'"):
        check_component("adapter", object())
