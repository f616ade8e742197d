"""Exceptions raised by the GSA core.

Every error a user can trigger derives from :class:`GSAError`, so applications can catch one type,
and every message names the bad value and the valid choices.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class GSAError(Exception):
    """Base class of every error raised on purpose by this library."""


class UnknownComponentError(GSAError, KeyError):
    """A strategy name that no loaded plugin registered."""

    def __init__(self, kind: str, name: str, available: Iterable[str]):
        self.kind, self.name = kind, name
        self.available = sorted(available)
        self.suggestion = did_you_mean(name, self.available)
        super().__init__(self._message())

    def _message(self) -> str:
        listed = ", ".join(self.available) if self.available else "(none registered)"
        hint = f" Did you mean {self.suggestion!r}?" if self.suggestion else ""
        return f"unknown {self.kind} {self.name!r}.{hint} Available {self.kind} names: {listed}."

    def __str__(self) -> str:  # KeyError would otherwise repr() the message
        return self._message()


class UnknownKindError(GSAError, KeyError):
    """A component kind outside the fixed set of extension points."""

    def __init__(self, kind: str, kinds: Iterable[str]):
        self.kind = kind
        self.kinds = sorted(kinds)
        hint = did_you_mean(kind, self.kinds)
        extra = f" Did you mean {hint!r}?" if hint else ""
        self._text = f"unknown component kind {kind!r}.{extra} Valid kinds: {', '.join(self.kinds)}."
        super().__init__(self._text)

    def __str__(self) -> str:
        return self._text


class DuplicateComponentError(GSAError):
    """Two plugins registered the same ``(kind, name)`` without asking to override."""

    def __init__(self, kind: str, name: str, existing: str, new: str):
        self.kind, self.name, self.existing, self.new = kind, name, existing, new
        super().__init__(
            f"{kind} {name!r} is registered twice: first by {existing}, then by {new}. "
            f"Rename one, or pass override=True in {new} to replace it on purpose."
        )


class ParamsError(GSAError, ValueError):
    """Parameters that do not validate against a strategy's params model."""


class ConfigError(GSAError, ValueError):
    """A configuration file or mapping that cannot be loaded or does not validate."""


class MaskNotSupportedError(GSAError, ValueError):
    """A backend asked to serve a mask kind it cannot compute."""


class CalibrationError(GSAError, ValueError):
    """Calibration data unusable for initialising a bank (NaN/Inf, wrong shape)."""


def did_you_mean(name: str, choices: Iterable[str]) -> str | None:
    """Closest valid choice to a misspelt name, or None when nothing is close."""
    matches = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.5)
    return matches[0] if matches else None


class NonFiniteInputError(GSAError, ValueError):
    """NaN or Inf in an attention input (DESIGN.md section 2): every backend raises it before any output.

    Why an error rather than a NaN output: log-space GSA would spread a NaN key into every query that
    shares a splat with it (causal masks do not stop it inside a chunk), and a silently changed output is
    worse. ``tensor`` names the input (``q``, ``k``, ``v``), ``index`` the first bad element, ``layer``
    the attention layer when the caller knows it (:meth:`at_layer`).
    """

    def __init__(self, tensor: str, value: float, index: tuple[int, ...], *, layer: str | None = None):
        self.tensor, self.value, self.index, self.layer = tensor, value, index, layer
        where = f"batch row {index[0]}, head {index[1]}, position {index[2]}" if len(index) == 4 else (
            f"index {list(index)}")
        at = f" in {layer}" if layer else ""
        super().__init__(
            f"non-finite value ({value}) in attention input {tensor!r}{at} at {where}: GSA attention needs finite "
            "queries, keys and values; look for an overflow (fp16/bf16) or a NaN in the hidden states before it"
        )

    def at_layer(self, layer: str) -> NonFiniteInputError:
        """The same error naming the layer it happened in (a layer re-raises what its backend found)."""
        return self if self.layer else NonFiniteInputError(self.tensor, self.value, self.index, layer=layer)


# ----------------------------------------------------------------------------- safety (docs/safety.md)
#: Longest message a user is shown: a million bad keys must not print a 50 MB line.
MAX_MESSAGE_CHARS = 1000


def bounded(message: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    """``message`` cut to ``limit`` characters, saying how much was left out."""
    if len(message) <= limit:
        return message
    tail = " ... ({:,} more characters)"
    keep = max(0, limit - len(tail.format(len(message))))
    return message[:keep] + tail.format(len(message) - keep)


class InputFileError(GSAError, ValueError):
    """A file given as input (config, script, corpus, tokenizer) that is missing, unreadable or malformed."""


class OutputPathError(GSAError, ValueError):
    """A destination that cannot or must not be written (a file, read-only, the source, not empty)."""


class CheckpointError(GSAError, ValueError):
    """A training/distillation checkpoint that is truncated, foreign, unsafe or does not fit the run."""


class ModelLoadError(GSAError, ValueError):
    """A model folder (or hub id) that cannot be loaded: missing files, corrupt config or weights."""


class RunInterrupted(GSAError):
    """A run stopped by Ctrl+C after writing its checkpoint; the message says how to resume."""

    exit_status = 130
