"""GPU memory deployment assets: alert rules pass promtool's unit tests, use only exported metrics, are loaded
by Prometheus and mounted by compose; the dashboard queries exported metrics and plots the forecast line."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml
from prometheus_client import CollectorRegistry

ROOT = Path(__file__).resolve().parents[1]
PROM = ROOT / "deploy" / "prometheus"
RULES = "rankwatch-memory-alerts.yml"


def _exported() -> set[str]:
    from rankwatch.processors.sinks import WorkerMetrics

    reg = CollectorRegistry()
    WorkerMetrics(reg)
    out = set()
    for fam in reg.collect():
        out.add(fam.name)
        if fam.type in ("counter", "histogram"):
            out |= {fam.name + "_total", fam.name + "_bucket", fam.name + "_count", fam.name + "_sum"}
    return out


def test_memory_alerts_use_exported_per_gpu_gauges_and_are_deployed():
    exported = _exported()
    rules = yaml.safe_load((PROM / RULES).read_text())
    names = set()
    for group in rules["groups"]:
        for rule in group["rules"]:
            names.add(rule["alert"])
            used = set(re.findall(r"\b(rankwatch_[a-z_]+)", rule["expr"]))
            assert used and used <= exported, f"{rule['alert']} uses unknown metrics {used - exported}"
            assert "host" in rule["expr"] and "gpu" in rule["expr"]  # alerts name the GPU
    assert {"RankwatchGpuOomImminent", "RankwatchGpuMemoryLeak"} <= names
    prom = yaml.safe_load((PROM / "prometheus.yml").read_text())
    assert f"/etc/prometheus/rules/{RULES}" in prom["rule_files"]
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert f"./deploy/prometheus/{RULES}:/etc/prometheus/rules/{RULES}:ro" in compose["services"]["prometheus"]["volumes"]


def test_memory_dashboard_queries_exported_gauges_and_has_a_forecast_line():
    dash = json.loads((ROOT / "deploy/grafana/dashboards/rankwatch-memory.json").read_text())
    assert dash["uid"] == "rankwatch-memory"
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)) >= 6
    exported = _exported()
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    for e in exprs:
        used = set(re.findall(r"\b(rankwatch_[a-z_]+)", e))
        assert used and used <= exported, e
    assert any("rankwatch_gpu_memory_peak_bytes" in e and "growth_bytes_per_second" in e for e in exprs)
    assert {v["name"] for v in dash["templating"]["list"]} == {"job", "host", "gpu"}
