"""A request's reply as text, token by token: incremental detokenisation, then the chat's stop-string filter.

Why incremental with two offsets (the method vLLM uses): a token alone may be half of a UTF-8
character or need its neighbour to decode right, so each new token is decoded together with the few
before it and only the text that those tokens add is emitted; while that text ends in an incomplete
character (U+FFFD) it is held back. Stop strings go through ``gsa_chat``'s filter, which holds back
text that may be the start of a stop string and cuts the reply at the first one, so a streamed reply
never shows a stop string or what follows it.
"""

from __future__ import annotations

from typing import Any

from gsa_chat.sampling import StopFilter


class ReplyText:
    """Feed token ids with :meth:`push`; it returns the text each one adds to the reply (possibly empty)."""

    def __init__(self, tokenizer: Any, stop: list[str]) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self._prefix = self._read = 0
        self._out: list[str] = []
        self.filter = StopFilter(stop, self._out.append)

    @property
    def stopped(self) -> bool:
        """Whether a stop string has been reached (the reply is complete)."""
        return bool(self.filter.done)

    @property
    def text(self) -> str:
        """The reply so far, as emitted."""
        return str(self.filter.shown)

    def _decode(self, ids: list[int]) -> str:
        return str(self.tokenizer.decode(ids, skip_special_tokens=True))

    def push(self, token: int) -> str:
        self.ids.append(int(token))
        before = self._decode(self.ids[self._prefix:self._read])
        now = self._decode(self.ids[self._prefix:])
        if len(now) > len(before) and not now.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self.ids)
            return self._emit(now[len(before):], end=False)
        return ""

    def finish(self) -> str:
        """The text still held back, once the reply has ended (by eos or its token limit)."""
        before = self._decode(self.ids[self._prefix:self._read])
        now = self._decode(self.ids[self._prefix:])
        self._prefix = self._read = len(self.ids)
        return self._emit(now[len(before):] if len(now) > len(before) else "", end=True)

    def _emit(self, piece: str, *, end: bool) -> str:
        self._out.clear()
        self.filter.feed(piece, end=end)
        return "".join(self._out)


__all__ = ["ReplyText"]
