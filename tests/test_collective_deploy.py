"""Collective-op deployment assets: the hang/straggler/slow-stream alerts exist (promtool tests, loading, mounting
and exported metrics are checked for every rule file in tests/test_deploy.py); the dashboard queries exported
metrics; the worker mirrors the detectors' gauges."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

from tests.test_memory_deploy import _exported

ROOT = Path(__file__).resolve().parents[1]
PROM = ROOT / "deploy" / "prometheus"
RULES = "rankwatch-collective-alerts.yml"


def test_collective_alerts_exist():
    """promtool tests, loading, mounting and exported metrics are checked for every rule file in test_deploy.py."""
    rules = yaml.safe_load((PROM / RULES).read_text())
    names = {rule["alert"] for group in rules["groups"] for rule in group["rules"]}
    assert {"RankwatchCollectiveHang", "RankwatchStraggler", "RankwatchSlowStreams"} <= names


def test_collective_dashboard_queries_exported_metrics():
    dash = json.loads((ROOT / "deploy/grafana/dashboards/rankwatch-collectives.json").read_text())
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)) >= 4
    exported = _exported()
    for e in (t["expr"] for p in dash["panels"] for t in p["targets"]):
        used = set(re.findall(r"\b(rankwatch_[a-z_]+)", e))
        assert used and used <= exported, e


def test_hang_and_straggler_gauges_follow_the_detector():
    """The worker mirrors the detectors' gauges: a straggler's series exists while it is named, then goes."""
    from prometheus_client import CollectorRegistry, generate_latest
    from rankwatch.processors.sinks import WorkerMetrics
    from rankwatch.processors.stages import Gauges

    m = WorkerMetrics(CollectorRegistry())
    g = Gauges()
    g.set("rankwatch_hang_active", ("j",), 1)
    g.set("rankwatch_straggler_lag_seconds", ("j", "37"), 0.25)
    m.sync_gauges(g)
    text = generate_latest(m.registry).decode()
    assert 'rankwatch_hang_active{job="j"} 1.0' in text
    assert 'rankwatch_straggler_lag_seconds{job="j",rank="37"} 0.25' in text
    g.remove("rankwatch_straggler_lag_seconds", ("j", "37"))
    m.sync_gauges(g)
    assert "rank=\"37\"" not in generate_latest(m.registry).decode()
    m.observe_anomaly("op_timing", "warning", "op_interval", "j", 5.0, 0.0, "allreduce")
    m.observe_anomaly("op_timing", "warning", "op_interval", "j", 5.0, 0.0, "MyCustomOp")
    text = generate_latest(m.registry).decode()
    assert 'rankwatch_op_timing_anomalies_total{job="j",role="allreduce"} 1.0' in text
    assert 'role="other"' in text  # bounded vocabulary
