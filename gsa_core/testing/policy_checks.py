"""Property checks for initializers, birth/death policies, schedulers and model adapters.

One line per plugin: ``check_birth_policy(MyBirth())``. Each check draws banks and statistics with
hypothesis and asserts the invariants stated in the protocol's docstring.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gsa_core.bank import SplatBank
from gsa_core.protocols import BirthPolicy, Births, DeathPolicy, Initializer, ModelAdapter, Scheduler
from gsa_core.testing.strategies import bank_specs, random_stats


def _property(
    strategy: st.SearchStrategy[Any], max_examples: int
) -> Callable[[Callable[..., None]], Callable[[], None]]:
    """Decorator turning ``test(example)`` into a zero-argument hypothesis run."""

    def wrap(test: Callable[..., None]) -> Callable[[], None]:
        return settings(max_examples=max_examples, deadline=None, derandomize=True,
                        suppress_health_check=list(HealthCheck))(given(strategy)(test))

    return wrap


def _snapshot(bank: SplatBank) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in bank.state_dict().items()}


def assert_valid_bank(bank: SplatBank, who: str) -> None:
    """Finite parameters and positive-definite covariances on every alive slot."""
    alive = bank.alive
    for name, p in bank.slot_parameters().items():
        assert torch.isfinite(p.detach()[alive]).all(), f"{who}: non-finite {name} in an alive slot"
    diag = bank.scale_tril().detach().diagonal(dim1=-2, dim2=-1)[alive]
    assert (diag > 0).all() and torch.isfinite(diag).all(), f"{who}: invalid covariance in an alive slot"


# ----------------------------------------------------------------------------- initializer
@st.composite
def calibration_data(draw: st.DrawFn, n_heads: int, head_dim: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Queries/keys ``[H, N, d]`` including the hard cases: none, fewer than slots, duplicates,
    zero variance and rank-deficient data."""
    kind = draw(st.sampled_from(("none", "normal", "few", "duplicates", "constant", "rank1")))
    if kind == "none":
        return None, None
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    n = {"few": 2, "duplicates": 30, "constant": 30, "rank1": 30, "normal": 60}[kind]
    x = torch.randn(n_heads, n, head_dim, generator=g) * draw(st.sampled_from((0.1, 1.0, 10.0)))
    if kind == "duplicates":
        x = x[:, :3].repeat(1, 10, 1)
    elif kind == "constant":
        x = torch.ones(n_heads, n, head_dim) * 2.5
    elif kind == "rank1":
        x = torch.randn(n_heads, n, 1, generator=g) * torch.randn(n_heads, 1, head_dim, generator=g)
    half = n // 2
    return x[:, :half].contiguous(), x[:, half:].contiguous()


def check_initializer(initializer: Initializer, *, max_examples: int = 20) -> None:
    """Writes only alive slots, finite values, valid covariances, same seed gives the same bank."""
    assert isinstance(initializer, Initializer), f"{initializer!r} does not implement Initializer"

    @st.composite
    def problem(draw: st.DrawFn):
        spec = draw(bank_specs(max_capacity=16))
        return spec, draw(calibration_data(spec.n_heads, spec.head_dim)), draw(st.integers(0, 2**31 - 1))

    @_property(problem(), max_examples)
    def test(args) -> None:
        spec, (queries, keys), seed = args
        bank = spec.make()
        before = _snapshot(bank)
        initializer.initialize(bank, queries, keys, generator=torch.Generator().manual_seed(seed))
        who = type(initializer).__name__
        assert torch.equal(bank.alive, before["alive"]), f"{who}: changed which slots are alive"
        dead = ~bank.alive
        for name, p in bank.slot_parameters().items():
            assert p.shape == before[name].shape, f"{who}: changed the shape of {name}"
            assert torch.equal(p.detach()[dead], before[name][dead]), f"{who}: wrote a dead slot's {name}"
        assert_valid_bank(bank, who)
        again = spec.make()
        initializer.initialize(again, queries, keys, generator=torch.Generator().manual_seed(seed))
        for name, p in again.slot_parameters().items():
            assert torch.equal(p, bank.slot_parameters()[name]), f"{who}: same seed gave a different {name}"

    test()


# ----------------------------------------------------------------------------- birth
def apply_births(bank: SplatBank, births: Births) -> None:
    """Write births into the bank exactly as the adaptation controller does."""
    if len(births) == 0:
        return
    shape_key = "scale_tril_raw" if bank.covariance == "full" else "log_scale"
    with torch.no_grad():
        has_source = births.sources >= 0
        if has_source.any():
            bank.log_amplitude[births.heads[has_source], births.sources[has_source]] = (
                births.source_log_amplitude[has_source].to(bank.log_amplitude)
            )
    bank.write_slots(births.heads, births.slots, centers=births.centers,
                     log_amplitude=births.log_amplitude, **{shape_key: births.shape})


