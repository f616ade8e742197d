"""One distillation run: load, convert, calibrate, stage 1 (splats vs the frozen original, layer by layer),
optional stage 2 (task loss with LoRA or full fine-tuning), checkpoints, report, save.

Why this order: calibration puts splats where the queries and keys are; stage 1 then fits each layer's
attention output on the original inputs (cheap, no error compounding); stage 2 fixes what compounds
through the network, against the frozen original's outputs. Data parallel under ``torchrun`` through
``gsa_train.distributed.DataParallel`` (each process takes its rows of the same global batch; gradients
are averaged, losses normalised by global counts, so the run equals the single-process one).
"""

from __future__ import annotations

import copy
import json
import random
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from gsa_train.records import adaptation_point
from torch import Tensor, nn

from gsa_core.adaptation.update import apply_update
from gsa_core.config import GSAConfig
from gsa_core.errors import CheckpointError, ConfigError, bounded
from gsa_distill import checkpoint
from gsa_distill.evaluate import embedding_agreement, mean_pool, sentence_embeddings
from gsa_distill.regularisers import regularisation
from gsa_distill.settings import DistillSettings
from gsa_distill.taps import LayerTaps, layer_errors

SCHEMA = "gsa-distill/1"


# ----------------------------------------------------------------------------- loading and data
def load_source(source: str) -> tuple[nn.Module, Any]:
    """A Hugging Face model folder as ``(model, tokenizer)``: a causal LM when its config says so, an
    encoder-decoder as the class its config names, else the bare encoder (``AutoModel``); with the attention
    implementation its adapter needs (``gsa_plugins.adapters.load_kwargs``)."""
    import transformers
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    from gsa_plugins.adapters import load_kwargs
    from gsa_plugins.adapters.hf import (
        is_gsa_checkpoint,
        load_converted,
        load_tokenizer,
        model_load_errors,
        read_checkpoint_config,
    )

    path = Path(source)
    if not path.is_dir():
        raise ConfigError(f"source model folder not found: {source} (give a folder saved with save_pretrained)")
    data = read_checkpoint_config(path)  # a model folder with intact weights
    tokenizer = load_tokenizer(path)  # never follows an auto_map (docs/safety.md)
    if is_gsa_checkpoint(data):  # already converted: distillation goes on fitting its splats
        return load_converted(path).eval(), _with_pad(tokenizer)
    with model_load_errors(path):
        config = AutoConfig.from_pretrained(path, trust_remote_code=False)
        causal = bool(getattr(config, "is_decoder", False)) or any(
            a.endswith("ForCausalLM") for a in (getattr(config, "architectures", None) or []))
        cls: Any = AutoModelForCausalLM if causal else AutoModel
        if getattr(config, "is_encoder_decoder", False):  # no Auto class loads a composite: the one it names
            named = getattr(transformers, (getattr(config, "architectures", None) or [""])[0], None)
            cls = named if isinstance(named, type) else cls
        model = cls.from_pretrained(path, trust_remote_code=False, **load_kwargs(config))
    return model.eval(), _with_pad(tokenizer)


def _with_pad(tokenizer: Any) -> Any:
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def training_texts(settings: DistillSettings) -> tuple[list[str], list[str]]:
    """``(train passages, held-out passages)``: documents split by ``gsa_data.split_documents`` (the held-out
    ones are never calibrated or trained on), shuffled with the seed."""
    from gsa_data import load_corpus, pack_passages, split_documents

    if settings.texts is not None:
        texts = [t for t in settings.texts if t.strip()]
        if len(texts) < 2:
            raise ConfigError("distillation needs at least two texts (one is held out)")
        n_held = max(1, round(len(texts) * settings.heldout_fraction))
        train, held = texts[:-n_held], texts[-n_held:]
    else:
        try:
            documents = load_corpus(settings.corpus)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot read corpus {settings.corpus!r}: {exc}") from None
        split = split_documents(documents, settings.heldout_fraction)
        train = pack_passages(split.train, max_chars=settings.passage_chars)
        held = pack_passages(split.heldout, max_chars=settings.passage_chars)
    rng = random.Random(settings.seed)
    rng.shuffle(train)
    rng.shuffle(held)
    return train, held


