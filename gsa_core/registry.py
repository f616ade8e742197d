"""The component registry: strategies by ``(kind, name)``, and ``gsa`` commands, contributed by pluggy plugins.

Plugins are discovered lazily through the ``gsa.plugins`` entry-point group, the same path for
built-ins (``gsa_plugins``) and third parties. Environment switches:

- ``GSA_DISABLE_PLUGIN_AUTOLOAD=1``: load no entry point except those named in ``GSA_PLUGINS``;
- ``GSA_PLUGINS=a,b``: load only the entry points named ``a`` and ``b``.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib.metadata
import os
import sys
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import pluggy
import pydantic
from pydantic import BaseModel, ConfigDict

from gsa_core.commands import GROUPS, CommandSet, CommandSpec
from gsa_core.errors import DuplicateComponentError, ParamsError, UnknownComponentError, UnknownKindError
from gsa_core.hookspecs import ENTRY_POINT_GROUP, PROJECT, GSAHookSpecs
from gsa_core.protocols import KINDS, PROTOCOLS

DISABLE_AUTOLOAD_ENV = "GSA_DISABLE_PLUGIN_AUTOLOAD"
ALLOW_LIST_ENV = "GSA_PLUGINS"


class GSAPluginWarning(UserWarning):
    """A plugin could not be loaded; the rest of the registry keeps working."""


class StrategyParams(BaseModel):
    """Base for params models: unknown keys are errors, instances are immutable.

    A strategy that is itself a ``StrategyParams`` subclass is registered without a separate
    params model (its validated instance *is* the component), in the manner of gsplat's
    dataclass strategies.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)


class NoParams(StrategyParams):
    """Params model of a strategy that takes none."""


@dataclass(frozen=True)
class PluginInfo:
    """Who provides components: an entry point (with its distribution) or a direct registration."""

    name: str
    distribution: str | None = None
    version: str | None = None
    module: str | None = None
    status: str = "loaded"
    error: str | None = None

    def describe(self) -> str:
        if self.status == "direct":
            return f"module {self.name!r}"
        if self.distribution:
            return f"plugin {self.name!r} ({self.distribution} {self.version})"
        return f"plugin {self.name!r}"


@dataclass(frozen=True)
class Component:
    kind: str
    name: str
    factory: Callable[[Any], Any]
    params_model: type[BaseModel]
    provider: PluginInfo
    description: str = ""


@dataclass
class _Loading:
    """What is being loaded now, so registrations know their provider and can be rolled back."""

    provider: PluginInfo
    added: list[tuple[str, str]] = field(default_factory=list)
    replaced: dict[tuple[str, str], Component] = field(default_factory=dict)


def format_validation_error(err: pydantic.ValidationError, prefix: str = "") -> str:
    """One line per problem: ``path: message (got value)``."""
    lines = []
    for e in err.errors():
        path = ".".join(str(p) for p in (prefix, *e["loc"]) if p != "")
        got = f" (got {e['input']!r})" if "input" in e and not isinstance(e["input"], dict) else ""
        msg = e["msg"].removeprefix("Value error, ")
        lines.append(f"{path or '<root>'}: {msg}{got}")
    return "; ".join(lines)


