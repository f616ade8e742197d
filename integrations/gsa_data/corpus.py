"""Offline text sources, a deterministic split and simple paragraph/sentence splitting."""

from __future__ import annotations

import ast
import functools
import hashlib
import os
import re
import sysconfig
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

CORPORA = ("stdlib", "docstrings", "topics")
# Folders of the standard library that hold no prose worth reading or not the standard library itself.
_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test",
                        "_bundled", "lib2to3"})


@dataclass(frozen=True)
class Document:
    """One text with a stable identifier (``stdlib:json/decoder.py:JSONDecoder.decode``, ``pydoc:if``...)."""

    id: str
    text: str


@dataclass(frozen=True)
class Split:
    """A deterministic train/held-out partition of documents."""

    train: tuple[Document, ...]
    heldout: tuple[Document, ...]


# ----------------------------------------------------------------------------- sources
def stdlib_root() -> Path:
    """The folder of the running interpreter's standard library."""
    return Path(sysconfig.get_paths()["stdlib"])


def _module_files(root: Path, packages: frozenset[str] | None) -> list[Path]:
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel = Path(dirpath).relative_to(root)
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("."))
        if packages is not None and rel.parts and rel.parts[0] not in packages:
            dirnames[:] = []
            continue
        for name in sorted(filenames):
            if not name.endswith(".py"):
                continue
            top = rel.parts[0] if rel.parts else name[:-3]
            if packages is None or top in packages:
                files.append(Path(dirpath) / name)
    return files


def _docstrings_of(tree: ast.Module, prefix: str) -> Iterable[tuple[str, str]]:
    """``(qualified name, cleaned docstring)`` for the module and every class and function in it."""
    doc = ast.get_docstring(tree, clean=True)
    if doc:
        yield prefix, doc
    stack: list[tuple[str, ast.AST]] = [(prefix + ":", tree)]
    while stack:
        qual, node = stack.pop()
        children = [c for c in ast.iter_child_nodes(node)
                    if isinstance(c, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)]
        found = []
        for child in children:
            name = f"{qual}{child.name}" if qual.endswith(":") else f"{qual}.{child.name}"
            text = ast.get_docstring(child, clean=True)
            if text:
                found.append((name, text))
            stack.append((name, child))
        yield from found


@functools.lru_cache(maxsize=8)
def _stdlib_docstrings(root: str, packages: frozenset[str] | None, min_chars: int) -> tuple[Document, ...]:
    base = Path(root)
    docs: dict[str, Document] = {}
    for path in _module_files(base, packages):
        try:
            tree = ast.parse(path.read_bytes(), filename=str(path))
        except (SyntaxError, ValueError, OSError):  # Python-2 test data, odd encodings, unreadable files
            continue
        rel = path.relative_to(base).as_posix()
        for name, text in _docstrings_of(tree, f"stdlib:{rel}"):
            if len(text) >= min_chars:
                docs.setdefault(name, Document(name, text))
    return tuple(sorted(docs.values(), key=lambda d: d.id))


def stdlib_docstrings(
    *, packages: Iterable[str] | None = None, min_chars: int = 40, root: str | os.PathLike[str] | None = None
) -> list[Document]:
    """Docstrings of the standard library's modules, classes and functions, sorted by id.

    Source files are parsed with :mod:`ast`, never imported. ``packages`` keeps only these top-level
    modules/packages (e.g. ``["json", "email"]``; ``None``: all); docstrings shorter than ``min_chars``
    are dropped. Test suites, ``site-packages``, ``idlelib``'s tests and ``lib2to3`` are skipped.
    """
    chosen = None if packages is None else frozenset(packages)
    return list(_stdlib_docstrings(str(root or stdlib_root()), chosen, min_chars))


def pydoc_topics() -> list[Document]:
    """The language-reference topics shipped in :mod:`pydoc_data.topics` (a plain data module)."""
    from pydoc_data.topics import topics

    return [Document(f"pydoc:{name}", text.strip()) for name, text in sorted(topics.items()) if text.strip()]


def text_folder(path: str | os.PathLike[str], *, pattern: str = "*.txt", encoding: str = "utf-8") -> list[Document]:
    """Every file matching ``pattern`` under ``path`` (recursively), one document each, sorted by path."""
    base = Path(path)
    if not base.is_dir():
        raise FileNotFoundError(f"text folder {str(base)!r} does not exist or is not a folder")
    docs = []
    for file in sorted(base.rglob(pattern)):
        if file.is_file():
            text = file.read_text(encoding=encoding, errors="replace").strip()
            if text:
                docs.append(Document(f"file:{file.relative_to(base).as_posix()}", text))
    return docs


def load_corpus(source: str | os.PathLike[str] = "stdlib") -> list[Document]:
    """Documents by name: ``stdlib`` (docstrings and pydoc topics), ``docstrings``, ``topics``, or a folder."""
    if isinstance(source, str) and source in CORPORA:
        if source == "docstrings":
            return stdlib_docstrings()
        if source == "topics":
            return pydoc_topics()
        return stdlib_docstrings() + pydoc_topics()
    if Path(source).is_dir():
        return text_folder(source)
    raise ValueError(f"unknown corpus {str(source)!r}: use one of {', '.join(CORPORA)} or a folder of text files")


