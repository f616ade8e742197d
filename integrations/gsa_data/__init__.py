"""Real English text that is on every machine, for calibration, distillation and training.

Sources (DESIGN.md section 6), all offline:

- :func:`stdlib_docstrings`: the docstrings of Python's standard library, read by parsing the source
  files with :mod:`ast` (nothing is imported, so no module's import-time side effects run);
- :func:`pydoc_topics`: the language reference topics of :mod:`pydoc_data.topics` (a data module);
- :func:`text_folder`: every text file under a folder.

:func:`load_corpus` picks one by name, :func:`split_documents` makes a deterministic train/held-out
split (by a hash of each document's id, so adding documents never moves the others), and
:func:`split_paragraphs` / :func:`split_sentences` / :func:`pack_passages` cut documents into model
inputs.
"""

from gsa_data.corpus import (
    Document,
    Split,
    corpus_problem,
    load_corpus,
    pack_passages,
    pydoc_topics,
    split_documents,
    split_paragraphs,
    split_sentences,
    stdlib_docstrings,
    text_folder,
)

__all__ = [
    "Document", "Split", "corpus_problem", "load_corpus", "pack_passages", "pydoc_topics", "split_documents",
    "split_paragraphs", "split_sentences", "stdlib_docstrings", "text_folder",
]
