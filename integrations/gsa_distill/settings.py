"""The validated settings of one distillation run (``gsa distill`` and :func:`gsa_distill.distill`).

Why pydantic with ``extra="forbid"``: a typo in a settings file or keyword fails before any model is
loaded, with the field's path and the valid choices (same conventions as :class:`gsa_core.GSAConfig`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import pydantic
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from gsa_core.calibration import RECOMMENDED_INITIALIZER
from gsa_core.config import MAX_SEED, MAX_STEPS, GSAConfig, read_config_file
from gsa_core.errors import ConfigError, bounded
from gsa_core.registry import format_validation_error, get_registry
from gsa_distill.regularisers import check_regularisers

Stage2 = Literal["none", "lora", "full"]
TaskLoss = Literal["auto", "embedding-cosine", "next-token", "logit-kl"]
STAGE2_CHOICES: tuple[str, ...] = ("none", "lora", "full")
TASK_LOSSES: tuple[str, ...] = ("auto", "embedding-cosine", "next-token", "logit-kl")
DEFAULT_GSA: dict[str, Any] = {"bank": {"n_splats": 16}, "backend": "auto"}
#: Rows per batch and tokens per row beyond which activations alone exhaust a machine's memory.
MAX_BATCH_SIZE = 4096
MAX_LENGTH = 1 << 17
#: Settings that only stage 2 reads, and those that only LoRA reads: written without them, an error (a silently
#: ignored flag hides a mistake; :func:`check_effective`).
STAGE2_ONLY = ("stage2_steps", "stage2_lr", "splat_lr", "task_loss")
LORA_ONLY = ("lora_rank", "lora_alpha", "lora_targets")
#: Settings a resumed run must share with the run that wrote the checkpoint.
RESUME_KEYS = ("gsa", "window", "initializer", "initializer_params", "corpus", "texts", "heldout_fraction",
               "passage_chars", "max_length", "batch_size", "seed", "stage2", "lora_rank", "lora_alpha", "lora_targets")


class DistillSettings(BaseModel):
    """Everything a distillation run needs besides the source model's weights."""

    model_config = ConfigDict(extra="forbid", validate_default=True, allow_inf_nan=False)

    source: str = Field(description="Hugging Face model folder (or a model object passed to distill())")
    output: Path | None = Field(None, description="output folder: model/, distill.json, checkpoints/")
    gsa: dict[str, Any] = Field(default_factory=lambda: dict(DEFAULT_GSA),
                                description="the GSA config (bank, backend, adapter, adaptation, seed)")
    window: int | None = Field(None, ge=1, le=MAX_LENGTH,
                               description="hybrid: exact attention within this many keys (each side for encoders), "
                               "GSA beyond; None: GSA everywhere the config says")
    initializer: str = Field(RECOMMENDED_INITIALIZER[0], description="registered initializer used for calibration")
    initializer_params: dict[str, Any] | None = Field(
        None, description="its params; default: the recommended ones for the recommended initializer, else {}")
    # data
    corpus: str = Field("stdlib", description="gsa_data corpus: stdlib | docstrings | topics | a folder of .txt")
    texts: list[str] | None = Field(None, description="training texts given directly (instead of the corpus)")
    heldout_fraction: float = Field(0.1, gt=0.0, lt=1.0, description="documents held out from calibration/training")
    passage_chars: int = Field(400, ge=20, le=MAX_LENGTH)
    max_length: int = Field(128, ge=2, le=MAX_LENGTH, description="tokens per sequence")
    batch_size: int = Field(16, ge=1, le=MAX_BATCH_SIZE, description="global batch (split across data-parallel "
                            "processes)")
    calib_tokens: int = Field(10000, ge=1, le=MAX_STEPS, description="tokens whose q/k vectors calibrate the banks")
    eval_batches: int = Field(2, ge=0, le=MAX_STEPS, description="held-out batches for the per-layer error "
                              "before/after")
    # stage 1
    stage1_steps: int = Field(200, ge=0, le=MAX_STEPS)
    stage1_lr: float = Field(1e-2, gt=0.0)
    # stage 2
    stage2: Stage2 = "none"
    stage2_steps: int = Field(100, ge=0, le=MAX_STEPS)
    stage2_lr: float | None = Field(None, gt=0.0, description="default 1e-3 (lora) / 2e-5 (full)")
    splat_lr: float | None = Field(None, gt=0.0, description="splat learning rate in stage 2 (default stage1_lr/10)")
    lora_rank: int = Field(8, ge=1, le=1 << 16)
    lora_alpha: float = Field(16.0, gt=0.0)
    lora_targets: list[str] | None = Field(None, description="module names LoRA adapts (default: peft's for the model)")
    task_loss: TaskLoss = "auto"
    # shared
    regularisers: dict[str, float] = Field(default_factory=dict, description="name -> weight")
    checkpoint_every: int = Field(50, ge=1, le=MAX_STEPS, description="checkpoint every N steps (and on Ctrl+C)")
    resume: bool = False
    seed: int = Field(0, ge=0, le=MAX_SEED)
    progress: bool | None = Field(None, description="progress bars (default: when stderr is a terminal)")
    log_every: int = Field(10, ge=1, le=MAX_STEPS)

    @field_validator("source", mode="before")
    @classmethod
    def _path_source(cls, value: Any) -> Any:
        return str(value) if isinstance(value, Path) else value

    @field_validator("corpus")
    @classmethod
    def _known_corpus(cls, value: str) -> str:
        from gsa_data import corpus_problem

        problem = corpus_problem(value)
        if problem is not None:
            raise ValueError(problem)
        return value

    @field_validator("initializer")
    @classmethod
    def _known_initializer(cls, name: str) -> str:
        get_registry().get("initializer", name)  # raises naming the registered ones
        return name

    @field_validator("gsa")
    @classmethod
    def _valid_gsa(cls, data: dict[str, Any]) -> dict[str, Any]:
        GSAConfig.from_dict(data, source="gsa")
        return data

    @field_validator("regularisers")
    @classmethod
    def _known_regularisers(cls, data: dict[str, float]) -> dict[str, float]:
        return check_regularisers(data)

    @model_validator(mode="after")
    def _defaults(self) -> DistillSettings:
        if self.initializer_params is None:
            rec_name, rec_params = RECOMMENDED_INITIALIZER
            self.initializer_params = dict(rec_params) if self.initializer == rec_name else {}
        return self

    # ------------------------------------------------------------------ derived
    def gsa_config(self) -> GSAConfig:
        return GSAConfig.from_dict(self.gsa, source="gsa")

    def lr2(self) -> float:
        if self.stage2_lr is not None:
            return self.stage2_lr
        return 1e-3 if self.stage2 == "lora" else 2e-5

    def lr_splats2(self) -> float:
        return self.splat_lr if self.splat_lr is not None else self.stage1_lr / 10

    @classmethod
    def build(cls, **values: Any) -> DistillSettings:
        """Validate, turning pydantic's error into a :class:`ConfigError` naming each bad field."""
        try:
            return cls.model_validate(values)
        except pydantic.ValidationError as exc:
            raise ConfigError(bounded(format_validation_error(exc, "distill settings"))) from None


