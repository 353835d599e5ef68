"""`rankwatch` command line: up, broker, worker, anomalies, analyze, inspect, ops, memory, deeplog, demo, eval, ..."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Any

import orjson

from rankwatch.config import ConfigError, Settings, load_config
from rankwatch.ops_analyzer.command import add_ops_parser, cmd_ops

log = logging.getLogger("rankwatch")


def quiet_libraries(verbose: bool = False) -> None:
    """kafka-python and aiokafka log every connection at INFO; keep them to warnings unless -v."""
    for name in ("kafka", "aiokafka", "faust", "mode"):
        logging.getLogger(name).setLevel(logging.INFO if verbose else logging.WARNING)


def _common(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--bootstrap", help="Kafka bootstrap servers host:port[,...] (env RANKWATCH_BOOTSTRAP)")
    ap.add_argument("--config", help="TOML config file (env RANKWATCH_CONFIG)")
    ap.add_argument("--job", help="job name")
    ap.add_argument("-v", "--verbose", action="store_true")


def _detection_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--window", type=int, help="rolling window per rank and signal (default 50)")
    ap.add_argument("--threshold-factor", type=float, dest="threshold_factor",
                    help="k in median + k x 1.4826 x MAD")
    ap.add_argument("--deeplog-model", dest="deeplog_model", metavar="CKPT",
                    help="trained DeepLog checkpoint (file, or folder: newest *.pt; reloaded when newer); "
                         "default: each job bootstraps its own from its first log lines")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="rankwatch", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("up", help="embedded broker (unless --bootstrap) + topics + worker")
    _common(p)
    _detection_args(p)
    p.add_argument("--port", type=int, dest="embedded_port", help="embedded broker port (default 9092)")
    p.add_argument("--metrics-port", type=int, dest="metrics_port")
    p.add_argument("--state-file", dest="state_file", help="keep detector state across restarts in this file")
    p = sub.add_parser("broker", help="run the embedded broker alone and print its address")
    _common(p)
    p.add_argument("--port", type=int, dest="embedded_port")
    p = sub.add_parser("worker", help="run the Faust worker (detectors) against --bootstrap")
    _common(p)
    _detection_args(p)
    p.add_argument("--metrics-port", type=int, dest="metrics_port")
    p.add_argument("--embedded", action="store_true", help="short group timeouts for the embedded broker")
    p.add_argument("--state-file", dest="state_file", help="keep detector state across restarts in this file")
    p = sub.add_parser("anomalies", help="print the anomalies topic")
    _common(p)
    p.add_argument("--follow", "-f", action="store_true")
    p.add_argument("--json", action="store_true", help="JSON lines instead of a table")
    p = sub.add_parser("analyze", help="run parsing and detectors over files, no Kafka")
    _common(p)
    _detection_args(p)
    p.add_argument("paths", nargs="+")
    p.add_argument("--rank", type=int)
    p.add_argument("--json", dest="json_out", metavar="OUT", help="write anomaly records as JSON lines ('-': stdout)")
    p = sub.add_parser("inspect", help="how rankwatch reads these logs: formats, fields, ranks, malformed lines")
    _common(p)
    p.add_argument("paths", nargs="+", help="log files or folders")
    p.add_argument("--rank", type=int, help="rank for files whose rank cannot be inferred")
    p.add_argument("--json", action="store_true", help="one JSON document instead of tables")
    p.add_argument("--max-lines", type=int, default=0, dest="max_lines", help="read at most N lines per file")
    add_ops_parser(sub)
    p = sub.add_parser("demo", help="simulate an 8-rank job with faults and watch rankwatch catch them")
    _common(p)
    p.add_argument("--ranks", type=int, default=8)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--dir", help="where the simulated job writes its logs (default: a temp folder)")
    p = sub.add_parser("eval", help="precision, recall and delay per fault type on labelled scenarios")
    _common(p)
    p.add_argument("--seeds", type=int, default=20)
    p.add_argument("--ranks", type=int, default=8)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--path", choices=("offline", "stream", "both"), default="both")
    p.add_argument("--suite", choices=("training", "ops"), default="training",
                   help="training metrics (default) or collective timing: stragglers, slow streams, hangs")
    p = sub.add_parser("report", help="trend plots with anomalies marked, and an index.html")
    _common(p)
    _detection_args(p)
    p.add_argument("paths", nargs="*", help="log files or folders")
    p.add_argument("--out", required=True)
    p.add_argument("--from-topic", action="store_true", help="read the metrics and GPU topics instead of files")
    p.add_argument("--per-rank", action="store_true", help="one panel per rank instead of overlaid")
    p = sub.add_parser("replay-anomalies", help="re-run captured batches through your model")
    p.add_argument("--anomaly-dir", required=True, help="TrainingMonitor output_dir (or its anomalies/ folder)")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--model", required=True, help="module:factory returning the model")
    p.add_argument("--loss", help="module:fn, fn(model, batch) -> loss (default: model(**batch) or its .loss)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--step", type=int)
    p.add_argument("--visualize", action="store_true")
    p.add_argument("-v", "--verbose", action="store_true")
    from rankwatch.memory_cli import add_memory_parser

    add_memory_parser(sub)
    from rankwatch.deeplog.cli import add_parser as add_deeplog_parser

    add_deeplog_parser(sub)
    return ap


def _settings(args: argparse.Namespace) -> Settings:
    return load_config(Settings, vars(args), path=getattr(args, "config", None))


def _detection(args: argparse.Namespace):
    from rankwatch.processors.pipeline import DetectionConfig

    return load_config(DetectionConfig, vars(args), path=getattr(args, "config", None), section="detection")


def _formats(args: argparse.Namespace):
    """The config file's [[formats]]: compiled now, so a bad pattern stops the command before any work."""
    from rankwatch.formats.user import load_user_formats

    return load_user_formats(getattr(args, "config", None))


