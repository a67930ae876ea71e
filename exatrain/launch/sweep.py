"""Sweeps: `optim.lr=1e-4,3e-4 seed=1,2,3` -> the cartesian product, one run (array task) per point.

A key may be shortened to any unique suffix of a config path (`seed` -> `train.seed`,
`tokenizer.kind` -> `data.tokenizer.kind`). Values split on commas outside brackets, so list values
stay whole: `optim.betas=[0.9,0.95],[0.9,0.99]` is two points.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence

from exatrain.config import ConfigError, JobConfig


def config_keys() -> list[str]:
    """Every leaf path of JobConfig, dotted."""
    def walk(obj: dict, prefix: str) -> list[str]:
        out = []
        for k, v in obj.items():
            out += walk(v, f"{prefix}{k}.") if isinstance(v, dict) else [f"{prefix}{k}"]
        return out
    return walk(dataclasses.asdict(JobConfig()), "")


def resolve_key(key: str, keys: Sequence[str] | None = None) -> str:
    keys = config_keys() if keys is None else keys
    if key in keys:
        return key
    matches = [k for k in keys if k.endswith("." + key)]
    if len(matches) == 1:
        return matches[0]
    if matches:
        raise ConfigError(f"sweep key {key!r} is ambiguous: {', '.join(matches)}")
    raise ConfigError(f"sweep key {key!r} matches no config key")


def split_values(text: str) -> list[str]:
    values, depth, cur = [], 0, ""
    for c in text:
        depth += (c in "[{") - (c in "]}")
        if c == "," and depth == 0:
            values.append(cur)
            cur = ""
        else:
            cur += c
    values.append(cur)
    return values


def parse_axes(tokens: Sequence[str]) -> list[tuple[str, list[str]]]:
    """["optim.lr=1e-4,3e-4", "seed=1,2"] -> [("optim.lr", ["1e-4", "3e-4"]), ("train.seed", ["1", "2"])]."""
    keys = config_keys()
    axes: list[tuple[str, list[str]]] = []
    for tok in tokens:
        key, sep, text = tok.partition("=")
        if not sep or not key or not text:
            raise ConfigError(f"sweep axis {tok!r}: expected key=value1,value2,...")
        values = split_values(text)
        if any(not v for v in values):
            raise ConfigError(f"sweep axis {tok!r}: empty value")
        full = resolve_key(key, keys)
        if full in (k for k, _ in axes):
            raise ConfigError(f"sweep key {full} is given twice")
        axes.append((full, values))
    return axes


def expand(axes: Sequence[tuple[str, list[str]]]) -> list[list[str]]:
    """Cartesian product as dotlist overrides, last axis fastest; no axes -> one empty point."""
    return [[f"{k}={v}" for k, v in zip((k for k, _ in axes), combo)]
            for combo in itertools.product(*(vals for _, vals in axes))]
