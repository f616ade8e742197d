"""The training loop behind ``gsa train``: :class:`TrainSettings` in, :class:`TrainResult` out.

Why one loop for softmax and GSA: the comparison "GSA from scratch vs softmax on the same budget"
is only fair if everything but the attention is identical (data order, schedule, optimiser, clip).
A GSA model is a GPT-Neo converted by the ``gpt-neo`` adapter before the first step, its banks
initialised from its own (random-init) queries and keys with the config's initializer, and adapted
during training by the :class:`~gsa_core.adaptation.controller.AdaptationController`.

Deterministic for a seed: batches are a pure function of ``(seed, step)``
(:func:`gsa_train.data.batch_rows`) and the model has no dropout, so a run resumed from a checkpoint
ends with the same weights as an uninterrupted one, and ``torchrun`` ranks (each taking its shard of
the same global batch, gradients averaged) follow the single-process run up to float rounding.

Safe by construction (docs/safety.md): every setting is validated before anything is written; the
checkpoint (every :data:`DEFAULT_CHECKPOINT_EVERY` steps, and on Ctrl+C) is replaced atomically and
loaded with ``weights_only=True``; the final model is written next to the folder and moved in file by file.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pydantic
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from torch import Tensor, nn

from gsa_core.adaptation.update import apply_update
from gsa_core.config import MAX_SEED, MAX_STEPS
from gsa_core.errors import ConfigError, GSAError, bounded
from gsa_core.registry import format_validation_error
from gsa_train.data import batch_rows, check_corpus, encode_blocks, load_texts
from gsa_train.distributed import DataParallel
from gsa_train.interrupt import DEFAULT_CHECKPOINT_EVERY, StopRequest
from gsa_train.layouts import LAYOUTS, describe, gpt_neo_config, layout
from gsa_train.records import adaptation_point

#: GSA settings used when ``attention="gsa"`` and no config is given: global layers GSA with the exact
#: linear-time kernel backend, local (sliding-window) layers exact softmax, k-means banks, adaptation on.
DEFAULT_GSA: dict[str, Any] = {
    "bank": {"n_splats": 16},
    "backend": "kernel",
    "initializer": {"name": "kmeans", "params": {"scale_factor": 4.0}},
    "adapter": {"name": "gpt-neo", "params": {"global_layers": "gsa", "local_layers": "exact"}},
    "adaptation": {"enabled": True, "window": 20,
                   "scheduler": {"name": "interval", "params": {"start": 40, "every": 40}},
                   "death": "low-mass", "birth": "clone"},
}
CHECKPOINT = "checkpoint"
#: Rows per batch and tokenizer vocabulary beyond which the logits alone exhaust a machine's memory.
MAX_BATCH_SIZE = 4096
MAX_VOCAB_SIZE = 1_000_000
#: What a checkpoint must hold (anything else is another program's file).
CHECKPOINT_KEYS = ("step", "model", "optimizer", "history", "evals", "rng", "settings")


class TrainingDivergedError(GSAError, FloatingPointError):
    """The loss became NaN or infinite."""
#: Settings a resumed run must share with the run that wrote the checkpoint.
RESUME_KEYS = ("corpus", "layout", "attention", "gsa", "batch_size", "block_len", "seed", "vocab_size", "tokenizer",
               "resume_from")


class TrainSettings(BaseModel):
    """Everything one training run depends on (recorded in ``train.json``)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    out: Path = Field(description="folder for the model, tokenizer, checkpoint and train.json")
    corpus: str = Field("stdlib", description="stdlib | a folder of .txt files | hf:NAME")
    layout: str = Field("tiny", description=f"model shape: {', '.join(LAYOUTS)}")
    attention: Literal["softmax", "gsa"] = "softmax"
    gsa: dict[str, Any] | None = Field(None, description="GSA config (dict); None: DEFAULT_GSA")
    tokenizer: Path | None = Field(None, description="use this saved tokenizer instead of training one")
    vocab_size: int | None = Field(None, ge=259, le=MAX_VOCAB_SIZE,
                                   description="tokenizer vocabulary (default: the layout's)")
    steps: int = Field(200, ge=1, le=MAX_STEPS)
    batch_size: int = Field(16, ge=1, le=MAX_BATCH_SIZE, description="global batch (split across torchrun processes)")
    block_len: int | None = Field(None, ge=2, description="tokens per training row (None: 128, or the layout's "
                                  "positions if fewer; always an int after validation)")
    lr: float = Field(1e-3, gt=0)
    warmup_steps: int = Field(20, ge=0, le=MAX_STEPS)
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="cosine decay ends at lr * min_lr_ratio")
    weight_decay: float = Field(0.1, ge=0)
    grad_clip: float | None = Field(1.0, gt=0)
    seed: int = Field(0, ge=0, le=MAX_SEED)
    heldout_fraction: float = Field(0.1, gt=0, lt=1)
    eval_every: int = Field(0, ge=0, le=MAX_STEPS, description="held-out evaluation every N steps (0: at the end only)")
    eval_blocks: int = Field(256, ge=1, le=MAX_STEPS, description="held-out rows evaluated")
    checkpoint_every: int = Field(DEFAULT_CHECKPOINT_EVERY, ge=0, le=MAX_STEPS,
                                  description="checkpoint every N steps (0: only on Ctrl+C)")
    log_every: int = Field(10, ge=1, le=MAX_STEPS)
    calibration_tokens: int = Field(4096, ge=1, le=MAX_STEPS, description="tokens whose q/k initialise the banks (GSA)")
    resume: bool = False
    resume_from: Path | None = Field(
        None, description="continue training this saved model (gsa train's or gsa convert's output: GSA or softmax), "
                          "e.g. at a longer context (block_len) after gsa convert --max-positions; the layout, "
                          "attention and GSA config are the model's",
    )
    positions: str = Field(
        "tile", description="training from scratch with rows shorter than the layout's positions: the table's rows "
                            "past block_len never learn, so at the end they are remade from the trained rows by this "
                            "registered positions strategy, one that keeps the trained rows (tile), or cut off (none)",
    )
    progress: bool | None = Field(None, description="rich progress bar (None: when stderr is a terminal)")
    stop_after: int | None = Field(None, ge=1, description="stop after this step (tests: simulate an interruption)")

    @field_validator("layout")
    @classmethod
    def _known_layout(cls, value: str) -> str:
        layout(value)
        return value

    @field_validator("positions")
    @classmethod
    def _known_positions(cls, value: str) -> str:
        from gsa_core.errors import UnknownComponentError
        from gsa_core.positions import keeps_trained_rows, registered_strategies
        from gsa_core.registry import get_registry

        try:
            get_registry().get("positions", value)
        except UnknownComponentError as exc:
            raise ValueError(str(exc).strip("'\"")) from None
        if not keeps_trained_rows(value):
            fits = [n for n in registered_strategies() if keeps_trained_rows(n)]
            raise ValueError(f"positions {value!r} moves the trained positions (it rebuilds every row), so a model "
                             f"trained from scratch would read its short inputs at other positions; for the rows past "
                             f"block_len use one that keeps the trained rows: {', '.join(fits)} (extend a saved model "
                             f"for a longer context with gsa convert --max-positions N --positions {value})")
        return value

    @field_validator("corpus")
    @classmethod
    def _known_corpus(cls, value: str) -> str:
        return check_corpus(value)

    @field_validator("tokenizer")
    @classmethod
    def _tokenizer_folder(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_dir():
            raise ValueError(f"tokenizer folder {value} " + ("is a file" if value.exists() else "does not exist"))
        return value

    @model_validator(mode="after")
    def _block_fits(self) -> TrainSettings:
        if self.resume_from is not None:
            return self._resumed_model_fits()
        positions = LAYOUTS[self.layout].max_position_embeddings if self.layout in LAYOUTS else None
        if self.block_len is None:
            self.block_len = min(128, positions or 128)
        elif positions is not None and self.block_len > positions:
            raise ValueError(f"block_len {self.block_len} exceeds layout {self.layout!r}'s {positions} positions")
        return self

    def _resumed_model_fits(self) -> TrainSettings:
        """``resume_from`` is a saved model whose positions hold a row (its kind sets ``attention``)."""
        from gsa_core.positions import PositionLimitError, registered_strategies
        from gsa_plugins.adapters.hf import is_gsa_checkpoint, read_checkpoint_config

        assert self.resume_from is not None
        if self.gsa is not None:
            raise ValueError("resume_from continues a saved model with its own GSA config: give no GSA config")
        if self.resume:
            raise ValueError("resume_from starts a new run from a saved model; resume continues a run in --out: "
                             "use one of them")
        data = read_checkpoint_config(self.resume_from)
        if data.get("model_type") not in ("gpt_neo", "gsa_gpt_neo"):
            raise ValueError(f"resume_from {self.resume_from}: gsa train continues GPT-Neo models (converted or not), "
                             f"not model type {data.get('model_type')!r}")
        self.attention = "gsa" if is_gsa_checkpoint(data) else "softmax"
        positions = int(data.get("max_position_embeddings") or 0)
        if self.block_len is None:
            self.block_len = min(128, positions)
        elif self.block_len > positions:
            raise ValueError(str(PositionLimitError(self.block_len, positions, registered_strategies(),
                                                    what=f"a training context of {self.block_len} tokens")))
        return self

    @classmethod
    def build(cls, **values: Any) -> TrainSettings:
        """Validate, turning pydantic's errors into one :class:`ConfigError` naming each bad field."""
        try:
            return cls.model_validate(values)
        except pydantic.ValidationError as exc:
            raise ConfigError(bounded(f"invalid training settings: {format_validation_error(exc)}")) from None

    def gsa_dict(self) -> dict[str, Any]:
        data = dict(DEFAULT_GSA if self.gsa is None else self.gsa)
        data.setdefault("seed", self.seed)
        return data


@dataclass
class TrainResult:
    """What a run produced: where, and the numbers also written to ``train.json``."""

    out: Path
    metrics: dict[str, Any] = field(default_factory=dict)

    @property
    def heldout_ppl(self) -> float:
        return float(self.metrics["final"]["heldout_ppl"])


# ----------------------------------------------------------------------------- pieces
def lr_at(step: int, s: TrainSettings) -> float:
    """Linear warm-up to ``lr``, then cosine decay to ``lr * min_lr_ratio`` at the last step."""
    if step < s.warmup_steps:
        return s.lr * (step + 1) / s.warmup_steps
    span = max(1, s.steps - s.warmup_steps)
    progress = min(1.0, (step - s.warmup_steps) / span)
    return s.lr * (s.min_lr_ratio + (1 - s.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on matrices only; biases, norms, embeddings of positions and splat banks are not decayed."""
    decay, plain = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 and ".gsa." not in f".{name}" and "wpe" not in name else plain).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": plain, "weight_decay": 0.0}]


def load_trained(path: str | os.PathLike[str]) -> Any:
    """A model saved by :func:`train`: GSA checkpoints through ``load_converted``, softmax ones as GPT-Neo."""
    from gsa_plugins.adapters.hf import is_gsa_checkpoint, load_converted, model_load_errors, read_checkpoint_config

    if is_gsa_checkpoint(read_checkpoint_config(path)):
        return load_converted(path)
    from transformers import GPTNeoForCausalLM

    with model_load_errors(path):
        return GPTNeoForCausalLM.from_pretrained(path, attn_implementation="eager", trust_remote_code=False)


def _tokenizer(s: TrainSettings, texts: tuple[str, ...], dp: DataParallel) -> Any:
    from gsa_plugins.adapters.hf import load_tokenizer
    from gsa_train.tokenizer import train_tokenizer

    if s.tokenizer is None and s.resume_from is not None:
        return _tokenizer_of(s.resume_from)
    if s.tokenizer is not None:
        tokenizer = load_tokenizer(s.tokenizer)
        if tokenizer.eos_token_id is None:
            raise ConfigError(f"--tokenizer {s.tokenizer}: the tokenizer has no end-of-text token (eos), which "
                              "training uses between passages")
        return tokenizer
    if s.resume and (s.out / "tokenizer.json").exists():
        return load_tokenizer(s.out)
    if dp.is_main:  # one rank trains it, the others read the same files
        train_tokenizer(texts, s.vocab_size or layout(s.layout).vocab_size,
                        model_max_length=layout(s.layout).max_position_embeddings, save_to=s.out)
    dp.barrier()
    return load_tokenizer(s.out)


def _tokenizer_of(folder: Path) -> Any:
    """The tokenizer saved with a model (``resume_from``), or a message saying to give ``--tokenizer``."""
    from gsa_core.errors import ModelLoadError
    from gsa_plugins.adapters.hf import load_tokenizer

    try:
        tokenizer = load_tokenizer(folder)
    except ModelLoadError as exc:
        raise ConfigError(f"--resume-from {folder}: {exc}; give the model's tokenizer with --tokenizer DIR") from None
    if tokenizer.eos_token_id is None:
        raise ConfigError(f"the tokenizer saved in {folder} has no end-of-text token (eos), which training uses "
                          "between passages; give one with --tokenizer DIR")
    return tokenizer


def _calibrate(model: nn.Module, cfg: Any, blocks: Tensor, tokens: int, batch_size: int) -> dict[str, Any]:
    """Initialise the banks from the model's own queries/keys on training text (the config's initializer)."""
    from gsa_calibrate.collect import collect_qk

    from gsa_core.calibration import calibrate_banks
    from gsa_plugins.adapters import attention_layers, banks

    rows = blocks[: max(1, -(-tokens // blocks.shape[1]))]
    batches = [{"input_ids": b, "attention_mask": torch.ones_like(b)} for b in rows.split(batch_size)]
    vectors = collect_qk(model, attention_layers(model), batches, max_tokens=tokens)
    report = calibrate_banks(banks(model), vectors, (cfg.initializer.name, cfg.initializer.params), seed=cfg.seed)
    return {"initializer": cfg.initializer.name, "tokens": tokens, "seconds": round(report.seconds, 3)}


def build_model(s: TrainSettings, tokenizer: Any, blocks: Tensor) -> tuple[nn.Module, Any, dict[str, Any] | None]:
    """The model at step 0 (same on every rank): GPT-Neo of the layout, converted to GSA if asked."""
    from transformers import GPTNeoForCausalLM

    if s.resume_from is not None:
        return _resumed_model(s, tokenizer)
    config = gpt_neo_config(s.layout, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(s.seed)
    model = GPTNeoForCausalLM(config)
    if s.attention == "softmax":
        return model, None, None
    from gsa_core.config import GSAConfig
    from gsa_plugins.adapters import convert

    cfg = GSAConfig.from_dict(s.gsa_dict(), source="the GSA config of gsa train")
    convert(model, cfg)
    calibration = None if s.resume else _calibrate(model, cfg, blocks, s.calibration_tokens, s.batch_size)
    return model, cfg, calibration


def _resumed_model(s: TrainSettings, tokenizer: Any) -> tuple[nn.Module, Any, None]:
    """The saved model ``resume_from`` as it is (its banks already fitted: no calibration), and its GSA config."""
    from gsa_core.config import GSAConfig

    assert s.resume_from is not None
    model = load_trained(s.resume_from)
    vocab = int(model.get_input_embeddings().num_embeddings)
    if len(tokenizer) > vocab:
        raise ConfigError(f"the tokenizer has {len(tokenizer)} tokens but {s.resume_from} embeds {vocab}: give the "
                          "model's own tokenizer (--tokenizer DIR)")
    cfg = GSAConfig.from_model_config(model.config) if s.attention == "gsa" else None
    return model, cfg, None


@torch.no_grad()
def evaluate(model: nn.Module, blocks: Tensor, batch_size: int, dp: DataParallel) -> dict[str, float]:
    """Mean next-token loss over ``blocks`` (rows split across ranks, token sums all-reduced) and its exp."""
    was = model.training
    model.eval()
    total, count = 0.0, 0
    mine = blocks[dp.rank:: dp.world_size]
    for batch in mine.split(batch_size):
        loss = model(input_ids=batch, labels=batch).loss
        n = batch.shape[0] * (batch.shape[1] - 1)
        total += float(loss) * n
        count += n
    model.train(was)
    total, count = dp.sum(total), dp.sum(count)
    loss = total / max(count, 1)
    return {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "tokens": int(count)}


@contextlib.contextmanager
def _progress(enabled: bool, total: int, start: int) -> Iterator[Any]:
    if not enabled:
        yield None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (TextColumn("train"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
               TextColumn("{task.fields[info]}"))
    with Progress(*columns, transient=False) as bar:
        task = bar.add_task("train", total=total, completed=start, info="")
        yield lambda info: bar.update(task, advance=1, info=info)


def _check_resume(s: TrainSettings, saved: Any) -> None:
    from gsa_core.errors import CheckpointError

    if not isinstance(saved, dict):
        raise CheckpointError(f"the checkpoint in {s.out / CHECKPOINT} records no settings: it is not from gsa train")
    current = s.model_dump(mode="json")
    changed = [k for k in RESUME_KEYS if saved.get(k) != current.get(k)]
    if changed:
        details = ", ".join(f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in changed)
        raise ConfigError(bounded(f"cannot resume {s.out}: settings differ from the checkpoint's ({details})"))


def _restore(path: Path, s: TrainSettings, model: nn.Module,
             optimizer: torch.optim.Optimizer) -> tuple[dict[str, Any], int, list, list]:
    """Load ``state.pt`` (tensors and plain data only) into the model and optimizer: ``(state, step, history,
    evals)``; every problem is a :class:`CheckpointError` naming the file."""
    from gsa_data.files import load_checkpoint

    from gsa_core.errors import CheckpointError

    fix = "delete it (or the folder) and train again without --resume"
    state = load_checkpoint(path, required=CHECKPOINT_KEYS, what="training checkpoint", fix=fix)
    _check_resume(s, state["settings"])
    try:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"])  # the controller's statistics subsample tokens with the global generator
        step, history, evals = int(state["step"]), list(state["history"]), list(state["evals"])
    except (RuntimeError, KeyError, ValueError, TypeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(bounded(f"training checkpoint {path} does not fit this model: {first}; {fix}")) from None
    if not 0 <= step < s.steps:
        raise CheckpointError(f"training checkpoint {path} is at step {step}, outside this run's {s.steps} steps; "
                              f"{fix}")
    return state, step, history, evals


def _save_state(path: Path, step: int, s: TrainSettings, model: nn.Module, optimizer: torch.optim.Optimizer,
                controller: Any, history: list, evals: list, calibration: Any) -> None:
    from gsa_data.files import save_checkpoint

    save_checkpoint({"step": step, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                     "controller": None if controller is None else controller.state_dict(),
                     "history": history, "evals": evals, "calibration": calibration,
                     "rng": torch.get_rng_state(), "settings": s.model_dump(mode="json")}, path)


def _shape_of(model: nn.Module) -> dict[str, Any]:
    """The shape of a model continued from ``resume_from`` (what ``describe`` gives for a layout)."""
    config = model.config
    return {"name": "resumed", "hidden_size": config.hidden_size, "num_layers": config.num_layers,
            "num_heads": config.num_heads, "window_size": config.window_size,
            "max_position_embeddings": config.max_position_embeddings, "vocab_size": config.vocab_size}


# ----------------------------------------------------------------------------- the loop
def train(settings: TrainSettings | dict[str, Any], dp: DataParallel | None = None) -> TrainResult:
    """Train, evaluate on held-out text, save model + tokenizer + ``train.json`` into ``settings.out``.

    ``dp``: a data-parallel context (default: read from ``torchrun``'s environment, closed at the end).
    Only rank 0 writes files; every rank returns the same metrics.
    """
    s = settings if isinstance(settings, TrainSettings) else TrainSettings.build(**settings)
    own = dp is None
    dp = DataParallel.from_env() if dp is None else dp
    try:
        return _train(s, dp)
    finally:
        if own:
            dp.close()


def _train(s: TrainSettings, dp: DataParallel) -> TrainResult:
    from gsa_common import load_average, utc_now

    from gsa_core.errors import OutputPathError

    t_start = time.perf_counter()
    ckpt_path = s.out / CHECKPOINT / "state.pt"
    if s.resume and not ckpt_path.is_file():
        raise ConfigError(f"cannot resume: no checkpoint at {ckpt_path} (a run writes one every "
                          "--checkpoint-every steps and on Ctrl+C)")
    if s.out.exists() and not s.out.is_dir():
        raise OutputPathError(f"--out {s.out} is a file, not a folder")
    # Nothing is deleted: an older run's checkpoint stays until this run's first checkpoint replaces it.
    texts = load_texts(s.corpus, heldout_fraction=s.heldout_fraction)
    try:
        s.out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputPathError(f"cannot create --out {s.out}: {exc.strerror or exc}") from None
    tokenizer = _tokenizer(s, texts.train, dp)
    blocks = encode_blocks(tokenizer, texts.train, s.block_len)
    heldout = encode_blocks(tokenizer, texts.heldout, s.block_len)[: s.eval_blocks]
    if len(blocks) == 0 or len(heldout) == 0:
        raise ConfigError(f"corpus {s.corpus!r} is too small for block_len {s.block_len}: "
                          f"{len(blocks)} training and {len(heldout)} held-out blocks")
    dp.shard_range(s.batch_size)  # fail early when the batch does not split across ranks

    model, cfg, calibration = build_model(s, tokenizer, blocks)
    dp.broadcast_parameters(model)
    model.train()
    optimizer = torch.optim.AdamW(param_groups(model, s.weight_decay), lr=s.lr, betas=(0.9, 0.95))
    start, history, evals, state = 0, [], [], None
    if s.resume:
        state, start, history, evals = _restore(ckpt_path, s, model, optimizer)
        calibration = state.get("calibration")
    controller = None
    if cfg is not None and cfg.adaptation.enabled:
        from gsa_core.adaptation.controller import AdaptationController

        # created after the optimizer's state is loaded: load_state_dict replaces the param-group dicts, and
        # the controller's per-slot Adam correction keeps references to the groups it was given
        controller = AdaptationController(model, cfg, optimizer)
        if state is not None and state.get("controller") is not None:
            from gsa_core.errors import CheckpointError

            try:
                controller.load_state_dict(state["controller"])
            except (KeyError, TypeError, ValueError, AttributeError, RuntimeError) as exc:
                raise CheckpointError(f"training checkpoint {ckpt_path}: its adaptation state does not fit ({exc!r});"
                                      " delete it and train again without --resume") from None

    def save_state(step: int) -> None:
        if dp.is_main:
            _save_state(ckpt_path, step, s, model, optimizer, controller, history, evals, calibration)
        dp.barrier()

    show = (sys.stderr.isatty() if s.progress is None else s.progress) and dp.is_main
    end = min(s.steps, s.stop_after or s.steps)
    t_loop, tokens_seen, losses = time.perf_counter(), 0, []
    with _progress(show, s.steps, start) as tick, StopRequest("training") as stop:
        for step in range(start, end):
            lr = lr_at(step, s)
            for group in optimizer.param_groups:
                group["lr"] = lr
            ids = blocks[dp.shard(batch_rows(len(blocks), s.batch_size, step, s.seed))]
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            update = apply_update(optimizer, step, controller=controller,
                                  average_gradients=lambda: dp.average_gradients(model),
                                  max_grad_norm=s.grad_clip, parameters=model.parameters())
            grad_norm = float("nan") if update.grad_norm is None else update.grad_norm
            value = dp.mean(loss.detach())
            if not math.isfinite(value):
                raise TrainingDivergedError(f"training loss became {value} at step {step}; try a lower --lr")
            losses.append(value)
            tokens_seen += s.batch_size * s.block_len
            if (step + 1) % s.log_every == 0 or step + 1 == s.steps:
                history.append({"step": step + 1, "loss": round(sum(losses) / len(losses), 5), "lr": lr,
                                "grad_norm": round(grad_norm, 4), **adaptation_point(model, controller)})
                losses = []
            if s.eval_every and (step + 1) % s.eval_every == 0 and step + 1 < s.steps:
                evals.append({"step": step + 1, **evaluate(model, heldout, s.batch_size, dp)})
            if tick is not None:
                tick(f"loss {value:.3f}")
            if step + 1 < s.steps and stop.agreed(dp):
                save_state(step + 1)
                raise StopRequest.interrupted(step + 1, s.steps, ckpt_path,
                                              "the same gsa train command with --resume")
            if s.checkpoint_every and (step + 1) % s.checkpoint_every == 0 and step + 1 < s.steps:
                save_state(step + 1)
    train_seconds = time.perf_counter() - t_loop
    if end < s.steps:  # stopped early on purpose: leave the checkpoint, write nothing final
        return TrainResult(s.out, {"stopped_at": end})

    final = evaluate(model, heldout, s.batch_size, dp)
    n_params = sum(p.numel() for p in model.parameters())
    metrics: dict[str, Any] = {
        "settings": s.model_dump(mode="json"),
        "gsa_config": None if cfg is None else cfg.to_dict(),
        "layout": describe(s.layout) if s.resume_from is None else _shape_of(model),
        "corpus": {"source": texts.source, "documents": texts.n_documents, "train_passages": len(texts.train),
                   "heldout_passages": len(texts.heldout), "train_blocks": len(blocks),
                   "train_tokens": int(blocks.numel()), "heldout_blocks": len(heldout),
                   "heldout_tokens": int(heldout.numel())},
        "tokenizer": {"vocab_size": len(tokenizer), "trained": s.tokenizer is None},
        "parameters": n_params,
        "world_size": dp.world_size,
        "resumed_from": start if s.resume else None,
        "calibration": calibration,
        "history": history,
        "evals": evals,
        "final": {"step": s.steps, "train_loss": history[-1]["loss"] if history else None,
                  "heldout_loss": final["loss"], "heldout_ppl": final["ppl"], "heldout_tokens": final["tokens"]},
        "adaptation": None if controller is None else controller.report(),
        "seconds": {"total": round(time.perf_counter() - t_start, 2), "train": round(train_seconds, 2),
                    "tokens_per_s": round(tokens_seen / max(train_seconds, 1e-9), 1)},
        "load_average": load_average(),
        "finished": utc_now(),
    }
    from gsa_plugins.adapters.positions import keep_trained_positions, record_training_context

    if s.resume_from is None:  # rows past block_len were never trained: remake them from the trained ones
        metrics["positions"] = {"trained": s.block_len, "strategy": s.positions,
                                "table": keep_trained_positions(model, s.block_len, s.positions)}
    else:
        record_training_context(model, s.block_len)
    if controller is not None:
        controller.remove_hooks()
    if dp.is_main:
        from gsa_data.files import publish, staging_dir

        with staging_dir(s.out) as staged:  # moved in file by file once complete: never half a model
            model.save_pretrained(staged)
            tokenizer.save_pretrained(staged)
            (staged / "train.json").write_text(json.dumps(metrics, indent=2, default=str) + "\n")
            publish(staged, s.out)
    dp.barrier()
    return TrainResult(s.out, metrics)


__all__ = ["DEFAULT_CHECKPOINT_EVERY", "DEFAULT_GSA", "TrainResult", "TrainSettings", "TrainingDivergedError",
           "build_model", "evaluate", "load_trained", "lr_at", "train"]
