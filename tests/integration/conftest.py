"""Fixtures that start real processes: the embedded Tansu broker and the Faust worker."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid

import orjson
import pytest

from rankwatch.broker import EmbeddedBroker, ensure_topics, free_port, stop_process
from rankwatch.config import Settings
from rankwatch.consume import messages_from_beginning

pytestmark = pytest.mark.integration


@pytest.fixture(scope="session")
def broker():
    with EmbeddedBroker() as b:
        yield b


def make_settings(bootstrap: str, partitions: int = 4) -> Settings:
    """Settings with topic names unique to one test, so tests sharing a broker do not see each other."""
    tag = uuid.uuid4().hex[:8]
    s = Settings(bootstrap=bootstrap, partitions=partitions, app_id=f"rw-test-{tag}")
    s.use_topic_prefix(f"t{tag}")
    ensure_topics(s)
    return s


def settings_env(s: Settings) -> dict[str, str]:
    return {**os.environ, **s.env(), "PYTHONUNBUFFERED": "1"}


@pytest.fixture()
def settings(broker):
    return make_settings(broker.bootstrap)


def read_topic(s: Settings, topic: str) -> list[dict]:
    """Every record of a topic, decoded (packs flattened), from the beginning to the current end."""
    out: list[dict] = []
    for m in messages_from_beginning(s, [topic]):
        d = orjson.loads(m.value)
        out.extend(d if isinstance(d, list) else [d])
    return out


class WorkerProcess:
    def __init__(self, s: Settings, *extra: str, env_extra: dict[str, str] | None = None) -> None:
        self.metrics_port = free_port()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "rankwatch.cli", "worker", "--embedded", "--metrics-port",
             str(self.metrics_port), *extra], env={**settings_env(s), **(env_extra or {})},
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def stop(self) -> None:
        stop_process(self.proc, 20)


@pytest.fixture()
def worker(settings):
    w = WorkerProcess(settings)
    yield w
    w.stop()
