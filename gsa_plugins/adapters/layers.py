"""The per-layer GSA module the adapters attach, Hugging Face masks as :class:`MaskSpec`, hybrid attention.

The layer owns its decoding too: :meth:`GSALayer.decode` continues a stored past
(:mod:`gsa_plugins.adapters.past`) through the layer's backend.

Torch only: nothing here imports ``transformers``.
"""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor, nn

from gsa_core.attention import GSAAttention
from gsa_core.bank import SplatBank, compute_dtype
from gsa_core.calibration import gsa_input_scale
from gsa_core.config import GSAConfig
from gsa_core.errors import NonFiniteInputError
from gsa_core.masks import MaskSpec
from gsa_core.numerics import blocked_softmax_attention, check_finite, rows_per_block
from gsa_core.protocols import RecurrentBackend, is_exact_for
from gsa_plugins.adapters.past import DecodePlan, LayerPast, attend_kept, layer_signature
from gsa_plugins.adapters.recall_cache import recall_extend, recall_forward, recall_policy

Mode = Literal["gsa", "exact", "hybrid"]
#: ``teacher(q, k, v, mask, out)``: called in passthrough with the host's inputs and its exact output.
TeacherTap = Callable[[Tensor, Tensor, Tensor, MaskSpec, Tensor], None]
MODES: tuple[str, ...] = ("gsa", "exact", "hybrid")


# ----------------------------------------------------------------------------- masks
def allowed_from_hf(mask: Tensor | None) -> Tensor | None:
    """A Hugging Face 4-D attention mask as bool "may attend".

    Bool masks (``sdpa``) already mean True = attend; float masks (``eager``) are additive and must hold
    0 (attend) or a large negative value (the dtype's minimum or ``-inf``).
    """
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return mask
    if not mask.is_floating_point():
        raise TypeError(f"attention mask must be bool or floating point, got {mask.dtype}")
    allowed = mask == 0
    blocked = mask <= torch.finfo(mask.dtype).min / 2
    if not bool((allowed | blocked).all()):
        raise ValueError(
            "GSA serves boolean attention masks only: this additive mask holds values other than 0 and "
            "the dtype's minimum (a position bias such as ALiBi cannot be represented by GSA)"
        )
    return allowed


def _spec_allowed(spec: MaskSpec, batch: int, n_q: int, n_k: int, device: torch.device) -> Tensor:
    return spec.allowed(n_q, n_k, device=device)[:, 0].expand(batch, n_q, n_k)


def spec_from_allowed(allowed: Tensor, batch: int, n_q: int, n_k: int, *, causal: bool) -> MaskSpec:
    """The structured :class:`MaskSpec` equal to ``allowed [B|1, H|1, n_q, n_k]`` (True = attend).

    Recognises causal (queries aligned to the last keys, as with a cache) plus key padding, and
    non-causal key padding (self- or cross-attention); anything else becomes an ``attend`` mask, which
    only the ``dense`` backend serves. The result is verified against ``allowed`` element by element.
    """
    if allowed.dim() != 4:
        raise ValueError(f"expected a 4-D attention mask [batch, heads, {n_q}, {n_k}], got {tuple(allowed.shape)}")
    a = allowed.to(torch.bool).expand(batch, -1, n_q, n_k)
    if a.shape[1] != 1:
        if not bool((a == a[:, :1]).all()):
            return MaskSpec(attend=a)
        a = a[:, :1]
    a = a[:, 0]
    # Causal (bottom-right aligned): the last query sees every real key. Otherwise: any query sees it.
    key_padding = a[:, -1, :] if causal else a.any(dim=1)
    spec = MaskSpec(causal=causal, key_padding=None if bool(key_padding.all()) else key_padding.contiguous())
    if torch.equal(_spec_allowed(spec, batch, n_q, n_k, a.device), a):
        return spec
    if causal:  # maybe not causal after all (e.g. a bidirectional mask in a causal-capable module)
        other = spec_from_allowed(allowed, batch, n_q, n_k, causal=False)
        if other.attend is None:
            return other
    return MaskSpec(attend=a.unsqueeze(1))


