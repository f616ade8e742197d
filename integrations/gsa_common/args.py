"""Command-line argument types shared by the commands and the benchmarks."""

from __future__ import annotations

import argparse
import json
from typing import Any

from gsa_core.errors import ConfigError


def json_object_arg(text: str) -> dict[str, Any]:
    """``--x-params '{"a": 1}'``: a JSON object, or an argparse error saying what is wrong."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("expected a JSON object")
    return value


def check_range(flag: str, value: int, low: int, high: int) -> None:
    """One message (exit status 2) for a numeric option outside ``low..high``, naming the flag and the range."""
    if not low <= value <= high:
        raise ConfigError(f"{flag} must be between {low:,} and {high:,}, got {value}")
