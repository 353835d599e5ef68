"""rankwatch: streaming anomaly detection for distributed deep-learning training jobs."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

# The kept offline tool's names, imported on first use: `import rankwatch` stays light (no torch, no numpy).
_LAZY = {"LSTMTimeSeriesAnalyzer": "rankwatch.ops_analyzer.analyzer",
         "DistributedLogAnalyzer": "rankwatch.ops_analyzer.logs"}
__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'rankwatch' has no attribute {name!r}")
