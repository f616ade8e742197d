"""The one validated GSA configuration.

Each strategy is ``{name, params}``; the name must be registered for its kind and the params are
validated against that strategy's own model, so a typo fails at load time with the field's path,
the bad value and the closest valid name. Loads from a mapping, TOML, JSON or YAML, and from a
model config that carries it (``gsa`` key).
"""

from __future__ import annotations

import copy
import json
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar, Literal

import pydantic
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from gsa_core.bank import CovarianceKind
from gsa_core.errors import ConfigError, ParamsError, UnknownComponentError, bounded
from gsa_core.registry import Registry, format_validation_error, get_registry

CONFIG_SUFFIXES = (".toml", ".json", ".yaml", ".yml")

# Upper bounds where the machine would give out first (docs/safety.md): a value beyond them validates
# today and then dies in an allocation or an overflow minutes later.
#: Splats per head: 65,536 slots of a 64-dim head are already ~100 MB of parameters per layer.
MAX_SPLATS = 65_536
#: Seeds are unsigned 63-bit: ``torch.manual_seed`` and ``torch.Generator`` overflow beyond.
MAX_SEED = 2**63 - 1
#: Steps, windows and token budgets: a billion is past any run this library can finish.
MAX_STEPS = 10**9
#: Config files are small: larger inputs are refused before parsing.
MAX_CONFIG_BYTES = 1 << 20
#: Values in a parsed config, counted with every YAML alias expanded (an alias bomb is refused).
MAX_CONFIG_VALUES = 10_000


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True, allow_inf_nan=False)


