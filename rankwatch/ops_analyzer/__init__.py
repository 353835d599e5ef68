"""The users' offline NCCL-log LSTM tool, kept as an interface over rankwatch's collective-timing model
(docs/OPS.md): `DistributedLogAnalyzer(path)` finds and parses a job's logs into `rank_entries`,
`LSTMTimeSeriesAnalyzer` judges every rank/stream with the model `rankwatch analyze` and the stream use.

Both names are imported on first use, so the CLI can register `rankwatch ops` without loading torch."""

from __future__ import annotations

from typing import Any

_NAMES = {"LSTMTimeSeriesAnalyzer": "rankwatch.ops_analyzer.analyzer",
          "DistributedLogAnalyzer": "rankwatch.ops_analyzer.logs"}
__all__ = list(_NAMES)


def __getattr__(name: str) -> Any:
    if name in _NAMES:
        import importlib

        return getattr(importlib.import_module(_NAMES[name]), name)
    raise AttributeError(f"module 'rankwatch.ops_analyzer' has no attribute {name!r}")
