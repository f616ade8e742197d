"""gsa_data: offline real text, deterministic split, paragraph/sentence splitting."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

try:
    import gsa_data  # noqa: F401
except ImportError:  # not yet installed as a package: use the source tree
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integrations"))

from gsa_data import (
    Document,
    load_corpus,
    pack_passages,
    pydoc_topics,
    split_documents,
    split_paragraphs,
    split_sentences,
    stdlib_docstrings,
    text_folder,
)


def test_stdlib_docstrings_load_offline_by_parsing():
    docs = stdlib_docstrings(packages=["json", "textwrap"])
    ids = [d.id for d in docs]
    assert ids == sorted(ids) and len(ids) == len(set(ids))
    assert any(i.startswith("stdlib:json/decoder.py:JSONDecoder") for i in ids)
    assert any(i == "stdlib:textwrap.py:dedent" for i in ids)
    assert all(len(d.text) >= 40 for d in docs)
    assert "Remove any common leading whitespace" in next(d.text for d in docs if d.id == "stdlib:textwrap.py:dedent")


def test_stdlib_modules_are_never_imported():
    # ``antigravity`` opens a web browser and ``this`` prints when imported: parsing must not run them.
    code = textwrap.dedent("""
        import sys
        from gsa_data import stdlib_docstrings
        docs = stdlib_docstrings(packages=["antigravity", "this", "json"], min_chars=1)
        assert "antigravity" not in sys.modules and "this" not in sys.modules
        print(len(docs))
    """)
    env_path = str(Path(__file__).resolve().parents[1] / "integrations")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         env={"PYTHONPATH": env_path, "PATH": ""})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().isdigit() and int(out.stdout) > 0


def test_pydoc_topics_and_corpus_names():
    topics = pydoc_topics()
    assert len(topics) > 20 and all(d.id.startswith("pydoc:") and d.text for d in topics)
    assert load_corpus("topics") == topics
    with pytest.raises(ValueError, match="unknown corpus 'nope'"):
        load_corpus("nope")


def test_text_folder(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "b.txt").write_text("Second file.\n")
    (tmp_path / "sub" / "a.txt").write_text("First file.\n\nTwo paragraphs.")
    (tmp_path / "empty.txt").write_text("  \n")
    (tmp_path / "skip.md").write_text("not a txt")
    docs = text_folder(tmp_path)
    assert [d.id for d in docs] == ["file:b.txt", "file:sub/a.txt"]
    assert load_corpus(tmp_path) == docs
    with pytest.raises(FileNotFoundError):
        text_folder(tmp_path / "missing")


def test_split_is_deterministic_disjoint_and_stable():
    docs = [Document(f"doc{i}", f"text {i}") for i in range(200)]
    a = split_documents(docs, 0.2)
    b = split_documents(list(reversed(docs)), 0.2)
    assert a == b
    ids_train, ids_held = {d.id for d in a.train}, {d.id for d in a.heldout}
    assert not ids_train & ids_held and len(ids_train | ids_held) == 200
    assert 20 <= len(ids_held) <= 60
    grown = split_documents([*docs, Document("new", "new text")], 0.2)
    assert {d.id for d in grown.heldout} - {"new"} == ids_held  # adding a document moves no other
    assert split_documents(docs, 0.2, salt="other") != a
    tiny = split_documents(docs[:2], 0.01)
    assert len(tiny.train) == 1 and len(tiny.heldout) == 1
    with pytest.raises(ValueError):
        split_documents(docs, 1.5)


def test_paragraphs_sentences_and_passages():
    text = "First para\n  continues here.\n\n\nSecond one. It has e.g. two sentences! Really? Yes.\n \n"
    assert split_paragraphs(text) == ["First para continues here.",
                                      "Second one. It has e.g. two sentences! Really? Yes."]
    assert split_sentences(split_paragraphs(text)[1]) == ["Second one.", "It has e.g. two sentences!", "Really?",
                                                          "Yes."]
    assert split_sentences("") == []
    docs = [Document("a", "Alpha beta gamma. " * 20 + "\n\nShort tail."), Document("b", "Other doc text here.")]
    passages = pack_passages(docs, max_chars=80, min_chars=1)
    assert all(len(p) <= 80 for p in passages)
    assert passages[-1] == "Other doc text here."  # never merged across documents
    assert "Short tail." in passages[-2]
    assert pack_passages(["x" * 200], max_chars=50, min_chars=1) == ["x" * 50] * 4