class StrategySpec(_Strict):
    """``{name, params}`` for one strategy; a bare string is shorthand for ``{name: string}``."""

    kind: ClassVar[str] = ""
    name: str
    params: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _from_name(cls, data: Any) -> Any:
        return {"name": data} if isinstance(data, str) else data

    @field_validator("name")
    @classmethod
    def _known_name(cls, name: str) -> str:
        try:
            get_registry().get(cls.kind, name)
        except UnknownComponentError as exc:
            raise ValueError(str(exc)) from None
        return name

    @field_validator("params")
    @classmethod
    def _valid_params(cls, params: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        name = info.data.get("name")
        if name is None:  # the name itself failed; that error is already reported
            return params
        try:
            validated = get_registry().validate_params(cls.kind, name, params)
        except ParamsError as exc:
            raise ValueError(str(exc)) from None
        return validated.model_dump(mode="json")

    def build(self, registry: Registry | None = None) -> Any:
        return (registry or get_registry()).build(self.kind, self.name, self.params)


class InitializerSpec(StrategySpec):
    kind: ClassVar[str] = "initializer"


class BackendSpec(StrategySpec):
    kind: ClassVar[str] = "backend"


class BirthSpec(StrategySpec):
    kind: ClassVar[str] = "birth"


class DeathSpec(StrategySpec):
    kind: ClassVar[str] = "death"


class SchedulerSpec(StrategySpec):
    kind: ClassVar[str] = "scheduler"


class AdapterSpec(StrategySpec):
    kind: ClassVar[str] = "adapter"


class PositionsSpec(StrategySpec):
    kind: ClassVar[str] = "positions"


class RecallSpec(StrategySpec):
    """The recall cache (docs/recall-and-evals.md): a policy by name, its params (``budget``, ``block``, ...) and
    the layers that keep one (None: every causal GSA or hybrid layer without a sliding window of its own)."""

    kind: ClassVar[str] = "recall"
    layers: list[int] | None = Field(None, description="layer indices with a recall cache (None: every one that "
                                     "can take it)")

    @field_validator("layers")
    @classmethod
    def _distinct_layers(cls, layers: list[int] | None) -> list[int] | None:
        if layers is None:
            return None
        if not layers or any(i < 0 for i in layers) or len(set(layers)) != len(layers):
            raise ValueError(f"recall layers must be distinct layer indices >= 0 (or omitted for all), got {layers}")
        return sorted(layers)


SPEC_TYPES: dict[str, type[StrategySpec]] = {
    s.kind: s for s in (InitializerSpec, BackendSpec, BirthSpec, DeathSpec, SchedulerSpec, AdapterSpec,
                        PositionsSpec, RecallSpec)
}


class BankConfig(_Strict):
    """Shape of every layer's splat bank."""

    n_splats: int = Field(64, ge=1, le=MAX_SPLATS, description="capacity K: slots per head")
    covariance: CovarianceKind = "diagonal"
    log_normalizer: bool = Field(False, description="add -1/4 log det(2 pi Sigma) to each log-feature")
    init_scale: float = Field(1.0, gt=0, description="initial splat standard deviation")
    min_alive: int = Field(1, ge=1, le=MAX_SPLATS, description="death never leaves a head with fewer alive slots")

    @model_validator(mode="after")
    def _min_alive_fits(self) -> BankConfig:
        if self.min_alive > self.n_splats:
            raise ValueError(f"min_alive ({self.min_alive}) exceeds n_splats ({self.n_splats})")
        return self


class AdaptationConfig(_Strict):
    """Birth and death of splats during training (off unless enabled)."""

    enabled: bool = False
    window: int = Field(100, ge=1, le=MAX_STEPS, description="steps of statistics the policies read")
    # Defaults are names, validated (against the registry) only when a config is built.
    scheduler: SchedulerSpec = Field("interval", validate_default=True)  # type: ignore[assignment]
    death: DeathSpec = Field("low-mass", validate_default=True)  # type: ignore[assignment]
    birth: BirthSpec = Field("clone", validate_default=True)  # type: ignore[assignment]


class LongContextConfig(_Strict):
    """Inputs longer than the model was trained on (docs/long-context.md): linear-memory prefill, positions."""

    #: Default tokens per prefill piece: a piece's scores and masks are ``chunk x (window + chunk)``.
    DEFAULT_CHUNK: ClassVar[int] = 1024

    prefill_chunk: int = Field(
        DEFAULT_CHUNK, ge=0, le=MAX_STEPS,
        description="inputs longer than this take the linear-memory path: prefilled through the recurrent cache in "
                    "pieces of this many tokens (a training forward: causal masks built per layer, windows blocked); "
                    "0: never",
    )
    positions: PositionsSpec = Field(  # type: ignore[assignment]
        "none", validate_default=True,
        description="the strategy that extended the learned position table (none: the table as trained)",
    )
    trained_positions: int | None = Field(
        None, ge=1, le=MAX_STEPS, description="rows of the position table before it was extended (None: not extended)",
    )


class GSAConfig(_Strict):
    """Everything that defines a GSA model beyond the host model's own weights."""

    schema_version: Literal[1] = 1
    seed: int = Field(0, ge=0, le=MAX_SEED)
    bank: BankConfig = BankConfig()
    initializer: InitializerSpec = Field("random", validate_default=True)  # type: ignore[assignment]
    backend: BackendSpec = Field("auto", validate_default=True)  # type: ignore[assignment]
    adaptation: AdaptationConfig = Field(default_factory=AdaptationConfig)
    adapter: AdapterSpec | None = Field(None, description="model adapter; None detects it from the model")
    long_context: LongContextConfig = Field(default_factory=LongContextConfig)
    recall: RecallSpec | None = Field(None, description="recall cache of exact keys beside the state; None: off")

    # ----------------------------------------------------------------- loading
    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str = "config") -> GSAConfig:
        try:
            return cls.model_validate(dict(data))
        except pydantic.ValidationError as exc:
            raise ConfigError(bounded(f"invalid GSA config in {source}: {format_validation_error(exc)}")) from None

    @classmethod
    def from_file(cls, path: str | Path) -> GSAConfig:
        path = Path(path)
        return cls.from_dict(read_config_file(path), source=str(path))

    @classmethod
    def from_model_config(cls, model_config: Any) -> GSAConfig:
        """The GSA config a converted Hugging Face model carries under its ``gsa`` attribute."""
        data = getattr(model_config, "gsa", None)
        if data is None and isinstance(model_config, Mapping):
            data = model_config.get("gsa")
        if data is None:
            raise ConfigError("this model config carries no GSA config (no 'gsa' entry): was it converted?")
        return cls.from_dict(data, source="model config")

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def with_updates(self, **changes: Any) -> GSAConfig:
        """A validated copy with top-level fields replaced."""
        data = copy.deepcopy(self.to_dict())
        data.update(changes)
        return GSAConfig.from_dict(data)


