"""``gsa viz attention``: GSA's attention matrix beside the original softmax's, their difference and the KL
divergence per query row.

Both matrices come from the model's own computations on one text (:func:`gsa_viz.inputs.capture`): GSA's is the
layer's own ``attend`` with the identity as values (``A @ I = A``, whatever the backend, window or hybrid mode),
the softmax's is ``softmax(scaling · q kᵀ)`` under the host's mask and window on the host's ``q, k`` (which
reproduces the host's exact output; tested). Masked cells (causal, window) are drawn grey, not as zeros.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from gsa_core.numerics import safe_softmax
from gsa_viz.figures import DIVERGING, DPI, MASKED, OKABE_ITO, SEQUENTIAL, pyplot, set_title
from gsa_viz.inputs import LayerInputs, VizModel, capture, encode, pick_heads, pick_layers, token_labels

DEFAULT_TOKENS = 48
#: Texts up to this many tokens get every token written on the axes (when at most MAX_LABELLED_HEADS heads are drawn).
MAX_LABELLED = 40
MAX_LABELLED_HEADS = 8
#: ``gid`` of the drawn heatmaps (tests and scripts find them).
GID_GSA, GID_SOFTMAX, GID_DIFF, GID_KL = "attention-gsa", "attention-softmax", "attention-difference", "row-kl"
#: Smallest GSA weight the KL uses (an underflowed weight would make the divergence infinite).
TINY = 1e-30


@dataclass
class AttentionPair:
    """``gsa``, ``softmax`` ``[H, n, n]`` (rows sum to 1 where a query sees a key), ``allowed [n, n]`` and the
    KL divergence ``KL(softmax_i || gsa_i)`` per head and query row ``[H, n]`` in nats."""

    gsa: Tensor
    softmax: Tensor
    allowed: Tensor
    kl: Tensor


@torch.no_grad()
def attention_pair(inputs: LayerInputs) -> AttentionPair:
    """Both attention matrices of one captured layer."""
    layer = inputs.layer
    h, n, _ = inputs.q.shape
    eye = torch.eye(n, dtype=torch.float32).expand(1, h, n, n)
    gsa = layer.attend(inputs.q[None], inputs.k[None], eye, inputs.mask)[0].float()
    allowed = inputs.effective_mask().allowed(n, n)[0, 0]
    logits = (inputs.q @ inputs.k.transpose(-1, -2)) * layer.scaling
    softmax = safe_softmax(logits.masked_fill(~allowed, float("-inf")), -1)
    log_p = torch.log(softmax.clamp_min(TINY))
    log_g = torch.log(gsa.clamp_min(TINY))
    kl = torch.where(softmax > 0, softmax * (log_p - log_g), torch.zeros_like(softmax)).sum(-1)
    return AttentionPair(gsa, softmax, allowed, kl)


def _masked(x: Tensor, allowed: Tensor) -> Any:
    import numpy as np

    return np.ma.masked_array(x.numpy(), mask=~allowed.numpy())


def _label_axes(ax: Any, labels: list[str] | None, font: float) -> None:
    if labels is None:
        ax.set_xlabel("key position", fontsize=font)
        ax.set_ylabel("query position", fontsize=font)
        return
    ticks = list(range(len(labels)))
    ax.set_xticks(ticks, labels, rotation=90, fontsize=font - 2)
    ax.set_yticks(ticks, labels, fontsize=font - 2)


def _layout(rows: int, *, labelled: bool) -> tuple[Any, Any, list[Any], float]:
    """A figure of ``rows x 4`` panels placed by hand (constrained layout of hundreds of axes takes minutes) and
    one horizontal colour-bar axis under each matrix column: ``(fig, axes [rows, 4], bar_axes, font)``."""
    import numpy as np

    side = max(1.6, min(3.2, 20.0 / rows))  # panel side in inches: 3.2 for one head, 1.6 from 13 heads on
    font = 8.0 if side >= 2.5 else 6.5
    ticks = 0.75 if labelled else 0.45  # room under and beside a panel for its tick labels
    left, gap, right, title, bottom, row_gap = 0.35 + ticks, 0.45 + ticks, 0.25, 0.9, 0.8, 0.35 + ticks
    widths = [side, side, side, 1.15 * side]
    width = left + sum(widths) + 3 * gap + right
    height = title + rows * side + (rows - 1) * row_gap + row_gap + bottom
    fig = pyplot().figure(figsize=(width, height), dpi=DPI)
    axes = np.empty((rows, 4), dtype=object)
    for r in range(rows):
        y = height - title - (r + 1) * side - r * row_gap
        x = left
        for c, w in enumerate(widths):
            axes[r, c] = fig.add_axes((x / width, y / height, w / width, side / height))
            x += w + gap
    bar_axes = [fig.add_axes(((left + c * (side + gap)) / width, 0.45 / height, side / width, 0.12 / height))
                for c in range(3)]
    return fig, axes, bar_axes, font


def attention_figure(viz: VizModel, text: str, *, layer: int | str | None = None, head: int | str | None = 0,
                     max_tokens: int = DEFAULT_TOKENS) -> Any:
    """GSA vs softmax attention of one GSA layer on ``text`` for ``head`` (an index or ``"all"``: one row per head);
    returns the matplotlib figure."""
    from matplotlib import colormaps

    index = pick_layers(viz, layer)[0]
    ids = encode(viz, text, max_tokens)
    inputs = capture(viz, ids, [index])[index]
    heads = pick_heads(inputs.n_heads, head)
    pair = attention_pair(inputs)
    n = ids.shape[1]
    labels = token_labels(viz, ids) if n <= MAX_LABELLED and len(heads) <= MAX_LABELLED_HEADS else None
    fig, axes, bar_axes, font = _layout(len(heads), labelled=labels is not None)
    seq = colormaps[SEQUENTIAL].with_extremes(bad=MASKED)
    div = colormaps[DIVERGING].with_extremes(bad=MASKED)
    # one colour scale per column, shared by every head shown (so heads compare at a glance)
    top = max(float(pair.gsa[heads].max()), float(pair.softmax[heads].max()), 1e-9)
    diff = pair.gsa - pair.softmax
    span = max(float(diff[heads].abs().max()), 1e-9)
    columns = ((seq, 0.0, top, GID_GSA, "GSA", "attention weight"),
               (seq, 0.0, top, GID_SOFTMAX, "original softmax", "attention weight"),
               (div, -span, span, GID_DIFF, "GSA − softmax", "difference in weight"))
    matrices = (pair.gsa, pair.softmax, diff)
    for col, (cmap, lo, hi, gid, name, unit) in enumerate(columns):
        image = None
        for row, h in enumerate(heads):
            ax = axes[row, col]
            image = ax.imshow(_masked(matrices[col][h], pair.allowed), cmap=cmap, vmin=lo, vmax=hi,
                              interpolation="nearest", aspect="equal")
            image.set_gid(gid)
            ax.set_title(f"head {h}: {name}", fontsize=font + 1)
            _label_axes(ax, labels, font)
            ax.tick_params(labelsize=font - 1)
        bar = fig.colorbar(image, cax=bar_axes[col], orientation="horizontal")
        bar.ax.tick_params(labelsize=font - 1)
        bar.set_label(unit, fontsize=font)
    for row, h in enumerate(heads):
        ax = axes[row, 3]
        ax.plot(range(n), pair.kl[h].numpy(), color=OKABE_ITO[4], marker="o", ms=2.5, lw=1.2, gid=GID_KL)
        ax.set_title(f"head {h}: KL(softmax ‖ GSA)\nmean {float(pair.kl[h].mean()):.3f} nats", fontsize=font + 1)
        ax.set_xlabel("query position", fontsize=font)
        ax.set_ylabel("KL per query row (nats)", fontsize=font)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=font - 1)
    mask_kind = "causal" if inputs.effective_mask().causal else "none (every key visible)"
    if inputs.effective_mask().window is not None:
        mask_kind = f"causal, sliding window {inputs.effective_mask().window}"
    set_title(fig, f"{viz.path.name}, layer {index} ({inputs.name}): attention on {n} tokens, rows = queries, "
                   f"columns = keys\nmask: {mask_kind}; grey cells are masked")
    return fig


# ----------------------------------------------------------------------------- gsa viz attention
def add_arguments(parser: Any) -> None:
    from gsa_viz.commands import add_model_arguments

    add_model_arguments(parser)
    parser.add_argument("--text", required=True, help="the text whose attention to draw (a string)")
    parser.add_argument("--tokens", type=int, default=DEFAULT_TOKENS,
                        help=f"at most this many tokens of the text (default {DEFAULT_TOKENS}; tokens are written on "
                             f"the axes up to {MAX_LABELLED})")
    parser.set_defaults(handler=run)


def run(args: Any) -> int:
    from gsa_common import check_range

    from gsa_viz.commands import finish
    from gsa_viz.figures import check_out, save_png
    from gsa_viz.inputs import MAX_TOKENS, load_gsa_model

    check_range("--tokens", args.tokens, 2, min(MAX_TOKENS, 1024))
    check_out(args.out)
    viz = load_gsa_model(args.model)
    fig = attention_figure(viz, args.text, layer=args.layer, head=args.head, max_tokens=args.tokens)
    return finish(save_png(fig, args.out))


__all__ = ["AttentionPair", "add_arguments", "attention_figure", "attention_pair"]
