"""The docs build with no broken links, the README's links resolve, and every runnable example runs.

A runnable example is a fenced code block (``python`` or ``bash``) preceded by the line
``<!-- runnable -->`` in README.md or a page under docs/ (the convention is described in
docs/contributing.md).
"""

from __future__ import annotations

import glob
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
README = ROOT / "README.md"
MARKER = "<!-- runnable -->"
LANGUAGES = ("python", "bash")
FENCE = re.compile(r"^(?P<fence>`{3,}|~{3,})\s*(?P<info>[^`]*)$")
# [text](target) and ![alt](target); the target ends at whitespace (an optional "title" may follow).
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
# `path/inside/the/repo` in backquotes: a file or folder the text names without linking to it.
REPO_DIRS = ("benchmarks", "docs", "examples", "gsa_core", "gsa_plugins", "integrations", "scripts", "tests")
PATH_SPAN = re.compile(r"`((?:" + "|".join(REPO_DIRS) + r")/[^`\s]*)`")


@dataclass(frozen=True)
class Example:
    source: Path
    line: int  # 1-based line of the first line of code
    language: str
    code: str

    @property
    def id(self) -> str:
        where = self.source.relative_to(ROOT) if self.source.is_relative_to(ROOT) else self.source
        return f"{where}:{self.line}"


def markdown_files() -> list[Path]:
    return [README, *sorted(DOCS.rglob("*.md"))]


def runnable_examples(text: str, source: Path) -> list[Example]:
    """The blocks marked runnable in ``text``. Markers inside a fenced block are text, not markers.

    A marker must be followed (blank lines allowed) by a ``python`` or ``bash`` fence: anything else
    raises ``ValueError``, so a marker can never silently stop marking its block.
    """
    lines = text.splitlines()
    examples: list[Example] = []
    i = 0
    while i < len(lines):
        opening = FENCE.match(lines[i].strip())
        if opening:  # skip a whole block, so a marker shown inside one is never taken for a marker
            i = _fence_end(lines, i, opening["fence"]) + 1
            continue
        if lines[i].strip() != MARKER:
            i += 1
            continue
        j = i + 1
        while j < len(lines) and not lines[j].strip():
            j += 1
        fence = FENCE.match(lines[j].strip()) if j < len(lines) else None
        language = fence["info"].strip() if fence else ""
        if fence is None or language not in LANGUAGES:
            raise ValueError(f"{source}:{i + 1}: {MARKER} must be followed by a fenced block in one of "
                             f"{', '.join(LANGUAGES)}, got {lines[j].strip() if j < len(lines) else 'the end'!r}")
        end = _fence_end(lines, j, fence["fence"])
        examples.append(Example(source, j + 2, language, "\n".join(lines[j + 1:end]) + "\n"))
        i = end + 1
    return examples


def _fence_end(lines: list[str], start: int, fence: str) -> int:
    """Index of the line closing the block opened at ``start`` (a fence of the same kind, at least as long)."""
    for k in range(start + 1, len(lines)):
        stripped = lines[k].strip()
        if stripped.startswith(fence[0] * len(fence)) and not stripped.strip(fence[0]):
            return k
    raise ValueError(f"unclosed code block opened at line {start + 1}")


def all_examples() -> list[Example]:
    return [ex for path in markdown_files() for ex in runnable_examples(path.read_text(encoding="utf-8"), path)]


EXAMPLES = all_examples()


# ----------------------------------------------------------------------------- running examples
#: Set for every example. One torch thread: the examples are tiny, and on a shared 2-core machine a
#: second thread only adds contention (it made one example 30x slower here).
EXAMPLE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def example_env(home: Path) -> dict[str, str]:
    """The environment examples run in: this interpreter's scripts first on PATH, a private GSA_HOME, no hub."""
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env.update(EXAMPLE_ENV, GSA_HOME=str(home))
    return env


