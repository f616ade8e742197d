"""Ctrl+C during a long run: finish the step, write the checkpoint, then stop with a message saying how to resume.

Why not just ``KeyboardInterrupt``: it can strike anywhere, in the middle of an optimiser step or of a
checkpoint write, and the run would end with nothing to resume from. Instead the first Ctrl+C only
sets a flag that the loop reads between steps (all ``torchrun`` ranks agree through one all-reduce, so
they stop at the same step); a second Ctrl+C interrupts at once, as usual.
"""

from __future__ import annotations

import signal
import sys
import threading
from types import FrameType, TracebackType
from typing import Any

from gsa_core.errors import RunInterrupted

#: Steps between checkpoints unless told otherwise (``gsa train``; distillation's own default is the same):
#: a killed run loses at most this many steps, an interrupted one (Ctrl+C) none.
DEFAULT_CHECKPOINT_EVERY = 50


class StopRequest:
    """Context manager: while inside, SIGINT asks the loop to stop (see the module docstring)."""

    def __init__(self, what: str = "the run") -> None:
        self.what = what
        self.requested = False
        self._previous: Any = None
        self._installed = False

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
            self._installed = True
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if self._installed:
            signal.signal(signal.SIGINT, self._previous)
            self._installed = False

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print(f"\nCtrl+C: {self.what} stops after this step and writes its checkpoint (Ctrl+C again to quit now)",
              file=sys.stderr, flush=True)

    def agreed(self, dp: Any) -> bool:
        """Whether any rank was asked to stop (an all-reduce under ``torchrun``, so every rank answers the same)."""
        if getattr(dp, "active", False):
            return dp.sum(1.0 if self.requested else 0.0) > 0
        return self.requested

    @staticmethod
    def interrupted(step: int, total: int, checkpoint: Any, resume: str) -> RunInterrupted:
        """The error that ends an interrupted run (exit status 130)."""
        return RunInterrupted(f"interrupted at step {step} of {total}; the checkpoint {checkpoint} holds it. "
                              f"Resume with: {resume}")


__all__ = ["DEFAULT_CHECKPOINT_EVERY", "StopRequest"]