def _stop_on_signals() -> threading.Event:
    """An event set by SIGINT/SIGTERM. Install it before announcing readiness, so no signal is missed."""
    stop = threading.Event()

    def _handler(signum: int, frame: Any) -> None:  # noqa: ARG001
        stop.set()

    signal.signal(signal.SIGINT, _handler)
    signal.signal(signal.SIGTERM, _handler)
    return stop


def cmd_broker(args: argparse.Namespace) -> int:
    from rankwatch.broker import EmbeddedBroker, ensure_topics

    settings = _settings(args)
    stop = _stop_on_signals()
    broker = EmbeddedBroker(port=settings.embedded_port).start()
    try:
        settings.bootstrap = broker.bootstrap
        ensure_topics(settings)
        print(broker.bootstrap, flush=True)
        while not stop.wait(0.5):
            if broker.proc is None or broker.proc.poll() is not None:
                log.error("the embedded broker exited")
                return 1
    finally:
        broker.stop()
    return 0


def cmd_up(args: argparse.Namespace) -> int:
    from rankwatch.broker import EmbeddedBroker, die_with_parent, ensure_topics, stop_process

    settings = _settings(args)
    stop = _stop_on_signals()
    broker = None
    worker = None
    try:
        if not settings.bootstrap:
            broker = EmbeddedBroker(port=settings.embedded_port).start()
            settings.bootstrap = broker.bootstrap
            print(f"embedded broker: {broker.bootstrap} (in memory; a restart empties it)", flush=True)
        created = ensure_topics(settings)
        if created:
            print("created topics: " + ", ".join(created), flush=True)
        cmd = [sys.executable, "-m", "rankwatch.cli", "worker", "--bootstrap", settings.bootstrap]
        for flag, name in (("--config", "config"), ("--window", "window"),
                           ("--threshold-factor", "threshold_factor"), ("--metrics-port", "metrics_port"),
                           ("--state-file", "state_file"), ("--deeplog-model", "deeplog_model")):
            if getattr(args, name, None) is not None:
                cmd += [flag, str(getattr(args, name))]
        if broker is not None:
            cmd.append("--embedded")
        # its own session too: Ctrl-C stops `up`, which stops the worker (it commits and saves), then the broker
        worker = subprocess.Popen(cmd, preexec_fn=die_with_parent, start_new_session=True)
        print(f"worker pid {worker.pid}; metrics on :{settings.metrics_port}/metrics; Ctrl-C stops all",
              flush=True)
        while not stop.wait(0.5):
            if worker.poll() is not None:
                log.error("worker exited with code %s", worker.returncode)
                return worker.returncode or 1
        return 0
    finally:
        stop_process(worker, 20)
        if broker is not None:
            broker.stop()


