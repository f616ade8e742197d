"""How the ``gsa`` tools write and read their own files (docs/safety.md).

Why one module: every command that writes must keep the same promises, and they are easy to get
subtly wrong one command at a time:

- a file is replaced only once its successor is complete on disk (temporary file in the same folder,
  ``fsync``, ``os.replace``), so a crash or a full disk never leaves half a checkpoint or model;
- what belongs to the user alone (chat sessions, checkpoints, caches) is created private: folders
  0700, files 0600;
- checkpoints are read with ``torch.load(weights_only=True)``: tensors and plain data only, so a
  crafted file cannot run code, and a truncated or foreign one is one clear error naming the file.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
import warnings
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import IO, Any

from gsa_core.errors import CheckpointError, InputFileError, OutputPathError

PRIVATE_DIR_MODE = 0o700
PRIVATE_FILE_MODE = 0o600


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _umask()


# ----------------------------------------------------------------------------- reading
def read_text(path: str | os.PathLike[str], *, what: str = "file", max_bytes: int = 64 << 20) -> str:
    """A UTF-8 text file given on the command line; every problem is an :class:`InputFileError` naming it."""
    source = Path(path)
    if not source.is_file():
        raise InputFileError(f"{what} {source}: " + ("is not a file" if source.exists() else "no such file"))
    try:
        if source.stat().st_size > max_bytes:
            raise InputFileError(f"{what} {source} is larger than {max_bytes:,} bytes")
        raw = source.read_bytes()
    except OSError as exc:
        raise InputFileError(f"cannot read {what} {source}: {exc.strerror or exc}") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputFileError(f"{what} {source} is not UTF-8 text (byte {exc.start}); save it as UTF-8") from None


# ----------------------------------------------------------------------------- private folders
def private_dir(path: str | os.PathLike[str]) -> Path:
    """``path`` created (with its parents) and made 0700 when this user owns it."""
    folder = Path(path)
    try:
        folder.mkdir(parents=True, exist_ok=True, mode=PRIVATE_DIR_MODE)
    except OSError as exc:
        raise OutputPathError(f"cannot create the folder {folder}: {exc.strerror or exc}") from None
    _tighten(folder, PRIVATE_DIR_MODE)
    return folder


def make_private(path: str | os.PathLike[str]) -> None:
    """Files 0600, folders 0700, when this user owns them (someone else's file is left alone)."""
    target = Path(path)
    _tighten(target, PRIVATE_DIR_MODE if target.is_dir() else PRIVATE_FILE_MODE)


def _tighten(path: Path, mode: int) -> None:
    with contextlib.suppress(OSError):  # a read-only or foreign file system keeps its modes
        st = path.stat()
        if st.st_uid == os.getuid() and (st.st_mode & 0o777) != mode:
            os.chmod(path, mode)


# ----------------------------------------------------------------------------- atomic writes
def atomic_write(path: str | os.PathLike[str], write: Callable[[IO[bytes]], Any], *, private: bool = False) -> Path:
    """Write ``path`` through ``write(file)`` so that it is either the old file or the whole new one.

    ``private``: the file is 0600 (else the usual ``0666 & ~umask``). Errors name the file.
    """
    target = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    except OSError as exc:
        raise OutputPathError(f"cannot write {target}: {exc.strerror or exc}") from None
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, PRIVATE_FILE_MODE if private else 0o666 & ~_UMASK)
        os.replace(tmp, target)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(exc, OSError):
            raise OutputPathError(f"cannot write {target}: {exc.strerror or exc}") from None
        raise
    _fsync_dir(target.parent)
    return target


def atomic_write_text(path: str | os.PathLike[str], text: str, *, private: bool = False) -> Path:
    return atomic_write(path, lambda f: f.write(text.encode("utf-8")), private=private)


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):  # not every file system can sync a folder
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def publish(staging: str | os.PathLike[str], destination: str | os.PathLike[str]) -> list[str]:
    """Move every file of the ``staging`` folder into ``destination``, each one atomically (``os.replace``
    after an ``fsync``); files of ``destination`` with other names are kept. Returns the names moved.

    Used for whole models (``save_pretrained`` into a temporary folder first): an interrupted save
    leaves the previous model's files intact instead of a mixture with half-written ones.
    """
    src, dst = Path(staging), Path(destination)
    dst.mkdir(parents=True, exist_ok=True)
    moved = []
    for item in sorted(src.rglob("*")):
        rel = item.relative_to(src)
        if item.is_dir():
            (dst / rel).mkdir(parents=True, exist_ok=True)
            continue
        with open(item, "rb") as handle:
            os.fsync(handle.fileno())
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        os.replace(item, dst / rel)
        moved.append(rel.as_posix())
    _fsync_dir(dst)
    return moved


@contextlib.contextmanager
def staging_dir(destination: str | os.PathLike[str]) -> Any:
    """A hidden temporary folder inside ``destination`` (created if needed; the same file system, so
    :func:`publish` only renames), removed afterwards whatever happens."""
    import shutil

    dst = Path(destination)
    try:
        dst.mkdir(parents=True, exist_ok=True)
        folder = Path(tempfile.mkdtemp(prefix=".partial-", dir=dst))
    except OSError as exc:
        raise OutputPathError(f"cannot write into {dst}: {exc.strerror or exc}") from None
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


