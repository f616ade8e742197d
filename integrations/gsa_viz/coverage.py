"""``gsa viz coverage``: where coverage is thin, per layer and head, as heatmaps.

A query or key counts as covered when its nearest alive splat is within ``radius`` standard deviations (RMS per
axis of the Mahalanobis distance; :func:`gsa_core.adaptation.coverage.coverage_map`, the definition the
coverage-gap birth policy and the loggers use). The share covered is measured on held-out text: by default the
standard-library passages ``gsa train`` holds out.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from gsa_core.adaptation.coverage import coverage_map
from gsa_core.adaptation.statistics import DEFAULT_COVERAGE_RADIUS
from gsa_viz.figures import DPI, SEQUENTIAL, pyplot, set_title
from gsa_viz.inputs import DEFAULT_TOKENS, VizModel, capture, encode

#: ``gid`` of the two heatmaps.
GID_QUERIES, GID_KEYS = "coverage-queries", "coverage-keys"
#: Heads up to this many get each share written in its cell.
MAX_ANNOTATED = 16


@torch.no_grad()
def coverage_shares(viz: VizModel, ids: Tensor, radius: float = DEFAULT_COVERAGE_RADIUS) -> dict[int, Tensor]:
    """Per GSA layer index: ``[2, H]``, the share of the text's queries (row 0) and keys (row 1) covered."""
    out = {}
    for index, inputs in capture(viz, ids).items():
        bank = inputs.layer.bank
        q, k = inputs.gsa_space()
        out[index] = torch.stack([coverage_map(bank, x, radius).fraction() for x in (q, k)]).cpu()
    return out


def coverage_figure(viz: VizModel, text: str, *, radius: float = DEFAULT_COVERAGE_RADIUS,
                    max_tokens: int = DEFAULT_TOKENS) -> Any:
    """Heatmaps (layers x heads) of the share of ``text``'s queries and keys covered; returns the figure."""
    ids = encode(viz, text, max_tokens)
    shares = coverage_shares(viz, ids, radius)
    layers = list(shares)
    table = torch.stack([shares[i] for i in layers])  # [L, 2, H]
    n_heads = table.shape[-1]
    cell = max(0.28, min(0.9, 9.0 / n_heads))
    width = 2 * (n_heads * cell + 1.6) + 1.0
    height = len(layers) * max(cell, 0.45) + 2.0
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(width, height), dpi=DPI, layout="constrained", squeeze=False)
    font = 8.0 if n_heads <= 16 else 6.0
    image = None
    for col, (role, gid) in enumerate((("queries", GID_QUERIES), ("keys", GID_KEYS))):
        ax = axes[0, col]
        data = table[:, col].numpy()
        image = ax.imshow(data, cmap=SEQUENTIAL, vmin=0.0, vmax=1.0, aspect="auto", interpolation="nearest")
        image.set_gid(gid)
        ax.set_title(f"{role}: mean {100 * float(table[:, col].mean()):.1f}% covered", fontsize=font + 2)
        ax.set_xlabel("head", fontsize=font + 1)
        ax.set_ylabel("layer", fontsize=font + 1)
        step = 1 if n_heads <= 16 else 4
        ax.set_xticks(range(0, n_heads, step), [str(h) for h in range(0, n_heads, step)], fontsize=font)
        ax.set_yticks(range(len(layers)), [str(i) for i in layers], fontsize=font)
        if n_heads <= MAX_ANNOTATED:
            for r in range(len(layers)):
                for h in range(n_heads):
                    value = float(data[r, h])
                    label = f"{100 * value:.1f}" if n_heads <= 8 else f"{100 * value:.0f}"
                    ax.text(h, r, label, ha="center", va="center", fontsize=font - 1,
                            color="black" if value > 0.6 else "white")
    bar = fig.colorbar(image, ax=list(axes.flat), shrink=0.9)
    bar.set_label("share covered (0-1)", fontsize=font + 1)
    set_title(fig, f"{viz.path.name}: share of {ids.shape[1]} tokens' queries and keys within {radius:g}σ "
                   "(RMS per axis) of an alive splat, per GSA layer and head")
    return fig


# ----------------------------------------------------------------------------- gsa viz coverage
def add_arguments(parser: Any) -> None:
    parser.add_argument("model", metavar="MODEL", help="a GSA model folder (gsa convert, gsa distill's model/, "
                        "gsa train --attention gsa)")
    parser.add_argument("--text", default=None, metavar="FILE",
                        help="held-out text, a UTF-8 file (default: the standard-library passages gsa train holds out)")
    parser.add_argument("--tokens", type=int, default=DEFAULT_TOKENS, help=f"tokens read (default {DEFAULT_TOKENS})")
    parser.add_argument("--radius", type=float, default=DEFAULT_COVERAGE_RADIUS,
                        help=f"covered within this many standard deviations (default {DEFAULT_COVERAGE_RADIUS:g})")
    parser.add_argument("--out", required=True, help="the PNG to write")
    parser.set_defaults(handler=run)


def run(args: Any) -> int:
    import math

    from gsa_common import check_range

    from gsa_core.errors import ConfigError
    from gsa_viz.commands import finish
    from gsa_viz.figures import check_out, save_png
    from gsa_viz.inputs import MAX_TOKENS, load_gsa_model, read_text

    check_range("--tokens", args.tokens, 2, MAX_TOKENS)
    if not (math.isfinite(args.radius) and args.radius > 0):
        raise ConfigError(f"--radius must be a positive number of standard deviations, got {args.radius}")
    check_out(args.out)
    viz = load_gsa_model(args.model)
    fig = coverage_figure(viz, read_text(args.text), radius=args.radius, max_tokens=args.tokens)
    return finish(save_png(fig, args.out))


__all__ = ["GID_KEYS", "GID_QUERIES", "add_arguments", "coverage_figure", "coverage_shares"]
