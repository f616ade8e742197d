"""``gsa viz splats``: where one layer's splats sit among its queries and keys.

Per head: the head's queries and keys on real text, projected onto the PCA plane of that head's q/k; every
alive splat as its projected covariance ellipse at 1σ (filled, coloured by the share of attention mass it
carries on this text) and 2σ (outline); dead slots as grey crosses at their (stale) centers.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from gsa_core.adaptation.statistics import slot_mass
from gsa_viz.figures import MASS, OKABE_ITO, head_grid, small_font
from gsa_viz.inputs import DEFAULT_TOKENS, LayerInputs, VizModel, capture, encode, pick_heads, pick_layers
from gsa_viz.projection import ellipse, fit_plane

#: ``gid`` of the drawn artists (tests and scripts count them).
GID_1SIGMA, GID_2SIGMA, GID_DEAD = "splat-1sigma", "splat-2sigma", "dead-slot"


def mass_share(inputs: LayerInputs) -> Tensor:
    """``[H, K]``: the share of the text's attention mass each slot carries (sums to 1 over alive slots)."""
    q, k = inputs.gsa_space()
    bank = inputs.layer.bank
    mass, _, counted = slot_mass(bank, q[None], k[None], inputs.effective_mask())
    return (mass / counted.clamp_min(1).unsqueeze(-1)).cpu()


def _limits(points: Tensor) -> tuple[tuple[float, float], tuple[float, float]]:
    lo = torch.quantile(points, 0.005, dim=0)
    hi = torch.quantile(points, 0.995, dim=0)
    pad = (hi - lo).clamp_min(1e-6) * 0.15
    return (float(lo[0] - pad[0]), float(hi[0] + pad[0])), (float(lo[1] - pad[1]), float(hi[1] + pad[1]))


def draw_head(ax: Any, inputs: LayerInputs, head: int, share: Tensor, *, n_panels: int, legend: bool) -> Any:
    """One head's panel; returns the colour map's scalar mappable (for the colour bar)."""
    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.patches import Ellipse

    q, k = inputs.gsa_space()
    bank = inputs.layer.bank
    qh, kh = q[head], k[head]
    plane = fit_plane(torch.cat([qh, kh]))
    pq, pk = plane.points(qh), plane.points(kh)
    centers, covs = plane.gaussians(bank.centers[head].detach(), bank.covariance_matrix()[head].detach())
    alive = bank.alive[head].cpu()
    font = small_font(n_panels)
    marker = 6 if n_panels <= 4 else 2
    # the points above the ellipses, so a cloud inside a splat stays visible
    ax.scatter(pk[:, 0], pk[:, 1], s=marker, color=OKABE_ITO[0], alpha=0.6, linewidths=0, label="keys", zorder=3)
    ax.scatter(pq[:, 0], pq[:, 1], s=marker, color=OKABE_ITO[3], alpha=0.6, linewidths=0, label="queries", zorder=3)
    norm = Normalize(0.0, max(float(share[head].max()), 1e-9))
    cmap = colormaps[MASS]
    for slot in torch.nonzero(alive).flatten().tolist():
        width, height, angle = ellipse(covs[slot], 2.0)
        ax.add_patch(Ellipse(tuple(centers[slot].tolist()), width, height, angle=angle, fill=False, lw=0.8,
                             ls="--", ec="#333333", gid=GID_2SIGMA))
        width, height, angle = ellipse(covs[slot], 1.0)
        ax.add_patch(Ellipse(tuple(centers[slot].tolist()), width, height, angle=angle, lw=1.0, ec="#000000",
                             fc=cmap(norm(float(share[head, slot]))), alpha=0.45, gid=GID_1SIGMA))
    dead = ~alive
    if bool(dead.any()):
        ax.scatter(centers[dead, 0], centers[dead, 1], marker="x", s=4 * marker + 10, color="#4d4d4d", lw=1.2,
                   label="dead slots", gid=GID_DEAD, zorder=5)
    (x0, x1), (y0, y1) = _limits(torch.cat([pq, pk, centers[alive]]))
    ax.set_xlim(x0, x1)
    ax.set_ylim(y0, y1)
    ax.set_title(f"head {head}: {int(alive.sum())}/{bank.capacity} splats alive", fontsize=font + 1)
    ax.set_xlabel(f"PC1 ({100 * float(plane.explained[0]):.0f}% of q/k variance)", fontsize=font)
    ax.set_ylabel(f"PC2 ({100 * float(plane.explained[1]):.0f}%)", fontsize=font)
    ax.tick_params(labelsize=font)
    if legend:
        ax.legend(loc="upper right", fontsize=font, markerscale=2 if n_panels <= 4 else 4, framealpha=0.8)
    return ScalarMappable(norm=Normalize(0.0, 1.0), cmap=cmap)


def splat_figure(viz: VizModel, text: str, *, layer: int | str | None = None, head: int | str | None = 0,
                 max_tokens: int = DEFAULT_TOKENS) -> Any:
    """The splats of one GSA layer (``layer``: a model layer index; None: the first GSA layer) for ``head`` (an
    index or ``"all"``: a grid) among the q/k of ``text``; returns the matplotlib figure."""
    index = pick_layers(viz, layer)[0]
    ids = encode(viz, text, max_tokens)
    inputs = capture(viz, ids, [index])[index]
    heads = pick_heads(inputs.n_heads, head)
    share = mass_share(inputs)
    name = inputs.name
    fig, axes = head_grid(len(heads), extra_width=0.9,
                          title=f"{viz.path.name}, layer {index} ({name}): splats among {ids.shape[1]} tokens' "
                                "queries and keys, on each head's q/k PCA plane\nfilled: 1σ ellipse coloured by "
                                "its share of attention mass; dashed: 2σ")
    mappable = None
    for i, (ax, h) in enumerate(zip(axes, heads, strict=True)):
        mappable = draw_head(ax, inputs, h, share, n_panels=len(heads), legend=i == 0)
    bar = fig.colorbar(mappable, ax=axes, shrink=0.8)
    bar.set_label("share of the head's attention mass (relative to its largest splat)", fontsize=8)
    return fig


__all__ = ["GID_1SIGMA", "GID_2SIGMA", "GID_DEAD", "draw_head", "mass_share", "splat_figure"]


# ----------------------------------------------------------------------------- gsa viz splats
def add_arguments(parser: Any) -> None:
    from gsa_viz.commands import add_model_arguments

    add_model_arguments(parser)
    parser.add_argument("--text", default=None, metavar="FILE",
                        help="a UTF-8 text file (default: held-out passages of the standard-library corpus)")
    parser.add_argument("--tokens", type=int, default=DEFAULT_TOKENS, help=f"tokens read (default {DEFAULT_TOKENS})")
    parser.set_defaults(handler=run)


def run(args: Any) -> int:
    from gsa_common import check_range

    from gsa_viz.commands import finish
    from gsa_viz.figures import check_out, save_png
    from gsa_viz.inputs import MAX_TOKENS, load_gsa_model, read_text

    check_range("--tokens", args.tokens, 2, MAX_TOKENS)
    check_out(args.out)
    viz = load_gsa_model(args.model)
    fig = splat_figure(viz, read_text(args.text), layer=args.layer, head=args.head, max_tokens=args.tokens)
    return finish(save_png(fig, args.out))
