"""``gsa eval {passkey, ppl, passkey-corpus}``: the evaluations, imported when ``gsa eval`` runs (``gsa --help``
imports none of them)."""

from __future__ import annotations

import argparse
import importlib

#: ``gsa eval NAME``: (module, help), in the order ``gsa eval --help`` lists them.
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "passkey": ("gsa_eval.passkey", "passkey retrieval against prompt length and depth (passkey.json/png)"),
    "ppl": ("gsa_eval.ppl", "held-out loss against context length and position (ppl_context.json/png)"),
    "passkey-corpus": ("gsa_eval.passkey_corpus", "write the passkey fine-tuning corpus (and tokenizer) for gsa train"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="eval_command", required=True, metavar="EVALUATION")
    for name, (module, help_text) in SUBCOMMANDS.items():
        child = sub.add_parser(name, help=help_text, description=help_text)
        importlib.import_module(module).add_arguments(child)


__all__ = ["SUBCOMMANDS", "add_arguments"]
