"""Detectors: plain, picklable classes with no Kafka/Faust/Prometheus imports and no I/O."""

from rankwatch.models.base import Score
from rankwatch.models.mad import RollingMAD

__all__ = ["Score", "RollingMAD"]