class Registry:
    """Components by kind and name, filled by plugins on first use."""

    def __init__(self, *, autoload: bool | None = None, allow: list[str] | None = None) -> None:
        if autoload is None:
            autoload = os.environ.get(DISABLE_AUTOLOAD_ENV, "").strip().lower() not in ("1", "true", "yes")
        if allow is None and os.environ.get(ALLOW_LIST_ENV, "").strip():
            allow = [p.strip() for p in os.environ[ALLOW_LIST_ENV].split(",") if p.strip()]
        self.autoload = autoload
        self.allow = allow
        self._components: dict[str, dict[str, Component]] = {k: {} for k in KINDS}
        self._plugins: dict[str, PluginInfo] = {}
        self._pm = pluggy.PluginManager(PROJECT)
        self._pm.add_hookspecs(GSAHookSpecs)
        self._loaded = False
        self._loading: _Loading | None = None
        self._loaded_plugins: list[tuple[Any, PluginInfo]] = []  # in load order, for the commands hook
        self._commands: dict[str, dict[str, CommandSpec]] | None = None  # group -> name -> spec, on first use

    # ----------------------------------------------------------------- loading
    def ensure_loaded(self) -> None:
        """Load entry-point plugins once (lazily, on the first query)."""
        if self._loaded or self._loading is not None:
            return
        self._loaded = True
        if not self.autoload and not self.allow:
            return
        seen = set()
        for ep in sorted(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
            if self.allow is not None and ep.name not in self.allow:
                continue
            if ep.name in seen:  # the same distribution visible twice on sys.path
                continue
            seen.add(ep.name)
            dist = getattr(ep, "dist", None)
            info = PluginInfo(
                name=ep.name,
                distribution=dist.name if dist else None,
                version=dist.version if dist else None,
                module=ep.value,
            )
            try:
                plugin = ep.load()
            except Exception as exc:
                self._fail(info, f"import failed: {type(exc).__name__}: {exc}")
                continue
            self.load_plugin(plugin, info=info)
        for missing in sorted(set(self.allow or ()) - seen):
            warnings.warn(
                f"{ALLOW_LIST_ENV} names plugin {missing!r}, but no installed distribution provides an "
                f"entry point of that name in group {ENTRY_POINT_GROUP!r}",
                GSAPluginWarning,
                stacklevel=2,
            )

    def load_plugin(self, plugin: Any, *, name: str | None = None, info: PluginInfo | None = None) -> None:
        """Register a plugin object (module or instance with a ``gsa_register`` hookimpl) now."""
        if info is None:
            info = PluginInfo(name=name or getattr(plugin, "__name__", type(plugin).__name__),
                              module=getattr(plugin, "__name__", None))
        if not self._loaded and self._loading is None:
            self.ensure_loaded()
        try:
            self._pm.register(plugin, name=info.name)
        except Exception as exc:
            self._fail(info, f"rejected by pluggy: {exc}")
            return
        impls = [i for i in self._pm.hook.gsa_register.get_hookimpls() if i.plugin is plugin]
        loading = _Loading(provider=info)
        previous, self._loading = self._loading, loading
        try:
            for impl in impls:
                impl.function(registry=self)
        except DuplicateComponentError:
            self._rollback(loading)
            self._pm.unregister(plugin)
            raise
        except Exception as exc:
            self._rollback(loading)
            self._pm.unregister(plugin)
            self._fail(info, f"gsa_register raised {type(exc).__name__}: {exc}")
            return
        finally:
            self._loading = previous
        self._plugins[info.name] = info
        self._loaded_plugins.append((plugin, info))
        if self._commands is not None:  # commands were already collected: add this plugin's now
            self._collect_commands(plugin, info)

    def _rollback(self, loading: _Loading) -> None:
        for kind, name in loading.added:
            self._components[kind].pop(name, None)
        for (kind, name), old in loading.replaced.items():
            self._components[kind][name] = old

    def _fail(self, info: PluginInfo, reason: str) -> None:
        failed = PluginInfo(**{**info.__dict__, "status": "failed", "error": reason})
        self._plugins[info.name] = failed
        warnings.warn(f"GSA {info.describe()} was skipped: {reason}", GSAPluginWarning, stacklevel=3)

    # ----------------------------------------------------------------- registering
    def register(
        self,
        kind: str,
        name: str,
        factory: Callable[[Any], Any],
        params: type[BaseModel] | None = None,
        *,
        override: bool = False,
        description: str | None = None,
    ) -> None:
        """Register ``factory`` as ``(kind, name)``.

        ``factory`` is called with the validated params instance. When ``params`` is omitted the
        factory must itself be a pydantic model, and its validated instance is the component.
        ``override=True`` replaces an earlier registration on purpose.
        """
        self._check_kind(kind)
        if not isinstance(name, str) or not name:
            raise ValueError(f"component names must be non-empty strings, got {name!r}")
        if params is None:
            if not (isinstance(factory, type) and issubclass(factory, BaseModel)):
                raise TypeError(
                    f"registering {kind} {name!r}: pass params=<pydantic model>, or register a "
                    f"pydantic model class that is the strategy itself"
                )
            params = factory
        if self._loading is None:
            self.ensure_loaded()
        provider = self._loading.provider if self._loading else _caller_provider()
        existing = self._components[kind].get(name)
        if existing is not None and not override:
            raise DuplicateComponentError(kind, name, existing.provider.describe(), provider.describe())
        doc = description if description is not None else _first_doc_line(factory)
        self._components[kind][name] = Component(kind, name, factory, params, provider, doc)
        if self._loading is not None:
            if existing is not None:
                self._loading.replaced.setdefault((kind, name), existing)
            else:
                self._loading.added.append((kind, name))

    def unregister(self, kind: str, name: str) -> None:
        self.get(kind, name)
        del self._components[kind][name]

    # ----------------------------------------------------------------- commands
    def commands(self, group: str = "command") -> list[CommandSpec]:
        """The ``gsa`` commands (``group="command"``) or ``gsa bench`` benchmarks (``"benchmark"``) that
        plugins add through ``gsa_register_commands``, in plugin load order. Nothing is imported for them
        until a command runs (:meth:`CommandSpec.load`)."""
        if group not in GROUPS:
            raise ValueError(f"unknown command group {group!r}; groups: {', '.join(GROUPS)}")
        self.ensure_loaded()
        if self._commands is None:
            self._commands = {g: {} for g in GROUPS}
            for plugin, info in self._loaded_plugins:
                self._collect_commands(plugin, info)
        return list(self._commands[group].values())

    def _collect_commands(self, plugin: Any, info: PluginInfo) -> None:
        """Call one plugin's ``gsa_register_commands``; a hook that raises, or a name already taken, is
        skipped with a :class:`GSAPluginWarning` and everything else keeps working."""
        assert self._commands is not None
        cli = CommandSet(info)
        try:
            for impl in self._pm.hook.gsa_register_commands.get_hookimpls():
                if impl.plugin is plugin:
                    impl.function(cli=cli)
        except Exception as exc:
            warnings.warn(f"the commands of GSA {info.describe()} were skipped: gsa_register_commands raised "
                          f"{type(exc).__name__}: {exc}", GSAPluginWarning, stacklevel=3)
            return
        for spec in cli.specs:
            taken = self._commands[spec.group].get(spec.name)
            if taken is not None:
                where = "gsa bench " if spec.group == "benchmark" else "gsa "
                warnings.warn(f"'{where}{spec.name}' is registered twice, first by {taken.provider.describe()}, "
                              f"then by {info.describe()}; the first is kept", GSAPluginWarning, stacklevel=3)
                continue
            self._commands[spec.group][spec.name] = spec

    # ----------------------------------------------------------------- queries
    def _check_kind(self, kind: str) -> None:
        if kind not in PROTOCOLS:
            raise UnknownKindError(kind, KINDS)

    def get(self, kind: str, name: str) -> Component:
        self._check_kind(kind)
        self.ensure_loaded()
        try:
            return self._components[kind][name]
        except KeyError:
            raise UnknownComponentError(kind, name, self._components[kind]) from None

    def names(self, kind: str) -> list[str]:
        self._check_kind(kind)
        self.ensure_loaded()
        return sorted(self._components[kind])

    def components(self, kind: str | None = None) -> list[Component]:
        self.ensure_loaded()
        kinds = KINDS if kind is None else (kind,)
        for k in kinds:
            self._check_kind(k)
        return [self._components[k][n] for k in kinds for n in sorted(self._components[k])]

    def plugins(self) -> list[PluginInfo]:
        """Every plugin seen, loaded or failed, with its distribution and version."""
        self.ensure_loaded()
        return [self._plugins[n] for n in sorted(self._plugins)]

    def params_model(self, kind: str, name: str) -> type[BaseModel]:
        return self.get(kind, name).params_model

    def validate_params(self, kind: str, name: str, params: Mapping[str, Any] | BaseModel | None) -> BaseModel:
        """Validated params instance, or a :class:`ParamsError` naming each bad field."""
        model = self.params_model(kind, name)
        if isinstance(params, model):
            return params
        if isinstance(params, BaseModel):
            params = params.model_dump()
        try:
            return model.model_validate(dict(params or {}))
        except pydantic.ValidationError as exc:
            raise ParamsError(
                f"invalid params for {kind} {name!r}: {format_validation_error(exc)}"
            ) from exc

    def build(self, kind: str, name: str, params: Mapping[str, Any] | BaseModel | None = None) -> Any:
        """The component ``(kind, name)`` built from validated ``params``."""
        comp = self.get(kind, name)
        validated = self.validate_params(kind, name, params)
        obj = validated if comp.factory is comp.params_model else comp.factory(validated)
        protocol = PROTOCOLS[kind]
        if not isinstance(obj, protocol):
            raise TypeError(
                f"{kind} {name!r} from {comp.provider.describe()} built a {type(obj).__name__}, which "
                f"does not implement the {protocol.__name__} protocol"
            )
        return obj


def _first_doc_line(obj: Any) -> str:
    doc = getattr(obj, "__doc__", None) or ""
    return doc.strip().splitlines()[0] if doc.strip() else ""


def _caller_provider() -> PluginInfo:
    """Provider of a registration made outside plugin loading: the calling module."""
    frame = sys._getframe(2)
    module = frame.f_globals.get("__name__", "<unknown>")
    return PluginInfo(name=module, module=module, status="direct")


_default: Registry | None = None
_current: contextvars.ContextVar[Registry | None] = contextvars.ContextVar("gsa_registry", default=None)


def get_registry() -> Registry:
    """The registry in scope: the innermost :func:`scoped_registry`, else the process default."""
    scoped = _current.get()
    if scoped is not None:
        return scoped
    global _default
    if _default is None:
        _default = Registry()
    return _default


@contextlib.contextmanager
def scoped_registry(*, autoload: bool | None = None, allow: list[str] | None = None) -> Iterator[Registry]:
    """A fresh registry for the duration of a block (tests, sandboxes); the default is untouched."""
    registry = Registry(autoload=autoload, allow=allow)
    token = _current.set(registry)
    try:
        yield registry
    finally:
        _current.reset(token)


def build(kind: str, name: str, params: Mapping[str, Any] | BaseModel | None = None) -> Any:
    """Shortcut for ``get_registry().build(...)``."""
    return get_registry().build(kind, name, params)
