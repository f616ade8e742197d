"""How a failed ``gsa`` command ends: one line naming the problem, and an exit status (docs/safety.md).

The policy:

- errors a user can cause are raised where they happen as :class:`~gsa_core.errors.GSAError`
  subclasses whose message names the input (the file, the flag, the value) and what to do; they end
  with exit status 2 (``RunInterrupted``: 130, after its checkpoint is written);
- failures of the environment that no code of ours can rule out (``OSError``: disk full, permissions;
  ``sqlite3`` errors, ``MemoryError``, a missing dependency, undecodable text) also end with status 2
  and one line, through :func:`describe`, as a safety net;
- anything else is a bug: status 1 and a line that says so and how to get the traceback;
- ``--debug`` anywhere on the command line, or ``GSA_DEBUG=1``, prints the traceback first.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sqlite3
import sys
import traceback
from collections.abc import Sequence

from gsa_core.errors import GSAError

DEBUG_FLAG = "--debug"
DEBUG_ENV = "GSA_DEBUG"
EXIT_ERROR = 2
EXIT_BUG = 1
EXIT_INTERRUPTED = 130
DEBUG_HINT = f"run the command again with {DEBUG_FLAG} (or {DEBUG_ENV}=1) for the traceback"


def split_debug(argv: Sequence[str]) -> tuple[list[str], bool]:
    """``argv`` without ``--debug`` (accepted before or after the command), and whether debugging is on."""
    args = list(argv)
    end = args.index("--") if "--" in args else len(args)
    debug = DEBUG_FLAG in args[:end]
    kept = [a for i, a in enumerate(args) if i >= end or a != DEBUG_FLAG]
    env = os.environ.get(DEBUG_ENV, "").strip().lower() in ("1", "true", "yes", "on")
    return kept, debug or env


def add_debug_flag(parser: argparse.ArgumentParser) -> None:
    """Show ``--debug`` in ``gsa --help`` (:func:`split_debug` has already taken it out of the arguments)."""
    with contextlib.suppress(argparse.ArgumentError):
        parser.add_argument(DEBUG_FLAG, action="store_true",
                            help=f"print the traceback of an error (also {DEBUG_ENV}=1); accepted anywhere")


def tolerant_streams() -> None:
    """Output that cannot be encoded (a stored message with odd characters, a non-UTF-8 terminal) is escaped
    rather than ending the command with ``UnicodeEncodeError``."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(AttributeError, ValueError, OSError):
            stream.reconfigure(errors="backslashreplace")


def _os_message(exc: OSError) -> str:
    names = " -> ".join(str(n) for n in (exc.filename, exc.filename2) if n is not None)
    reason = exc.strerror or str(exc) or type(exc).__name__
    return f"{names}: {reason}" if names else reason


def describe(exc: BaseException) -> tuple[str, int]:
    """The one-line message and exit status for ``exc`` (see the module docstring)."""
    if isinstance(exc, GSAError):
        return str(exc) or type(exc).__name__, int(getattr(exc, "exit_status", EXIT_ERROR))
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted", EXIT_INTERRUPTED
    if isinstance(exc, MemoryError):
        return ("out of memory: use smaller settings (fewer splats, a smaller batch or shorter sequences)",
                EXIT_ERROR)
    if isinstance(exc, OSError):
        return f"{_os_message(exc)} (check the path, its permissions and the free disk space)", EXIT_ERROR
    if isinstance(exc, sqlite3.Error):
        return f"database error: {exc}", EXIT_ERROR
    if isinstance(exc, UnicodeError):
        return f"text that is not valid UTF-8: {exc}", EXIT_ERROR
    if isinstance(exc, ImportError):
        missing = getattr(exc, "name", None)
        return (f"a dependency is missing: {exc}" + (f" (pip install {missing})" if missing else ""), EXIT_ERROR)
    return (f"internal error, a bug in gsa (please report it): {type(exc).__name__}: {exc}. {DEBUG_HINT}",
            EXIT_BUG)


def report(exc: BaseException, *, debug: bool) -> int:
    """Print ``exc`` as one line (the traceback first with ``debug``); returns the exit status."""
    from gsa_cli.output import error

    if debug:
        traceback.print_exception(exc, file=sys.stderr)
    message, status = describe(exc)
    error(message)
    return status


__all__ = ["DEBUG_ENV", "DEBUG_FLAG", "EXIT_BUG", "EXIT_ERROR", "EXIT_INTERRUPTED", "add_debug_flag", "describe",
           "report", "split_debug", "tolerant_streams"]
