"""When a run happened and how busy the machine was: recorded next to every measured number."""

from __future__ import annotations

import datetime as _dt
import os


def utc_now() -> str:
    """The current UTC time, ISO 8601 to the second (``2025-01-31T12:00:00+00:00``)."""
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


def load_average() -> float | None:
    """The 1-minute system load average (None where unavailable): other work inflates timings."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None