def corpus_problem(source: str | os.PathLike[str]) -> str | None:
    """Why ``source`` is not a corpus :func:`load_corpus` can read (checked without reading it), or None."""
    if isinstance(source, str) and source in CORPORA:
        return None
    path = Path(source)
    if path.is_dir():
        return None
    if path.exists():
        return f"corpus {str(source)!r} is a file: give a folder of .txt files, or one of {', '.join(CORPORA)}"
    return f"unknown corpus {str(source)!r}: use one of {', '.join(CORPORA)} or a folder of text files"


# ----------------------------------------------------------------------------- split
def _unit_hash(salt: str, key: str) -> float:
    digest = hashlib.sha256(f"{salt}\x00{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def split_documents(docs: Sequence[Document], heldout_fraction: float = 0.1, *, salt: str = "gsa-data") -> Split:
    """Held-out documents are those whose hashed id falls below ``heldout_fraction``.

    Deterministic on every machine and independent of the documents' order; adding a document never
    moves another. With two or more documents and ``0 < heldout_fraction < 1`` both sides are non-empty.
    """
    if not 0.0 <= heldout_fraction <= 1.0:
        raise ValueError(f"heldout_fraction must be in [0, 1], got {heldout_fraction!r}")
    keyed = sorted(((_unit_hash(salt, d.id), i) for i, d in enumerate(docs)))
    held = {i for u, i in keyed if u < heldout_fraction}
    if 0 < heldout_fraction < 1 and len(docs) >= 2:
        if not held:
            held = {keyed[0][1]}
        elif len(held) == len(docs):
            held.discard(keyed[-1][1])
    ordered = sorted(range(len(docs)), key=lambda i: docs[i].id)
    return Split(train=tuple(docs[i] for i in ordered if i not in held),
                 heldout=tuple(docs[i] for i in ordered if i in held))


# ----------------------------------------------------------------------------- splitting
_ABBREVIATIONS = ("e.g.", "i.e.", "etc.", "vs.", "cf.", "Mr.", "Mrs.", "Dr.", "No.", "approx.", "resp.")
_SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]]*\s+(?=[A-Z0-9\"'(\[`])")


def split_paragraphs(text: str, *, min_chars: int = 1) -> list[str]:
    """Blank-line separated paragraphs, each with its whitespace collapsed to single spaces."""
    paras = (" ".join(block.split()) for block in re.split(r"\n\s*\n", text))
    return [p for p in paras if len(p) >= min_chars]


def split_sentences(text: str) -> list[str]:
    """Sentences of one paragraph: split after ``. ! ?`` before a capital, digit, quote or bracket,
    except after common abbreviations (``e.g.``, ``i.e.``, ``etc.``...)."""
    text = " ".join(text.split())
    if not text:
        return []
    out: list[str] = []
    start = 0
    for m in _SENTENCE_END.finditer(text):
        piece = text[start:m.start()]
        if piece.endswith(_ABBREVIATIONS):
            continue
        out.append(text[start:m.end()].strip())
        start = m.end()
    tail = text[start:].strip()
    if tail:
        out.append(tail)
    return out


def _hard_cut(text: str, max_chars: int) -> list[str]:
    pieces, current = [], ""
    for word in text.split():
        while len(word) > max_chars:
            if current:
                pieces.append(current)
                current = ""
            pieces.append(word[:max_chars])
            word = word[max_chars:]
        candidate = f"{current} {word}" if current else word
        if len(candidate) > max_chars:
            pieces.append(current)
            current = word
        else:
            current = candidate
    if current:
        pieces.append(current)
    return pieces


def pack_passages(docs: Iterable[Document | str], *, max_chars: int = 600, min_chars: int = 40) -> list[str]:
    """Passages of at most ``max_chars``: consecutive paragraphs of one document packed together.

    A paragraph longer than ``max_chars`` is cut into sentences (and a sentence longer than that at
    word boundaries). Passages never cross documents; those shorter than ``min_chars`` are dropped.
    """
    if max_chars < 1:
        raise ValueError("max_chars must be >= 1")
    passages: list[str] = []
    for doc in docs:
        text = doc.text if isinstance(doc, Document) else doc
        units: list[str] = []
        for para in split_paragraphs(text):
            if len(para) <= max_chars:
                units.append(para)
                continue
            for sentence in split_sentences(para):
                units.extend([sentence] if len(sentence) <= max_chars else _hard_cut(sentence, max_chars))
        current = ""
        for unit in units:
            candidate = f"{current} {unit}" if current else unit
            if len(candidate) > max_chars and current:
                passages.append(current)
                current = unit
            else:
                current = candidate
        if current:
            passages.append(current)
    return [p for p in passages if len(p) >= min_chars]