def run_example(example: Example, workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run one example in ``workdir``; raise (Python) or fail (shell) exactly when the example breaks."""
    env = example_env(workdir / "gsa-home")
    if example.language == "bash":
        done = subprocess.run(["bash", "-euo", "pipefail", "-c", example.code], cwd=workdir, env=env,
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, (f"{example.id}: exit status {done.returncode}\n"
                                      f"--- stdout\n{done.stdout}\n--- stderr\n{done.stderr}")
        return
    monkeypatch.chdir(workdir)
    for key in (*EXAMPLE_ENV, "GSA_HOME"):
        monkeypatch.setenv(key, env[key])
    # Pad with blank lines so a traceback's line numbers are the Markdown file's.
    code = compile("\n" * (example.line - 1) + example.code, str(example.source), "exec")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        exec(code, {"__name__": "__docs_example__"})
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("example", EXAMPLES, ids=[ex.id for ex in EXAMPLES])
def test_runnable_example(example: Example, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run_example(example, tmp_path, monkeypatch)


def test_the_readme_and_the_docs_have_runnable_examples_in_both_languages() -> None:
    assert any(ex.source == README for ex in EXAMPLES), "the README's tour should hold a runnable example"
    assert {ex.language for ex in EXAMPLES} == set(LANGUAGES)


def test_the_collector_takes_marked_blocks_only(tmp_path: Path) -> None:
    text = "\n".join([
        "```python", "print('unmarked')", "```",
        MARKER, "", "```python", "x = 1", "```",
        "````markdown", MARKER, "```python", "shown, not run", "```", "````",
        MARKER, "```bash", "true", "```",
    ])
    found = runnable_examples(text, tmp_path / "page.md")
    assert [(ex.language, ex.code, ex.line) for ex in found] == [("python", "x = 1\n", 7), ("bash", "true\n", 17)]
    with pytest.raises(ValueError, match="must be followed by a fenced block"):
        runnable_examples(f"{MARKER}\n```toml\na = 1\n```\n", tmp_path / "page.md")
    with pytest.raises(ValueError, match="must be followed by a fenced block"):
        runnable_examples(f"{MARKER}\ntext\n", tmp_path / "page.md")


@pytest.mark.parametrize("language, code", [("python", "assert 1 + 1 == 3\n"), ("bash", "true\nexit 3\n"),
                                            ("bash", "false | true\n")])
def test_a_broken_example_fails(language: str, code: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(AssertionError):
        run_example(Example(tmp_path / "page.md", 1, language, code), tmp_path, monkeypatch)


# ----------------------------------------------------------------------------- building the site
def mkdocs_build(config: Path, site: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(config),
                           "--site-dir", str(site)], capture_output=True, text=True, timeout=300)


def test_the_docs_build_strict_with_every_page(tmp_path: Path) -> None:
    site = tmp_path / "site"
    done = mkdocs_build(ROOT / "mkdocs.yml", site)
    assert done.returncode == 0, done.stdout + done.stderr
    for page in DOCS.rglob("*.md"):
        rel = page.relative_to(DOCS).with_suffix("")
        html = site / "index.html" if rel.name == "index" else site / rel / "index.html"
        assert html.is_file(), f"{page.relative_to(ROOT)} was not rendered ({html} missing)"


def _tiny_docs(tmp_path: Path, index: str) -> Path:
    """A two-page site built with this project's mkdocs.yml settings (its strictness included)."""
    settings = yaml.safe_load((ROOT / "mkdocs.yml").read_text(encoding="utf-8"))
    settings.update(docs_dir=str(tmp_path / "docs"), site_dir=str(tmp_path / "site"))
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "index.md").write_text(f"# Home\n\n{index}\n", encoding="utf-8")
    (tmp_path / "docs" / "other.md").write_text("# Other\n\n## A section\n\nText.\n", encoding="utf-8")
    config = tmp_path / "mkdocs.yml"
    config.write_text(yaml.safe_dump(settings), encoding="utf-8")
    return config


@pytest.mark.parametrize("link, named", [("[gone](missing.md)", "missing.md"),
                                         ("[gone](other.md#no-such-section)", "no-such-section")])
def test_strict_build_fails_on_a_broken_link(link: str, named: str, tmp_path: Path) -> None:
    config = _tiny_docs(tmp_path, f"See [the other page](other.md#a-section) and {link}.")
    done = mkdocs_build(config, tmp_path / "site")
    assert done.returncode != 0, "a broken link must fail the strict build"
    assert named in done.stdout + done.stderr


def test_strict_build_passes_the_same_tree_without_the_broken_link(tmp_path: Path) -> None:
    config = _tiny_docs(tmp_path, "See [the other page](other.md#a-section).")
    done = mkdocs_build(config, tmp_path / "site")
    assert done.returncode == 0, done.stdout + done.stderr


# ----------------------------------------------------------------------------- links and named paths
def relative_links(text: str) -> list[str]:
    """Link targets that point into the repository (no scheme, not a bare #anchor), anchors removed."""
    targets = []
    for target in LINK.findall(text):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
            continue
        targets.append(target.split("#", 1)[0])
    return targets


def test_readme_links_point_to_files_that_exist() -> None:
    links = relative_links(README.read_text(encoding="utf-8"))
    assert "docs/index.md" in links, "the README must lead into the docs"
    missing = [t for t in links if not (ROOT / t).exists()]
    assert not missing, f"README.md links to missing files: {missing}"


def test_relative_links_finds_what_it_must() -> None:
    text = '[a](docs/x.md#s) ![b](img.png "t") [c](https://x.org/y.md) [d](#top) [e](mailto:a@b.c)'
    assert relative_links(text) == ["docs/x.md", "img.png"]


def expand_braces(path: str) -> list[str]:
    """``a/{b,c}.json`` -> ``a/b.json``, ``a/c.json`` (one level, as the docs write it)."""
    match = re.search(r"\{([^{}]*)\}", path)
    if not match:
        return [path]
    return [out for alt in match[1].split(",")
            for out in expand_braces(path[:match.start()] + alt + path[match.end():])]


def missing_paths(text: str) -> list[str]:
    """Repository paths named in backquotes (globs and ``{a,b}`` allowed) that match no file or folder."""
    return [p for p in PATH_SPAN.findall(text) for one in expand_braces(p) if not glob.glob(str(ROOT / one))]


def test_missing_paths_flags_only_what_is_missing() -> None:
    text = ("`benchmarks/results/{decode,init}.json` `tests/test_docs*.py` `docs/` `gsa chat` "
            "`benchmarks/results/{decode,nothing}.json` `examples/no-such-plugin/`")
    assert missing_paths(text) == ["benchmarks/results/{decode,nothing}.json", "examples/no-such-plugin/"]


@pytest.mark.parametrize("page", markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_paths_named_in_backquotes_exist(page: Path) -> None:
    missing = missing_paths(page.read_text(encoding="utf-8"))
    assert not missing, f"{page.relative_to(ROOT)} names paths that do not exist: {missing}"


def test_every_page_is_reachable_from_the_index() -> None:
    """Pages are listed by mkdocs without a nav; the index must still lead to each of them."""
    linked = {(DOCS / t).resolve() for t in relative_links((DOCS / "index.md").read_text(encoding="utf-8"))}
    pages = {p.resolve() for p in DOCS.rglob("*.md")} - {(DOCS / "index.md").resolve()}
    unlinked = sorted(str(p.relative_to(DOCS)) for p in pages - linked)
    assert not unlinked, f"docs/index.md links to no page {unlinked}: add them to its table of pages"
