"""Public benchmark data used by the tests and benchmarks (not shipped: see the data folder's README).

- loghub 2k samples with the corrected ground truth (loghub-2.0): template mining accuracy;
- DeepLog's HDFS sessions: next-key model quality with the paper's setting.
The folder is `$RANKWATCH_DATA_DIR`, else `shared/data` next to (or above) the checkout.
"""

from __future__ import annotations

import csv
import os
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path

_REPO = Path(__file__).resolve().parents[2]


def shared_data_dir() -> Path | None:
    env = os.environ.get("RANKWATCH_DATA_DIR")
    candidates = [Path(env)] if env else []
    candidates += [_REPO / "shared" / "data", _REPO.parent / "shared" / "data", _REPO.parent.parent / "shared" / "data"]
    return next((c for c in candidates if (c / "hdfs").is_dir() or (c / "loghub").is_dir()), None)


def loghub_sample(name: str, corrected: bool = True) -> tuple[list[str], list[str]]:
    """(messages, ground-truth templates) of loghub's `<name>_2k` sample. As in loghub's own evaluation, the
    message is the structured CSV's Content column (the header fields are already split off)."""
    root = shared_data_dir()
    if root is None:
        raise FileNotFoundError("benchmark data not found: set RANKWATCH_DATA_DIR")
    sub = f"corrected/{name}_2k.log_structured_corrected.csv" if corrected else f"{name}_2k.log_structured.csv"
    with open(root / "loghub" / name / sub, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    return [r["Content"] for r in rows], [r["EventTemplate"] for r in rows]


def grouping_accuracy(predicted: Sequence[object], truth: Sequence[str]) -> float:
    """Loghub's grouping accuracy (GA): the share of messages whose predicted group is exactly one ground-truth
    group (same messages, no more, no fewer)."""
    if len(predicted) != len(truth):
        raise ValueError("predicted and truth differ in length")
    members: dict[object, list[int]] = defaultdict(list)
    for i, p in enumerate(predicted):
        members[p].append(i)
    sizes = Counter(truth)
    correct = 0
    for idx in members.values():
        groups = {truth[i] for i in idx}
        if len(groups) == 1 and sizes[next(iter(groups))] == len(idx):
            correct += len(idx)
    return correct / len(truth) if truth else 0.0


def hdfs_sessions(name: str) -> list[str]:
    """Lines of DeepLog's HDFS session file (`hdfs_train`, `hdfs_test_abnormal`), blank lines dropped."""
    root = shared_data_dir()
    if root is None:
        raise FileNotFoundError("benchmark data not found: set RANKWATCH_DATA_DIR")
    return [line for line in (root / "hdfs" / name).read_text().splitlines() if line.strip()]


def split_hdfs_train(directory: str | os.PathLike[str], train_share: float = 0.8, limit: int | None = None
                     ) -> tuple[str, str]:
    """The paper's protocol on the public files: the first 80% of hdfs_train to train, the rest as held-out
    normal sessions. Writes both as session files; returns their paths."""
    lines = hdfs_sessions("hdfs_train")
    n = int(len(lines) * train_share)
    train, held = lines[:n], lines[n:]
    if limit:
        train, held = train[:limit], held[: max(1, int(limit * (1 - train_share) / train_share))]
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    (d / "hdfs_train80").write_text("\n".join(train) + "\n")
    (d / "hdfs_normal20").write_text("\n".join(held) + "\n")
    return str(d / "hdfs_train80"), str(d / "hdfs_normal20")
