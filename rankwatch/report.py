"""`rankwatch report`: trend plots (loss, throughput, step time, learning rate, GPU utilisation) with detected
anomalies marked in red, and an index.html with the plots and a table of the anomalies."""

from __future__ import annotations

import html
from collections import defaultdict
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from rankwatch.processors.offline import run_pipeline
from rankwatch.processors.pipeline import DetectionConfig, Pipeline
from rankwatch.records import Anomaly, Record

PANELS = (("loss", "loss"), ("throughput", "throughput"), ("step_time_s", "step time (s)"))


def collect(records: Iterable[Record], detection: DetectionConfig | None = None, wall: float | None = None
            ) -> tuple[dict[str, dict[int, list[tuple[int, float]]]], dict[str, list[tuple[float, float]]],
                       list[Anomaly]]:
    """Run the pipeline while gathering series: metric -> rank -> [(step, value)], gpu -> [(ts, util)]. `wall`:
    as in run_pipeline (files at rest: when they are read)."""
    series: dict[str, dict[int, list[tuple[int, float]]]] = defaultdict(lambda: defaultdict(list))
    gpu: dict[str, list[tuple[float, float]]] = defaultdict(list)

    def gather(records: Iterable[Record]) -> Iterator[Record]:
        for rec in records:
            if rec.kind == "metrics":
                for name in ("loss", "throughput", "step_time_s", "lr"):
                    v = rec.data.get(name)
                    if isinstance(v, (int, float)):
                        series[name][rec.rank if rec.rank is not None else -1].append((rec.data["step"], v))
            elif rec.kind == "gpu" and "util_pct" in rec.data:
                label = f"rank {rec.rank}" if rec.rank is not None else f"{rec.data['host']}/{rec.data['gpu']}"
                gpu[label].append((rec.ts, rec.data["util_pct"]))
            yield rec

    anomalies = run_pipeline(Pipeline(detection), gather(records), wall=wall)
    return series, gpu, anomalies


def _moving_average(values: list[float], window: int) -> list[float]:
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def _plot_metric(name: str, label: str, by_rank: dict[int, list[tuple[int, float]]], lr: dict | None,
                 anomalies: list[Anomaly], path: Path, per_rank: bool) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ranks = sorted(by_rank)
    groups = [[r] for r in ranks] if per_rank else [ranks]
    fig, axes = plt.subplots(len(groups), 1, figsize=(11, 3.2 * len(groups)), squeeze=False, sharex=True)
    for ax, group in zip(axes[:, 0], groups, strict=True):
        for r in group:
            pts = sorted(by_rank[r])
            steps, vals = [p[0] for p in pts], [p[1] for p in pts]
            line, = ax.plot(steps, vals, linewidth=0.6, alpha=0.45, label=f"rank {r}" if len(ranks) <= 16 else None)
            if name == "loss":
                ax.plot(steps, _moving_average(vals, 20), linewidth=1.4, color=line.get_color())
            marks = [(a.context.get("step"), a.value) for a in anomalies if a.rank == r and a.signal == name
                     and a.value is not None]
            if marks:
                ax.scatter([m[0] for m in marks], [m[1] for m in marks], color="red", s=28, zorder=5,
                           label="anomaly" if r == group[0] else None)
        ax.set_ylabel(label)
        if lr:
            ax2 = ax.twinx()
            pts = sorted(lr[min(lr)])
            ax2.plot([p[0] for p in pts], [p[1] for p in pts], color="gray", linestyle="--", linewidth=1)
            ax2.set_ylabel("learning rate", color="gray")
        if len(group) <= 16:
            ax.legend(loc="upper right", fontsize=7, ncol=4)
    axes[-1, 0].set_xlabel("step")
    title = f"{label}" + (" (raw and moving average of 20)" if name == "loss" else "")
    fig.suptitle(title + "; anomalies in red")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _plot_gpu(gpu: dict[str, list[tuple[float, float]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(11, 3.2))
    t0 = min(p[0] for pts in gpu.values() for p in pts)
    for label, pts in sorted(gpu.items()):
        pts.sort()
        ax.plot([p[0] - t0 for p in pts], [p[1] for p in pts], linewidth=0.8, label=label)
    ax.set_xlabel("seconds since start")
    ax.set_ylabel("GPU utilisation (%)")
    if len(gpu) <= 16:
        ax.legend(fontsize=7, ncol=4)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def write_report(records: Iterable[Record], out: str | Path, per_rank: bool = False,
                 detection: DetectionConfig | None = None, wall: float | None = None) -> dict[str, Any]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    series, gpu, anomalies = collect(records, detection, wall)
    images, missing = [], []
    lr = series.get("lr")
    for name, label in PANELS:
        if series.get(name):
            fname = f"{name}.png"
            _plot_metric(name, label, series[name], lr, anomalies, out / fname, per_rank)
            images.append((label, fname))
        else:
            missing.append(label)
    if not lr:
        missing.append("learning rate")
    if gpu:
        _plot_gpu(gpu, out / "gpu_util.png")
        images.append(("GPU utilisation", "gpu_util.png"))
    else:
        missing.append("GPU utilisation")
    (out / "index.html").write_text(_html(images, missing, anomalies))
    return {"images": [f for _, f in images], "missing": missing, "anomalies": len(anomalies)}


def _html(images: list[tuple[str, str]], missing: list[str], anomalies: list[Anomaly]) -> str:
    e = html.escape
    rows = "\n".join(
        f"<tr class='{e(a.severity)}'><td>{e(a.to_dict()['event_time'])}</td><td>{e(a.job)}</td><td>{a.rank}</td>"
        f"<td>{e(str(a.context.get('step')))}</td><td>{e(a.detector)}</td><td>{e(a.signal)}</td>"
        f"<td>{'' if a.value is None else f'{a.value:.4g}'}</td><td>{e(a.severity)}</td><td>{e(a.message)}</td></tr>"
        for a in sorted(anomalies, key=lambda a: (a.event_time, a.rank or 0)))
    imgs = "\n".join(f"<h2>{e(label)}</h2><img src='{e(f)}' alt='{e(label)}'>" for label, f in images)
    notes = "".join(f"<p class='missing'>No {e(m)} in the input: not plotted.</p>" for m in missing)
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>rankwatch report</title>
<style>body{{font-family:sans-serif;margin:2em}} img{{max-width:100%}} table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:3px 6px;font-size:13px}} .critical{{background:#fdd}} .warning{{background:#ffd}}
.missing{{color:#a60}}</style></head><body>
<h1>rankwatch report</h1>{notes}
{imgs}
<h2>Anomalies ({len(anomalies)})</h2>
<table><tr><th>event time</th><th>job</th><th>rank</th><th>step</th><th>detector</th><th>signal</th><th>value</th>
<th>severity</th><th>message</th></tr>
{rows}
</table></body></html>
"""