class MaskCache:
    """Remembers the spec of the last mask tensor (weakly): every layer of one forward gets the same mask."""

    def __init__(self) -> None:
        self._ref: weakref.ref[Tensor] | None = None
        self._key: tuple[int, int, int, bool] | None = None
        self._spec: MaskSpec | None = None

    def spec(self, mask: Tensor | None, batch: int, n_q: int, n_k: int, *, causal: bool) -> MaskSpec:
        if mask is None:
            # No mask: causal modules attend causally (aligned to the last keys), the others to everything.
            return MaskSpec(causal=causal and n_q > 1)
        key = (mask._version, n_q, n_k, causal)
        if self._ref is not None and self._ref() is mask and self._key == key and self._spec is not None:
            return self._spec
        spec = spec_from_allowed(allowed_from_hf(mask), batch, n_q, n_k, causal=causal)
        self._ref, self._key, self._spec = weakref.ref(mask), key, spec
        return spec


# ----------------------------------------------------------------------------- hybrid
_TINY64 = torch.finfo(torch.float64).tiny


def _shifted_features(logf: Tensor) -> tuple[Tensor, Tensor]:
    """``l [..., n, K]`` -> ``(m [..., n, 1], exp(l - m))`` in float64, ``m`` the row max (0 for all-dead rows)."""
    m = logf.amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    return m.double(), (logf - m).double().exp()


def pair_log_weights_gemm(mq: Tensor, fq: Tensor, mk: Tensor, fk: Tensor) -> Tensor:
    """``log w_ij = logsumexp_s(lq_is + lk_js)`` as one float64 GEMM: ``mq_i + mk_j + log(sum_s fq_is fk_js)``.

    Why: the logsumexp form materialises ``[n_q, n_k, K]`` (and autograd keeps it), the GEMM only ``[n_q, n_k]``,
    about 10x faster for training. Exact up to float64 rounding, except pairs whose weight is below
    ``exp(-708)`` times their bound ``exp(mq_i + mk_j)``; those get a log-weight near ``mq_i + mk_j - 708``
    (zero weight once exponentiated beside any real key) instead of underflowing to ``-inf``.
    """
    g = fq @ fk.transpose(-1, -2)
    return mq + mk.transpose(-1, -2) + g.clamp_min(_TINY64).log()


def hybrid_attention(
    q: Tensor, k: Tensor, v: Tensor, bank: SplatBank, mask: MaskSpec, *, scaling: float, window: int,
    block_elements: int = 1 << 24, summary: tuple[Tensor, Tensor] | None = None,
) -> Tensor:
    """Exact softmax over a window of nearby keys plus GSA for the others, under one shared normaliser.

    For query ``i`` at key position ``p_i``: keys in its window score the exact logit ``scaling * q_i·k_j``;
    the other visible keys score the GSA log-weight ``log w_ij`` (computed on ``q, k`` in GSA space); then
    one softmax over all of them. Causal ``mask``: the window is the last ``window`` keys
    (``p_i - window < j <= p_i``). Bidirectional self-attention (``n_q == n_k``, not causal): the symmetric
    window ``|i - j| <= window`` (an encoder's local context is on both sides). Padding allowed.
    ``summary = (out, lse)``: GSA attention to still older keys, summarised (a recurrent state's
    ``readout`` of the GSA-space queries), joins the same softmax as one more key per query.
    ``O(n_q·n_k·K)`` as GEMMs (:func:`pair_log_weights_gemm`), in query blocks. Returns ``[B, H, n_q, d_v]``
    in ``v``'s dtype. NaN/Inf inputs raise :class:`~gsa_core.errors.NonFiniteInputError`.
    """
    if window < 0 or (mask.causal and window < 1):
        raise ValueError(f"hybrid window must be a positive number of keys, got {window!r}")
    if not mask.causal and q.shape[-2] != k.shape[-2]:
        raise ValueError("bidirectional hybrid attention needs self-attention (as many queries as keys); "
                         f"got {q.shape[-2]} queries and {k.shape[-2]} keys")
    check_finite(q=q, k=k, v=v)
    return _hybrid(q, k, v, bank, mask, scaling=scaling, window=window, block_elements=block_elements,
                   summary=summary)


