"""`rankwatch replay-anomalies`: re-run the captured batches of anomalous steps through the user's model.

For each record in `anomalies_rank_*.jsonl` (written by TrainingMonitor): rebuild the model from the user's
factory (`module:function`, called with no arguments), load the recorded checkpoint when there is one, load the
saved tensors (`torch.load(weights_only=True)`), run forward and backward, and write a JSON with the original and
recomputed loss and the parameters with the largest gradient norms. The loss is `--loss module:fn` called as
fn(model, batch) -> scalar tensor; without it, model(**batch) must return a scalar tensor or something with a
`loss` (attribute or key).
"""

from __future__ import annotations

import importlib
import json
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson


def load_callable(spec: str) -> Callable[..., Any]:
    module, _, name = spec.partition(":")
    if not module or not name:
        raise ValueError(f"expected module:function, got {spec!r}")
    if "" not in sys.path:
        sys.path.insert(0, "")  # like `python -m`: the current folder's modules are importable
    obj: Any = importlib.import_module(module)
    for part in name.split("."):
        obj = getattr(obj, part)
    return obj


def _loss_of(output: Any):
    if hasattr(output, "loss"):
        return output.loss
    if isinstance(output, dict) and "loss" in output:
        return output["loss"]
    return output


def _records(anomaly_dir: Path) -> tuple[Path, list[dict]]:
    """(root the record paths are relative to, records)."""
    base = anomaly_dir / "anomalies" if (anomaly_dir / "anomalies").is_dir() else anomaly_dir
    root = base.parent
    recs = []
    for f in sorted(base.glob("anomalies_rank_*.jsonl")):
        for line in f.read_bytes().splitlines():
            if line.strip():
                recs.append(orjson.loads(line))
    return root, recs


def _load_checkpoint(model, path: str | None, roots: list[Path]) -> str | None:
    import torch

    if not path:
        return None
    for root in [Path("."), *roots]:
        p = (root / path) if not Path(path).is_absolute() else Path(path)
        if p.is_file():
            state = torch.load(p, map_location="cpu", weights_only=True)
            if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
                state = state["model"]  # nanoGPT-style {"model": state_dict, "model_args": ...}
            model.load_state_dict(state)
            return str(p)
    return None


def replay(anomaly_dir: str, output_dir: str, model_spec: str, loss_spec: str | None = None,
           device: str = "cpu", step: int | None = None, visualize: bool = False, top_k: int = 10) -> dict:
    import torch

    factory = load_callable(model_spec)
    loss_fn = load_callable(loss_spec) if loss_spec else None
    root, records = _records(Path(anomaly_dir))
    if step is not None:
        records = [r for r in records if r["step"] == step]
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for rec in records:
        model = factory().to(device)
        ckpt = _load_checkpoint(model, rec.get("model_checkpoint"), [root, Path(anomaly_dir)])
        model.train()
        batch = {}
        for key, rel in rec.get("batch_info", {}).items():
            if key.endswith("_path"):
                batch[key[: -len("_path")]] = torch.load(root / rel, map_location=device, weights_only=True)
        model.zero_grad(set_to_none=True)
        loss = loss_fn(model, batch) if loss_fn else _loss_of(model(**batch))
        loss = loss.float() if loss.dim() == 0 else loss.float().mean()
        loss.backward()
        norms = [(name, float(p.grad.norm())) for name, p in model.named_parameters() if p.grad is not None]
        total = math.sqrt(sum(n * n for _, n in norms))
        norms.sort(key=lambda x: -x[1])
        result = {
            "step": rec["step"], "rank": rec["rank"], "original_loss": rec.get("loss"),
            "recomputed_loss": float(loss.detach()), "original_grad_norm": rec.get("grad_norm"),
            "recomputed_grad_norm": total, "model_checkpoint": rec.get("model_checkpoint"),
            "checkpoint_loaded": ckpt, "batch": {k: list(v.shape) for k, v in batch.items()},
            "top_gradients": [{"module": n, "grad_norm": g} for n, g in norms[:top_k]],
            "anomalies": rec.get("anomalies", []),
        }
        name = f"replay_step_{rec['step']}_rank_{rec['rank']}"
        (out / f"{name}.json").write_text(json.dumps(result, indent=2))
        if visualize:
            _bar_chart(result, out / f"{name}_top_gradients.png")
        results.append(result)
    summary = {
        "count": len(results),
        "mean_loss": _mean(r["recomputed_loss"] for r in results),
        "mean_grad_norm": _mean(r["recomputed_grad_norm"] for r in results),
        "mean_original_loss": _mean(r["original_loss"] for r in results),
        "anomalies": [{"step": r["step"], "rank": r["rank"], "recomputed_loss": r["recomputed_loss"]}
                      for r in results],
    }
    (out / "analysis_summary.json").write_text(json.dumps(summary, indent=2))
    if visualize and results:
        _overview(results, out / "overview.png")
    return summary


def _mean(values) -> float | None:
    vals = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    return sum(vals) / len(vals) if vals else None


def _bar_chart(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    top = result["top_gradients"][:10]
    fig, ax = plt.subplots(figsize=(8, 0.5 + 0.4 * max(1, len(top))))
    ax.barh([t["module"] for t in top][::-1], [t["grad_norm"] for t in top][::-1], color="tab:red")
    ax.set_xlabel("gradient norm")
    ax.set_title(f"step {result['step']} rank {result['rank']}: top-{len(top)} parameter gradients")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _overview(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    steps = [r["step"] for r in results]
    a1.scatter(steps, [r["original_loss"] for r in results], label="original", marker="o")
    a1.scatter(steps, [r["recomputed_loss"] for r in results], label="recomputed", marker="x", color="red")
    a1.set_ylabel("loss")
    a1.legend()
    a2.scatter(steps, [r["original_grad_norm"] for r in results], label="original", marker="o")
    a2.scatter(steps, [r["recomputed_grad_norm"] for r in results], label="recomputed", marker="x", color="red")
    a2.set_ylabel("grad norm")
    a2.set_xlabel("step")
    a2.legend()
    fig.suptitle(f"{len(results)} anomalous steps replayed")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
