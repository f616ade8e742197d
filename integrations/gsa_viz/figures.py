"""How every picture looks: the colour-blind-safe palette, grids of heads that stay readable from 1 to 64
heads, and PNG output of a known size (the figure's inches times :data:`DPI`, no tight cropping)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from gsa_core.errors import OutputPathError

#: Okabe-Ito: distinguishable by readers with any common colour-vision deficiency, and in greyscale print.
OKABE_ITO = ("#E69F00", "#56B4E9", "#009E73", "#0072B2", "#D55E00", "#CC79A7", "#F0E442", "#000000")
SEQUENTIAL = "viridis"  #: attention weights, coverage
MASS = "cividis"  #: splat mass
DIVERGING = "PuOr"  #: differences (ColorBrewer's colour-blind-safe diverging map)
MASKED = "#d9d9d9"  #: cells a mask hides (light grey, outside every colour map's range)
DPI = 100


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the Agg backend (the one benchmark plots use)."""
    from gsa_bench.scaffold import pyplot as bench_pyplot

    return bench_pyplot()


def grid(n: int) -> tuple[int, int]:
    """``(rows, cols)`` for ``n`` panels: near square, wider than tall (64 heads: 8 x 8)."""
    cols = math.ceil(math.sqrt(n))
    return math.ceil(n / cols), cols


def panel_inches(n: int) -> float:
    """Side of one panel: 4 in for one head, shrinking to 1.9 in for 64 (a 64-head page stays under 16 in)."""
    return max(1.9, 4.0 / math.sqrt(max(1, n)) ** 0.5)


def head_grid(n: int, *, title: str, extra_width: float = 0.0) -> tuple[Any, list[Any]]:
    """A figure with ``n`` square panels (unused grid cells hidden) and a title; returns ``(fig, axes)``."""
    plt = pyplot()
    rows, cols = grid(n)
    side = panel_inches(n)
    fig, axes = plt.subplots(rows, cols, figsize=(cols * side + extra_width, rows * side + 0.8), dpi=DPI,
                             squeeze=False, layout="constrained")
    flat = list(axes.flat)
    for ax in flat[n:]:
        ax.set_visible(False)
    set_title(fig, title)
    return fig, flat[:n]


def set_title(fig: Any, text: str) -> None:
    """The figure's title, each line wrapped to the figure's width (so a narrow figure never cuts it off)."""
    import textwrap

    width_in = fig.get_size_inches()[0]
    size = 11 if width_in >= 6 else 9
    chars = max(30, int(width_in * 72 / (0.6 * size)))
    lines = [part for line in text.splitlines() for part in textwrap.wrap(line, chars) or [""]]
    if fig.get_layout_engine() is None:  # panels placed by hand: the title sits in the top margin they leave
        fig.suptitle("\n".join(lines), fontsize=size, y=1 - 0.1 / fig.get_size_inches()[1], va="top")
    else:
        fig.suptitle("\n".join(lines), fontsize=size)


def small_font(n: int) -> float:
    """Tick and label size for panels of ``n`` heads."""
    return 9.0 if n <= 4 else 7.0 if n <= 16 else 5.5


def check_out(out: str | Path, suffix: str = ".png") -> Path:
    """``--out`` checked before any work: a file name ending in ``suffix`` that is not a folder."""
    path = Path(out)
    if path.suffix.lower() != suffix:
        raise OutputPathError(f"--out {path}: the name must end in {suffix}")
    if path.is_dir():
        raise OutputPathError(f"--out {path} is a folder; give a file name ending in {suffix}")
    return path


def save_png(fig: Any, out: str | Path) -> Path:
    """Write ``fig`` to ``out`` (a ``.png``; its folder is created) at :data:`DPI`; closes the figure."""
    path = check_out(out)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputPathError(f"cannot create the folder of --out {path}: {exc.strerror or exc}") from None
    plt = pyplot()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def png_bytes(fig: Any) -> bytes:
    """``fig`` as PNG bytes (for the HTML report); closes the figure."""
    import io

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI)
    pyplot().close(fig)
    return buffer.getvalue()


__all__ = ["DIVERGING", "DPI", "MASKED", "MASS", "OKABE_ITO", "SEQUENTIAL", "check_out", "grid", "head_grid",
           "panel_inches", "png_bytes", "pyplot", "save_png", "set_title", "small_font"]