def check_effective(values: dict[str, Any]) -> None:
    """Settings written by the user (flags, a ``[distill]`` table) that the run would ignore are an error, not a
    silent no-op: stage-2 settings with ``stage2 = "none"``, LoRA settings without ``stage2 = "lora"``."""
    stage2 = values.get("stage2", "none")
    unused = [k for k in STAGE2_ONLY if k in values] if stage2 == "none" else []
    unused += [k for k in LORA_ONLY if k in values] if stage2 != "lora" else []
    if unused:
        fix = ("choose --stage2 lora or full, or drop them" if stage2 == "none"
               else "they are LoRA settings (--stage2 lora): drop them")
        raise ConfigError(f"{', '.join(unused)} {'has' if len(unused) == 1 else 'have'} no effect with stage2 "
                          f"{stage2!r}: {fix}")


def read_settings_file(path: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """A TOML/JSON/YAML file as ``(gsa config, distill settings)``: its optional ``[distill]`` table holds
    the settings, everything else is the GSA config (so one file converts and distils)."""
    data = dict(read_config_file(Path(path)))
    distill = data.pop("distill", {}) or {}
    if not isinstance(distill, dict):
        raise ConfigError(f"{path}: [distill] must be a table of settings, got {type(distill).__name__}")
    return data, dict(distill)


__all__ = ["DEFAULT_GSA", "RESUME_KEYS", "STAGE2_CHOICES", "TASK_LOSSES", "DistillSettings", "check_effective",
           "read_settings_file"]
