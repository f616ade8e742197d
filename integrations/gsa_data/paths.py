"""Where the ``gsa`` tools keep per-user state: chat sessions (data) and trained default models (cache).

``GSA_HOME`` overrides both (tests and sandboxes point it at a temporary folder); otherwise the
platform's per-user folders (``platformdirs``: ``~/.local/share/gsa`` and ``~/.cache/gsa`` on Linux).
Both are private to the user (0700): they hold chat transcripts and models trained on their text.
"""

from __future__ import annotations

import os
from pathlib import Path

from platformdirs import user_cache_dir, user_data_dir

from gsa_data.files import private_dir

HOME_ENV = "GSA_HOME"


def _home() -> Path | None:
    value = os.environ.get(HOME_ENV, "").strip()
    return Path(value).expanduser() if value else None


def data_dir() -> Path:
    """Per-user data (the chat session database); created on first use."""
    home = _home()
    return private_dir(home / "data" if home else Path(user_data_dir("gsa", appauthor=False)))


def cache_dir() -> Path:
    """Per-user cache (models trained on first use); safe to delete, rebuilt when needed."""
    home = _home()
    return private_dir(home / "cache" if home else Path(user_cache_dir("gsa", appauthor=False)))
