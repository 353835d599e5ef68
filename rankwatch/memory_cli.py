"""`rankwatch memory profile|oom|leak|fragment|report`: the users' memory tool's commands, kept, on rankwatch's
detectors. The first four watch this node's GPUs (NVML) or a recording (`--replay`) locally, without Kafka; the
cluster-wide view (the old tool's master/worker "distributed" mode) is `producer --gpu` on every node and the
worker. `report` turns recordings or the GPU topic into the JSON report and a PNG per GPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from rankwatch.config import load_config
from rankwatch.records import Anomaly

MODES = ("profile", "oom", "leak", "fragment")
_THRESHOLD_HELP = {"profile": "usage %% above which the risk is at least medium",
                   "oom": "also warn when usage exceeds PCT (default: forecasts only; risk medium above 90%%)",
                   "leak": "leak threshold in MB/min (default 10)",
                   "fragment": "fragmentation threshold in %% of reserved memory (default 30)"}


def add_memory_parser(sub: Any) -> None:
    p = sub.add_parser("memory", help="GPU memory: profile, OOM risk, leaks, fragmentation, reports (no Kafka)")
    msub = p.add_subparsers(dest="memory_cmd", required=True)
    for mode in MODES:
        m = msub.add_parser(mode, help={"profile": "memory use, peaks and statistics per GPU",
                                         "oom": "OOM forecast and risk per GPU",
                                         "leak": "sustained growth between steps (GPU; Python side: the hook)",
                                         "fragment": "allocator fragmentation (needs the hook's allocator stats)"}[mode])
        m.add_argument("--duration", type=float, help="seconds to watch (default 60; with --monitor: until Ctrl-C)")
        m.add_argument("--interval", type=float, default=1.0, help="seconds between samples (default 1)")
        m.add_argument("--devices", type=int, nargs="+", metavar="N", help="GPU indices (default: all)")
        m.add_argument("--output", metavar="FILE", help="write the JSON report here")
        m.add_argument("--plot", action="store_true", help="a PNG per GPU (next to --output, else here)")
        m.add_argument("--threshold", type=float, metavar="X", help=_THRESHOLD_HELP[mode])
        m.add_argument("--monitor", action="store_true", help="keep watching, print warnings as they come")
        m.add_argument("--replay", metavar="FILE", help="judge a recording (GPU sample JSON lines or nvidia-smi "
                       "CSV) instead of this node's GPUs")
        m.add_argument("--speed", type=float, default=0.0, help="replay pace, x real time (default 0: at once)")
        m.add_argument("--window", type=float, help="leak window in seconds (default: 30 min, or 80%% of "
                       "--duration when shorter)")
        m.add_argument("--enable-tracking", action="store_true", dest="enable_tracking",
                       help="Python-side tracking: done in the training process by TrainingMonitor("
                       "track_host_memory=True); noted here for the old tool's users")
        m.add_argument("--job", default="local")
        m.add_argument("--host", help="host name for the samples (default: this machine's)")
        m.add_argument("--config", help="TOML config file ([detection] section)")
        m.add_argument("-v", "--verbose", action="store_true")
    r = msub.add_parser("report", help="JSON report and a PNG per GPU from recordings or the GPU topic")
    r.add_argument("paths", nargs="*", help="GPU sample JSON lines, logs with GPU lines, nvidia-smi CSV")
    r.add_argument("--from-topic", action="store_true", help="read the GPU topic instead of files")
    r.add_argument("--out", required=True, help="output folder")
    r.add_argument("--job", help="job name for nvidia-smi CSV and logs (default: the folder's name)")
    r.add_argument("--host", help="host name for nvidia-smi CSV (it has no host column)")
    r.add_argument("--bootstrap")
    r.add_argument("--config")
    r.add_argument("-v", "--verbose", action="store_true")


def detection_for(args: argparse.Namespace) -> Any:
    from rankwatch.processors.pipeline import DetectionConfig

    c = load_config(DetectionConfig, {}, path=args.config, section="detection")
    mode, thr = args.memory_cmd, args.threshold
    changes: dict[str, Any] = {}
    if thr is not None and mode in ("profile", "oom"):
        changes.update(oom_usage_threshold_pct=thr, oom_alert_on_usage=mode == "oom")
    elif thr is not None and mode == "leak":
        changes["leak_threshold_mb_per_min"] = thr
    elif thr is not None and mode == "fragment":
        changes["frag_ratio_threshold"] = thr / 100.0
    if args.window:
        changes["leak_window_s"] = args.window
    elif args.duration:
        changes["leak_window_s"] = min(c.leak_window_s, max(120.0, 0.8 * args.duration))
    if args.duration:  # a short watch: the start-up allowances shrink with it
        changes["oom_warmup_s"] = min(c.oom_warmup_s, 0.25 * args.duration)
        changes["mem_settle_s"] = min(c.mem_settle_s, 0.1 * args.duration)
    return dataclasses.replace(c, **changes)


def _print_anomaly(a: Anomaly) -> None:
    from rankwatch.records import iso

    print(f"{iso(a.event_time)[:19]} {a.severity.upper():8} {a.detector:13} {a.message}", flush=True)


def cmd_memory(args: argparse.Namespace) -> int:
    if args.memory_cmd == "report":
        return cmd_memory_report(args)
    from rankwatch.memory_watch import MemoryWatcher
    from rankwatch.producers.gpu import NvmlUnavailable
    from rankwatch.producers.gpu_replay import paced, read_samples

    watcher = MemoryWatcher(interval_s=args.interval, devices=args.devices, job=args.job, host=args.host,
                            config=detection_for(args))
    watcher.add_anomaly_callback(_print_anomaly)
    if args.enable_tracking:
        print("note: Python-side tracking runs inside the training process: TrainingMonitor(..., "
              "track_host_memory=True) adds RSS and the top growing allocation sites to memory anomalies",
              file=sys.stderr)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    if args.replay:
        try:
            records = read_samples(args.replay, args.job, args.host)
            first_ts = None
            for rec in paced(records, args.speed, stop=stop):
                first_ts = rec.ts if first_ts is None else first_ts
                if args.duration and rec.ts - first_ts > args.duration:
                    break
                watcher.feed([rec])
        except (OSError, ValueError) as exc:
            print(f"rankwatch memory: --replay {args.replay}: {exc}", file=sys.stderr)
            return 2
    else:
        try:
            watcher.sample_once()
        except NvmlUnavailable as exc:
            print(f"rankwatch memory: cannot read GPUs: {exc} (use --replay FILE for a recording)", file=sys.stderr)
            return 2
        duration = args.duration if args.duration else (None if args.monitor else 60.0)
        watcher.run(duration, stop)
    report = watcher.generate_report(args.output)
    print_table(args.memory_cmd, report)
    if args.plot:
        from rankwatch.memory_report import plot_devices

        out = Path(args.output).parent if args.output else Path(".")
        prefix = f"{Path(args.output).stem}_" if args.output else f"memory_{args.memory_cmd}_"
        for path in plot_devices(watcher.timeline, watcher.pipeline, watcher.anomalies, out, prefix):
            print(f"plot: {path}")
    if args.memory_cmd == "fragment" and not any(d["fragmentation"] for d in report["devices"].values()):
        print("note: no allocator stats in these samples: NVML does not see the CUDA caching allocator; "
              "TrainingMonitor(..., gpu_memory=True) sends them", file=sys.stderr)
    return 0


def _gib(x: Any) -> str:
    return "" if x is None else f"{x / 2**30:.1f}"


def print_table(mode: str, report: dict[str, Any]) -> None:
    from rich import box
    from rich.console import Console
    from rich.table import Table

    cols = {"profile": ["GPU", "rank", "used", "total", "used%", "peak", "avg%", "max%", "frag%", "samples"],
            "oom": ["GPU", "used%", "peak", "MB/s", "OOM in s", "risk", "conf."],
            "leak": ["GPU", "MB/min", "window s", "steady", "periodic", "leak"],
            "fragment": ["GPU", "frag.", "split", "reserved%", "retries", "trend/h", "raised"]}[mode]
    titles = {"profile": "GPU memory (GiB; % of total)", "oom": "OOM forecast (peak in GiB, growth in MB/s)",
              "leak": "Leak: growth between steps", "fragment": "Allocator fragmentation (share of reserved)"}
    table = Table(title=titles[mode], box=box.SIMPLE_HEAD, pad_edge=False)
    for c in cols:
        table.add_column(c, overflow="fold", justify="left" if c == "GPU" else "right", no_wrap=c == "GPU")
    leaks = {(a["host"], a["gpu"]) for a in report["anomalies"] if a["detector"] == "leak"}
    frags = {(a["host"], a["gpu"]) for a in report["anomalies"] if a["detector"] == "fragmentation"}
    for name, d in report["devices"].items():
        cur, st, risk = d["current_memory"], d["statistics"], d["risk_assessment"] or {}
        host, _, gpu = name.rpartition("/")
        host = host.split(":")[-1]
        hit = (host, int(gpu)) if gpu.isdigit() else None
        if mode == "profile":
            row = [name, d["rank"], _gib(cur["allocated"]), _gib(cur["total"]), _pct(cur["utilization"]),
                   _gib(d["peak_memory"]), _pct(st["avg_utilization"]), _pct(st["max_utilization"]),
                   _pct(st["avg_fragmentation"]), st["num_snapshots"]]
        elif mode == "oom":
            row = [name, _pct(risk.get("current_usage_percent")), _gib(risk.get("peak_bytes")),
                   _round(risk.get("growth_rate_mb_per_sec")), risk.get("predicted_oom_time_seconds"),
                   risk.get("risk_level"), risk.get("confidence")]
        elif mode == "leak":
            lk = d["leak"] or {}
            row = [name, _round(lk.get("growth_rate_mb_per_min")), lk.get("window_s"), lk.get("steady"),
                   lk.get("periodic"), "LEAK" if hit in leaks else ("no" if lk else "too short")]
        else:
            fr = d["fragmentation"] or {}
            row = [name, _round(fr.get("fragmentation_ratio")), _round(fr.get("split_ratio")),
                   _round(fr.get("reserved_percent")), fr.get("alloc_retries"), _round(fr.get("trend_per_hour")),
                   "yes" if hit in frags else ("no" if fr else "no allocator stats")]
        table.add_row(*("" if v is None else str(v) for v in row))
    Console().print(table)
    if mode == "oom":
        for name, d in report["devices"].items():
            if d["risk_assessment"] and d["risk_assessment"]["risk_level"] != "low":
                print(f"{name}: {d['risk_assessment']['recommendation']}")
    print(f"{len(report['anomalies'])} anomalies")


def _pct(x: Any) -> str:
    return "" if x is None else f"{x:.1f}"


def _round(x: Any) -> Any:
    return round(x, 3) if isinstance(x, float) else x


def cmd_memory_report(args: argparse.Namespace) -> int:
    import heapq

    import orjson

    from rankwatch.config import Settings
    from rankwatch.memory_report import MemoryTimeline, build_report, plot_devices
    from rankwatch.processors.offline import read_records, run_pipeline
    from rankwatch.processors.pipeline import DetectionConfig, Pipeline
    from rankwatch.producers.gpu_replay import read_samples

    if args.from_topic:
        from rankwatch.consume import read_records_from_topics

        settings = load_config(Settings, vars(args), path=args.config)
        if not settings.bootstrap:
            settings.bootstrap = f"127.0.0.1:{settings.embedded_port}"
        records: Any = read_records_from_topics(settings, [settings.topic_gpu])
    elif args.paths:
        csvs = [p for p in args.paths if p.endswith(".csv")]
        logs = [p for p in args.paths if not p.endswith(".csv")]
        streams = [read_records(logs, args.job)] if logs else []
        streams += [read_samples(p, args.job or Path(p).resolve().parent.name, args.host) for p in csvs]
        records = heapq.merge(*streams, key=lambda r: r.ts)
    else:
        print("rankwatch memory report: give paths or --from-topic", file=sys.stderr)
        return 2
    pipeline = Pipeline(load_config(DetectionConfig, {}, path=args.config, section="detection"))
    timeline = MemoryTimeline()
    anomalies = run_pipeline(pipeline, (r for r in timeline.watch(records) if r.kind == "gpu"))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = build_report(timeline, pipeline, anomalies)
    (out / "memory_report.json").write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2))
    plots = plot_devices(timeline, pipeline, anomalies, out)
    print_table("profile", report)
    print(f"{len(report['devices'])} GPUs, {len(plots)} plots, {len(anomalies)} anomalies -> "
          f"{out / 'memory_report.json'}")
    return 0 if report["devices"] else 1