def cmd_worker(args: argparse.Namespace) -> int:
    from rankwatch.processors.app import EMBEDDED_GROUP_TIMEOUTS, WorkerConfig, run_worker

    settings = _settings(args)
    embedded = args.embedded or not settings.bootstrap
    if not settings.bootstrap:
        settings.bootstrap = f"127.0.0.1:{settings.embedded_port}"
    wcli: dict = dict(EMBEDDED_GROUP_TIMEOUTS) if embedded else {}
    wcli["state_file"] = args.state_file
    worker = load_config(WorkerConfig, wcli, path=args.config, section="worker")
    run_worker(settings, _detection(args), worker, loglevel="info" if args.verbose else "warning")
    return 0


def cmd_anomalies(args: argparse.Namespace) -> int:
    from rankwatch.consume import follow_anomalies, render_table

    settings = _settings(args)
    if not settings.bootstrap:
        settings.bootstrap = f"127.0.0.1:{settings.embedded_port}"
    if not _any_reachable(settings.bootstrap):  # say so now, not after 30 s of the client's retries
        print(f"rankwatch: no broker answers at {settings.bootstrap}: start one (`rankwatch up`) or name yours "
              "with --bootstrap HOST:PORT (env RANKWATCH_BOOTSTRAP)", file=sys.stderr)
        return 2
    records = follow_anomalies(settings, follow=args.follow)
    if args.json:
        for rec in records:
            sys.stdout.buffer.write(orjson.dumps(rec) + b"\n")
            sys.stdout.flush()
    else:
        render_table(records, live=args.follow)
    return 0


def _any_reachable(bootstrap: str, timeout: float = 3.0) -> bool:
    """Does any of the bootstrap servers accept a TCP connection?"""
    import socket

    for server in bootstrap.split(","):
        host, _, port = server.strip().rpartition(":")
        try:
            with socket.create_connection((host.strip("[]") or "127.0.0.1", int(port)), timeout=timeout):
                return True
        except (OSError, ValueError):
            continue
    return False


def cmd_analyze(args: argparse.Namespace) -> int:
    from rankwatch.consume import render_table
    from rankwatch.processors.offline import AnalyzeStats, analyze

    stats = AnalyzeStats()
    anomalies = analyze(args.paths, args.job, args.rank, _detection(args), stats, formats=_formats(args))
    dicts = [a.to_dict() for a in anomalies]
    if args.json_out:
        data = b"".join(orjson.dumps(d) + b"\n" for d in dicts)
        if args.json_out == "-":
            sys.stdout.buffer.write(data)
        else:
            with open(args.json_out, "wb") as f:
                f.write(data)
    if args.json_out != "-":
        render_table(dicts, live=False)
    errs = sum(stats.parse_errors.values())
    malformed = f"{errs} malformed {dict(stats.parse_errors)}" if errs else "0 malformed"
    skipped = f", files skipped or cut short {dict(stats.files_skipped)}" if stats.files_skipped else ""
    print(f"{stats.lines} lines, records {dict(stats.records)}, {malformed}{skipped}, {len(dicts)} anomalies",
          file=sys.stderr)
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from rankwatch.inspect_logs import inspect_paths, render

    result = inspect_paths(args.paths, args.job, args.rank, _formats(args), args.max_lines,
                           progress=not args.json and sys.stderr.isatty())
    if args.json:
        sys.stdout.buffer.write(orjson.dumps(result.to_dict(), option=orjson.OPT_INDENT_2) + b"\n")
    else:
        render(result)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from rankwatch.demo import run_demo

    return run_demo(_settings(args), ranks=args.ranks, steps=args.steps, seed=args.seed, workdir=args.dir)