def batch_order(n_batches: int, step: int, seed: int) -> int:
    """The batch index used at ``step``: a fresh seeded permutation each epoch (a function of the step only,
    so a resumed run reads the same batches as an uninterrupted one)."""
    epoch, pos = divmod(step, n_batches)
    order = list(range(n_batches))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return order[pos]


def with_window(model: nn.Module, cfg: GSAConfig, window: int) -> GSAConfig:
    """``cfg`` with every self-attention layer in hybrid mode: exact within ``window`` keys, GSA beyond (any
    adapter: its ``hybrid_params``)."""
    from gsa_core.config import AdapterSpec
    from gsa_core.registry import get_registry
    from gsa_plugins.adapters import detect_adapter

    name = cfg.adapter.name if cfg.adapter is not None else detect_adapter(model).name
    params = dict(cfg.adapter.params) if cfg.adapter is not None else {}
    adapter = get_registry().build("adapter", name, params)
    params = adapter.hybrid_params(model, params, window)
    return cfg.model_copy(update={"adapter": AdapterSpec(name=name, params=params)})


# ----------------------------------------------------------------------------- helpers
class _Progress:
    """A rich progress bar, or nothing (off when stderr is not a terminal unless asked)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._bar: Any = None

    def __enter__(self) -> _Progress:
        if self.enabled:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self._bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[info]}"), TimeRemainingColumn(),
                                 console=Console(stderr=True), transient=False)
            self._bar.__enter__()
        return self

    def task(self, description: str, total: int, completed: int = 0) -> Any:
        return None if self._bar is None else self._bar.add_task(description, total=total, completed=completed,
                                                                 info="")

    def update(self, task: Any, info: str) -> None:
        if self._bar is not None and task is not None:
            self._bar.update(task, advance=1, info=info)

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)


class _LazyBatches:
    """Token batches of a long text list, tokenised on first use (a run reads only the batches its steps need)."""

    def __init__(self, tokenizer: Any, texts: list[str], batch_size: int, max_length: int,
                 inputs: Callable[[dict[str, Tensor]], dict[str, Tensor]] = dict) -> None:
        self.tokenizer, self.texts, self.batch_size, self.max_length = tokenizer, texts, batch_size, max_length
        self.inputs = inputs  # token batch -> forward keyword arguments (the adapter's forward_inputs)
        self._cache: dict[int, dict[str, Tensor]] = {}

    def __len__(self) -> int:
        return -(-len(self.texts) // self.batch_size)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        if not 0 <= index < len(self):
            raise IndexError(index)
        if index not in self._cache:
            from gsa_calibrate.collect import token_batches

            rows = self.texts[index * self.batch_size:(index + 1) * self.batch_size]
            self._cache[index] = self.inputs(token_batches(self.tokenizer, rows, batch_size=self.batch_size,
                                                           max_length=self.max_length)[0])
        return self._cache[index]

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        return (self[i] for i in range(len(self)))


def _to(batch: Mapping[str, Tensor], device: torch.device) -> dict[str, Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


def _bank_params(layers: Mapping[str, Any]) -> list[nn.Parameter]:
    return [p for layer in layers.values() for p in layer.bank.parameters()]


def _make_controller(model: nn.Module, cfg: Any, optimizer: torch.optim.Optimizer) -> Any:
    from gsa_core.adaptation.controller import controller_for

    return controller_for(model, cfg, optimizer)


# ----------------------------------------------------------------------------- the run
class Distiller:
    """Runs :func:`distill`; kept as an object so tests and benchmarks can reach the model and the state."""

    def __init__(self, settings: DistillSettings, *, model: nn.Module | None = None, tokenizer: Any = None,
                 log: Callable[[str], None] | None = None) -> None:
        from gsa_train.distributed import DataParallel

        self.s = settings
        self.dp = DataParallel.from_env()
        self.log = log if log is not None else (lambda msg: print(msg, file=sys.stderr, flush=True))
        self.ckpt_dir = None if settings.output is None else Path(settings.output) / "checkpoints"
        self._resume = self._load_resume()  # a damaged or mismatched checkpoint fails before the slow model load
        if model is None:
            model, tokenizer = load_source(settings.source)
        if tokenizer is None:
            raise ConfigError("distill() needs a tokenizer with the model")
        positions = getattr(getattr(model, "config", None), "max_position_embeddings", None)
        if isinstance(positions, int) and settings.max_length > positions:
            raise ConfigError(f"max_length {settings.max_length} exceeds the model's {positions} positions: use "
                              f"--max-length {positions} or less")
        self.model, self.tokenizer = model, tokenizer
        self.report: dict[str, Any] = {"schema": SCHEMA, "settings": settings.model_dump(mode="json")}
        self.timings: dict[str, float] = {}
        progress = settings.progress
        self.progress = (sys.stderr.isatty() if progress is None else progress) and self.dp.is_main

    # ------------------------------------------------------------ pieces
    def _info(self, msg: str) -> None:
        if self.dp.is_main:
            self.log(msg)

    def convert(self) -> None:
        from gsa_plugins.adapters import convert, gsa_layers, is_converted

        torch.manual_seed(self.s.seed)
        if is_converted(self.model) and self.s.window is not None:
            raise ConfigError("settings.window applies at conversion, but the model given is already converted: pass "
                             "the original model, or set its layers to 'hybrid' when converting")
        if not is_converted(self.model):
            cfg = self.s.gsa_config().model_copy(update={"seed": self.s.seed})
            if self.s.window is not None:
                cfg = with_window(self.model, cfg, self.s.window)
            self.model = convert(self.model, cfg)
        self.layers = gsa_layers(self.model)
        if not self.layers:
            raise ConfigError("the converted model has no GSA layers (every layer is 'exact'); nothing to distil")
        self.cfg = GSAConfig.from_model_config(self.model.config)
        self.causal = any(layer.causal for layer in self.layers.values())

    def data(self) -> None:
        from gsa_calibrate.collect import token_batches

        from gsa_plugins.adapters import adapter_for

        train, held = training_texts(self.s)
        if not train:
            raise ConfigError(f"corpus {self.s.corpus!r} gives no training text: give a folder with more .txt files")
        adapter = adapter_for(self.model)

        def inputs(batch: dict[str, Tensor]) -> dict[str, Tensor]:
            return adapter.forward_inputs(self.model, batch)

        self.train_batches = _LazyBatches(self.tokenizer, train, self.s.batch_size, self.s.max_length, inputs)
        n_eval = self.s.eval_batches * self.s.batch_size
        self.eval_batches = [inputs(b) for b in token_batches(self.tokenizer, held[:n_eval],
                                                              batch_size=self.s.batch_size,
                                                              max_length=self.s.max_length)]
        self.report["data"] = {"train_passages": len(train), "heldout_passages": len(held),
                               "train_batches": len(self.train_batches), "eval_batches": len(self.eval_batches)}

    def calibrate(self) -> None:
        from gsa_calibrate.collect import collect_qk

        from gsa_core.calibration import calibrate_banks
        from gsa_plugins.adapters import attention_layers, banks, set_passthrough

        t0 = time.perf_counter()
        set_passthrough(self.model, True)
        need = self.s.calib_tokens
        batches = []
        for b in self.train_batches:  # the first batches until calib_tokens real tokens
            batches.append(b)
            need -= int(b["attention_mask"].sum())
            if need <= 0:
                break
        vectors = collect_qk(self.model, attention_layers(self.model), batches, max_tokens=self.s.calib_tokens)
        # the adapter's capture points are the self-attention layers; cross-attention banks (keys from another
        # sequence) keep the splats they got at conversion, and stage 1 trains them like the others
        every = banks(self.model)
        report = calibrate_banks({n: b for n, b in every.items() if n in vectors}, vectors,
                                 (self.s.initializer, self.s.initializer_params), seed=self.s.seed)
        self.timings["calibration_s"] = time.perf_counter() - t0
        self.report["calibration"] = {**report.to_dict(), "not_calibrated": sorted(set(every) - set(vectors))}

    def eval_layers(self, label: str) -> None:
        if self.eval_batches:
            self.report.setdefault("layer_error", {})[label] = layer_errors(self.model, self.layers,
                                                                           self.eval_batches)

    def eval_embeddings(self, label: str, teacher: nn.Module | None = None) -> None:
        """Held-out mean-pooled embedding cosine of an encoder (GSA on) against its original (passthrough)."""
        from gsa_plugins.adapters import set_passthrough

        if self.causal or not self.eval_batches:
            return
        if teacher is None:
            set_passthrough(self.model, True)
            ref = sentence_embeddings(self.model, self.eval_batches)
        else:
            ref = sentence_embeddings(teacher, self.eval_batches)
        set_passthrough(self.model, False)
        got = sentence_embeddings(self.model, self.eval_batches)
        self.report.setdefault("embedding", {})[label] = embedding_agreement(ref, got)

    def _save_ckpt(self, stage: int, step: int, optimizer: torch.optim.Optimizer, controller: Any,
                   history: list[dict[str, Any]]) -> None:
        if self.ckpt_dir is None or not self.dp.is_main:
            return
        checkpoint.save(self.ckpt_dir, {
            "stage": stage, "step": step, "model": checkpoint.trainable_state(self.model),
            "optimizer": optimizer.state_dict(), "controller": None if controller is None else controller.state_dict(),
            "history": history, "report": self.report, "timings": self.timings,
        })

    def _global_batch(self, step: int) -> dict[str, Tensor]:
        idx = batch_order(len(self.train_batches), step, self.s.seed)
        batch = self.train_batches[idx]
        if self.dp.active:
            rows = batch["input_ids"].shape[0]
            if rows % self.dp.world_size:  # the last, smaller batch: drop the rows that do not divide
                keep = rows - rows % self.dp.world_size
                batch = {k: v[:keep] for k, v in batch.items()}
            batch = self.dp.shard(batch)
        return batch

    # ------------------------------------------------------------ stage 1
    def _update(self, step: int, params: list[nn.Parameter], optimizer: torch.optim.Optimizer, controller: Any) -> None:
        """After backward: the one update (``gsa_core.adaptation.apply_update``), gradients averaged across ranks."""
        apply_update(optimizer, step, controller=controller,
                     average_gradients=lambda: self.dp.average_gradients(params))

    def _restore(self, resume: dict[str, Any] | None, optimizer: torch.optim.Optimizer,
                 controller: Any) -> tuple[int, list[dict[str, Any]]]:
        """Load a stage's checkpoint (trainable weights, optimizer, controller); the step and history to go on
        from (``0, []`` for a fresh start)."""
        if resume is None:
            return 0, []
        source = self.ckpt_dir / checkpoint.FILE if self.ckpt_dir is not None else "checkpoint"
        checkpoint.load_trainable_state(self.model, resume["model"], source)
        try:
            optimizer.load_state_dict(resume["optimizer"])
            if controller is not None and resume["controller"] is not None:
                controller.load_state_dict(resume["controller"])
            return int(resume["step"]), list(resume["history"])
        except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as exc:
            raise CheckpointError(bounded(f"{source} does not fit this run ({type(exc).__name__}: {exc}); "
                                          f"{checkpoint.FIX}")) from None

    def _interrupt_if_asked(self, stage: int, step: int, steps: int, optimizer: torch.optim.Optimizer,
                            controller: Any, history: list[dict[str, Any]]) -> None:
        """After a step: on Ctrl+C (any rank), write the checkpoint and stop with how to resume (exit 130)."""
        stop = getattr(self, "_stop", None)
        if stop is None or step >= steps or not stop.agreed(self.dp):
            return
        from gsa_train.interrupt import StopRequest

        if self.ckpt_dir is None:
            raise KeyboardInterrupt
        self._save_ckpt(stage, step, optimizer, controller, history)
        self.dp.barrier()
        raise StopRequest.interrupted(step, steps, self.ckpt_dir / checkpoint.FILE,
                                      f"the same gsa distill command with --resume (stage {stage})")

    def stage1(self, resume: dict[str, Any] | None) -> None:
        from gsa_plugins.adapters import set_passthrough

        steps = self.s.stage1_steps
        self.model.requires_grad_(False)
        params = _bank_params(self.layers)
        for p in params:
            p.requires_grad_(True)
        optimizer = torch.optim.Adam(params, lr=self.s.stage1_lr)
        controller = _make_controller(self.model, self.cfg, optimizer)
        start, history = self._restore(resume, optimizer, controller)
        set_passthrough(self.model, True)
        self.model.eval()
        for layer in self.layers.values():
            layer.train()  # the controller observes training-mode GSA forwards
        device = params[0].device
        banks = {n: layer.bank for n, layer in self.layers.items()}
        t0 = time.perf_counter()
        stop = self._stop_at(start, steps)
        with _Progress(self.progress) as bar, LayerTaps(self.layers) as taps:
            task = bar.task("stage 1: splats vs original", steps, start)
            for step in range(start, stop):
                batch = _to(self._global_batch(step), device)
                taps.start(batch["attention_mask"])
                self.model(**batch)
                ref = {n: self.dp.sum(taps.ref[n]) for n in self.layers}
                per_layer = [taps.err[n] / max(ref[n], 1e-30) for n in self.layers]
                loss = torch.stack(per_layer).mean() * self.dp.world_size
                reg, reg_values = regularisation(banks, self.s.regularisers)
                total = loss if reg is None else loss + reg
                total.backward()
                self._update(step, params, optimizer, controller)
                value = self.dp.sum(loss.detach()) / self.dp.world_size  # the global relative MSE
                if step % self.s.log_every == 0 or step == steps - 1:
                    history.append({"step": step, "rel_mse": value, **reg_values,
                                    **adaptation_point(self.model, controller)})
                bar.update(task, f"rel. MSE {value:.4f}")
                if (step + 1) % self.s.checkpoint_every == 0 or step + 1 == steps:
                    self._save_ckpt(1, step + 1, optimizer, controller, history)
                self._interrupt_if_asked(1, step + 1, steps, optimizer, controller, history)
        for layer in self.layers.values():
            layer.train(False)
        if controller is not None:
            self.report["adaptation_stage1"] = controller.report()
            controller.remove_hooks()
        self.timings["stage1_s"] = self.timings.get("stage1_s", 0.0) + time.perf_counter() - t0
        self.report["stage1"] = {"steps": steps, "lr": self.s.stage1_lr, "history": history}
        self.finished = stop >= steps

    def _stop_at(self, start: int, steps: int) -> int:
        budget = getattr(self, "_budget_left", None)
        if budget is None:
            return steps
        stop = min(steps, start + budget)
        self._budget_left = budget - (stop - start)
        return stop

    # ------------------------------------------------------------ stage 2
    def _task_loss(self) -> str:
        loss = self.s.task_loss
        if loss == "auto":
            return "logit-kl" if self.causal else "embedding-cosine"
        if loss == "embedding-cosine" and self.causal:
            raise ConfigError("task_loss 'embedding-cosine' is for encoders; use next-token or logit-kl for a causal "
                              "LM")
        if loss in ("next-token", "logit-kl") and not self.causal:
            raise ConfigError(f"task_loss {loss!r} needs a causal LM; use embedding-cosine for an encoder")
        return loss

    def stage2(self, resume: dict[str, Any] | None) -> None:
        from gsa_plugins.adapters import adapter_for, gsa_layers, set_passthrough

        kind, steps = self.s.stage2, self.s.stage2_steps
        loss_name = self._task_loss()
        teacher = copy.deepcopy(self.model)
        set_passthrough(teacher, True)
        teacher.requires_grad_(False).eval()
        for layer in gsa_layers(teacher).values():
            layer.teacher = None
        set_passthrough(self.model, False)
        self.model.requires_grad_(False)
        if kind == "lora":
            from peft import LoraConfig, get_peft_model

            targets = self.s.lora_targets or adapter_for(self.model).lora_targets(self.model)
            if not targets:
                raise ValueError(f"adapter {adapter_for(self.model).name!r} names no LoRA target modules for this "
                                 "model: set lora_targets")
            lora = LoraConfig(r=self.s.lora_rank, lora_alpha=self.s.lora_alpha, target_modules=targets,
                              lora_dropout=0.0)
            torch.manual_seed(self.s.seed + 1)  # LoRA's init draws from the global generator: same on every rank
            self.model = get_peft_model(self.model, lora)
            host_params = [p for n, p in self.model.named_parameters() if "lora_" in n]
        else:
            host_params = [p for n, p in self.model.named_parameters() if ".bank." not in n]
        for p in host_params:
            p.requires_grad_(True)
        splat_params = _bank_params(self.layers)
        for p in splat_params:
            p.requires_grad_(True)
        optimizer = torch.optim.Adam([{"params": host_params, "lr": self.s.lr2()},
                                      {"params": splat_params, "lr": self.s.lr_splats2()}])
        controller = _make_controller(self.model, self.cfg, optimizer)
        start, history = self._restore(resume, optimizer, controller)
        self.model.eval()
        for layer in self.layers.values():
            layer.train()
        device = splat_params[0].device
        all_params = host_params + splat_params
        t0 = time.perf_counter()
        stop = self._stop_at(start, steps)
        with _Progress(self.progress) as bar:
            task = bar.task(f"stage 2: {kind}, {loss_name}", steps, start)
            for step in range(start, stop):
                batch = _to(self._global_batch(step), device)
                loss = self._stage2_loss(loss_name, teacher, batch)
                loss.backward()
                self._update(step, all_params, optimizer, controller)
                value = self.dp.mean(loss.detach())
                if step % self.s.log_every == 0 or step == steps - 1:
                    history.append({"step": step, "loss": value, **adaptation_point(self.model, controller)})
                bar.update(task, f"{loss_name} {value:.5f}")
                if (step + 1) % self.s.checkpoint_every == 0 or step + 1 == steps:
                    self._save_ckpt(2, step + 1, optimizer, controller, history)
                self._interrupt_if_asked(2, step + 1, steps, optimizer, controller, history)
        for layer in self.layers.values():
            layer.train(False)
        if controller is not None:
            self.report["adaptation_stage2"] = controller.report()
            controller.remove_hooks()
        if kind == "lora":
            self.model = self.model.merge_and_unload()
        self.teacher = teacher
        self.timings["stage2_s"] = self.timings.get("stage2_s", 0.0) + time.perf_counter() - t0
        self.report["stage2"] = {"kind": kind, "steps": steps, "lr": self.s.lr2(), "splat_lr": self.s.lr_splats2(),
                                 "task_loss": loss_name, "history": history,
                                 "trainable_host_params": sum(p.numel() for p in host_params),
                                 "trainable_splat_params": sum(p.numel() for p in splat_params)}
        self.finished = stop >= steps

    def _stage2_loss(self, loss_name: str, teacher: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        mask = batch["attention_mask"]
        if loss_name == "embedding-cosine":
            with torch.no_grad():
                target = mean_pool(teacher(**batch).last_hidden_state, mask)
            got = mean_pool(self.model(**batch).last_hidden_state, mask)
            return (1.0 - torch.nn.functional.cosine_similarity(got.float(), target.float(), dim=-1)).mean()
        logits = self.model(**batch).logits[:, :-1].float()
        real = mask[:, 1:].bool()
        n_global = self.dp.sum(int(real.sum()))
        if loss_name == "next-token":
            labels = batch["input_ids"][:, 1:].masked_fill(~real, -100)
            ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100, reduction="sum")
            return ce / max(n_global, 1) * self.dp.world_size
        with torch.no_grad():
            ref = teacher(**batch).logits[:, :-1].float().log_softmax(-1)
        kl = (ref.exp() * (ref - logits.log_softmax(-1))).sum(-1)
        return (kl * real).sum() / max(n_global, 1) * self.dp.world_size

    # ------------------------------------------------------------ everything
    def run(self, *, stop_after_steps: int | None = None) -> dict[str, Any]:
        """Run (or resume) the whole distillation; ``stop_after_steps`` stops early leaving a checkpoint
        (for tests and time budgets), with ``report["finished"] = False``."""
        self._budget_left = stop_after_steps
        started = time.perf_counter()
        torch.manual_seed(self.s.seed)
        random.seed(self.s.seed)
        resume = self._resume
        if resume is not None:
            checkpoint.restore_rng_state(resume, self.ckpt_dir / checkpoint.FILE)
        from gsa_train.interrupt import StopRequest

        with StopRequest("distillation") as self._stop:
            return self._run(resume, started)

    def _load_resume(self) -> dict[str, Any] | None:
        """The checkpoint to resume from (checked against these settings), or None for a fresh run."""
        if not self.s.resume or self.ckpt_dir is None:
            return None
        resume = checkpoint.load(self.ckpt_dir, restore_rng=False)
        if resume is None:
            raise ConfigError(f"cannot resume: no checkpoint at {self.ckpt_dir / checkpoint.FILE} (a run writes "
                              "one every checkpoint_every steps and on Ctrl+C)")
        self._check_resume(resume)
        return resume

    def _check_resume(self, resume: dict[str, Any]) -> None:
        from gsa_distill.settings import RESUME_KEYS

        saved = resume["report"].get("settings") if isinstance(resume.get("report"), dict) else None
        if not isinstance(saved, dict) or resume.get("stage") not in (1, 2):
            raise CheckpointError(f"{self.ckpt_dir / checkpoint.FILE} records no distillation settings: it is not "
                                  f"from gsa distill; {checkpoint.FIX}")
        current = self.s.model_dump(mode="json")
        changed = [k for k in RESUME_KEYS if saved.get(k) != current.get(k)]
        if changed:
            details = ", ".join(f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in changed)
            raise ConfigError(bounded(f"cannot resume {self.s.output}: settings differ from the checkpoint's "
                                      f"({details}); use the same settings, or start again without --resume"))

    def _run(self, resume: dict[str, Any] | None, started: float) -> dict[str, Any]:
        self.convert()
        self.data()
        if resume is None:
            self.calibrate()
            self.eval_layers("calibrated")
            self.eval_embeddings("calibrated")
        else:
            self.report = resume["report"]
            self.timings = dict(resume["timings"])
            self._info(f"resuming stage {resume['stage']} at step {resume['step']}")
        self.finished = True
        stage1_resume = resume if resume is not None and resume["stage"] == 1 else None
        if resume is None or resume["stage"] == 1:  # at stage 2, stage 1's final banks are in its checkpoint
            self.stage1(stage1_resume)
            if self.finished:
                self.eval_layers("stage1")
                self.eval_embeddings("stage1")
        if self.finished and self.s.stage2 != "none":
            self.stage2(resume if resume is not None and resume["stage"] == 2 else None)
            if self.finished:
                self.eval_layers("stage2")
                self.eval_embeddings("stage2", teacher=self.teacher)
        from gsa_plugins.adapters import set_passthrough

        set_passthrough(self.model, False)
        self.timings["run_s"] = self.timings.get("run_s", 0.0) + time.perf_counter() - started
        self.report["timings"] = self.timings
        self.report["finished"] = self.finished
        self.report["world_size"] = self.dp.world_size
        if self.finished and self.s.output is not None and self.dp.is_main:
            self.save(Path(self.s.output))
        return self.report

    def save(self, out: Path) -> None:
        """``out/model`` and ``out/distill.json``, each file moved in only once complete (``gsa_data.files``)."""
        from gsa_data.files import atomic_write_text, publish, staging_dir

        out.mkdir(parents=True, exist_ok=True)
        with staging_dir(out) as staged:
            self.model.save_pretrained(staged)
            self.tokenizer.save_pretrained(staged)
            publish(staged, out / "model")
        atomic_write_text(out / "distill.json", json.dumps(self.report, indent=1, default=str) + "\n")


def distill(settings: DistillSettings | Mapping[str, Any], *, model: nn.Module | None = None, tokenizer: Any = None,
            stop_after_steps: int | None = None, log: Callable[[str], None] | None = None) -> Distiller:
    """Distil ``settings.source`` (or ``model`` + ``tokenizer``) into GSA; returns the finished
    :class:`Distiller` (``.model`` the converted model, ``.report`` what ``distill.json`` holds)."""
    if not isinstance(settings, DistillSettings):
        settings = DistillSettings.build(**dict(settings))
    runner = Distiller(settings, model=model, tokenizer=tokenizer, log=log)
    try:
        runner.run(stop_after_steps=stop_after_steps)
    finally:
        runner.dp.close()
    return runner


__all__ = ["SCHEMA", "Distiller", "batch_order", "distill", "load_source", "training_texts"]
