"""Typed settings, loaded once per component with precedence CLI > env (RANKWATCH_*) > TOML file > default.

Each component owns one dataclass. The loader is generic: a field ``foo_bar`` is read from the CLI mapping
key ``foo_bar``, the environment variable ``RANKWATCH_FOO_BAR`` and the TOML key ``foo_bar`` (top level or in
the component's ``[section]``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, TypeVar

import tomllib

T = TypeVar("T")
ENV_PREFIX = "RANKWATCH_"


class ConfigError(ValueError):
    """A setting could not be read or has the wrong type."""


@dataclass
class Settings:
    """Shared settings: where Kafka is, what the topics are called, where metrics are served."""

    bootstrap: str | None = None  # None: use (and in `up`/`demo`, start) the embedded broker
    security_protocol: str = "PLAINTEXT"  # PLAINTEXT | SSL | SASL_PLAINTEXT | SASL_SSL
    sasl_mechanism: str | None = None  # PLAIN | SCRAM-SHA-256 | SCRAM-SHA-512
    sasl_username: str | None = None
    sasl_password: str | None = None  # prefer RANKWATCH_SASL_PASSWORD over the config file
    ssl_cafile: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    embedded_port: int = 9092
    topic_logs: str = "rankwatch.logs"
    topic_metrics: str = "rankwatch.metrics"
    topic_ops: str = "rankwatch.ops"
    topic_gpu: str = "rankwatch.gpu"
    topic_logkeys: str = "rankwatch.logkeys"
    topic_summaries: str = "rankwatch.summaries"  # stage 1 -> stage 2, keyed by job (docs/ARCHITECTURE.md)
    topic_anomalies: str = "anomalies"
    topic_deadletter: str = "rankwatch.deadletter"
    partitions: int = 8
    replication_factor: int = 1
    job: str | None = None
    metrics_port: int = 9108
    metrics_bind: str = "0.0.0.0"
    app_id: str = "rankwatch"
    max_job_labels: int = 50  # bounded Prometheus label cardinality: further jobs are labelled "other"

    def topics(self) -> dict[str, str]:
        """Logical record family -> topic name."""
        return {
            "log": self.topic_logs,
            "metrics": self.topic_metrics,
            "op": self.topic_ops,
            "gpu": self.topic_gpu,
            "logkey": self.topic_logkeys,
            "summaries": self.topic_summaries,
            "anomaly": self.topic_anomalies,
            "deadletter": self.topic_deadletter,
        }

    def use_topic_prefix(self, prefix: str) -> None:
        """Name every topic `<prefix>.<family>`: isolated topics for a test or an evaluation run."""
        for f in fields(self):
            if f.name.startswith("topic_"):
                setattr(self, f.name, f"{prefix}.{f.name[len('topic_'):]}")

    def env(self) -> dict[str, str]:
        """These settings as RANKWATCH_* variables, to hand to a child process (worker, shipper)."""
        return {ENV_PREFIX + f.name.upper(): str(getattr(self, f.name)) for f in fields(self)
                if getattr(self, f.name) is not None}

    def kafka_kwargs(self) -> dict[str, Any]:
        """Connection and security arguments for kafka-python clients."""
        if not self.bootstrap:
            raise ConfigError("no bootstrap servers: pass --bootstrap or start the embedded broker")
        kw: dict[str, Any] = {
            "bootstrap_servers": self.bootstrap.split(","),
            "security_protocol": self.security_protocol,
        }
        if self.sasl_mechanism:
            kw.update(
                sasl_mechanism=self.sasl_mechanism,
                sasl_plain_username=self.sasl_username,
                sasl_plain_password=self.sasl_password,
            )
        for name in ("ssl_cafile", "ssl_certfile", "ssl_keyfile"):
            if getattr(self, name):
                kw[name] = getattr(self, name)
        return kw

    def faust_broker(self) -> list[str]:
        if not self.bootstrap:
            raise ConfigError("no bootstrap servers configured")
        return [f"kafka://{hp.strip()}" for hp in self.bootstrap.split(",") if hp.strip()]

    def faust_credentials(self) -> Any:
        """faust credentials object matching the kafka-python settings (None for PLAINTEXT)."""
        if self.security_protocol == "PLAINTEXT":
            return None
        import faust
        from aiokafka.helpers import create_ssl_context

        ctx = None
        if "SSL" in self.security_protocol:
            ctx = create_ssl_context(
                cafile=self.ssl_cafile, certfile=self.ssl_certfile, keyfile=self.ssl_keyfile
            )
        if self.sasl_mechanism:
            return faust.SASLCredentials(
                username=self.sasl_username,
                password=self.sasl_password,
                mechanism=self.sasl_mechanism,
                ssl_context=ctx,
            )
        return faust.SSLCredentials(ctx)


def _coerce(type_text: str, raw: Any, name: str) -> Any:
    optional = "None" in type_text
    base = type_text.replace("| None", "").replace("None |", "").strip()
    if raw is None or (optional and isinstance(raw, str) and raw.strip().lower() in ("", "none", "null")):
        if optional:
            return None
        raise ConfigError(f"{name} must not be empty")
    try:
        if base == "bool":
            if isinstance(raw, bool):
                return raw
            text = str(raw).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        if base == "int":
            return int(raw)
        if base == "float":
            return float(raw)
        if base == "str":
            return str(raw)
        if base.startswith("tuple"):
            items = raw if isinstance(raw, (list, tuple)) else [s for s in str(raw).split(",") if s.strip()]
            return tuple(s.strip() if isinstance(s, str) else s for s in items)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{name}: cannot read {raw!r} as {base}") from exc
    return raw


def load_config(
    cls: type[T],
    cli: Mapping[str, Any] | None = None,
    *,
    env: Mapping[str, str] | None = None,
    path: str | os.PathLike[str] | None = None,
    section: str | None = None,
) -> T:
    """Build ``cls`` from CLI > env > file > defaults. CLI values of None mean "not given"."""
    env = os.environ if env is None else env
    path = path or env.get(ENV_PREFIX + "CONFIG")
    values: dict[str, Any] = {}
    known = {f.name: f for f in fields(cls)}  # type: ignore[arg-type]
    if path:
        try:
            data = tomllib.loads(Path(path).read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"cannot read config file {path}: {exc}") from exc
        flat = {k: v for k, v in data.items() if not isinstance(v, dict)}
        if section and isinstance(data.get(section), dict):
            flat.update(data[section])
        values.update({k: v for k, v in flat.items() if k in known})
    for name in known:
        key = ENV_PREFIX + name.upper()
        if key in env:
            values[name] = env[key]
    for name, value in (cli or {}).items():
        if name in known and value is not None:
            values[name] = value
    coerced = {n: _coerce(str(known[n].type), v, n) for n, v in values.items()}
    return cls(**coerced)


__all__ = ["ConfigError", "Settings", "load_config", "field"]