def read_config_file(path: Path) -> dict[str, Any]:
    """Parse a TOML/JSON/YAML file into a mapping, with errors that name the file and line.

    Refused before or while parsing: files over :data:`MAX_CONFIG_BYTES`, text that is not UTF-8, and
    documents with more than :data:`MAX_CONFIG_VALUES` values once YAML aliases are expanded.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}" if not path.exists() else f"{path} is not a file")
    suffix = path.suffix.lower()
    if suffix not in CONFIG_SUFFIXES:
        raise ConfigError(f"unsupported config format {suffix!r} for {path}; use one of {', '.join(CONFIG_SUFFIXES)}")
    try:
        raw = path.read_bytes() if path.stat().st_size <= MAX_CONFIG_BYTES else None
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror or exc}") from None
    if raw is None or len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path} is larger than {MAX_CONFIG_BYTES:,} bytes: not a GSA config")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path} is not UTF-8 text (byte {exc.start}); save it as UTF-8") from None
    try:
        if suffix == ".toml":
            data = tomllib.loads(text)
        elif suffix == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)  # aliases share nodes: count_values below counts without copying
    except ConfigError as exc:
        raise ConfigError(f"cannot parse {path}: {exc}") from None
    except (tomllib.TOMLDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise ConfigError(bounded(f"cannot parse {path}: {exc or type(exc).__name__}")) from None
    except Exception as exc:  # yaml.YAMLError, kept lazy so yaml is imported only when needed
        raise ConfigError(bounded(f"cannot parse {path}: {exc}")) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping at the top level, got {type(data).__name__}")
    try:
        count_values(data, MAX_CONFIG_VALUES)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    return data


def count_values(data: Any, limit: int) -> int:
    """Number of values in ``data`` with shared sub-trees counted every time they occur (YAML aliases).

    Linear in the number of distinct containers (memoised by identity); raises :class:`ConfigError`
    past ``limit`` or on a self-referencing structure.
    """
    sizes: dict[int, int] = {}
    active: set[int] = set()

    def size(node: Any, depth: int) -> int:
        if not isinstance(node, dict | list):
            return 1
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in active:
            raise ConfigError("it refers to itself (a recursive YAML alias)")
        if depth > 64:
            raise ConfigError("it nests deeper than 64 levels")
        active.add(key)
        children = node.values() if isinstance(node, dict) else node
        total = 1 + len(node) if isinstance(node, dict) else 1
        for child in children:
            total += size(child, depth + 1)
            if total > limit:
                raise ConfigError(f"it holds more than {limit:,} values (with YAML aliases expanded): "
                                  "not a GSA config")
        active.discard(key)
        sizes[key] = total
        return total

    return size(data, 0)


def config_json_schema(registry: Registry | None = None) -> dict[str, Any]:
    """JSON Schema of :class:`GSAConfig` where each strategy lists its registered names and params."""
    registry = registry or get_registry()
    schema = GSAConfig.model_json_schema()
    defs = schema.setdefault("$defs", {})
    for kind, spec_type in SPEC_TYPES.items():
        title = spec_type.__name__
        if title not in defs:
            continue
        choices = []
        # fields a spec type has beside name and params (recall: layers), as its own schema gives them
        extra = {k: v for k, v in defs[title].get("properties", {}).items() if k not in ("name", "params")}
        for comp in registry.components(kind):
            params_schema = comp.params_model.model_json_schema(ref_template="#/$defs/{model}")
            defs.update(params_schema.pop("$defs", {}))
            choices.append({
                "type": "object",
                "description": comp.description,
                "properties": {"name": {"const": comp.name}, "params": params_schema, **extra},
                "required": ["name"],
                "additionalProperties": False,
            })
        names = [c.name for c in registry.components(kind)]
        defs[title] = {
            "title": title,
            "description": f"a {kind} by name: one of {', '.join(names) or '(none registered)'}",
            "oneOf": [{"type": "string", "enum": names}, *choices] if names else [{"type": "object"}],
        }
    return schema
