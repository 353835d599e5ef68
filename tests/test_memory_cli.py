"""`rankwatch memory ...` (the users' memory tool's commands, kept), its report, MemoryWatcher, and the hook's GPU
memory sampling (allocator stats injected: no GPU here)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from rankwatch.cli import main
from rankwatch.sim_memory import fragmentation_run, imbalance_job, leak_run, write_jsonl

RISK_KEYS = {"risk_level", "confidence", "current_usage_percent", "growth_rate_mb_per_sec",
             "predicted_oom_time_seconds", "recommendation"}


@pytest.fixture(scope="module")
def leak_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("rec") / "gpu.jsonl"
    write_jsonl(leak_run(3, "50MB/s"), str(path))
    return path


def test_memory_oom_replay_writes_the_users_report_shape_and_a_plot(leak_file, tmp_path, capsys):
    out = tmp_path / "oom_report.json"
    assert main(["memory", "oom", "--replay", str(leak_file), "--output", str(out), "--plot"]) == 0
    report = json.loads(out.read_text())
    assert set(report) >= {"timestamp", "devices", "anomalies"}
    dev = report["devices"]["node000/0"]
    assert set(dev["current_memory"]) >= {"allocated", "free", "total", "utilization"}
    assert set(dev["statistics"]) == {"avg_utilization", "max_utilization", "avg_fragmentation", "num_snapshots"}
    assert dev["statistics"]["num_snapshots"] == len(leak_file.read_text().splitlines())
    assert dev["peak_memory"] > 0.95 * dev["current_memory"]["total"]
    assert RISK_KEYS <= set(dev["risk_assessment"])
    ooms = [a for a in report["anomalies"] if a["detector"] == "oom"]
    assert ooms and ooms[0]["host"] == "node000" and ooms[0]["gpu"] == 0
    assert RISK_KEYS <= set(ooms[0]["context"])
    printed = capsys.readouterr().out
    assert "out of memory in" in printed and "OOM forecast" in printed
    assert (tmp_path / "oom_report_node000-gpu0.png").stat().st_size > 10_000


def test_memory_profile_reads_nvidia_smi_csv(tmp_path, capsys):
    csv = tmp_path / "smi.csv"
    lines = ["timestamp, index, memory.used [MiB], memory.total [MiB], utilization.gpu [%]"]
    for i in range(120):
        for gpu in (0, 1):
            lines.append(f"2026/10/01 10:{i // 60:02d}:{i % 60:02d}.000, {gpu}, {30000 + 100 * gpu + (i % 4) * 500} MiB, "
                         f"81559 MiB, {95 - gpu} %")
    csv.write_text("\n".join(lines) + "\n")
    out = tmp_path / "profile.json"
    assert main(["memory", "profile", "--replay", str(csv), "--host", "n1", "--output", str(out)]) == 0
    rep = json.loads(out.read_text())
    assert sorted(rep["devices"]) == ["n1/0", "n1/1"]
    st = rep["devices"]["n1/1"]["statistics"]
    assert st["num_snapshots"] == 120 and st["avg_gpu_util_pct"] == 94.0
    assert st["max_utilization"] == pytest.approx(100 * (30100 + 1500) / 81559, abs=0.01)
    assert rep["anomalies"] == []
    assert "n1/0" in capsys.readouterr().out


def test_memory_leak_and_fragment_on_recordings_with_allocator_stats(tmp_path, capsys):
    frag = tmp_path / "frag.jsonl"
    write_jsonl(fragmentation_run(1), str(frag))
    out = tmp_path / "frag.json"
    assert main(["memory", "fragment", "--replay", str(frag), "--output", str(out)]) == 0
    rep = json.loads(out.read_text())
    fr = rep["devices"]["node000/0"]["fragmentation"]
    assert fr is not None and fr["fragmentation_ratio"] > 0.2
    assert any(a["detector"] == "fragmentation" for a in rep["anomalies"])
    assert rep["devices"]["node000/0"]["statistics"]["avg_fragmentation"] > 5
    leak = tmp_path / "leak.jsonl"
    write_jsonl(leak_run(1, "60MB/min"), str(leak))
    out = tmp_path / "leak.json"
    assert main(["memory", "leak", "--replay", str(leak), "--output", str(out), "--threshold", "20"]) == 0
    rep = json.loads(out.read_text())
    (found,) = [a for a in rep["anomalies"] if a["detector"] == "leak"]
    assert found["value"] == pytest.approx(60, rel=0.3) and found["threshold"] == 20
    assert "LEAK" in capsys.readouterr().out


def test_memory_report_folder_names_the_imbalanced_gpu_and_plots_each(tmp_path, capsys):
    runs = imbalance_job(2, True, duration=400.0)
    folder = tmp_path / "job-a"
    folder.mkdir()
    for r in runs:
        write_jsonl(r, str(folder / f"{r.host}-gpu{r.gpu}.jsonl"))
    out = tmp_path / "report"
    assert main(["memory", "report", str(folder), "--out", str(out)]) == 0
    rep = orjson.loads((out / "memory_report.json").read_bytes())
    assert len(rep["devices"]) == len(runs)
    victim = runs[0].labels["victim"]
    named = {f"{a['host']}/{a['gpu']}" for a in rep["anomalies"] if a["detector"] == "imbalance"}
    assert named == {victim}
    assert len(list(out.glob("*.png"))) == len(runs)
    assert rep["devices"][victim]["rank"] is not None


def test_memory_commands_without_a_gpu_say_so_and_exit_non_zero():
    r = subprocess.run([sys.executable, "-m", "rankwatch.cli", "memory", "oom", "--duration", "1"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1].startswith("rankwatch memory: cannot read GPUs")


def test_memory_watcher_calls_back_with_device_and_prediction(leak_file):
    from rankwatch.producers.gpu_replay import read_samples

    from rankwatch.memory_watch import MemoryWatcher

    rows = [r for r in read_samples(str(leak_file), "local")]
    it = iter(rows)
    clock = iter(r.ts for r in rows)
    w = MemoryWatcher(sample_fn=lambda: [{k: v for k, v in next(it).data.items() if k != "host"}],
                      clock=lambda: next(clock), host="node000")
    calls = []
    w.add_warning_callback(lambda device, prediction: calls.append((device, prediction.risk_level.value,
                                                                    prediction.predicted_oom_time_seconds)))
    for _ in range(len(rows) - 5):
        w.sample_once()
    assert calls and calls[0][0] == 0 and calls[-1][1] == "critical"
    assert all(c[2] is not None for c in calls)
    report = w.generate_report()
    assert report["devices"]["node000/0"]["risk_assessment"]["risk_level"] in ("high", "critical")


def test_hook_samples_allocator_stats_warns_and_finds_python_side_growth(tmp_path):
    from rankwatch.producers.training import TrainingMonitor

    gib = 2**30
    state = {"i": 0}
    keep = []

    def stats():  # a leaking process: 40 MB of allocations kept per second, a 6 GiB sawtooth per step
        i = state["i"]
        alloc = 30 * gib + 40 * 2**20 * i + 6 * gib * ((i % 3) / 2)
        return {"gpu": 2, "mem_used_bytes": alloc + 2 * gib, "mem_total_bytes": 80 * gib, "allocated_bytes": alloc,
                "reserved_bytes": alloc + 1.5 * gib, "active_bytes": alloc, "inactive_split_bytes": 0,
                "num_alloc_retries": 0, "num_ooms": 0}

    clock = {"t": 1e9}
    mon = TrainingMonitor(tmp_path / "exp", rank=5, memory_stats=stats, clock=lambda: clock["t"],
                          track_host_memory=True, host="node3")
    warnings = []
    mon.add_warning_callback(lambda device, p: warnings.append((device, p.risk_level.value)))
    found = []
    for step in range(1300):
        state["i"] = step
        clock["t"] = 1e9 + step
        keep.append(bytearray(2000))  # the Python side grows too
        found += mon.observe(step, 2.0, 1.0)
    report = mon.host_memory_report()
    mon.close()
    ooms = [a for a in found if a.detector == "oom"]
    assert ooms and ooms[0].rank == 5 and ooms[0].host == "node3" and ooms[0].gpu == 2
    assert "host_memory" in ooms[0].context and ooms[0].context["host_memory"]["rss_bytes"] > 0
    assert warnings and warnings[0][0] == 2 and warnings[-1][1] == "critical"
    assert report["rss_bytes"] > 0 and isinstance(report["top_growth"], list)
    lines = (tmp_path / "exp" / "gpu" / "gpu_rank_5.jsonl").read_bytes().splitlines()
    first = orjson.loads(lines[0])
    assert len(lines) == 1300 and first["rank"] == 5 and first["allocated_bytes"] == 30 * gib and "rss_bytes" in first
    saved = (tmp_path / "exp" / "anomalies" / "memory_anomalies_rank_5.jsonl").read_bytes().splitlines()
    assert len(saved) == len([a for a in found if a.detector in ("oom", "leak", "fragmentation")])
    # what the hook writes is what `analyze` and the shipper read: the same forecast offline
    from rankwatch.processors.offline import analyze

    offline = [a for a in analyze([str(tmp_path / "exp" / "gpu")], job="exp") if a.detector == "oom"]
    assert [round(a.event_time) for a in offline] == [round(a.event_time) for a in ooms]


def test_hook_without_cuda_samples_nothing(tmp_path):
    from rankwatch.producers.training import TrainingMonitor

    mon = TrainingMonitor(tmp_path, rank=0)
    for step in range(5):
        mon.observe(step, 1.0)
    mon.close()
    assert mon.gpu_memory is False and not (tmp_path / "gpu").exists()


def test_torch_memory_stats_reports_and_resets_the_interval_peak_only_on_request(monkeypatch, tmp_path):
    import torch
    from rankwatch.processors.offline import read_records
    from rankwatch.producers import memory_hook

    gib = 2**30
    resets = []
    fake = {"allocated_bytes.all.current": 30 * gib, "allocated_bytes.all.peak": 37 * gib,
            "reserved_bytes.all.current": 38 * gib, "num_alloc_retries": 0, "num_ooms": 0}
    monkeypatch.setattr(memory_hook, "cuda_in_use", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "memory_stats", lambda dev: dict(fake))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda dev: (40 * gib, 80 * gib))
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda dev: resets.append(dev))
    plain = memory_hook.torch_memory_stats()
    assert plain is not None and "peak_allocated_bytes" not in plain and resets == []
    peaked = memory_hook.MemoryProbe(None, 1.0, host="n1", peaks=True).sample(1e9)
    assert peaked is not None and peaked["peak_allocated_bytes"] == 37 * gib and resets == [0]
    assert peaked["allocated_bytes"] == 30 * gib and peaked["mem_used_bytes"] == 40 * gib
    # the GPU sample format keeps it (the hook's saved samples, `analyze`, the shipper)
    (tmp_path / "gpu_rank_0.jsonl").write_bytes(orjson.dumps({"ts": 1e9, "rank": 0, **peaked}) + b"\n")
    recs = list(read_records([str(tmp_path)]))
    assert len(recs) == 1 and recs[0].data["peak_allocated_bytes"] == 37 * gib
