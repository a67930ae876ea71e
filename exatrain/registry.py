"""Named components that config keys choose from, and the plugin modules that register them.

A registry maps names to components (attention backends, LR schedules, model converters,
callbacks, engines). The allowed values of a config key are the names its registry holds, so a
new method plugs in by registering, never by editing a list of strings. Registration happens
when a plugin module is imported: exatrain's own plugins (BUILTIN_PLUGINS) are imported the first
time any registry is read, and a job's `plugins: [my_pkg.my_methods]` adds modules of its own
(imported on every rank, so they work under torchrun and Slurm too).

Methods also register a config *resolver* (fills derived values such as the vocabulary size)
and a *validator* (cross-field checks of their section); `exatrain.config.load_config` runs all
resolvers, then all validators, once.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable
from typing import Any, Generic, TypeVar

from exatrain.errors import ConfigError

T = TypeVar("T")

BUILTIN_PLUGINS = (
    "exatrain.data.tokenizer",
    "exatrain.data.megatron",
    "exatrain.model.llama",
    "exatrain.model.attention",
    "exatrain.model.s2",
    "exatrain.train.schedules",
    "exatrain.train.meco",
    "exatrain.train.send",
    "exatrain.train.send_tracking",
    "exatrain.eval.eigenscore_run",
    "exatrain.train.precision",
    "exatrain.train.stability",
    "exatrain.train.guard",
    "exatrain.engine.native",
    "exatrain.engine.deepspeed",
    "exatrain.interop.hf",
)
_imported: set[str] = set()


def load_plugins(modules: Iterable[str] = ()) -> None:
    """Import exatrain's plugin modules (once) and `modules`; a module that fails is a ConfigError."""
    for name in (*BUILTIN_PLUGINS, *modules):
        if name in _imported:
            continue
        _imported.add(name)
        try:
            importlib.import_module(name)
        except ImportError as exc:
            _imported.discard(name)
            if name in BUILTIN_PLUGINS:
                raise
            raise ConfigError(f"plugins: cannot import {name!r} ({exc}); is it on PYTHONPATH on every rank?") from exc


class Registry(Generic[T]):
    """Components by name for the config key `key` (used in error messages)."""

    def __init__(self, key: str):
        self.key = key
        self._items: dict[str, T] = {}

    def register(self, name: str, item: T | None = None) -> Any:
        """`REG.register("x", obj)`, or `@REG.register("x")` as a decorator. Re-registering a name replaces it."""
        if item is not None:
            self._items[name] = item
            return item

        def decorator(obj: T) -> T:
            self._items[name] = obj
            return obj

        return decorator

    def get(self, name: str) -> T:
        load_plugins()
        if name not in self._items:
            raise ConfigError(f"{self.key}: unknown {name!r}; registered: {', '.join(self.names()) or 'none'}")
        return self._items[name]

    def names(self) -> list[str]:
        load_plugins()
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        load_plugins()
        return name in self._items


ATTENTION: Registry[Any] = Registry("model.attention")
SCHEDULES: Registry[Any] = Registry("schedule.name")
CONVERTERS: Registry[Any] = Registry("model.converters")
CALLBACKS: Registry[Any] = Registry("train.callbacks")
ENGINES: Registry[Any] = Registry("parallel.engine")

ConfigHook = Callable[[Any], None]
RESOLVERS: list[ConfigHook] = []
VALIDATORS: list[ConfigHook] = []


def config_resolver(fn: ConfigHook) -> ConfigHook:
    """Register a function that fills derived values of a JobConfig in place, before validation."""
    RESOLVERS.append(fn)
    return fn


def config_validator(fn: ConfigHook) -> ConfigHook:
    """Register a function that raises ConfigError for an invalid JobConfig (after resolution)."""
    VALIDATORS.append(fn)
    return fn
