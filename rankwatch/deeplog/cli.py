"""`rankwatch deeplog train|evaluate`: argument parsing and the terminal summary."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any

from rankwatch.deeplog.config import DeepLogConfigError, load_deeplog_config


def add_parser(sub: Any) -> None:
    p = sub.add_parser("deeplog", help="train and evaluate DeepLog log-key models")
    dsub = p.add_subparsers(dest="deeplog_cmd", required=True)
    t = dsub.add_parser("train", help="train a DeepLog model on normal log-key sequences",
                        description="Data: session files, JSON/JSONL, raw log folders (mined on the fly), or "
                                    "--from-topic. Multi-GPU: torchrun --nproc_per_node N -m rankwatch.cli deeplog "
                                    "train ... (DDP); a plain run uses every GPU with DataParallel.")
    t.add_argument("--config", help="config.yaml (sections model, training, data, evaluation)")
    t.add_argument("--data-dir", nargs="+", help="training data: files or folders (data.data_dir)")
    t.add_argument("--format", choices=("auto", "sessions", "json", "logs"), help="data.format")
    t.add_argument("--epochs", type=int, help="training.num_epochs")
    t.add_argument("--batch-size", type=int, help="training.batch_size (global)")
    t.add_argument("--lr", type=float, help="training.learning_rate")
    t.add_argument("--window", type=int, help="data.window (h)")
    t.add_argument("--max-steps", type=int, help="training.max_steps (stop early)")
    t.add_argument("--device", help="auto | cpu | cuda | cuda:N")
    t.add_argument("--resume", metavar="CKPT", help="continue from a checkpoint (epoch_N.pt, step_N.pt)")
    t.add_argument("--output-dir", help="where checkpoints, history, plots and reports go (default outputs)")
    t.add_argument("--from-topic", action="store_true",
                   help="train on a known-good run's topics (log lines + its published templates)")
    t.add_argument("--job", help="only this job (raw logs, --from-topic)")
    t.add_argument("--bootstrap", help="Kafka bootstrap servers for --from-topic (env RANKWATCH_BOOTSTRAP)")
    t.add_argument("--rankwatch-config", help="rankwatch TOML (topic names, security) for --from-topic")
    t.add_argument("--no-evaluate", action="store_true", help="skip the evaluation after training")
    t.add_argument("-v", "--verbose", action="store_true")
    e = dsub.add_parser("evaluate", help="accuracy, score statistics and detection quality of a checkpoint")
    e.add_argument("--checkpoint", required=True)
    e.add_argument("--config", help="config.yaml (default: the one stored in the checkpoint)")
    e.add_argument("--normal", nargs="+", help="normal sequences (default: the training run's validation pieces)")
    e.add_argument("--abnormal", nargs="+", help="abnormal sequences (labelled data: precision/recall/F1/FPR)")
    e.add_argument("--top-g", help="comma-separated g values (default 1,3,5,9,10,15,20)")
    e.add_argument("--output-dir", help="where the reports go (default: the training output dir)")
    e.add_argument("--device", default="auto")
    e.add_argument("--json", action="store_true", help="print the results as JSON")
    e.add_argument("-v", "--verbose", action="store_true")


def run(args: argparse.Namespace) -> int:
    try:
        if args.deeplog_cmd == "train":
            return _train(args)
        return _evaluate(args)
    except DeepLogConfigError as exc:
        print(f"rankwatch deeplog: {exc}", file=sys.stderr)
        return 2


def _train(args: argparse.Namespace) -> int:
    from rankwatch.deeplog.train import train

    overrides = {"data.data_dir": args.data_dir, "data.format": args.format, "training.num_epochs": args.epochs,
                 "training.batch_size": args.batch_size, "training.learning_rate": args.lr,
                 "data.window": args.window, "training.max_steps": args.max_steps, "training.device": args.device,
                 "output_dir": args.output_dir, "data.job": args.job}
    cfg = load_deeplog_config(args.config, overrides)
    settings = None
    if args.from_topic:
        from rankwatch.config import Settings, load_config

        settings = load_config(Settings, {"bootstrap": args.bootstrap}, path=args.rankwatch_config)
        if not settings.bootstrap:
            settings.bootstrap = f"127.0.0.1:{settings.embedded_port}"
    logging.getLogger("rankwatch.deeplog").setLevel(logging.INFO)
    summary = train(cfg, resume=args.resume, settings=settings, evaluate_after=not args.no_evaluate)
    print(f"best model: {summary['best_model']} (loss {summary['best_loss']:.4f}, {summary['steps']} steps, "
          f"{summary['seconds']:.1f} s on {summary['device']})")
    print(f"history: {summary['output_dir']}/training_history.json, plot: {summary['output_dir']}/training_curve.png")
    if "evaluation" in summary:
        print(f"evaluation: {summary['evaluation']['report_path']}")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from rankwatch.deeplog.evaluate import evaluate

    cfg = load_deeplog_config(args.config) if args.config else None
    top_g = [int(g) for g in args.top_g.split(",")] if args.top_g else None
    res = evaluate(args.checkpoint, cfg, args.normal, args.abnormal, args.output_dir, args.device, top_g)
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        print_summary(res)
    return 0


def print_summary(res: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    n = res["normal"]
    acc = ", ".join(f"top-{k} {v:.3f}" for k, v in n["top_k_accuracy"].items())
    loss = f"{n['loss']:.4f}" if n.get("loss") is not None else "-"
    console.print(f"normal data: {n['sequences']:,} sequences, {n['predictions']:,} predictions; loss {loss}; {acc}")
    if "anomaly_score" in n:
        s = n["anomaly_score"]
        console.print(f"anomaly score (share of keys outside the top {s['g']}): mean {s['mean']:.4f}, "
                      f"p90 {s['p90']:.4f}, p95 {s['p95']:.4f}, p99 {s['p99']:.4f}")
    if "detection_by_g" in res:
        table = Table(title=f"detection: {res['abnormal']['sequences']:,} abnormal vs {n['sequences']:,} normal")
        for col in ("g", "precision", "recall", "F1", "FPR"):
            table.add_column(col, justify="right")
        for g, m in res["detection_by_g"].items():
            table.add_row(g, f"{m['precision']:.4f}", f"{m['recall']:.4f}", f"{m['f1']:.4f}", f"{m['fpr']:.4f}")
        console.print(table)
    if "report_path" in res:
        console.print(f"reports: {res['report_path']}, {res['json_path']}")
