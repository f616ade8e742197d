"""The one scaffold every benchmark runs on: common options, threads, the offline environment, the run's
metadata and the JSON + markdown (+ plot) writer.

A benchmark module declares a :class:`Benchmark` (its own options, ``measure``, and optionally a markdown
table, a plot and a printed summary) as ``BENCHMARK`` and registers it with ``cli.benchmark(name,
"module:BENCHMARK", help=...)``; ``gsa bench NAME`` and ``python -m module`` then behave the same:

- options every benchmark has: ``--out DIR`` (default ``benchmarks/results``), ``--threads N``, ``--quiet``,
  ``--markdown`` (print the markdown table only), ``--from-json PATH`` (print the tables of an earlier run
  without measuring; with ``--out``, also write its table and plot there, and a copy of the JSON when
  ``--out`` is another folder) and, when the benchmark has a smoke mode, ``--quick``;
- before measuring: torch's thread count is set (and recorded), and ``HF_HUB_OFFLINE=1`` unless set
  (benchmarks never download);
- the report gets ``command``, ``started``, ``finished``, ``loadavg_1m {start, end}`` (other work on the
  machine inflates timings) and ``environment`` (:func:`gsa_bench.timing.environment`);
- written as ``OUT/NAME.json``, ``OUT/NAME.md`` (when the benchmark has a markdown table) and
  ``OUT/NAME.png`` (when it has a plot and matplotlib is installed).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gsa_common import load_average, utc_now

DEFAULT_OUT = Path("benchmarks/results")
Report = dict[str, Any]


def log(args: argparse.Namespace, message: str) -> None:
    """A progress line on stderr unless ``--quiet``."""
    if not getattr(args, "quiet", False):
        print(message, file=sys.stderr, flush=True)


class Run:
    """One measured run: its start time and load, and :meth:`save` for partial results along the way."""

    def __init__(self, benchmark: Benchmark, args: argparse.Namespace) -> None:
        self.benchmark, self.args = benchmark, args
        self.started = utc_now()
        self.load_start = load_average()

    def metadata(self) -> Report:
        from gsa_bench.timing import environment

        return {"command": [Path(sys.argv[0]).name, *sys.argv[1:]], "started": self.started, "finished": utc_now(),
                "loadavg_1m": {"start": self.load_start, "end": load_average()}, "environment": environment()}

    def complete(self, report: Report) -> Report:
        """``report`` with the run's metadata."""
        return {**report, **self.metadata()}

    def save(self, report: Report) -> Path:
        """Write ``report`` (with the metadata so far) now, e.g. after each case of a long grid."""
        return self.benchmark.write(self.complete(report), self.args.out)


