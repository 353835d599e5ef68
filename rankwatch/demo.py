"""`rankwatch demo`: a simulated 8-rank job with injected faults, shipped by the real producer through the
embedded broker to the real worker, anomalies shown live, then an injected-vs-detected summary."""

from __future__ import annotations

import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from rankwatch.broker import EmbeddedBroker, die_with_parent, ensure_topics, free_port, stop_process
from rankwatch.config import Settings
from rankwatch.consume import COLUMNS, _cell, follow_anomalies
from rankwatch.parsing import parse_iso
from rankwatch.sim_collectives import build_timeline
from rankwatch.simulate import FAULT_KINDS, Fault, Scenario, default_faults, write_job

SPEED = 20.0  # simulated seconds per wall second


COLLECTIVE = ("straggler", "slow_stream", "hang")


def matches(fault, anomaly: dict, window: tuple[float, float] | None = None, any_signal: bool = False) -> bool:
    """Does this anomaly report that fault? (`any_signal`: is it explained by it; a straggler slows every rank,
    so it explains every rank's step time and throughput in its window.) Collective faults match by time,
    since collectives carry no step number."""
    signal, detector = FAULT_KINDS[fault.kind]
    if fault.kind in COLLECTIVE and window is not None:
        t = parse_iso(anomaly["event_time"])
        in_time = window[0] - 1.0 <= t <= window[1] + 5.0
        if any_signal:
            return in_time
        return in_time and anomaly.get("rank") == fault.rank and anomaly.get("signal") == signal
    step = (anomaly.get("context") or {}).get("step")
    return (anomaly.get("rank") == fault.rank and (any_signal or anomaly.get("signal") == signal)
            and step is not None and fault.step <= step <= fault.step + fault.length)


def run_demo(settings: Settings, ranks: int = 8, steps: int = 300, seed: int = 7, workdir: str | None = None
             ) -> int:
    import subprocess

    from rankwatch.producers.shipper import Shipper, ShipperConfig

    console = Console()
    t_start = time.monotonic()
    broker = None
    worker = None
    tmp = tempfile.TemporaryDirectory(prefix="rankwatch-demo-")
    base = Path(workdir or tmp.name)
    jobdir = base / "demo-job"
    jobdir.mkdir(parents=True, exist_ok=True)
    sc = Scenario(ranks=ranks, steps=steps, seed=seed)
    sc.faults = default_faults(ranks, steps, np.random.default_rng(seed))
    windows = build_timeline(sc).windows
    labelled = [(f, windows.get(i)) for i, f in enumerate(sc.faults) if FAULT_KINDS[f.kind][1]]
    shipper = None
    consumer: threading.Thread | None = None
    stop_consuming = threading.Event()
    try:
        if not settings.bootstrap:
            broker = EmbeddedBroker(port=free_port()).start()
            settings.bootstrap = broker.bootstrap
            console.print(f"[bold]embedded broker[/] on {broker.bootstrap}")
        settings.app_id = f"rankwatch-demo-{int(time.time())}"
        ensure_topics(settings)
        metrics_port = free_port()
        worker = subprocess.Popen(
            [sys.executable, "-m", "rankwatch.cli", "worker", "--bootstrap", settings.bootstrap, "--embedded",
             "--metrics-port", str(metrics_port)],
            env={**os.environ, **settings.env()},
            preexec_fn=die_with_parent, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True)  # Ctrl-C stops the demo, which stops the worker, then the broker
        console.print(f"[bold]worker[/] pid {worker.pid}, metrics on http://127.0.0.1:{metrics_port}/metrics")
        shipper = Shipper([str(jobdir)], settings, ShipperConfig(
            checkpoint=str(base / "shipper-checkpoint.json"), metrics_port=0))
        ship_errors: list[BaseException] = []

        def ship() -> None:
            try:
                shipper.run()
            except BaseException as exc:  # surfaced below: the demo must not pretend to work
                ship_errors.append(exc)
                raise

        threading.Thread(target=ship, name="shipper", daemon=True).start()
        seen: list[dict] = []

        def consume() -> None:
            for rec in follow_anomalies(settings, follow=True, poll_ms=200, stop=stop_consuming):
                seen.append(rec)
                console.print("[red]ANOMALY[/] " + " | ".join(_cell(rec, c) for c in COLUMNS[1:]),
                              style="bold red" if rec.get("severity") == "critical" else "yellow")

        consumer = threading.Thread(target=consume, name="anomalies", daemon=True)
        consumer.start()
        console.print(f"[bold]simulating[/] {ranks} ranks x {steps} steps in {jobdir} "
                      f"(faults: " + ", ".join(f"{f.kind} on rank {f.rank} at step {f.step}" for f in sc.faults)
                      + ")")
        n = write_job(sc, jobdir, speed=SPEED)
        console.print(f"job finished: {n} lines written; waiting for the pipeline to drain")
        deadline = time.monotonic() + 45
        while time.monotonic() < deadline and not ship_errors:
            if all(any(matches(f, a, w) for a in seen) for f, w in labelled) and shipper.tailer.lag_bytes() == 0:
                time.sleep(1.0)  # let trailing anomalies arrive
                break
            time.sleep(0.2)
        stop_consuming.set()
        if ship_errors:
            console.print(f"[red]the shipper failed: {ship_errors[0]!r}[/]")
            return 1
        return _summary(console, labelled, seen, shipper.shipped_total, time.monotonic() - t_start)
    finally:
        if consumer is not None:  # closed before the broker goes, or it logs the lost connection as errors
            stop_consuming.set()
            consumer.join(timeout=5)
        if shipper is not None:
            shipper.stop_event.set()
            shipper.close()
        stop_process(worker, 15)
        if broker is not None:
            broker.stop()
        tmp.cleanup()


def _summary(console: Console, labelled: list[tuple[Fault, tuple[float, float] | None]], seen: list[dict],
             shipped: int, wall: float) -> int:
    table = Table(title="injected vs detected")
    for col in ("fault", "rank", "step", "detected", "by", "first seen (event time)"):
        table.add_column(col)
    all_found = True
    explained = set()
    for f, w in labelled:
        hits = [a for a in seen if matches(f, a, w)]
        explained.update(a["id"] for a in hits)
        all_found &= bool(hits)
        first = min((a["event_time"] for a in hits), default="")
        table.add_row(f.kind, str(f.rank), str(f.step), "[green]yes[/]" if hits else "[red]NO[/]",
                      ", ".join(sorted({a["detector"] for a in hits})), first[11:23])
    console.print(table)
    others = [a for a in seen if a["id"] not in explained
              and not any(matches(f, a, w, any_signal=True) for f, w in labelled)]
    console.print(f"{shipped} lines shipped, {len(seen)} anomalies, {len(others)} not explained by an injected "
                  f"fault; wall time {wall:.1f} s")
    for a in others:
        console.print(f"  unexplained: rank {a['rank']} step {a['context'].get('step')} {a['detector']} "
                      f"{a['signal']} {a['message']}")
    return 0 if all_found else 1
