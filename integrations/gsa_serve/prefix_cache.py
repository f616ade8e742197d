"""The prefix-state cache: a session's past after a token prefix, so a follow-up turn prefills only what is new.

Why keyed by the exact token ids: a state summarises every token it absorbed, so a state may only ever
continue the very prefix it was built from. An entry's key is the SHA-256 of the model's identity and
the prefix's token ids, and a hit is confirmed by comparing the stored ids themselves, so neither a
hash collision nor another model's entry can hand a request someone else's state. A lookup finds the
longest cached prefix of a prompt (it hashes the prompt's prefixes at the lengths that are cached).

Entries are immutable pasts (:class:`~gsa_serve.runners.SessionPast`) plus the logits after their
last token, so a prompt equal to a cached prefix needs no forward at all. The cache is a
least-recently-used list bounded in bytes (the pasts' tensors and the logits); an entry larger than
the whole bound is not kept. Only the engine thread uses it.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from torch import Tensor

from gsa_serve.runners import SessionPast


@dataclass(frozen=True)
class PrefixEntry:
    ids: tuple[int, ...]
    past: SessionPast
    logits: Tensor  # after the last token of ``ids``: what the next token is sampled from

    def nbytes(self) -> int:
        return self.past.nbytes() + self.logits.numel() * self.logits.element_size()


def _token_bytes(ids: Sequence[int]) -> bytes:
    return array("q", ids).tobytes()


class PrefixCache:
    """LRU of :class:`PrefixEntry`, at most ``max_bytes`` in all, for one model (``identity``)."""

    def __init__(self, max_bytes: int, identity: str) -> None:
        if max_bytes < 0:
            raise ValueError(f"the prefix cache's size must be >= 0 bytes, got {max_bytes}")
        self.max_bytes, self.identity = int(max_bytes), identity
        self._entries: OrderedDict[bytes, PrefixEntry] = OrderedDict()
        self._lengths: dict[int, int] = {}  # prefix length -> entries of that length
        self.nbytes = 0
        self.hits = self.misses = self.evictions = 0

    def __len__(self) -> int:
        return len(self._entries)

    def _digest(self, data: bytes) -> bytes:
        h = hashlib.sha256(self.identity.encode("utf-8"))
        h.update(b"\0")
        h.update(data)
        return h.digest()

    def key(self, ids: Sequence[int]) -> bytes:
        """The entry key of the prefix ``ids`` (model identity and token ids)."""
        return self._digest(_token_bytes(ids))

    def lookup(self, ids: Sequence[int]) -> PrefixEntry | None:
        """The entry of the longest cached prefix of ``ids`` (ids equal, not just the hash), or None."""
        data = _token_bytes(ids)
        for length in sorted((n for n in self._lengths if n <= len(ids)), reverse=True):
            key = self._digest(data[:length * 8])
            entry = self._entries.get(key)
            if entry is not None and entry.ids == tuple(ids[:length]):
                self._entries.move_to_end(key)
                self.hits += 1
                return entry
        self.misses += 1
        return None

    def put(self, ids: Sequence[int], past: SessionPast, logits: Tensor) -> bool:
        """Keep ``past`` (after ``ids``) and its next-token ``logits``; returns whether it was kept."""
        if not ids or past.length != len(ids):
            raise ValueError(f"a prefix entry's past must have seen exactly its {len(ids)} ids, not {past.length}")
        entry = PrefixEntry(tuple(int(i) for i in ids), past, logits)
        size = entry.nbytes()
        if size > self.max_bytes:
            return False
        key = self.key(ids)
        old = self._entries.pop(key, None)
        if old is not None:
            self._forget(old)
        self._entries[key] = entry
        self._lengths[len(ids)] = self._lengths.get(len(ids), 0) + 1
        self.nbytes += size
        while self.nbytes > self.max_bytes:
            _, evicted = self._entries.popitem(last=False)
            self._forget(evicted)
            self.evictions += 1
        return True

    def _forget(self, entry: PrefixEntry) -> None:
        self.nbytes -= entry.nbytes()
        n = len(entry.ids)
        self._lengths[n] -= 1
        if not self._lengths[n]:
            del self._lengths[n]

    def clear(self) -> None:
        self._entries.clear()
        self._lengths.clear()
        self.nbytes = 0


__all__ = ["PrefixCache", "PrefixEntry"]
