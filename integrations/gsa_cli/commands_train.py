"""``gsa train``: train a GPT-Neo (softmax or GSA) from scratch on a text corpus.

Data parallel on CPUs: ``torchrun --nproc_per_node 2 -m gsa_cli.main train ...`` (each process takes
its share of the global ``--batch-size``; gradients are averaged, so the result matches one process).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from gsa_train.interrupt import DEFAULT_CHECKPOINT_EVERY
from gsa_train.layouts import LAYOUTS

from gsa_cli.output import print_json, print_table


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, required=True, help="folder for the model, tokenizer and train.json")
    parser.add_argument("--corpus", default="stdlib",
                        help="stdlib (Python's docstrings, default), a folder of .txt files, or hf:NAME")
    parser.add_argument("--layout", default=None, choices=list(LAYOUTS), help="model shape (default: tiny)")
    parser.add_argument("--attention", default=None, choices=["softmax", "gsa"],
                        help="softmax, or gsa (global layers GSA, local layers exact, by default)")
    parser.add_argument("--config", type=Path, help="GSA config file (TOML/JSON/YAML) for --attention gsa")
    parser.add_argument("--tokenizer", type=Path, help="use this saved tokenizer instead of training one")
    parser.add_argument("--vocab-size", type=int, help="tokenizer vocabulary (default: the layout's)")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=16, help="global batch, split across processes")
    parser.add_argument("--block-len", type=int, default=None,
                        help="tokens per row (default 128, or the layout's positions if fewer)")
    parser.add_argument("--context", type=int, default=None, metavar="N",
                        help="the training context: tokens per row (another name for --block-len), e.g. with "
                             "--resume-from at a longer context than the model was trained on")
    parser.add_argument("--resume-from", type=Path, default=None, metavar="MODEL",
                        help="continue training a saved model (gsa train's or gsa convert's output; its layout, "
                             "attention and GSA config), e.g. at --context N after gsa convert --max-positions N")
    parser.add_argument("--positions", default="tile", metavar="NAME",
                        help="rows of the position table past --block-len never learn: at the end remake them as "
                             "copies of the trained rows (tile, default) or cut the table to them (none)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup-steps", type=int, default=20)
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--grad-clip", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-every", type=int, default=0, help="held-out evaluation every N steps (0: end only)")
    parser.add_argument("--eval-blocks", type=int, default=256, help="held-out rows evaluated")
    parser.add_argument("--checkpoint-every", type=int, default=DEFAULT_CHECKPOINT_EVERY,
                        help=f"checkpoint every N steps (default {DEFAULT_CHECKPOINT_EVERY}; 0: only on Ctrl+C, which "
                             "always writes one)")
    parser.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint")
    parser.add_argument("--force", action="store_true",
                        help="train into a non-empty OUT, replacing its model files (an old checkpoint stays until "
                             "this run writes its own)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--json", action="store_true", help="print train.json's summary as JSON")
    parser.set_defaults(handler=run)


def settings_from_args(args: argparse.Namespace) -> Any:
    from gsa_train.loop import TrainSettings

    from gsa_core.config import read_config_file
    from gsa_core.errors import ConfigError

    gsa = None
    block_len = args.block_len
    if args.context is not None:
        if block_len is not None and block_len != args.context:
            raise ConfigError(f"--context {args.context} and --block-len {block_len} are the same setting: give one")
        block_len = args.context
    if args.resume_from is not None:
        given = [flag for flag, value in (("--layout", args.layout), ("--attention", args.attention),
                                          ("--config", args.config), ("--vocab-size", args.vocab_size),
                                          ("--resume", args.resume or None)) if value is not None]
        if given:
            raise ConfigError(f"--resume-from continues a saved model as it is: drop {', '.join(given)} (its layout, "
                              "attention and GSA config are the model's; --resume continues a run in --out)")
    if args.config is not None:
        if args.attention != "gsa":
            raise ConfigError("--config is a GSA config: use it with --attention gsa")
        gsa = read_config_file(args.config)
    chosen = {"layout": args.layout, "attention": args.attention}
    return TrainSettings.build(
        **{k: v for k, v in chosen.items() if v is not None}, out=args.out, corpus=args.corpus, gsa=gsa,
        tokenizer=args.tokenizer, vocab_size=args.vocab_size, steps=args.steps, batch_size=args.batch_size,
        block_len=block_len, resume_from=args.resume_from, positions=args.positions, lr=args.lr,
        warmup_steps=args.warmup_steps, weight_decay=args.weight_decay,
        grad_clip=args.grad_clip, seed=args.seed, eval_every=args.eval_every, eval_blocks=args.eval_blocks,
        checkpoint_every=args.checkpoint_every, resume=args.resume, progress=False if args.no_progress else None,
    )


def run(args: argparse.Namespace) -> int:
    from gsa_data.files import check_destination
    from gsa_train.distributed import DataParallel
    from gsa_train.loop import train

    settings = settings_from_args(args)  # every setting is checked before anything is written
    sources = [p for p in (settings.tokenizer, Path(settings.corpus), settings.resume_from) if p is not None]
    check_destination(settings.out, sources=sources, force=args.force, resume=args.resume, flag="--out")
    with DataParallel.from_env() as dp:
        result = train(settings, dp)
        if not dp.is_main:
            return 0
    m = result.metrics
    summary = {"out": str(result.out), "layout": m["layout"]["name"], "attention": settings.attention,
               "parameters": m["parameters"], "steps": settings.steps, "processes": m["world_size"],
               **m["final"], "seconds": m["seconds"]["total"], "tokens_per_s": m["seconds"]["tokens_per_s"]}
    if args.json:
        print_json(summary)
    else:
        print_table(f"gsa train → {result.out}", ["metric", "value"],
                    [(k, f"{v:.4g}" if isinstance(v, float) else v) for k, v in summary.items()])
    return 0