@dataclass(frozen=True)
class Benchmark:
    """A benchmark: ``gsa bench NAME`` (call it with a parser to configure that parser) and ``main()``."""

    name: str  #: the ``gsa bench`` name and the output files' stem
    description: str  #: one line, for ``--help``
    options: Callable[[argparse.ArgumentParser], None]  #: the benchmark's own options
    measure: Callable[[argparse.Namespace, Run], Report]  #: the report (the scaffold adds the run metadata)
    markdown: Callable[[Report], str] | None = None  #: the README table: NAME.md and what ``--markdown`` prints
    plot: Callable[[Report], Any] | None = None  #: the figure saved as NAME.png (drawn with :func:`pyplot`)
    summary: Callable[[Report], str] | None = None  #: printed after a run (default: the markdown table)
    prepare: Callable[[argparse.Namespace], None] | None = None  #: fill in defaults, validate (before measuring)
    threads: int | None = None  #: default ``--threads`` (None: torch's default)
    quick_help: str | None = None  #: the help of ``--quick`` (None: the benchmark has no smoke mode)

    # ------------------------------------------------------------ command line
    def __call__(self, parser: argparse.ArgumentParser) -> None:
        """Configure ``parser`` for this benchmark (what ``gsa bench NAME`` calls)."""
        self.add_arguments(parser)

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        if self.quick_help is not None:
            parser.add_argument("--quick", action="store_true", help=self.quick_help)
        parser.add_argument("--out", type=Path, default=None,
                            help=f"output folder for {self.name}.json and the rest (default {DEFAULT_OUT}/; with "
                            "--from-json: write nothing unless given)")
        default = "torch's default" if self.threads is None else str(self.threads)
        parser.add_argument("--threads", type=int, default=self.threads,
                            help=f"torch threads (default {default}; 0: torch's default)")
        parser.add_argument("--from-json", type=Path, default=None, metavar="PATH",
                            help=f"do not measure: print the tables of an existing {self.name}.json (and with --out, "
                            "write its table and plot there)")
        parser.add_argument("--markdown", action="store_true", help="print only the markdown table")
        parser.add_argument("--quiet", action="store_true", help="no progress lines")
        self.options(parser)
        parser.set_defaults(handler=self.run)

    def main(self, argv: Sequence[str] | None = None) -> int:
        """``python -m gsa_bench.NAME``: the same options and behaviour as ``gsa bench NAME``."""
        parser = argparse.ArgumentParser(prog=f"python -m gsa_bench.{self.name}", description=self.description)
        self.add_arguments(parser)
        return self.run(parser.parse_args(argv))

    # ------------------------------------------------------------ running
    def run(self, args: argparse.Namespace) -> int:
        """Measure (or load ``--from-json``), write the outputs to ``--out``, print the summary."""
        if getattr(args, "quick", None) is None:
            args.quick = False
        if self.prepare is not None:
            self.prepare(args)
        if args.from_json is not None:
            report = json.loads(args.from_json.read_text())
            if args.out is None:
                pass  # print only: a re-render never writes over measured results unasked
            elif args.out.resolve() == args.from_json.parent.resolve():
                self.write_rendered(report, args.out)  # leave the measured JSON as it is
            else:
                self.write(report, args.out)
        else:
            if args.out is None:
                args.out = DEFAULT_OUT
            set_threads(args)
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
            run = Run(self, args)
            report = run.complete(self.measure(args, run))
            log(args, f"wrote {self.write(report, args.out)}")
        text = self.markdown(report) if args.markdown and self.markdown else self.summary_text(report)
        print(text)
        return 0

    def summary_text(self, report: Report) -> str:
        if self.summary is not None:
            return self.summary(report)
        return self.markdown(report) if self.markdown is not None else json.dumps(report, indent=1, default=str)

    # ------------------------------------------------------------ writing
    def write(self, report: Report, out: Path) -> Path:
        """``out/NAME.json`` and what :meth:`write_rendered` writes; returns the JSON's path."""
        out.mkdir(parents=True, exist_ok=True)
        path = out / f"{self.name}.json"
        path.write_text(json.dumps(report, indent=1, default=str) + "\n")
        self.write_rendered(report, out)
        return path

    def write_rendered(self, report: Report, out: Path) -> None:
        """``out/NAME.md`` and ``out/NAME.png`` (skipped, with a note, when matplotlib is missing)."""
        out.mkdir(parents=True, exist_ok=True)
        if self.markdown is not None:
            (out / f"{self.name}.md").write_text(self.markdown(report) + "\n")
        if self.plot is not None:
            try:
                plt = pyplot()
            except ImportError:
                print("matplotlib is not installed (pip install matplotlib): no plot written", file=sys.stderr)
                return
            fig = self.plot(report)
            fig.tight_layout()
            fig.savefig(out / f"{self.name}.png", dpi=120)
            plt.close(fig)


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the file-only Agg backend (ImportError when matplotlib is not installed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def ok_cases(cases: Sequence[dict[str, Any]]) -> dict[tuple[str, int], dict[str, Any]]:
    """The cases that ran to the end, by ``(model, context)``: what summaries and plots compare."""
    return {(c["model"], c["context"]): c for c in cases if c.get("status") == "ok"}


def ok_series(cases: Sequence[dict[str, Any]], model: str) -> list[dict[str, Any]]:
    """One model's finished cases in order of context: a plotted line."""
    return [c for (m, _), c in sorted(ok_cases(cases).items(), key=lambda item: item[0][1]) if m == model]


def quick_defaults(args: argparse.Namespace, defaults: dict[str, tuple[Any, Any]]) -> None:
    """Each option left at None gets its ``(quick, full)`` default, by ``--quick``."""
    for name, (quick, full) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)


def set_threads(args: argparse.Namespace) -> None:
    """Apply ``--threads`` (0 or None: torch's default) and record the count actually used in ``args.threads``."""
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    args.threads = torch.get_num_threads()
