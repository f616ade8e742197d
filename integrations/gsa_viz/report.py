"""``gsa report``: one self-contained HTML page of every benchmark's table and plot, the machines and settings
they ran on, and optionally a model card.

Everything comes from the JSON the benchmarks write (``benchmarks/results/NAME.json``): each table and plot is
rendered again by that benchmark's own ``markdown`` and ``plot`` functions (the same code ``gsa bench`` runs),
falling back to the ``NAME.md`` / ``NAME.png`` written beside it when a JSON predates its renderer. Images are
embedded as ``data:`` URIs and the page loads nothing from the network; a small inline script marks the page
(``<body data-images-loaded="N of M">``) and shows a warning when an image failed to decode.
"""

from __future__ import annotations

import base64
import html
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gsa_core.errors import ConfigError

DEFAULT_RESULTS = Path("benchmarks/results")
#: Environment fields shown for a machine (the rest of ``environment`` is in the JSON).
MACHINE_KEYS = ("cpu_model", "logical_cpus", "cpus_usable", "platform", "python", "torch", "cpu_capability", "mkl",
                "cuda", "gpu")
MAX_VALUE_CHARS = 160


# ----------------------------------------------------------------------------- benchmarks
def known_benchmarks() -> dict[str, Any]:
    """Every registered benchmark (``gsa bench NAME``) and evaluation (``gsa eval``) by its output name."""
    import importlib

    from gsa_eval.commands import SUBCOMMANDS

    from gsa_core.registry import get_registry

    found: dict[str, Any] = {}
    for spec in get_registry().commands("benchmark"):
        try:
            bench = spec.load()
        except Exception:  # a plugin's benchmark that fails to import: its JSON is shown from its files
            continue
        found[getattr(bench, "name", spec.name)] = bench
    for module, _ in SUBCOMMANDS.values():
        bench = getattr(importlib.import_module(module), "BENCHMARK", None)
        if bench is not None:
            found[bench.name] = bench
    return found


def benchmark_for(stem: str, benchmarks: dict[str, Any]) -> Any:
    """The benchmark that wrote ``STEM.json``: by name, else the longest name ``STEM`` starts with (a variant run
    saved under another name, e.g. ``distill_bert_long``)."""
    if stem in benchmarks:
        return benchmarks[stem]
    prefixes = [n for n in benchmarks if stem.startswith(n + "_")]
    return benchmarks[max(prefixes, key=len)] if prefixes else None


@dataclass
class Section:
    """One benchmark's part of the page."""

    name: str
    path: Path
    report: dict[str, Any]
    description: str = ""
    table: str | None = None
    table_note: str = ""
    plot: bytes | None = None
    plot_note: str = ""
    machine: dict[str, Any] = field(default_factory=dict)


def _render_table(bench: Any, report: dict[str, Any], path: Path) -> tuple[str | None, str]:
    markdown = getattr(bench, "markdown", None) if bench is not None else None
    if markdown is not None:
        try:
            return markdown(report), ""
        except Exception as exc:  # an older JSON than the renderer: use the table written with it
            note = f"re-rendering failed ({type(exc).__name__}); "
    else:
        note = ""
    md = path.with_suffix(".md")
    if md.is_file():
        return md.read_text(encoding="utf-8"), note + f"table from {md.name}" if note else ""
    summary = report.get("summary")
    if isinstance(summary, dict) and summary:
        return _key_values(summary), note + "summary from the JSON"
    return None, note + "this benchmark writes no table"


def _render_plot(bench: Any, report: dict[str, Any], path: Path) -> tuple[bytes | None, str]:
    from gsa_viz.figures import png_bytes, pyplot

    plot = getattr(bench, "plot", None) if bench is not None else None
    note = ""
    if plot is not None:
        try:
            fig = plot(report)
            fig.tight_layout()
            return png_bytes(fig), ""
        except Exception as exc:
            pyplot().close("all")
            note = f"re-rendering failed ({type(exc).__name__}); "
    png = path.with_suffix(".png")
    if png.is_file():
        return png.read_bytes(), note + f"plot from {png.name}" if note else ""
    return None, note + "this benchmark draws no plot" if plot is None else note + "no plot"


