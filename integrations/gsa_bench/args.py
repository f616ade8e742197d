"""Argument types the benchmarks share: comma lists and size lists (each bad value gets one argparse error)."""

from __future__ import annotations

import argparse
from collections.abc import Callable


def csv_list(text: str) -> list[str]:
    """``"a, b,,c"`` -> ``["a", "b", "c"]``."""
    return [t.strip() for t in text.split(",") if t.strip()]


def int_list(minimum: int = 1) -> Callable[[str], list[int]]:
    """An argparse type: a non-empty comma list of integers, each at least ``minimum``."""

    def parse(text: str) -> list[int]:
        try:
            values = [int(t) for t in csv_list(text)]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a comma list of integers, got {text!r}") from None
        if not values or min(values) < minimum:
            raise argparse.ArgumentTypeError(f"expected integers >= {minimum}, got {text!r}")
        return values

    return parse


def positive_float_list(text: str) -> list[float]:
    """A non-empty comma list of positive numbers."""
    try:
        values = [float(t) for t in csv_list(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma list of numbers, got {text!r}") from None
    if not values or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"expected positive numbers, got {text!r}")
    return values


def parse_sizes(text: str) -> list[int]:
    """``"512,1024"``, ``"1k,64k"`` or a power-of-two range ``"512-65536"`` -> sorted sizes."""
    sizes: set[int] = set()

    def one(tok: str) -> int:
        tok = tok.strip().lower()
        value = int(tok[:-1]) * 1024 if tok.endswith("k") else int(tok)
        if value < 1:
            raise argparse.ArgumentTypeError(f"sizes must be positive, got {tok!r}")
        return value

    try:
        for part in text.split(","):
            if not part.strip():
                continue
            if "-" in part:
                lo, hi = (one(p) for p in part.split("-", 1))
                while lo <= hi:
                    sizes.add(lo)
                    lo *= 2
            else:
                sizes.add(one(part))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"bad size list {text!r}: {exc}") from None
    if not sizes:
        raise argparse.ArgumentTypeError("empty size list")
    return sorted(sizes)
