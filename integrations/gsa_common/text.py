"""Text that crosses a trust boundary: what reaches the terminal, and what was read from it.

Why here: stored chat messages, model output, plugin descriptions and error messages all end up on a
terminal, where an escape sequence in them would be obeyed (clear the screen, retitle the window,
fake a prompt); and a line typed or piped in may not be valid UTF-8. Every writer and reader of the
``gsa`` tools uses these two functions, so the rule is the same everywhere.
"""

from __future__ import annotations

import re

#: Control characters except tab and newline (C0, DEL and the C1 range, which some terminals obey too).
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
_SURROGATE = re.compile("[\ud800-\udfff]")
REPLACEMENT = "\ufffd"


def terminal_safe(text: str) -> str:
    """``text`` with terminal control characters shown as U+FFFD instead of obeyed (tab and newline kept)."""
    return _CONTROL.sub(REPLACEMENT, text)


def valid_text(text: str) -> str:
    """``text`` as valid Unicode: bytes that were not UTF-8 (kept as surrogates by ``surrogateescape``) and any
    other lone surrogate become U+FFFD, so the text can be stored, encoded and tokenised."""
    return _SURROGATE.sub(REPLACEMENT, text)


__all__ = ["REPLACEMENT", "terminal_safe", "valid_text"]