# ----------------------------------------------------------------------------- destinations
def check_destination(destination: str | os.PathLike[str], *, sources: Iterable[str | os.PathLike[str]] = (),
                      writes: Iterable[str | os.PathLike[str]] = (), force: bool = False, resume: bool = False,
                      flag: str = "DST") -> Path:
    """Refuse, before anything is loaded or written, a destination that would lose data.

    - neither the destination nor any folder the command ``writes`` into it may be one of ``sources``
      (compared as resolved paths, so a symlink or ``..`` does not get around it);
    - it must not be a file, and its nearest existing folder must be writable;
    - an existing non-empty folder needs ``force`` (or ``resume``, which continues what is there).
    """
    dst = Path(destination).expanduser()
    targets = {Path(t).expanduser().resolve(): Path(t) for t in (dst, *writes)}
    for source in sources:
        src = Path(source).expanduser()
        if src.exists() and src.resolve() in targets:
            raise OutputPathError(f"{flag} {dst} would overwrite the source {src}: choose a new folder for the "
                                  "output (a source is never overwritten, not even with --force)")
    if dst.exists() and not dst.is_dir():
        raise OutputPathError(f"{flag} {dst} is a file, not a folder: choose a folder (new or empty)")
    existing = next((p for p in (dst, *dst.parents) if p.exists()), None)
    if existing is not None and not os.access(existing, os.W_OK | os.X_OK):
        raise OutputPathError(f"{flag} {dst}: {existing} is not writable; choose another folder or fix its "
                              "permissions")
    if dst.is_dir() and not resume and not force and any(dst.iterdir()):
        raise OutputPathError(f"{flag} {dst} is not empty: choose a new folder, pass --resume to continue the run "
                              "saved there, or --force to overwrite its files")
    return dst


# ----------------------------------------------------------------------------- checkpoints
def save_checkpoint(payload: Mapping[str, Any], path: str | os.PathLike[str]) -> Path:
    """``torch.save`` of tensors and plain data, atomically, private to the user."""
    import torch

    target = Path(path)
    private_dir(target.parent)
    atomic_write(target, lambda f: torch.save(dict(payload), f), private=True)
    for stale in target.parent.glob(f".{target.name}.*.tmp"):  # left by a run killed while writing
        with contextlib.suppress(OSError):
            stale.unlink()
    return target


_GLOBAL = re.compile(r"unsupported GLOBAL (\S+)")


def load_checkpoint(path: str | os.PathLike[str], *, required: Iterable[str] = (), what: str = "checkpoint",
                    fix: str = "delete it, or start again without --resume") -> dict[str, Any]:
    """A checkpoint written by :func:`save_checkpoint`, loaded with ``weights_only=True``.

    Anything but tensors and plain containers (a pickled callable, a class) is refused, as is a
    truncated, foreign or random file, or one missing the ``required`` entries: each is one
    :class:`~gsa_core.errors.CheckpointError` naming the file and what to do (``fix``).
    """
    import pickle

    import torch

    source = Path(path)
    try:
        with warnings.catch_warnings():  # torch warns about odd pickle protocols of damaged files: one message
            warnings.simplefilter("ignore", UserWarning)
            payload = torch.load(source, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = _GLOBAL.search(str(exc))
        if found:
            raise CheckpointError(
                f"refused to load {what} {source}: it contains the Python object {found.group(1).rstrip('.')}, "
                "and a checkpoint may only hold tensors and plain data (loading it could run code). "
                f"It was not written by gsa, or was tampered with: {fix}") from None
        raise CheckpointError(f"{what} {source} is not a readable checkpoint (corrupt or not a checkpoint): "
                              f"{fix}") from None
    except OSError as exc:
        raise CheckpointError(f"{what} {source} cannot be loaded: it cannot be read ({exc.strerror or exc}); "
                              f"{fix}") from None
    except Exception as exc:  # the restricted unpickler over damaged bytes raises anything
        # (EOFError, RuntimeError, IndexError 'pop from empty list', KeyError, ...): weights_only already
        # refused every object that could run code, so what is left is a damaged file
        reason = "it is empty" if isinstance(exc, EOFError) else "it is truncated or corrupt"
        raise CheckpointError(f"{what} {source} cannot be loaded: {reason}; {fix}") from None
    if not isinstance(payload, dict):
        raise CheckpointError(f"{what} {source} holds a {type(payload).__name__}, not a gsa checkpoint: {fix}")
    missing = [key for key in required if key not in payload]
    if missing:
        raise CheckpointError(f"{what} {source} is not a gsa checkpoint of this kind (no {', '.join(missing)}): "
                              f"{fix}")
    return payload


__all__ = ["PRIVATE_DIR_MODE", "PRIVATE_FILE_MODE", "atomic_write", "atomic_write_text", "check_destination",
           "load_checkpoint", "make_private", "private_dir", "publish", "read_text", "save_checkpoint", "staging_dir"]
