"""User-defined line formats from the config file, tried before the built-in ones.

    [[formats]]
    name = "my-trainer"
    regex = 'step=(?P<step>\\d+) loss=(?P<loss>\\S+) dt=(?P<dt>[\\d.]+)ms'
    fields = { dt = "step_time_s" }      # group -> field; groups already named like a field map to themselves
    units = { dt = "ms" }                # converted to seconds (times) or GiB (memory sizes)
    glob = "*/train*.log"                # optional: only files whose path (below the tailed root) or name matches
    kind = "metrics"                     # metrics (default) or log (an event named after the format)

A metrics format needs at least one numeric group besides `step`; without a `step` group the file's step counter
numbers the lines. A group that matched but is not a number makes the line a dead letter (it claimed the format).
Every mistake in the section (bad regex, unknown unit or key, no named group) is a ConfigError naming the format,
raised when the component starts.
"""

from __future__ import annotations

import fnmatch
import os
import re
from dataclasses import dataclass
from typing import Any

import orjson

from rankwatch.config import ConfigError, load_config
from rankwatch.formats.base import Parsed, ParseError, SourceContext, need_int, number

# unit -> (factor, family): times to seconds, sizes to GiB, percent kept as printed
UNITS: dict[str, tuple[float, str]] = {
    "s": (1.0, "time"), "sec": (1.0, "time"), "ms": (1e-3, "time"), "us": (1e-6, "time"), "µs": (1e-6, "time"),
    "ns": (1e-9, "time"), "min": (60.0, "time"), "h": (3600.0, "time"),
    "b": (1 / 2**30, "size"), "kib": (1 / 2**20, "size"), "mib": (1 / 2**10, "size"), "gib": (1.0, "size"),
    "tib": (2**10, "size"), "kb": (1e3 / 2**30, "size"), "mb": (1e6 / 2**30, "size"), "gb": (1e9 / 2**30, "size"),
    "%": (1.0, "ratio"), "percent": (1.0, "ratio"), "fraction": (100.0, "ratio"),
}
_KEYS = {"name", "regex", "fields", "units", "glob", "kind"}
_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


@dataclass
class FormatsConfig:
    """The `[[formats]]` array of tables (or RANKWATCH_FORMATS as a JSON list)."""

    formats: list | None = None


@dataclass(frozen=True)
class UserFormat:
    name: str
    pattern: re.Pattern[str]
    fields: dict[str, str]  # group -> field name
    scale: dict[str, float]  # group -> factor
    glob: str | None = None
    kind: str = "metrics"
    step_group: str | None = None

    def matches_path(self, path: str, root: str | None = None) -> bool:
        if not self.glob:
            return True
        rel = os.path.relpath(path, root) if root and path.startswith(root) else path
        return (fnmatch.fnmatch(rel, self.glob) or fnmatch.fnmatch(os.path.basename(path), self.glob)
                or fnmatch.fnmatch(path, self.glob))

    def parse(self, body: str, ctx: SourceContext) -> Parsed | None:
        m = self.pattern.search(body)
        if m is None:
            return None
        values = {g: v for g, v in m.groupdict().items() if v is not None}
        if self.kind == "log":
            return Parsed("log", {"event": self.name, "fields": {self.fields.get(g, g): _maybe_number(v)
                                                                 for g, v in values.items()}})
        data: dict[str, Any] = {}
        for group, name in self.fields.items():
            if group == self.step_group or group not in values:
                continue
            x = number(values[group].strip())
            if x is None:
                raise ParseError(f"format {self.name}: {group} is not a number: {values[group][:40]!r}")
            data[name] = x * self.scale.get(group, 1.0)
        if not data:
            return None
        if self.step_group and self.step_group in values:
            data["step"] = need_int(values[self.step_group].strip(), "step", f"format {self.name}")
        else:
            data["step"], data["step_counted"] = ctx.next_step(), True
        return Parsed("metrics", data)


def _maybe_number(text: str) -> Any:
    x = number(text)
    return text if x is None else x