def collect(results: Path) -> list[Section]:
    """A :class:`Section` per ``*.json`` in ``results`` (not its subfolders), in name order."""
    if not results.is_dir():
        raise ConfigError(f"--results {results}: no such folder (benchmarks write theirs to {DEFAULT_RESULTS}/)")
    files = sorted(results.glob("*.json"))
    benchmarks = known_benchmarks()
    sections = []
    for path in files:
        try:
            report = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeError, json.JSONDecodeError) as exc:
            raise ConfigError(f"cannot read {path}: {exc}") from None
        if not isinstance(report, dict):
            continue
        bench = benchmark_for(path.stem, benchmarks)
        section = Section(path.stem, path, report, description=getattr(bench, "description", "") or "")
        section.table, section.table_note = _render_table(bench, report, path)
        section.plot, section.plot_note = _render_plot(bench, report, path)
        env = report.get("environment")
        section.machine = {k: env[k] for k in MACHINE_KEYS if isinstance(env, dict) and k in env}
        sections.append(section)
    return sections


# ----------------------------------------------------------------------------- HTML pieces
def _cell(text: str) -> str:
    out = html.escape(text.strip())
    out = re.sub(r"`([^`]+)`", r"<code>\1</code>", out)
    return re.sub(r"\*\*([^*]+)\*\*", r"<b>\1</b>", out)


def _table_html(rows: list[list[str]]) -> str:
    """Pipe-table rows (the second one the ``---`` / ``---:`` alignment row) as an HTML table."""
    aligns: list[str] = []
    if len(rows) > 1 and all(re.fullmatch(r"\s*:?-+:?\s*", c) for c in rows[1]):
        aligns = ["right" if c.strip().endswith(":") else "left" for c in rows[1]]
        rows = [rows[0], *rows[2:]]

    def cell(tag: str, j: int, text: str) -> str:
        style = f' style="text-align:{aligns[j]}"' if j < len(aligns) else ""
        return f"<{tag}{style}>{_cell(text)}</{tag}>"

    head = "".join(cell("th", j, c) for j, c in enumerate(rows[0]))
    body = "".join("<tr>" + "".join(cell("td", j, c) for j, c in enumerate(r)) + "</tr>" for r in rows[1:])
    return f"<div class=scroll><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>"


def markdown_html(text: str) -> str:
    """The markdown the benchmarks write (pipe tables, headings, paragraphs) as HTML."""
    out: list[str] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i].strip()
        if line.startswith("|"):
            rows = []
            while i < len(lines) and lines[i].strip().startswith("|"):
                rows.append(lines[i].strip().strip("|").split("|"))
                i += 1
            out.append(_table_html(rows))
            continue
        if line.startswith("#"):
            level = min(6, len(line) - len(line.lstrip("#")) + 2)
            out.append(f"<h{level}>{_cell(line.lstrip('#'))}</h{level}>")
        elif line:
            out.append(f"<p>{_cell(line)}</p>")
        i += 1
    return "\n".join(out)