def _hybrid(q: Tensor, k: Tensor, v: Tensor, bank: SplatBank, mask: MaskSpec, *, scaling: float, window: int,
            block_elements: int = 1 << 24, summary: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """:func:`hybrid_attention` of checked inputs (decoding checks each token once, when it arrives)."""
    batch, heads, n_q, _ = q.shape
    n_k = k.shape[-2]
    device = q.device
    dtype = compute_dtype(q)
    qf, kf, vf = q.to(dtype), k.to(dtype), v.to(dtype)
    scale = gsa_input_scale(scaling)
    mq, fq = _shifted_features(bank.log_features(qf * scale if scale != 1.0 else qf))
    mk, fk = _shifted_features(bank.log_features(kf * scale if scale != 1.0 else kf))
    q_pos = torch.arange(n_q, device=device) + mask.offset(n_q, n_k)
    k_pos = torch.arange(n_k, device=device)
    kt = kf.transpose(-1, -2)

    def logits(rows: slice) -> Tensor:
        exact = torch.matmul(qf[..., rows, :], kt)
        if scaling != 1.0:
            exact = exact * scaling
        logw = pair_log_weights_gemm(mq[..., rows, :], fq[..., rows, :], mk, fk).to(dtype)
        if mask.causal:
            in_window = k_pos.unsqueeze(0) > (q_pos[rows].unsqueeze(1) - window)
        else:
            in_window = (k_pos.unsqueeze(0) - q_pos[rows].unsqueeze(1)).abs() <= window
        return torch.where(in_window, exact, logw)

    block = rows_per_block(n_q, n_k * heads * batch, block_elements)
    out = blocked_softmax_attention(logits, vf, n_q, block=block, allowed=mask.allowed(n_q, n_k, device=device),
                                    summary=summary)
    if mask.query_padding is not None:
        out = out * mask.query_padding[:, None, :, None].to(out.dtype)
    return out.to(v.dtype)


# ----------------------------------------------------------------------------- the attached module
class GSALayer(GSAAttention):
    """The GSA attention an adapter attaches to one attention module (as its ``gsa`` submodule).

    Holds the splat bank (``.bank``) and how this layer attends: ``mode`` ``"gsa"`` (GSA through the
    configured backend) or ``"hybrid"`` (exact sliding window plus GSA, one normaliser); ``passthrough``
    switches GSA off (the host module then runs its original attention, the bank is unused).
    ``scaling`` is the host's logit factor (``q·k * scaling``): GSA sees ``q, k * sqrt(scaling)``
    (``gsa_core.calibration.to_gsa_space``). ``window``: the host's own sliding window, kept in
    ``gsa`` mode; ``hybrid_window``: keys per query computed exactly in ``hybrid`` mode (causal layers: the last
    ``hybrid_window`` keys; bidirectional ones: every key within ``hybrid_window`` positions, both sides).
    ``q_in``/``k_in`` are identity modules called with the ``[B, T, H*d]`` queries/keys the layer sees
    whenever a hook is registered on them (calibration of families whose projections are not those).
    ``layer``: the layer's index in its model; ``config.recall`` gives it a recall cache (``self.recall``, a
    :class:`~gsa_core.protocols.RecallPolicy`) when it names this layer, or names none and the layer can
    take one (:mod:`gsa_plugins.adapters.recall_cache`).
    """

    def __init__(
        self, n_heads: int, head_dim: int, config: GSAConfig, *, mode: Mode, scaling: float = 1.0,
        causal: bool = True, window: int | None = None, hybrid_window: int | None = None, passthrough: bool = False,
        layer: int | None = None,
    ) -> None:
        super().__init__(n_heads, head_dim, config)
        if mode not in ("gsa", "hybrid"):
            raise ValueError(f"a GSALayer runs mode 'gsa' or 'hybrid', got {mode!r}")
        if mode == "hybrid" and hybrid_window is None:
            raise ValueError("hybrid mode needs a hybrid_window (keys per query computed exactly)")
        self.mode: Mode = mode
        self.scaling = float(scaling)
        self.causal = causal
        self.window = window
        self.hybrid_window = hybrid_window
        self.passthrough = passthrough
        self.q_in = nn.Identity()
        self.k_in = nn.Identity()
        self.masks = MaskCache()
        self.teacher: TeacherTap | None = None
        self._recurrent: tuple[object, bool] | None = None  # (backend, whether it is recurrent)
        self.layer = layer
        self.recall = recall_policy(config, layer, causal=causal, mode=mode, window=window, backend=self.backend,
                                    bank=self.bank)

    def capturing(self) -> bool:
        return bool(self.q_in._forward_hooks or self.k_in._forward_hooks)

    def capture(self, q: Tensor, k: Tensor) -> None:
        """Feed ``q, k [B, H, n, d]`` to the capture modules as ``[B, n, H*d]`` (only when hooked)."""
        if self.capturing():
            self.q_in(q.transpose(1, 2).flatten(2))
            self.k_in(k.transpose(1, 2).flatten(2))

    def tap_teacher(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, out: Tensor, *, causal: bool) -> None:
        """In passthrough, hand the host's ``q, k, v [B, H, n, ·]``, mask and exact output ``[B, H, n_q, d_v]``
        to ``self.teacher`` (set by distillation: it trains GSA on the teacher's own inputs, layer by layer)."""
        if self.teacher is not None:
            spec = self.masks.spec(mask, q.shape[0], q.shape[-2], k.shape[-2], causal=causal)
            self.teacher(q, k, v, spec, out)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, mask: MaskSpec) -> Tensor:
        """``q [B, H, n_q, d]``, ``k, v [B, H, n_k, ·]`` in the host's space -> ``[B, H, n_q, d_v]``."""
        if self.window is not None and self.mode != "hybrid":
            mask = dataclasses.replace(mask, causal=True, window=self.window)
        scale = gsa_input_scale(self.scaling)
        if scale != 1.0:
            q, k = q * scale, k * scale
        return self(q, k, v, mask)

    def forward(self, q: Tensor, k: Tensor, v: Tensor, mask: MaskSpec | None = None) -> Tensor:
        """GSA-space ``q, k`` (their plain dot product is the host's logit). Hybrid mode runs here too, so
        forward hooks (the adaptation controller's statistics) see hybrid layers like the others; so does a
        layer with a recall cache (:func:`~gsa_plugins.adapters.recall_cache.recall_forward`)."""
        if self.recall is not None:
            self._check_inputs(q, k, v)
            with self.naming_errors():
                return recall_forward(self, q, k, v, mask if mask is not None else MaskSpec(causal=True),
                                      window=self.recall_window())
        if self.mode != "hybrid":
            return super().forward(q, k, v, mask)
        assert self.hybrid_window is not None
        self._check_inputs(q, k, v)
        with self.naming_errors():
            return hybrid_attention(q, k, v, self.bank, mask if mask is not None else MaskSpec(causal=self.causal),
                                    scaling=1.0, window=self.hybrid_window)

    def recall_window(self) -> int:
        """Exact keys per query beside a recall cache: the hybrid window, or none in ``gsa`` mode."""
        return int(self.hybrid_window or 0) if self.mode == "hybrid" else 0

    # ------------------------------------------------------------------ decoding with a stored past
    def recurrent_backend(self) -> RecurrentBackend | None:
        """The backend that continues this layer from a state: its own, when it is recurrent (any registered
        backend implementing :class:`~gsa_core.protocols.RecurrentBackend`, ``auto`` included)."""
        known = getattr(self, "_recurrent", None)
        if known is None or known[0] is not self.backend:  # a protocol isinstance costs more than a decode step's op
            known = self._recurrent = (self.backend, isinstance(self.backend, RecurrentBackend))
        return self.backend if known[1] else None

    def decode_plan(self) -> DecodePlan:
        """How this layer decodes (see :mod:`gsa_plugins.adapters.decoding` for the kinds)."""
        signature = layer_signature(self)
        backend = self.recurrent_backend()
        if self.recall is not None:  # its backend was checked when the policy was built
            return DecodePlan("recall", self.hybrid_window if self.mode == "hybrid" else None, self, self.scaling,
                              signature)
        if self.mode == "hybrid":
            assert self.hybrid_window is not None
            # the state stands for exact GSA over the keys that left the window: an inexact backend would
            # compute something else than the forward, which then keeps every key instead
            exact = backend is not None and is_exact_for(backend, self.bank)
            return DecodePlan("hybrid" if exact else "full", self.hybrid_window if exact else None, self,
                              self.scaling, signature)
        if self.window is not None:
            return DecodePlan("window", self.window, self, self.scaling, signature)
        # an inexact recurrent backend (sparse top-k) decodes with its own state: that equals its own forward
        return DecodePlan("state" if backend is not None else "full", None, self, self.scaling, signature)

    def decode(self, plan: DecodePlan, q: Tensor, k: Tensor, v: Tensor, valid: Tensor,
               past: LayerPast | None) -> tuple[Tensor, LayerPast]:
        """Attention of new tokens ``q, k, v [B, H, n, ·]`` (host space; ``valid [B, n]``: real tokens) over
        the stored ``past`` and themselves, as one causal forward over all of them would give. Returns the
        outputs ``[B, H, n, d_v]`` and the new past to store."""
        try:  # not naming_errors(): a generator-based context manager costs a decode step's op
            return self._decode(plan, q, k, v, valid, past)
        except NonFiniteInputError as exc:
            if self.label is None:
                raise
            raise exc.at_layer(self.label) from None

    def _decode(self, plan: DecodePlan, q: Tensor, k: Tensor, v: Tensor, valid: Tensor,
                past: LayerPast | None) -> tuple[Tensor, LayerPast]:
        scale = gsa_input_scale(self.scaling)
        if plan.kind == "state":
            backend = self.recurrent_backend()
            assert backend is not None
            state = past.state if past is not None else None
            if state is None:
                state = backend.init_state(self.bank, q.shape[0], v.shape[-1], q.device)
            padding = None if bool(valid.all()) else valid
            if scale != 1.0:
                q, k = q * scale, k * scale
            out, state = backend.extend(q, k, v, self.bank, state, MaskSpec(causal=True, key_padding=padding))
            return out.to(v.dtype), LayerPast(state=state)
        if plan.kind == "hybrid":
            return self._decode_hybrid(plan, q, k, v, valid, past, scale)
        if plan.kind == "recall":
            return recall_extend(self, q, k, v, valid, past, scaling=self.scaling, window=plan.window or 0)

        def attend(q: Tensor, keys: Tensor, values: Tensor, kept_valid: Tensor, state: object) -> Tensor:
            padding = None if bool(kept_valid.all()) else kept_valid
            return self.attend(q, keys, values, MaskSpec(causal=True, key_padding=padding))

        return attend_kept(past, q, k, v, valid, keep=plan.keep, attend=attend)

    def _decode_hybrid(self, plan: DecodePlan, q: Tensor, k: Tensor, v: Tensor, valid: Tensor,
                       past: LayerPast | None, scale: float) -> tuple[Tensor, LayerPast]:
        backend = self.recurrent_backend()
        assert backend is not None and self.hybrid_window is not None
        state = past.state if past is not None else None
        if state is None:
            state = backend.init_state(self.bank, q.shape[0], v.shape[-1], q.device)
        check_finite(q=q, k=k, v=v)  # the kept keys were checked when they came

        def attend(q: Tensor, keys: Tensor, values: Tensor, kept_valid: Tensor, state: object) -> Tensor:
            summary = backend.readout(q * scale if scale != 1.0 else q, self.bank, state)
            padding = None if bool(kept_valid.all()) else kept_valid
            return _hybrid(q, keys, values, self.bank, MaskSpec(causal=True, key_padding=padding),
                           scaling=self.scaling, window=self.hybrid_window, summary=summary)

        def absorb(keys: Tensor, values: Tensor, kept_valid: Tensor, state: object) -> object:
            padding = None if bool(kept_valid.all()) else kept_valid
            return backend.absorb(keys * scale if scale != 1.0 else keys, values, self.bank, state, padding)

        return attend_kept(past, q, k, v, valid, keep=plan.keep, attend=attend, absorb=absorb, state=state)

    def extra_repr(self) -> str:
        extra = f", window={self.window}" if self.window is not None else ""
        if self.mode == "hybrid":
            extra += f", hybrid_window={self.hybrid_window}"
        if self.recall is not None:
            extra += f", recall={type(self.recall).__name__}(budget={self.recall.budget}, block={self.recall.block})"
        return (f"{super().extra_repr()}, mode={self.mode!r}, scaling={self.scaling:.4g}{extra}, "
                f"passthrough={self.passthrough}")


__all__ = [
    "MODES", "GSALayer", "MaskCache", "Mode", "TeacherTap", "allowed_from_hf", "hybrid_attention", "spec_from_allowed",
]
