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
from gsa_core.protocols import BirthPolicy, Births, DeathPolicy, Initializer, ModelAdapter, Scheduler, SlotStats
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
@st.composite
def _bank_seed_steps(draw: st.DrawFn) -> tuple:
    """A bank spec, a seed for statistics and generator, and a statistics window length."""
    return draw(bank_specs(max_capacity=16)), draw(st.integers(0, 2**31 - 1)), draw(st.integers(0, 50))


def apply_births(bank: SplatBank, births: Births) -> torch.Tensor:
    """Write births into the bank exactly as the adaptation controller does (sources first, then
    targets); returns ``written [H, K]``, the slots whose values changed."""
    from gsa_core.adaptation.ops import apply_births as _apply

    return _apply(bank, births)


def adaptation_stats(bank: SplatBank, seed: int, steps: int = 10) -> SlotStats:
    """:func:`random_stats` plus what the adaptation controller adds (``WindowStats``): slot ages, coverage,
    the window's typical token distance, and coverage-gap candidates - half of them next to alive
    splats, half far from every splat - with their true distances to the bank."""
    from gsa_core.adaptation.statistics import WindowStats, features_and_distance

    base = random_stats(bank, seed, steps=steps)
    g = torch.Generator().manual_seed(seed + 1)
    h, k, d = bank.n_heads, bank.capacity, bank.head_dim
    with torch.no_grad():
        pick = torch.randint(0, k, (h, 12), generator=g)
        centers = bank.centers.detach().float().gather(1, pick.unsqueeze(-1).expand(h, 12, d))
        index = pick.unsqueeze(-1).expand(h, 12, d)
        std = bank.scale_tril().detach().float().diagonal(dim1=-2, dim2=-1).gather(1, index)
        noise = torch.randn(h, 12, d, generator=g)
        far = torch.zeros(h, 12, 1)
        far[:, 6:] = 8.0
        points = centers + std * noise * (1.0 + far)
        _, dist = features_and_distance(bank, points)
        dist = dist.nan_to_num(posinf=1e30)
        dist[:, -2:] = float("-inf")  # empty rows, as in a partly filled buffer
        typical = dist.clamp_min(0).nan_to_num(0.0).median(-1).values
    return WindowStats(
        mass=base.mass, grad_norm=base.grad_norm, hits=base.hits, steps=base.steps,
        age=torch.randint(0, max(steps, 1) + 1, (h, k), generator=g) * bank.alive,
        coverage=torch.rand(h, generator=g), typical_distance=typical, gap_points=points, gap_dist=dist,
    )


def check_birth_policy(policy: BirthPolicy, *, max_examples: int = 20, mass_preserving: bool | None = None) -> None:
    """Births go to distinct dead slots, within capacity, from alive sources, with finite values,
    deterministically under the generator; a source the births rewrite (a split moves its parent)
    appears once; the bank stays valid after applying them.

    ``mass_preserving`` (default: the policy's ``preserves_mass`` attribute): also check that every
    source and its copies together keep the source's amplitude (a mass-preserving split or relocation).
    The statistics are :func:`adaptation_stats`, so coverage-based policies see gap candidates.
    """
    assert isinstance(policy, BirthPolicy), f"{policy!r} does not implement BirthPolicy"
    if mass_preserving is None:
        mass_preserving = bool(getattr(policy, "preserves_mass", False))

    @_property(_bank_seed_steps(), max_examples)
    def test(args) -> None:
        spec, seed, steps = args
        bank = spec.make()
        stats = adaptation_stats(bank, seed, steps=steps)
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
            _check_source_rewrites(births, bank, who)
        again = policy.propose(spec.make(), stats, generator=torch.Generator().manual_seed(seed))
        assert torch.equal(again.slots, births.slots) and torch.equal(again.centers, births.centers), (
            f"{who}: same seed gave different births"
        )
        alive_before = int(bank.alive.sum())
        amp_before = bank.log_amplitude.detach().double().exp().clone()
        apply_births(bank, births)
        assert int(bank.alive.sum()) == alive_before + n <= bank.n_heads * bank.capacity
        assert_valid_bank(bank, who)
        if mass_preserving and n:
            _check_mass_preserved(births, bank, amp_before, who)

    test()


def _check_source_rewrites(births: Births, bank: SplatBank, who: str) -> None:
    """Rows that rewrite their source (``source_centers``/``source_shape``) name each source once."""
    centers = getattr(births, "source_centers", None)
    shape = getattr(births, "source_shape", None)
    if centers is None and shape is None:
        return
    n = len(births)
    if centers is not None:
        assert centers.shape == (n, bank.head_dim), f"{who}: source_centers must be [n, d]"
        assert torch.isfinite(centers).all(), f"{who}: non-finite source_centers"
    if shape is not None:
        assert shape.shape == births.shape.shape, f"{who}: source_shape must match shape"
        assert torch.isfinite(shape).all(), f"{who}: non-finite source_shape"
    src = births.sources.long()
    pairs = [(int(h), int(s)) for h, s in zip(births.heads.long(), src, strict=True) if s >= 0]
    assert len(pairs) == len(set(pairs)), f"{who}: a rewritten source appears in more than one birth"