def _short(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text if len(text) <= MAX_VALUE_CHARS else text[: MAX_VALUE_CHARS - 1] + "…"


def _key_values(mapping: dict[str, Any], head: tuple[str, str] = ("field", "value")) -> str:
    """A two-column markdown table of ``mapping`` (long values shortened, pipes kept out of the cells)."""
    rows = "\n".join(f"| {k} | {_short(v).replace('|', '/')} |" for k, v in mapping.items())
    return f"| {head[0]} | {head[1]} |\n|---|---|\n{rows}"


def _image(data: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(data).decode("ascii")}">'


def _anchor(name: str) -> str:
    return "b-" + re.sub(r"[^a-z0-9_-]", "-", name.lower())


def machines_html(sections: list[Section]) -> str:
    """The distinct machines (environments) and which benchmarks ran on each."""
    groups: dict[str, list[str]] = {}
    described: dict[str, dict[str, Any]] = {}
    for s in sections:
        key = json.dumps(s.machine, sort_keys=True, default=str)
        groups.setdefault(key, []).append(s.name)
        described[key] = s.machine
    parts = []
    for n, (key, names) in enumerate(groups.items(), 1):
        machine = described[key] or {"environment": "not recorded in these JSON files"}
        parts.append(f"<h3>machine {n}: {', '.join(html.escape(x) for x in names)}</h3>"
                     + markdown_html(_key_values(machine)))
    return "\n".join(parts)


def section_html(s: Section) -> str:
    r = s.report
    when = " → ".join(str(r[k]) for k in ("started", "finished") if k in r) or str(r.get("created", "")) or "?"
    command = r.get("command")
    meta = {"file": s.path.name, "when (UTC)": when}
    if command:
        meta["command"] = " ".join(map(str, command)) if isinstance(command, list) else str(command)
    threads = (r.get("environment") or {}).get("torch_threads") if isinstance(r.get("environment"), dict) else None
    if threads is not None:
        meta["torch threads"] = threads
    if isinstance(r.get("loadavg_1m"), dict):
        meta["load average (1 min) start / end"] = f"{r['loadavg_1m'].get('start')} / {r['loadavg_1m'].get('end')}"
    parts = [f'<section id="{_anchor(s.name)}"><h2>{html.escape(s.name)}</h2>']
    if s.description:
        parts.append(f"<p class=lead>{html.escape(s.description)}</p>")
    parts.append(markdown_html(_key_values(meta)))
    if s.table:
        parts.append("<h3>results</h3>" + markdown_html(s.table))
    if s.table_note:
        parts.append(f"<p class=note>{html.escape(s.table_note)}</p>")
    if s.plot:
        parts.append(f"<figure>{_image(s.plot, f'{s.name} plot')}<figcaption>{html.escape(s.name)}"
                     f"{' (' + html.escape(s.plot_note) + ')' if s.plot_note else ''}</figcaption></figure>")
    elif s.plot_note:
        parts.append(f"<p class=note>{html.escape(s.plot_note)}</p>")
    settings = r.get("settings")
    if isinstance(settings, dict) and settings:
        table = markdown_html(_key_values(settings, ("setting", "value")))
        parts.append(f"<details><summary>settings</summary>{table}</details>")
    parts.append("</section>")
    return "\n".join(parts)


# ----------------------------------------------------------------------------- the model card
def model_card(path: Path) -> str:
    """A GSA model's config, splat counts per layer and head, and its conversion quality (from ``distill.json``
    beside it or ``train.json`` in it)."""
    from gsa_viz.inputs import load_gsa_model

    viz = load_gsa_model(path)
    config = viz.model.config
    gsa = getattr(config, "gsa", None)
    rows = ["| layer | module | mode | heads × slots | alive | alive per head |", "|---:|---|---|---:|---:|---|"]
    total_alive = total = 0
    for index, (name, layer) in viz.layers.items():
        bank = layer.bank
        alive = [int(v) for v in bank.alive.sum(-1)]
        total_alive += sum(alive)
        total += bank.n_heads * bank.capacity
        rows.append(f"| {index} | `{name}` | {layer.mode} | {bank.n_heads} × {bank.capacity} | {sum(alive)} | "
                    f"{' '.join(map(str, alive))} |")
    facts = {"folder": str(path), "model type": getattr(config, "model_type", "?"),
             "parameters": f"{sum(p.numel() for p in viz.model.parameters()):,}",
             "GSA layers": len(viz.layers), "alive splats": f"{total_alive:,} of {total:,} slots"}
    parts = ['<section id="model"><h2>model card</h2>', markdown_html(_key_values(facts)),
             "<h3>splats per GSA layer</h3>", markdown_html("\n".join(rows)), "<h3>conversion quality</h3>",
             quality_html(path), "<details><summary>GSA config</summary><pre>"
             + html.escape(json.dumps(gsa, indent=1, default=str)) + "</pre></details></section>"]
    return "\n".join(parts)


def quality_html(path: Path) -> str:
    """What the run that made the model measured."""
    distill = path.parent / "distill.json" if path.name == "model" else path / "distill.json"
    if distill.is_file():
        data = json.loads(distill.read_text(encoding="utf-8"))
        parts = []
        errors = data.get("layer_error") or {}
        if errors:
            layers = sorted({layer for per in errors.values() for layer in per})
            table = ["| after | " + " | ".join(f"`{n}`" for n in layers) + " |",
                     "|---|" + "---:|" * len(layers)]
            for label, per in errors.items():
                table.append(f"| {label} | " + " | ".join(f"{per[n]['rel_err']:.3f}" if n in per else "–"
                                                         for n in layers) + " |")
            parts.append("<p>relative attention-output error per layer on held-out text (GSA vs the original):</p>"
                         + markdown_html("\n".join(table)))
        for label, values in (data.get("embedding") or {}).items():
            parts.append(f"<p>sentence embeddings after {html.escape(label)}:</p>" + markdown_html(_key_values(values)))
        return "\n".join(parts) or f"<p class=note>{html.escape(distill.name)} holds no evaluation</p>"
    train = path / "train.json"
    if train.is_file():
        final = json.loads(train.read_text(encoding="utf-8")).get("final") or {}
        return "<p>held-out evaluation at the end of gsa train:</p>" + markdown_html(_key_values(final))
    return ("<p class=note>no conversion record: neither distill.json beside the model (gsa distill) nor "
            "train.json in it (gsa train)</p>")


# ----------------------------------------------------------------------------- the page
STYLE = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#1a1a1a;background:#fff}
header,main{max-width:1100px;margin:0 auto;padding:0 16px}
header{border-bottom:2px solid #0072B2;padding-bottom:8px}
nav{display:flex;flex-wrap:wrap;gap:4px 14px}
nav a{color:#0072B2;white-space:nowrap}
h2{border-bottom:1px solid #ccc;padding-top:16px}
.scroll{overflow-x:auto}
table{border-collapse:collapse;font-size:13px;margin:8px 0}
th,td{border:1px solid #ccc;padding:3px 8px;vertical-align:top}
th{background:#f2f2f2}
img{max-width:100%;height:auto;border:1px solid #eee}
figure{margin:12px 0}
figcaption,.note{color:#555;font-size:12px}
.lead{font-style:italic}
pre{background:#f7f7f7;padding:8px;overflow-x:auto;font-size:12px}
#image-warning{display:none;background:#D55E00;color:#fff;padding:8px}
"""
#: Counts the images that decoded; a page whose images all loaded says so on its body element.
CHECK_IMAGES = """
window.addEventListener("load", function () {
  var images = Array.prototype.slice.call(document.images);
  var ok = images.filter(function (im) { return im.complete && im.naturalWidth > 0; }).length;
  document.body.setAttribute("data-images-loaded", ok + " of " + images.length);
  if (ok < images.length) {
    var warn = document.getElementById("image-warning");
    warn.textContent = (images.length - ok) + " of " + images.length + " images failed to load";
    warn.style.display = "block";
  }
});
"""


def build_report(results: str | Path = DEFAULT_RESULTS, model: str | Path | None = None) -> str:
    """The HTML page (a string) for the benchmark JSON in ``results`` and, when given, a GSA ``model`` folder."""
    from gsa_common import utc_now

    sections = collect(Path(results))
    card = model_card(Path(model)) if model is not None else ""
    if not sections and not card:
        raise ConfigError(f"--results {results} holds no benchmark JSON (gsa bench NAME writes NAME.json there) and "
                          "no --model was given: nothing to report")
    links = [f'<a href="#{_anchor(s.name)}">{html.escape(s.name)}</a>' for s in sections]
    if card:
        links.insert(0, '<a href="#model">model card</a>')
    body = [f"<header><h1>Gaussian Splat Attention: report</h1><p>{len(sections)} benchmark result(s) from "
            f"<code>{html.escape(str(results))}</code>; written {html.escape(utc_now())}</p>"
            f"<nav>{''.join(links)}</nav></header>", '<div id="image-warning"></div>', "<main>", card]
    if sections:
        body.append("<section id=machines><h2>machines</h2>" + machines_html(sections) + "</section>")
        body.extend(section_html(s) for s in sections)
    body.append("</main>")
    return ("<!DOCTYPE html>\n<html lang=en><head><meta charset=utf-8>"
            '<meta name=viewport content="width=device-width, initial-scale=1">'
            f"<title>GSA report</title><style>{STYLE}</style><script>{CHECK_IMAGES}</script></head>\n"
            "<body>\n" + "\n".join(body) + "\n</body></html>\n")


# ----------------------------------------------------------------------------- gsa report
def add_arguments(parser: Any) -> None:
    parser.add_argument("--results", type=Path, default=DEFAULT_RESULTS,
                        help=f"folder of benchmark JSON (default {DEFAULT_RESULTS})")
    parser.add_argument("--model", type=Path, default=None, metavar="DIR",
                        help="also a model card for this GSA model folder (config, splat counts, conversion quality)")
    parser.add_argument("--out", type=Path, required=True, help="the HTML file to write")
    parser.set_defaults(handler=run)


def run(args: Any) -> int:
    from gsa_data.files import atomic_write_text

    from gsa_viz.commands import finish
    from gsa_viz.figures import check_out

    check_out(args.out, ".html")
    page = build_report(args.results, args.model)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, page)
    return finish(args.out)


__all__ = ["DEFAULT_RESULTS", "Section", "add_arguments", "benchmark_for", "build_report", "collect",
           "known_benchmarks", "markdown_html", "model_card"]