def compile_format(spec: Any, index: int) -> UserFormat:
    if not isinstance(spec, dict):
        raise ConfigError(f"formats[{index}] must be a table with name and regex, not {type(spec).__name__}")
    name = spec.get("name")
    label = f"format {name!r}" if name else f"formats[{index}]"
    if not isinstance(name, str) or not _NAME.match(name):
        raise ConfigError(f"{label}: name must be 1-64 letters, digits, '_', '-' or '.'")
    unknown = set(spec) - _KEYS
    if unknown:
        raise ConfigError(f"{label}: unknown keys {sorted(unknown)} (allowed: {sorted(_KEYS)})")
    regex = spec.get("regex")
    if not isinstance(regex, str) or not regex:
        raise ConfigError(f"{label}: regex must be a non-empty string")
    try:
        pattern = re.compile(regex)
    except re.error as exc:
        raise ConfigError(f"{label}: bad regex '{regex}': {exc}") from exc
    groups = list(pattern.groupindex)
    if not groups:
        raise ConfigError(f"{label}: regex '{regex}' has no named group (?P<name>...)")
    kind = spec.get("kind", "metrics")
    if kind not in ("metrics", "log"):
        raise ConfigError(f"{label}: kind must be 'metrics' or 'log', not {kind!r}")
    mapping = spec.get("fields") or {}
    units = spec.get("units") or {}
    if not isinstance(mapping, dict) or not isinstance(units, dict):
        raise ConfigError(f"{label}: fields and units must be tables (group = \"name\")")
    for group in list(mapping) + list(units):
        if group not in pattern.groupindex:
            raise ConfigError(f"{label}: {group!r} is not a named group of regex '{regex}' (groups: {groups})")
    fields: dict[str, str] = {}
    for group in groups:
        target = mapping.get(group, group)
        if not isinstance(target, str) or not re.match(r"^[A-Za-z_]\w*$", target):
            raise ConfigError(f"{label}: field name for group {group!r} must be an identifier, not {target!r}")
        fields[group] = target
    scale: dict[str, float] = {}
    for group, unit in units.items():
        u = UNITS.get(str(unit).lower())
        if u is None:
            raise ConfigError(f"{label}: unknown unit {unit!r} for group {group!r} (known: {sorted(UNITS)})")
        scale[group] = u[0]
    step_group = next((g for g, f in fields.items() if f == "step"), None)
    if kind == "metrics" and not [g for g in groups if g != step_group]:
        raise ConfigError(f"{label}: regex '{regex}' has no metric group besides step")
    glob = spec.get("glob")
    if glob is not None and not isinstance(glob, str):
        raise ConfigError(f"{label}: glob must be a string")
    return UserFormat(name=name, pattern=pattern, fields=fields, scale=scale, glob=glob, kind=kind,
                      step_group=step_group)


def compile_formats(specs: Any) -> tuple[UserFormat, ...]:
    if specs is None:
        return ()
    if isinstance(specs, str):  # RANKWATCH_FORMATS='[{"name": ..., "regex": ...}]'
        try:
            specs = orjson.loads(specs)
        except orjson.JSONDecodeError as exc:
            raise ConfigError(f"formats: not a JSON list of tables: {exc}") from exc
    if not isinstance(specs, list):
        raise ConfigError("formats must be an array of tables ([[formats]] in the config file)")
    out = [compile_format(s, i) for i, s in enumerate(specs)]
    names = [f.name for f in out]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise ConfigError(f"formats: names used twice: {sorted(dup)}")
    return tuple(out)


def load_user_formats(path: str | None = None, cli: dict[str, Any] | None = None,
                      env: dict[str, str] | None = None) -> tuple[UserFormat, ...]:
    """The configured formats (config file `[[formats]]`, env RANKWATCH_FORMATS), compiled; ConfigError if bad."""
    cfg = load_config(FormatsConfig, cli, env=env, path=path)
    return compile_formats(cfg.formats)


__all__ = ["FormatsConfig", "UserFormat", "UNITS", "compile_format", "compile_formats", "load_user_formats"]