def _check_mass_preserved(births: Births, bank: SplatBank, amp_before: torch.Tensor, who: str) -> None:
    """Each source's amplitude before == its amplitude after + the amplitudes of its copies."""
    amp_after = bank.log_amplitude.detach().double().exp()
    totals: dict[tuple[int, int], float] = {}
    for h, s, src in zip(births.heads.long().tolist(), births.slots.long().tolist(),
                         births.sources.long().tolist(), strict=True):
        if src < 0:
            continue
        totals.setdefault((h, src), float(amp_after[h, src]))
        totals[(h, src)] += float(amp_after[h, s])
    for (h, src), total in totals.items():
        before = float(amp_before[h, src])
        assert abs(total - before) <= 1e-5 * max(before, 1e-30), (
            f"{who}: not mass-preserving: source ({h}, {src}) had amplitude {before:.6g}, it and its copies "
            f"have {total:.6g}"
        )


# ----------------------------------------------------------------------------- death
def check_death_policy(policy: DeathPolicy, *, max_examples: int = 20) -> None:
    """Chooses only alive slots, as a ``bool [H, K]``, deterministically."""
    assert isinstance(policy, DeathPolicy), f"{policy!r} does not implement DeathPolicy"

    @_property(_bank_seed_steps(), max_examples)
    def test(args) -> None:
        spec, seed, steps = args
        bank = spec.make()
        stats = adaptation_stats(bank, seed, steps=steps)
        who = type(policy).__name__
        dead = policy.select(bank, stats)
        assert dead.dtype == torch.bool and dead.shape == bank.alive.shape, (
            f"{who}: select must return bool {tuple(bank.alive.shape)}, got {dead.dtype} {tuple(dead.shape)}"
        )
        assert not (dead & ~bank.alive).any(), f"{who}: chose a slot that is already dead"
        assert torch.equal(dead, policy.select(bank, copy.deepcopy(stats))), f"{who}: not deterministic"
        from gsa_core.adaptation.ops import limit_deaths

        for min_alive in (1, 2, 3):  # the controller's limit keeps the alive minimum, whatever the policy says
            limited = limit_deaths(bank.alive, dead, min_alive, priority=stats.mass)
            assert not (limited & ~dead).any(), f"{who}: the alive minimum added a death"
            left = (bank.alive & ~limited).sum(-1)
            need = bank.alive.sum(-1).clamp(max=min_alive)
            assert (left >= need).all(), f"{who}: a head fell below min_alive={min_alive}"

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


# ----------------------------------------------------------------------------- controller
def check_controller(
    make_model: Callable[[], torch.nn.Module],
    loss_fn: Callable[[torch.nn.Module, int], torch.Tensor],
    config: Any,
    *,
    steps: int = 12,
    lr: float = 1e-2,
    check_determinism: bool = True,
) -> Any:
    """Run an :class:`~gsa_core.adaptation.AdaptationController` from ``config`` (a ``GSAConfig``) for
    ``steps`` training steps with Adam and check, at every step and for every bank:

    - capacity never changes (every parameter keeps its shape) and no head falls below
      ``config.bank.min_alive`` alive slots (given it started with at least that many);
    - dead slots receive no gradient (every splat parameter's ``.grad`` is zero on dead slots);
    - births only go to slots that were dead (alive count = before − deaths + births, per head, and
      births never exceed the slots free after the deaths);
    - every slot the refine wrote has zero Adam moments right after it;
    - with ``check_determinism``, a second identical run gives a bit-identical model.

    ``make_model()`` must build the same model each call (seed inside it); ``loss_fn(model, step)``
    returns the step's loss. The controller refines whenever its scheduler says so; use an aggressive
    schedule (e.g. ``interval`` with ``start=1, every=1``). Returns the first run's controller.
    """
    from gsa_core.adaptation import AdaptationController

    def run() -> tuple[torch.nn.Module, Any]:
        model = make_model()
        opt = torch.optim.Adam(model.parameters(), lr=lr)
        controller = AdaptationController(model, config, opt, force=True, grace_steps=0, stats_every=1)
        banks = [t.bank for t in controller.banks]
        assert banks, "check_controller: the model holds no SplatBank"
        min_alive = controller.min_alive
        shapes = [{k: tuple(v.shape) for k, v in b.state_dict().items()} for b in banks]
        for step in range(steps):
            loss = loss_fn(model, step)
            loss.backward()
            for b in banks:
                for name, p in b.slot_parameters().items():
                    if p.grad is not None:
                        leak = p.grad[~b.alive]
                        assert bool((leak == 0).all()), f"dead slots received a gradient in {name} at step {step}"
            controller.after_backward(step)
            opt.step()
            before = [(b.alive.clone(), {k: v.detach().clone() for k, v in b.slot_parameters().items()})
                      for b in banks]
            report = controller.step(step)
            opt.zero_grad(set_to_none=True)
            for i, b in enumerate(banks):
                now = {k: tuple(v.shape) for k, v in b.state_dict().items()}
                assert now == shapes[i], f"capacity changed at step {step}: {shapes[i]} -> {now}"
                alive_before, params_before = before[i]
                assert (b.alive.sum(-1) >= min(min_alive, b.capacity)).all(), (
                    f"a head fell below min_alive={min_alive} at step {step}: {b.alive.sum(-1).tolist()}")
                if report is None:
                    assert torch.equal(b.alive, alive_before), f"alive changed without a refine at step {step}"
                    continue
                rec = report.records[i]
                births, deaths = torch.tensor(rec.births_per_head), torch.tensor(rec.deaths_per_head)
                assert torch.equal(b.alive.sum(-1), alive_before.sum(-1) - deaths + births), (
                    f"alive count does not add up at step {step}")
                free_after_deaths = b.capacity - alive_before.sum(-1) + deaths
                assert (births <= free_after_deaths).all(), f"more births than free slots at step {step}"
                changed = torch.zeros_like(b.alive)
                for name, p in b.slot_parameters().items():
                    diff = (p.detach() != params_before[name])
                    changed |= diff.reshape(*diff.shape[:2], -1).any(-1)
                for name, p in b.slot_parameters().items():
                    state = opt.state.get(p, {})
                    for key in ("exp_avg", "exp_avg_sq"):
                        if key in state:
                            moments = state[key][changed]
                            assert bool((moments == 0).all()), f"{key} of a written slot not zeroed ({name})"
        return model, controller

    model, controller = run()
    if check_determinism:
        again, _ = run()
        for (key, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items(), strict=True):
            assert torch.equal(a, b), f"two identical runs differ in {key}: adaptation is not deterministic"
    controller.remove_hooks()
    return controller


