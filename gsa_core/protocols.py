"""The extension points. A plugin implements one of these and registers it by name.

Each docstring states the invariants an implementation must keep; ``gsa_core.testing`` has one
check function per protocol that property-tests them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from gsa_core.bank import SplatBank
from gsa_core.masks import MaskSpec

if TYPE_CHECKING:
    from gsa_core.recall import RecallCandidates


@dataclass
class SlotStats:
    """Windowed per-slot statistics, each ``[H, K]``, that birth and death policies read.

    ``mass``: mean attention mass a slot carried per step; ``grad_norm``: mean ``||dL/dmu||``;
    ``hits``: tokens for which the slot was the best splat; ``steps``: how many steps the window holds.
    """

    mass: Tensor
    grad_norm: Tensor
    hits: Tensor
    steps: int

    @classmethod
    def zeros(cls, n_heads: int, capacity: int) -> SlotStats:
        z = torch.zeros(n_heads, capacity)
        return cls(mass=z.clone(), grad_norm=z.clone(), hits=z.clone(), steps=0)


@dataclass
class Births:
    """New splats a birth policy asks for. Row ``i`` writes slot ``(heads[i], slots[i])``.

    ``shape`` is the covariance parameter row (``log_scale`` or ``scale_tril_raw`` entry).
    ``sources[i]`` is the slot it was cloned/split from in the same head, or -1 for a seeded splat;
    ``source_log_amplitude[i]`` is that source's new log-amplitude (a mass-preserving split halves it).
    """

    heads: Tensor
    slots: Tensor
    centers: Tensor
    log_amplitude: Tensor
    shape: Tensor
    sources: Tensor
    source_log_amplitude: Tensor

    def __len__(self) -> int:
        return int(self.heads.numel())

    @classmethod
    def empty(cls, bank: SplatBank) -> Births:
        shape_row = tuple(bank.shape_params().shape[2:])
        long = torch.zeros(0, dtype=torch.long)
        return cls(
            heads=long, slots=long.clone(), centers=torch.zeros(0, bank.head_dim),
            log_amplitude=torch.zeros(0), shape=torch.zeros((0, *shape_row)),
            sources=long.clone(), source_log_amplitude=torch.zeros(0),
        )


@runtime_checkable
class Initializer(Protocol):
    """Fills a bank's alive slots from calibration data.

    Invariants: writes only alive slots (dead slots keep every bit); all written values finite and
    every covariance valid; never changes capacity; the same generator seed gives the same bank;
    works with ``queries``/``keys`` of ``None`` (no data), fewer vectors than slots, duplicate
    points and zero variance.
    """

    def initialize(
        self, bank: SplatBank, queries: Tensor | None, keys: Tensor | None, *, generator: torch.Generator
    ) -> None: ...


@runtime_checkable
class BirthPolicy(Protocol):
    """Proposes new splats for dead slots.

    Invariants: targets are dead slots, each at most once; never more births in a head than it has
    dead slots; sources (when not -1) are alive; values finite; deterministic under the generator.
    """

    def propose(self, bank: SplatBank, stats: SlotStats, *, generator: torch.Generator) -> Births: ...


@runtime_checkable
class DeathPolicy(Protocol):
    """Chooses slots to kill. Returns ``bool [H, K]``.

    Invariants: only alive slots are chosen; the result is deterministic for the same inputs.
    The controller, not the policy, keeps each head's minimum number of alive slots.
    """

    def select(self, bank: SplatBank, stats: SlotStats) -> Tensor: ...


@runtime_checkable
class Scheduler(Protocol):
    """Decides at which training steps the bank is refined.

    Invariants: a pure function of ``step`` and ``signals`` (same inputs, same answer); returns a
    plain ``bool``; never refines at negative steps.
    """

    def should_refine(self, step: int, signals: Mapping[str, float] | None = None) -> bool: ...


@runtime_checkable
class AttentionBackend(Protocol):
    """Computes GSA attention ``(q, k, v, bank, mask) -> (out, info)``.

    ``q [B, H, n_q, d]``, ``k [B, H, n_k, d]``, ``v [B, H, n_k, d_v]`` -> ``out [B, H, n_q, d_v]`` in
    ``v``'s dtype, computed in fp32. Invariants (DESIGN.md section 2): agrees with ``dense``
    (relative RMSE <= 1e-4 fp32) on outputs and gradients; causal outputs never depend on later
    tokens; padded keys change nothing and padded queries give zeros; non-causal attention is
    permutation-equivariant; finite outputs and gradients for finite inputs. ``supported_masks``
    lists the mask kinds (``gsa_core.masks.MASK_KINDS``) it can serve.

    Numerics contract, the same in every backend: a NaN or Inf anywhere in ``q``, ``k`` or ``v`` raises
    :class:`~gsa_core.errors.NonFiniteInputError` before any output (``gsa_core.numerics.check_finite``;
    padded positions included); empty sequences (``n_q = 0``, ``n_k = 0`` or both) are valid and give
    ``[B, H, n_q, d_v]`` zeros.

    Optional methods, used when present:

    - ``is_exact(bank) -> bool``: False when the backend changes the attention for this bank (``sparse``
      with ``top_k`` below the alive slots); ``auto`` and decoding never substitute an inexact backend;
    - ``flops(batch, heads, n_q, n_k, head_dim, value_dim, causal, bank) -> float``: the matmul FLOPs of one
      forward (what benchmarks divide by the time to get a FLOP rate).
    """

    name: str
    supported_masks: frozenset[str]

    def forward(
        self, q: Tensor, k: Tensor, v: Tensor, bank: SplatBank, mask: MaskSpec
    ) -> tuple[Tensor, dict[str, Any]]: ...


@runtime_checkable
class RecurrentState(Protocol):
    """A recurrent backend's state for a batch of sequences (``gsa_core.recurrent.BatchState`` is one).

    Invariants: its size (``nbytes()``) does not depend on how many tokens it has seen; ``select`` /
    ``split`` give rows of the batch and ``type(state).stack`` concatenates states again, so that
    ``stack(split(s))`` equals ``s`` and states of sequences of different lengths batch together;
    backends never modify a state they are given (state in, new state out).
    """

    @property
    def batch_size(self) -> int: ...

    def nbytes(self) -> int: ...

    def select(self, index: Any) -> Any: ...

    def split(self) -> list[Any]: ...


@runtime_checkable
class RecurrentBackend(AttentionBackend, Protocol):
    """A backend that continues attention from a state: constant-memory decoding, chunked long prompts.

    The state summarises every key absorbed so far (``B`` sequences at once, each its own length).
    ``init_state(bank, batch, value_dim, device)``: the state of no keys. Then, all functional:

    - ``extend(q, k, v, bank, state, mask) -> (out, state)``: causal attention of ``n >= 0`` new,
      aligned tokens (``q, k [B, H, n, d]``, ``v [B, H, n, d_v]``; query ``i`` sees the state's keys and
      new keys ``<= i``). ``mask`` (a causal :class:`MaskSpec` or None) carries the new tokens'
      ``key_padding`` (a padded key changes nothing: its row's state stays bit-identical) and
      ``query_padding`` (zeros); no window, ``attend`` mask or query offset. Chunked inside: no
      ``n x n`` buffer.
    - ``absorb(k, v, bank, state, key_padding) -> state``: fold keys in without reading out.
    - ``readout(q, bank, state) -> (out [B, H, n, d_v], lse [B, H, n])``: attention of queries to the
      state's keys alone, without changing it; ``lse`` is the log of the total (unnormalised) weight,
      ``-inf`` with zero output when no key is visible, so that readouts of disjoint key sets merge
      exactly under one normaliser (how hybrid layers combine a state with an exact window).
    - ``prefill(q, k, v, bank, mask)`` / ``step(q, k, v, bank, state, key_padding)``: thin wrappers
      (``gsa_core.recurrent.RecurrentOps``).

    Invariants (``gsa_core.testing.check_recurrent``): ``extend`` over any split of a sequence (empty
    pieces included, with padding) equals one causal ``forward``; ``absorb`` then ``readout`` equals
    attending to those keys; readouts of two states merge into the readout of their union; extending
    stacked states equals extending each; the NaN/Inf contract of :class:`AttentionBackend` holds for
    ``extend`` and ``absorb`` too.
    """

    def init_state(self, bank: SplatBank, batch: int, value_dim: int, device: torch.device) -> Any: ...

    def extend(
        self, q: Tensor, k: Tensor, v: Tensor, bank: SplatBank, state: Any, mask: MaskSpec | None = None
    ) -> tuple[Tensor, Any]: ...

    def absorb(self, k: Tensor, v: Tensor, bank: SplatBank, state: Any, key_padding: Tensor | None = None) -> Any: ...

    def readout(self, q: Tensor, bank: SplatBank, state: Any) -> tuple[Tensor, Tensor]: ...

    def prefill(
        self, q: Tensor, k: Tensor, v: Tensor, bank: SplatBank, mask: MaskSpec
    ) -> tuple[Tensor, Any]: ...

    def step(
        self, q: Tensor, k: Tensor, v: Tensor, bank: SplatBank, state: Any, key_padding: Tensor | None = None
    ) -> tuple[Tensor, Any]: ...


def is_exact_for(backend: Any, bank: SplatBank) -> bool:
    """Whether ``backend`` computes exact GSA for ``bank`` (its optional ``is_exact``; True without one)."""
    is_exact = getattr(backend, "is_exact", None)
    return not callable(is_exact) or bool(is_exact(bank))


@runtime_checkable
class ModelAdapter(Protocol):
    """Converts one model family's attention to GSA, and knows that family's facts.

    Integrations (conversion, calibration, distillation, generation) ask the adapter for anything that
    depends on the family, instead of keeping tables of their own. ``model`` is the Hugging Face model
    (original or converted), ``config`` a ``GSAConfig``, ``model_config`` the model's own config.

    Operations:

    - ``matches(model)``: whether this adapter converts ``model`` (detection);
    - ``convert(model, config)``: convert in place and return the model;
    - ``apply(model, config)``: rebuild the GSA structure of a model whose config already carries its
      GSA config (what ``from_pretrained`` of a converted checkpoint calls).

    Facts:

    - ``model_types``: the ``model_config.model_type`` values it converts (detection before loading);
    - ``attn_implementation(model_config)``: the ``from_pretrained(attn_implementation=...)`` the original
      needs so conversion can wrap its attention (GPT-Neo: ``"eager"``; ``AttentionInterface`` families:
      ``"sdpa"``; a composite model: a dict per sub-config; None: any);
    - ``sites(model)``: every attention module it can convert, in model order, each with ``name`` (module
      path), ``module``, ``layer`` (index), ``kind`` (``global``/``local``/``self``/``cross``),
      ``n_heads``, ``head_dim``, ``scaling`` (the host's logit factor), ``causal`` and ``window`` (the
      host's own sliding window or None); see ``gsa_plugins.adapters.Site``;
    - ``attention_layers(model)``: the calibration capture points, ``gsa_core.calibration.AttentionLayer``
      per layer with a splat bank (self-attention: calibration feeds queries and keys of one sequence);
    - ``lora_targets(model)``: module names for LoRA fine-tuning (peft's ``target_modules``);
    - ``hybrid_params(model, params, window)``: its params (a mapping) with every self-attention layer in
      hybrid mode, exact over ``window`` keys and GSA beyond; explicit per-layer choices in ``params`` win;
    - ``forward_inputs(model, batch)``: the forward keyword arguments for a batch of token ids
      (``input_ids``, ``attention_mask``): the batch itself for most families; an encoder-decoder also
      feeds the tokens to its decoder;
    - ``decode_plan(model)``: how each layer of a converted model decodes from a stored past, in layer
      order (``gsa_plugins.adapters.decoding.DecodePlan``: state, window, hybrid or full); a family without
      the recurrent generation cache raises ``UnsupportedModelError`` (a ``GSAError``), and ``generate()``
      keeps transformers' cache.

    Invariants: every original weight is kept; with GSA switched off (passthrough) the converted
    model reproduces the original outputs exactly; the GSA config travels in the model's config so
    ``from_pretrained`` rebuilds the same model. ``gsa_core.testing.check_adapter`` checks them.
    """

    name: str
    model_types: tuple[str, ...]

    def matches(self, model: Any) -> bool: ...

    def convert(self, model: Any, config: Any) -> Any: ...

    def apply(self, model: Any, config: Any) -> None: ...

    def attn_implementation(self, model_config: Any) -> str | dict[str, str] | None: ...

    def sites(self, model: Any) -> list[Any]: ...

    def attention_layers(self, model: Any) -> list[Any]: ...

    def lora_targets(self, model: Any) -> list[str]: ...

    def hybrid_params(self, model: Any, params: Mapping[str, Any], window: int) -> dict[str, Any]: ...

    def forward_inputs(self, model: Any, batch: Mapping[str, Any]) -> dict[str, Any]: ...

    def decode_plan(self, model: Any) -> list[Any]: ...


@runtime_checkable
class GenerationCache(Protocol):
    """Makes the generation cache ``generate()`` uses by default for a converted model.

    A converted model's ``generate()`` (without a cache of the caller's) asks the registered ones in
    name order; the first whose ``supports(model)`` is True builds the cache with ``create(model)``.
    Invariants: ``supports`` has no side effects and never raises for an unsupported model; ``create``
    returns a fresh, empty ``transformers`` ``Cache`` each call.
    """

    def supports(self, model: Any) -> bool: ...

    def create(self, model: Any) -> Any: ...


@runtime_checkable
class RecallPolicy(Protocol):
    """Chooses which keys a layer's recall cache keeps exact beside its state (``gsa_core.recall``).

    ``budget``: exact keys kept per head; ``block``: tokens between two selections; ``awaiting``: how queries
    score the keys awaiting a selection (``"exact"`` logit or ``"gsa"`` weight); ``uses_readout``:
    whether :meth:`score` reads ``candidates.readout`` (the state's readout of each candidate key, which
    the layer computes only when asked). ``score(candidates) -> [B, H, m]``: higher stays exact; the layer
    keeps the ``budget`` best valid candidates of each head and absorbs the rest into the state.

    Invariants (``gsa_core.testing.check_recall_policy``): finite scores for valid candidates; a pure
    function of its inputs (same inputs, same scores; nothing modified); a candidate's score depends on
    that candidate and the state only, so permuting candidates permutes the scores, padding changes no
    other score and batch rows are independent.
    """

    budget: int
    block: int
    awaiting: str
    uses_readout: bool

    def score(self, candidates: RecallCandidates) -> Tensor: ...


@runtime_checkable
class PositionExtension(Protocol):
    """Extends a learned absolute position table past the length it was trained on.

    ``extend(table, n_positions)``: ``table [P, d]`` (row ``i`` embeds position ``i``) -> a new
    ``[n_positions, d]`` tensor for ``n_positions >= P`` (``gsa_core.positions.check_table`` validates
    the arguments), in the table's dtype and on its device. Knows no model family: the model's adapter
    says where the table is (``HFAdapter.position_table``) and swaps the extended one in.

    Invariants (``gsa_core.testing.check_position_extension``): ``n_positions == P`` returns the table's
    values; finite rows for a finite table; the given table is never modified; deterministic (the same
    table and length give the same rows). A strategy that cannot extend raises
    ``gsa_core.positions.PositionLimitError`` naming the limit (the built-in ``none``).
    """

    def extend(self, table: Tensor, n_positions: int) -> Tensor: ...


PROTOCOLS: Mapping[str, type] = {
    "initializer": Initializer,
    "birth": BirthPolicy,
    "death": DeathPolicy,
    "scheduler": Scheduler,
    "backend": AttentionBackend,
    "adapter": ModelAdapter,
    "cache": GenerationCache,
    "positions": PositionExtension,
    "recall": RecallPolicy,
}
KINDS: tuple[str, ...] = tuple(PROTOCOLS)
