"""``gsa convert SRC DST [--config FILE] [--max-positions N --positions NAME]``: convert a Hugging Face model to
GSA and save it; with ``--max-positions``, also extend its learned position table by a named strategy (a model
that is already a GSA checkpoint only gets its positions extended)."""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path
from typing import Any

from gsa_cli.output import print_json

TOKENIZER_PREFIXES = ("tokenizer", "vocab", "merges", "special_tokens_map", "added_tokens", "spiece", "sentencepiece")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", help="model folder (or hub id, where the hub is reachable)")
    parser.add_argument("dst", type=Path, help="folder to write the converted model to")
    parser.add_argument("--config", type=Path, help="GSA config file (TOML/JSON/YAML); default: all defaults")
    parser.add_argument("--adapter", help="adapter name (default: the config's, else detected from the model)")
    parser.add_argument("--passthrough", action="store_true",
                        help="convert with GSA switched off (outputs identical to the original)")
    parser.add_argument("--verify", action="store_true",
                        help="reload DST and check it reproduces the converted model (and, with --passthrough, "
                             "the original) exactly")
    parser.add_argument("--max-positions", type=int, metavar="N",
                        help="extend the learned position table to N positions (docs/long-context.md); SRC may be "
                             "a GSA checkpoint, which then only gets its positions extended")
    parser.add_argument("--positions", metavar="NAME",
                        help="the position extension strategy for --max-positions: interpolate, tile, none or a "
                             "plugin's (default: the config's long_context.positions)")
    parser.add_argument("--force", action="store_true",
                        help="write into a non-empty DST, replacing the files of the same names")
    parser.add_argument("--json", action="store_true", help="print a JSON summary")
    parser.set_defaults(handler=run)


def _load_source(src: str) -> Any:
    import transformers
    from transformers import AutoConfig, AutoModel

    from gsa_plugins.adapters import load_kwargs

    config = AutoConfig.from_pretrained(src, trust_remote_code=False)
    arch = (getattr(config, "architectures", None) or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    if not isinstance(cls, type):
        cls = AutoModel
    # the attention implementation its adapter wraps; never code from the folder
    return cls.from_pretrained(src, trust_remote_code=False, **load_kwargs(config))


def _copy_tokenizer(src: str, dst: Path) -> list[str]:
    folder = Path(src)
    if not folder.is_dir():
        return []
    copied = []
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.name.startswith(TOKENIZER_PREFIXES) and not (dst / path.name).exists():
            shutil.copy2(path, dst / path.name)
            copied.append(path.name)
    return copied


def _probe(model: Any) -> Any:
    import torch

    vocab = int(getattr(model.config, "vocab_size", 100) or 100)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (2, 12), generator=generator)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask)
    return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


def positions_request(args: argparse.Namespace, cfg: Any) -> tuple[str, dict[str, Any]] | None:
    """``(strategy, params)`` for ``--max-positions``, checked before anything is loaded; None without it."""
    from gsa_core.errors import ConfigError
    from gsa_core.registry import get_registry

    if args.max_positions is None:
        if args.positions is not None:
            raise ConfigError("--positions NAME names how to extend the position table: give --max-positions N too")
        return None
    if args.max_positions < 1:
        raise ConfigError(f"--max-positions must be a positive number of positions, got {args.max_positions}")
    configured = cfg.long_context.positions
    if args.positions is None and configured.name == "none" and args.config is None:
        names = ", ".join(get_registry().names("positions"))
        raise ConfigError(f"--max-positions {args.max_positions} needs a strategy: --positions NAME (one of {names})")
    name = args.positions or configured.name
    get_registry().get("positions", name)  # an unknown name: the error lists the names, with a did-you-mean
    return name, (dict(configured.params) if name == configured.name else {})


def _extend(model: Any, request: tuple[str, dict[str, Any]] | None, max_positions: int | None) -> dict[str, Any]:
    """Extend ``model``'s positions as asked; what the summary reports about it."""
    from gsa_plugins.adapters.positions import extend_positions, position_limit

    if request is None:
        return {}
    before = position_limit(model)
    extend_positions(model, int(max_positions), request[0], request[1])  # type: ignore[arg-type]
    return {"positions": {"strategy": request[0], "params": request[1], "from": before, "to": position_limit(model)}}


