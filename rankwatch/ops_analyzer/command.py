"""`rankwatch ops --log_path DIR`: the users' offline tool's command line, over rankwatch's parser and model."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

HELP = "offline per rank/stream collective-op timing report (the kept LSTM tool)"


def add_ops_parser(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser("ops", help=HELP, description=(
        "Read a job's logs (NCCL_DEBUG=INFO COLL lines, JSON op events), split each rank/stream into "
        "continuous opCount runs, and report the ops whose interval the model did not expect. The default "
        "verdict is calibrated per rank/stream; --threshold switches to the seed's fixed rule."))
    p.add_argument("--log_path", "--log-path", dest="log_path", required=True, metavar="DIR",
                   help="folder (or file) of the job's rank logs; ranks come from paths or line prefixes")
    p.add_argument("--sequence_length", "--sequence-length", dest="sequence_length", type=int,
                   help="LSTM input window in ops (default 10)")
    p.add_argument("--threshold", type=float,
                   help="use the seed's relative verdict: an op is anomalous when |actual - predicted| / "
                        "predicted > X (the seed's default was 2.0). Without it the verdict is calibrated per "
                        "rank/stream, which also catches streams 1.5-3x slower")
    p.add_argument("--hidden_size", "--hidden-size", dest="hidden_size", type=int, help="LSTM width (64)")
    p.add_argument("--num_layers", "--num-layers", dest="num_layers", type=int, help="LSTM layers (2)")
    p.add_argument("--json", dest="json_out", metavar="OUT",
                   help="write the results {rank: {stream: [run, ...]}} as JSON ('-': stdout, no report)")
    p.add_argument("--job", help="job name (default: the folder's name)")
    p.add_argument("--config", help="TOML config file: op_* settings of its [detection] section apply")
    p.add_argument("-v", "--verbose", action="store_true", help="list every anomalous op in the report")
    return p


def results_json(results: dict[Any, dict[str, list[dict[str, Any]]]]) -> dict[str, Any]:
    """JSON object keys are strings: rank 3 -> "3", an unknown rank (None) -> "null"."""
    return {"null" if rank is None else str(rank): streams for rank, streams in results.items()}


def cmd_ops(args: argparse.Namespace) -> int:
    import os

    if not os.path.exists(args.log_path):  # before loading the model (torch): a typo answers at once
        print(f"rankwatch ops: no such file or folder: {args.log_path}", file=sys.stderr)
        return 2
    from rankwatch.config import load_config
    from rankwatch.models.op_timing import OpTimingConfig
    from rankwatch.ops_analyzer.analyzer import LSTMTimeSeriesAnalyzer
    from rankwatch.ops_analyzer.logs import DistributedLogAnalyzer

    cli = {"op_sequence_length": args.sequence_length, "op_hidden_size": args.hidden_size,
           "op_num_layers": args.num_layers, "op_threshold": args.threshold,
           "op_verdict": "relative" if args.threshold is not None else None}
    config = load_config(OpTimingConfig, cli, path=args.config, section="detection")
    logs = DistributedLogAnalyzer(args.log_path, args.job, args.verbose)
    files = logs.discover_log_files()
    rank_entries = logs.parse_log_files()
    analyzer = LSTMTimeSeriesAnalyzer.from_config(config, args.verbose)
    total = sum(len(v) for v in rank_entries.values())
    with _progress(total) as advance:
        results = analyzer.analyze_logs(rank_entries, on_progress=advance)
    if args.json_out:
        text = json.dumps(results_json(results), indent=1)
        if args.json_out == "-":
            sys.stdout.write(text + "\n")
        else:
            with open(args.json_out, "w", encoding="utf-8") as f:
                f.write(text + "\n")
    if args.json_out != "-":
        print(analyzer.generate_report(verbose=args.verbose))
    errs = sum(logs.stats.parse_errors.values())
    print(f"{len(files)} files, {logs.stats.lines} lines, {total} collective ops, {errs} malformed lines"
          + (f" {dict(logs.stats.parse_errors)}" if errs else ""), file=sys.stderr)
    return 0


class _progress:
    """A progress bar on stderr while the model runs, only when stderr is a terminal (pipes stay clean)."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.bar: Any = None

    def __enter__(self) -> Any:
        if not sys.stderr.isatty() or self.total < 20_000:
            return None
        from rich.console import Console
        from rich.progress import Progress

        self.bar = Progress(console=Console(stderr=True), transient=True)
        self.bar.start()
        task = self.bar.add_task("collective ops", total=self.total)
        return lambda done, _total: self.bar.update(task, completed=done)

    def __exit__(self, *exc: Any) -> None:
        if self.bar is not None:
            self.bar.stop()