def check_birth_policy(policy: BirthPolicy, *, max_examples: int = 20) -> None:
    """Births go to distinct dead slots, within capacity, from alive sources, with finite values,
    deterministically under the generator."""
    assert isinstance(policy, BirthPolicy), f"{policy!r} does not implement BirthPolicy"

    @st.composite
    def problem(draw: st.DrawFn):
        return draw(bank_specs(max_capacity=16)), draw(st.integers(0, 2**31 - 1)), draw(st.integers(0, 50))

    @_property(problem(), max_examples)
    def test(args) -> None:
        spec, seed, steps = args
        bank = spec.make()
        stats = random_stats(bank, seed, steps=steps)
        who = type(policy).__name__
        births = policy.propose(bank, stats, generator=torch.Generator().manual_seed(seed))
        assert isinstance(births, Births), f"{who}: propose must return Births, got {type(births).__name__}"
        n = len(births)
        d = bank.head_dim
        assert births.slots.shape == (n,) and births.centers.shape == (n, d), f"{who}: malformed Births shapes"
        assert births.shape.shape[1:] == bank.shape_params().shape[2:], f"{who}: covariance rows of wrong shape"
        if n:
            h, s = births.heads.long(), births.slots.long()
            assert ((h >= 0) & (h < bank.n_heads)).all() and ((s >= 0) & (s < bank.capacity)).all(), (
                f"{who}: birth outside the bank's capacity"
            )
            assert not bank.alive[h, s].any(), f"{who}: birth into an alive slot"
            pairs = set(zip(h.tolist(), s.tolist(), strict=True))
            assert len(pairs) == n, f"{who}: two births into the same slot"
            src = births.sources.long()
            with_src = src >= 0
            assert bank.alive[h[with_src], src[with_src]].all(), f"{who}: a birth cloned a dead source"
            for label, t in (("centers", births.centers), ("log_amplitude", births.log_amplitude),
                             ("shape", births.shape), ("source_log_amplitude", births.source_log_amplitude)):
                assert torch.isfinite(t).all(), f"{who}: non-finite {label}"
        again = policy.propose(spec.make(), stats, generator=torch.Generator().manual_seed(seed))
        assert torch.equal(again.slots, births.slots) and torch.equal(again.centers, births.centers), (
            f"{who}: same seed gave different births"
        )
        alive_before = int(bank.alive.sum())
        apply_births(bank, births)
        assert int(bank.alive.sum()) == alive_before + n <= bank.n_heads * bank.capacity
        assert_valid_bank(bank, who)

    test()


# ----------------------------------------------------------------------------- death
def check_death_policy(policy: DeathPolicy, *, max_examples: int = 20) -> None:
    """Chooses only alive slots, as a ``bool [H, K]``, deterministically."""
    assert isinstance(policy, DeathPolicy), f"{policy!r} does not implement DeathPolicy"

    @st.composite
    def problem(draw: st.DrawFn):
        return draw(bank_specs(max_capacity=16)), draw(st.integers(0, 2**31 - 1)), draw(st.integers(0, 50))

    @_property(problem(), max_examples)
    def test(args) -> None:
        spec, seed, steps = args
        bank = spec.make()
        stats = random_stats(bank, seed, steps=steps)
        who = type(policy).__name__
        dead = policy.select(bank, stats)
        assert dead.dtype == torch.bool and dead.shape == bank.alive.shape, (
            f"{who}: select must return bool {tuple(bank.alive.shape)}, got {dead.dtype} {tuple(dead.shape)}"
        )
        assert not (dead & ~bank.alive).any(), f"{who}: chose a slot that is already dead"
        assert torch.equal(dead, policy.select(bank, copy.deepcopy(stats))), f"{who}: not deterministic"

    test()


# ----------------------------------------------------------------------------- scheduler
def check_scheduler(scheduler: Scheduler, *, max_examples: int = 50) -> None:
    """Pure in ``(step, signals)``, returns a plain bool, never refines at negative steps."""
    assert isinstance(scheduler, Scheduler), f"{scheduler!r} does not implement Scheduler"
    who = type(scheduler).__name__
    signals = st.none() | st.dictionaries(st.sampled_from(("shift", "loss", "coverage")),
                                          st.floats(-1e6, 1e6, allow_nan=False), max_size=3)

    @_property(st.tuples(st.integers(-1000, 10**7), signals), max_examples)
    def test(args) -> None:
        step, sig = args
        first = scheduler.should_refine(step, sig)
        assert type(first) is bool, f"{who}: should_refine must return bool, got {type(first).__name__}"
        assert scheduler.should_refine(step, sig) is first, f"{who}: different answers for the same step"
        if step < 0:
            assert first is False, f"{who}: refined at negative step {step}"

    test()
    for step in (-1, -2, -10, -100, -1000, -(2**20)):  # a few steps hypothesis may not draw
        assert scheduler.should_refine(step, None) is False, f"{who}: refined at negative step {step}"


# ----------------------------------------------------------------------------- adapter
def check_adapter(adapter: ModelAdapter, make_model: Callable[[], Any], config: Any,
                  run: Callable[[Any], torch.Tensor]) -> None:
    """``make_model`` builds a fresh supported model; ``run`` returns its outputs on fixed inputs.

    Checks that the adapter recognises the model, keeps every original weight bit for bit, and
    that with GSA switched off (``config`` should say passthrough) the outputs are identical.
    """
    assert isinstance(adapter, ModelAdapter), f"{adapter!r} does not implement ModelAdapter"
    model = make_model()
    assert adapter.matches(model), f"{adapter.name}: does not recognise the model it was built for"
    reference = run(model)
    original = {k: v.detach().clone() for k, v in model.state_dict().items()}
    converted = adapter.convert(model, config)
    state = converted.state_dict()
    for key, value in original.items():
        assert key in state, f"{adapter.name}: conversion dropped weight {key}"
        assert torch.equal(state[key], value), f"{adapter.name}: conversion changed weight {key}"
    diff = (run(converted) - reference).abs().max().item()
    assert diff == 0.0, f"{adapter.name}: passthrough output differs by {diff}"