# ----------------------------------------------------------------------------- adapter
def check_adapter(adapter: ModelAdapter, make_model: Callable[[], Any], config: Any,
                  run: Callable[[Any], torch.Tensor]) -> None:
    """``make_model`` builds a fresh supported model; ``run`` returns its outputs on fixed inputs.

    Checks that the adapter recognises the model, keeps every original weight bit for bit, that with
    GSA switched off (``config`` should say passthrough) the outputs are identical, and that its family
    facts (the widened :class:`ModelAdapter` contract) describe the model: model types, sites, LoRA
    targets, calibration layers and forward inputs.
    """
    assert isinstance(adapter, ModelAdapter), f"{adapter!r} does not implement ModelAdapter"
    model = make_model()
    assert adapter.matches(model), f"{adapter.name}: does not recognise the model it was built for"
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    assert model_type in adapter.model_types, f"{adapter.name}: model_types {adapter.model_types} lack {model_type!r}"
    implementation = adapter.attn_implementation(model.config)
    assert implementation is None or isinstance(implementation, str | dict), (
        f"{adapter.name}: attn_implementation must be a string, a dict per sub-config or None, got {implementation!r}")
    reference = run(model)
    original = {k: v.detach().clone() for k, v in model.state_dict().items()}
    converted = adapter.convert(model, config)
    state = converted.state_dict()
    for key, value in original.items():
        assert key in state, f"{adapter.name}: conversion dropped weight {key}"
        assert torch.equal(state[key], value), f"{adapter.name}: conversion changed weight {key}"
    diff = (run(converted) - reference).abs().max().item()
    assert diff == 0.0, f"{adapter.name}: passthrough output differs by {diff}"
    _check_adapter_facts(adapter, converted)


def _check_adapter_facts(adapter: ModelAdapter, model: Any) -> None:
    modules = dict(model.named_modules())
    sites = adapter.sites(model)
    assert sites, f"{adapter.name}: sites() found no attention module in the model it converted"
    for site in sites:
        assert modules.get(site.name) is site.module, f"{adapter.name}: site {site.name!r} is not that module's path"
        assert site.kind in ("global", "local", "self", "cross"), f"{adapter.name}: site kind {site.kind!r}"
        assert site.n_heads >= 1 and site.head_dim >= 1, f"{adapter.name}: site {site.name!r} has no heads"
    names = {site.name for site in sites}
    layers = adapter.attention_layers(model)
    assert layers and {layer.name for layer in layers} <= names, (
        f"{adapter.name}: attention_layers() must name sites, got {[layer.name for layer in layers]}")
    targets = adapter.lora_targets(model)
    assert targets, f"{adapter.name}: lora_targets() is empty"
    for target in targets:  # peft matches target_modules against the end of module paths
        assert any(name == target or name.endswith("." + target) for name in modules), (
            f"{adapter.name}: LoRA target {target!r} names no module of the model")
    batch = {"input_ids": torch.zeros(1, 3, dtype=torch.long), "attention_mask": torch.ones(1, 3, dtype=torch.long)}
    inputs = adapter.forward_inputs(model, batch)
    assert all(inputs[k] is v for k, v in batch.items()), f"{adapter.name}: forward_inputs() must keep the batch"
