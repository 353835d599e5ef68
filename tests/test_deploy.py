"""Deployment assets are valid: alert rules pass promtool's unit tests, configs load, compose is consistent."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from rankwatch.producers.shipper import build_parser as producer_parser

from rankwatch.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
PROM = ROOT / "deploy" / "prometheus"
promtool = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(promtool is None and not __import__("os").environ.get("CI"),
                                    reason="promtool not installed (CI installs it)")


RULE_TESTS = sorted(p.name for p in PROM.glob("*-alerts.test.yml"))


@needs_promtool
@pytest.mark.parametrize("test_file", RULE_TESTS)
def test_alert_rules_unit_tests_pass(test_file):
    r = subprocess.run([promtool or "promtool", "test", "rules", test_file], cwd=PROM,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS" in r.stdout + r.stderr


def test_every_rule_file_has_unit_tests_and_is_loaded():
    rules = sorted(p.name for p in PROM.glob("*-alerts.yml"))
    assert [r.replace(".yml", ".test.yml") for r in rules] == RULE_TESTS
    loaded = [os.path.basename(f) for f in yaml.safe_load((PROM / "prometheus.yml").read_text())["rule_files"]]
    assert sorted(loaded) == rules


@needs_promtool
def test_prometheus_config_and_rules_check(tmp_path):
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    mounts = dict(v.rsplit(":", 1)[0].split(":", 1)[::-1] for v in compose["services"]["prometheus"]["volumes"])
    cfg = (PROM / "prometheus.yml").read_text()
    for rule in yaml.safe_load(cfg)["rule_files"]:
        host = mounts[rule]  # every rule file the config loads is mounted by compose
        assert (ROOT / host).is_file()
        cfg = cfg.replace(rule, str(ROOT / host))
    (tmp_path / "prometheus.yml").write_text(cfg)
    r = subprocess.run([promtool or "promtool", "check", "config", str(tmp_path / "prometheus.yml")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_every_alert_uses_metrics_rankwatch_exports():
    from prometheus_client import CollectorRegistry
    from rankwatch.processors.sinks import WorkerMetrics
    from rankwatch.producers.shipper import ShipperMetrics

    reg = CollectorRegistry()
    WorkerMetrics(reg)
    ShipperMetrics(reg)
    # a family's samples carry the names PromQL sees (_total, _bucket, ...), also for series not yet created
    exported = set()
    for fam in reg.collect():
        exported.add(fam.name)
        exported.update({fam.name + "_total", fam.name + "_bucket", fam.name + "_count", fam.name + "_sum"}
                        if fam.type in ("counter", "histogram") else set())
    import re

    for path in PROM.glob("*-alerts.yml"):
        for group in yaml.safe_load(path.read_text())["groups"]:
            for rule in group["rules"]:
                used = set(re.findall(r"\b(rankwatch_[a-z_]+)", rule["expr"]))
                assert used <= exported, f"{rule['alert']} uses unknown metrics {used - exported}"


def test_compose_is_consistent():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"kafka", "rankwatch-worker", "rankwatch-producer", "prometheus", "grafana"} <= set(services)
    for name, svc in services.items():
        for vol in svc.get("volumes", []):
            host = vol.split(":")[0]
            if host.startswith("./"):
                assert (ROOT / host).exists(), f"{name} mounts missing {host}"
        build = svc.get("build")
        if build:
            assert (ROOT / build["context"] / build["dockerfile"]).is_file()
        for dep in svc.get("depends_on", {}):
            assert dep in services
    # the commands are real CLI invocations
    build_parser().parse_args(services["rankwatch-worker"]["command"][1:])
    producer_parser().parse_args(services["rankwatch-producer"]["command"][1:])
    prom = yaml.safe_load((PROM / "prometheus.yml").read_text())
    targets = [t for sc in prom["scrape_configs"] for c in sc["static_configs"] for t in c["targets"]]
    for t in targets:
        host, port = t.split(":")
        assert host in services and any(p.startswith(port + ":") for p in services[host].get("ports", []))


def test_grafana_dashboard_is_valid_and_queries_known_metrics():
    dash = json.loads((ROOT / "deploy/grafana/dashboards/rankwatch.json").read_text())
    assert dash["uid"] == "rankwatch" and len(dash["panels"]) >= 6
    uids = set()
    for path in sorted((ROOT / "deploy/grafana/dashboards").glob("*.json")):
        dash = json.loads(path.read_text())
        assert dash["uid"] not in uids
        uids.add(dash["uid"])
        ids = [p["id"] for p in dash["panels"]]
        assert len(ids) == len(set(ids)), path
        for p in dash["panels"]:
            assert all("rankwatch_" in t["expr"] for t in p["targets"]), path
    ds = yaml.safe_load((ROOT / "deploy/grafana/provisioning/datasources/prometheus.yml").read_text())
    assert ds["datasources"][0]["uid"] == "prometheus"
    am = yaml.safe_load((ROOT / "deploy/alertmanager/alertmanager.yml").read_text())
    receivers = {r["name"] for r in am["receivers"]}
    assert am["route"]["receiver"] in receivers
    assert all(r["receiver"] in receivers for r in am["route"]["routes"])