def cmd_eval(args: argparse.Namespace) -> int:
    from rankwatch.evaluate import evaluate

    settings = _settings(args)
    if args.suite == "ops":
        from rankwatch.eval_ops import bar_met, evaluate_ops

        lines, ops = evaluate_ops(args.seeds, args.path, settings.bootstrap, args.ranks)
        print("\n".join(lines))
        ok = all(bar_met(q, normal) for q, normal in ops.values())
        print("bar (precision and recall >= 0.9 per fault type, straggler named >= 95%, hang within 2x the "
              "threshold, no op-timing alarm on victims):", "MET" if ok else "MISSED")
        return 0 if ok else 1
    lines, results = evaluate(args.seeds, args.ranks, args.steps, args.path, settings.bootstrap)
    print("\n".join(lines))
    ok = all(q.precision >= 0.9 and q.recall >= 0.9 and (not q.delays or max(q.delays) <= 1)
             for per_path in results.values() for q in per_path.values())
    print("bar (precision >= 0.9, recall >= 0.9, delay <= 1 step on every fault type):", "MET" if ok else "MISSED")
    return 0 if ok else 1


def cmd_report(args: argparse.Namespace) -> int:
    from rankwatch.report import write_report

    wall = None  # a topic's records may go on: only files are at rest, and judged as such (a hang at their end)
    if args.from_topic:
        from rankwatch.consume import read_records_from_topics

        settings = _settings(args)
        if not settings.bootstrap:
            settings.bootstrap = f"127.0.0.1:{settings.embedded_port}"
        records = read_records_from_topics(settings, [settings.topic_metrics, settings.topic_gpu])
    elif args.paths:
        from rankwatch.processors.offline import read_records

        records, wall = read_records(args.paths, args.job, formats=_formats(args)), time.time()
    else:
        print("rankwatch report: give log paths or --from-topic", file=sys.stderr)
        return 2
    res = write_report(records, args.out, args.per_rank, _detection(args), wall)
    for m in res["missing"]:
        print(f"note: no {m} in the input; not plotted", file=sys.stderr)
    print(f"{len(res['images'])} plots and {res['anomalies']} anomalies -> {os.path.join(args.out, 'index.html')}")
    return 0


def cmd_replay(args: argparse.Namespace) -> int:
    from rankwatch.replay import replay

    summary = replay(args.anomaly_dir, args.output_dir, args.model, args.loss, args.device, args.step,
                     args.visualize)
    print(f"replayed {summary['count']} anomalies -> {args.output_dir} (mean loss {summary['mean_loss']}, "
          f"mean grad norm {summary['mean_grad_norm']})")
    return 0 if summary["count"] else 1


def cmd_memory(args: argparse.Namespace) -> int:
    from rankwatch.memory_cli import cmd_memory as run

    return run(args)


def cmd_deeplog(args: argparse.Namespace) -> int:
    from rankwatch.deeplog.cli import run

    return run(args)


COMMANDS = {"up": cmd_up, "broker": cmd_broker, "worker": cmd_worker, "anomalies": cmd_anomalies,
            "analyze": cmd_analyze, "inspect": cmd_inspect, "ops": cmd_ops, "memory": cmd_memory, "demo": cmd_demo,
            "eval": cmd_eval, "report": cmd_report, "replay-anomalies": cmd_replay, "deeplog": cmd_deeplog}


def main(argv: list[str] | None = None) -> int:
    from kafka import errors as kafka_errors

    # (NoBrokersAvailable is gone from newer kafka-python; KafkaTimeoutError is what they raise)
    unreachable = tuple(getattr(kafka_errors, n) for n in ("NoBrokersAvailable", "KafkaTimeoutError")
                        if hasattr(kafka_errors, n))
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    quiet_libraries(args.verbose)
    try:
        return COMMANDS[args.cmd](args)
    except ConfigError as exc:
        print(f"rankwatch: {exc}", file=sys.stderr)
        return 2
    except unreachable as exc:
        print(f"rankwatch: cannot reach the Kafka broker ({exc}); check --bootstrap / RANKWATCH_BOOTSTRAP",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