def run(args: argparse.Namespace) -> int:
    from gsa_data.files import check_destination, publish, staging_dir

    from gsa_core.config import GSAConfig
    from gsa_core.errors import ConfigError, ModelLoadError
    from gsa_plugins.adapters import convert, detect_adapter, gsa_layers, load_converted
    from gsa_plugins.adapters.base import as_gsa_config
    from gsa_plugins.adapters.hf import is_gsa_checkpoint, model_load_errors, read_checkpoint_config

    cfg = as_gsa_config(args.config) if args.config else GSAConfig()  # config errors before the slow load
    positions = positions_request(args, cfg)
    check_destination(args.dst, sources=[args.src], force=args.force)  # before anything is loaded or written
    already = is_gsa_checkpoint(read_checkpoint_config(args.src))
    if already and positions is None:
        raise ModelLoadError(f"{args.src} is already a GSA checkpoint: convert the original model, go on fitting "
                             f"this one with gsa distill {args.src} DST, or extend its positions with --max-positions")
    if already and (args.config or args.adapter or args.passthrough):
        raise ConfigError(f"{args.src} is already a GSA checkpoint: with --max-positions only its positions are "
                          "extended; drop --config, --adapter and --passthrough (its GSA config stays as saved)")
    start = time.perf_counter()
    if already:
        model = load_converted(args.src).eval()
        original_class = type(model).__name__
        reference = table_before = None
    else:
        with model_load_errors(args.src):
            model = _load_source(args.src).eval()
        if args.passthrough:
            name = args.adapter or (cfg.adapter.name if cfg.adapter else None) or detect_adapter(model).name
            params = dict(cfg.adapter.params) if cfg.adapter and cfg.adapter.name == name else {}
            cfg = cfg.with_updates(adapter={"name": name, "params": {**params, "passthrough": True}})
        reference = _probe(model) if args.verify and args.passthrough else None
        original_class = type(model).__name__
        convert(model, cfg, adapter=args.adapter)
        table_before = _position_rows(model)
    extended = _extend(model, positions, args.max_positions)
    if positions is not None and reference is not None and not _prefix_kept(model, table_before):
        reference = None  # the strategy moved the trained positions: the original is no longer the reference
        extended["positions"]["passthrough_check"] = "skipped: the strategy changes the trained positions"
    with staging_dir(args.dst) as staged:  # each file moved in once complete: never half a model in DST
        model.save_pretrained(staged)
        tokenizer_files = _copy_tokenizer(args.src, staged)
        publish(staged, args.dst)
    adapter = model.config.gsa["adapter"]
    summary: dict[str, Any] = {
        "src": args.src, "dst": str(args.dst), "model": original_class, "saved_as": type(model).__name__,
        "adapter": adapter["name"], "gsa_layers": len(gsa_layers(model)),
        "passthrough": bool(adapter["params"].get("passthrough")), "tokenizer_files": tokenizer_files, **extended,
    }
    if args.verify:
        converted = _probe(model)
        again = load_converted(args.dst).eval()
        summary["reload_max_abs_diff"] = float((_probe(again) - converted).abs().max())
        if reference is not None:
            summary["passthrough_max_abs_diff"] = float((converted - reference).abs().max())
        diffs = (summary["reload_max_abs_diff"], summary.get("passthrough_max_abs_diff", 0.0))
        summary["verified"] = all(d == 0.0 for d in diffs)
    summary["seconds"] = round(time.perf_counter() - start, 2)
    if args.json:
        print_json(summary)
    else:
        what = "extended" if already else f"converted {original_class} with adapter {summary['adapter']!r}:"
        off = " (passthrough)" if summary["passthrough"] else ""
        layers = "" if already else f" {summary['gsa_layers']} GSA layers{off}"
        moved = extended.get("positions")
        span = f" positions {moved['from']} -> {moved['to']} ({moved['strategy']})" if moved else ""
        print(f"{what}{layers}{span} -> {args.dst}")
        if args.verify:
            line = f"reload max abs diff {summary['reload_max_abs_diff']}"
            if "passthrough_max_abs_diff" in summary:
                line += f", passthrough vs original {summary['passthrough_max_abs_diff']}"
            print(line)
    return 0 if summary.get("verified", True) else 1


def _position_rows(model: Any) -> Any:
    """A copy of the model's position table (None when it has none), to see whether an extension kept it."""
    from gsa_plugins.adapters.positions import position_table

    table = position_table(model)
    return None if table is None else table.module.weight.detach().clone()


def _prefix_kept(model: Any, before: Any) -> bool:
    after = _position_rows(model)
    return before is not None and after is not None and bool((after[: before.shape[0]] == before).all())
