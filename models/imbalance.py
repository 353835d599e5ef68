"""Memory imbalance across the GPUs of one job: a GPU whose peak is far above the median of its peers is the
one that will run out of memory first (an uneven pipeline stage, a rank with the embeddings, skewed routing).

Input: one compact peak per GPU per time bucket (the stage-1 summaries). A bucket is judged once every known
GPU reported it, or once half of them are `stale_buckets` ahead (a GPU went quiet); a GPU that reports a bucket
after it was judged (its worker was behind) is judged against that bucket's stored statistics. So the verdict
does not depend on how the summaries of different workers interleave. A GPU is flagged in a bucket when its
peak (as a share of its total memory) exceeds the bucket's median by `gap_pct` points and by `k` robust sigmas
of the spread across GPUs; `persist` flagged buckets in a row raise one finding, re-armed when the gap falls
below half. No I/O.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from rankwatch.models.latest_index import LatestIndex

T = TypeVar("T")  # what the caller needs back to build an anomaly (a JSON-able summary)


@dataclass
class ImbalanceConfig:
    gap_pct: float = 10.0
    k: float = 6.0
    min_gpus: int = 3
    persist: int = 3
    stale_buckets: int = 4
    keep_buckets: int = 500


@dataclass
class ImbalanceFinding(Generic[T]):
    gpu: str
    bucket: int
    share: float  # peak / total of this GPU
    median: float  # median share across the GPUs of the bucket
    threshold: float
    score: float
    gpus: int
    ref: T


def _median(values: list[float]) -> float:
    s = sorted(values)
    n = len(s)
    return s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])


class MemoryImbalanceDetector(Generic[T]):
    def __init__(self, config: ImbalanceConfig | None = None) -> None:
        self.config = config or ImbalanceConfig()
        self.pending: dict[int, dict[str, tuple[float, T]]] = {}
        self.judged: OrderedDict[int, tuple[float, float, int]] = OrderedDict()  # bucket -> median, scale, n
        self.progress = LatestIndex()  # gpu -> latest bucket reported
        self.streak: dict[str, int] = {}
        self.raised: set[str] = set()

    def add(self, gpu: str, bucket: int, share: float, ref: T) -> list[ImbalanceFinding[T]]:
        self.progress.set(gpu, max(bucket, self.progress.latest.get(gpu, bucket)))
        if bucket in self.judged:
            med, scale, n = self.judged[bucket]
            f = self._verdict(gpu, bucket, share, ref, med, scale, n)
            return [f] if f else []
        if self.judged and bucket < next(iter(self.judged)):
            return []  # older than anything kept: nothing to compare with
        self.pending.setdefault(bucket, {})[gpu] = (share, ref)
        out: list[ImbalanceFinding[T]] = []
        for b in sorted(b for b, got in self.pending.items() if len(got) >= self.config.min_gpus):
            if self._ready(b):
                for earlier in sorted(x for x in self.pending if x < b):
                    out.extend(self._judge(earlier))  # keep each GPU's verdicts in bucket order
                out.extend(self._judge(b))
        while len(self.pending) > self.config.keep_buckets:
            self.pending.pop(min(self.pending))
        return out

    def _ready(self, bucket: int) -> bool:
        got = self.pending.get(bucket, {})
        if len(got) < self.config.min_gpus:
            return False
        if len(got) >= len(self.progress):
            return True
        return self.progress.at_least(bucket + self.config.stale_buckets) * 2 >= len(self.progress)

    def finish(self) -> list[ImbalanceFinding[T]]:
        """End of input: judge what is pending (buckets with enough GPUs)."""
        out: list[ImbalanceFinding[T]] = []
        for b in sorted(self.pending):
            if len(self.pending[b]) >= self.config.min_gpus:
                out.extend(self._judge(b))
        self.pending.clear()
        return out

    def _judge(self, bucket: int) -> list[ImbalanceFinding[T]]:
        got = self.pending.pop(bucket, {})
        if len(got) < self.config.min_gpus:
            return []
        shares = [s for s, _ in got.values()]
        med = _median(shares)
        # spread floor 0.5% of total: identical GPUs would otherwise make any difference infinitely significant
        scale = max(1.4826 * _median([abs(s - med) for s in shares]), 0.005)
        self.judged[bucket] = (med, scale, len(got))
        while len(self.judged) > self.config.keep_buckets:
            self.judged.popitem(last=False)
        return [f for gpu, (s, ref) in sorted(got.items())
                if (f := self._verdict(gpu, bucket, s, ref, med, scale, len(got))) is not None]

    def _verdict(self, gpu: str, bucket: int, share: float, ref: T, med: float, scale: float, n: int
                 ) -> ImbalanceFinding[T] | None:
        c = self.config
        threshold = med + max(c.gap_pct / 100.0, c.k * scale)
        if share <= threshold:
            self.streak[gpu] = 0
            if share - med < c.gap_pct / 200.0:
                self.raised.discard(gpu)
            return None
        self.streak[gpu] = self.streak.get(gpu, 0) + 1
        if self.streak[gpu] < c.persist or gpu in self.raised:
            return None
        self.raised.add(gpu)
        return ImbalanceFinding(gpu, bucket, share, med, threshold, (share - med) / scale, n, ref)

    def save_state(self) -> dict[str, Any]:
        return {"pending": [[b, [[g, s, ref] for g, (s, ref) in got.items()]] for b, got in self.pending.items()],
                "judged": [[b, *v] for b, v in self.judged.items()], "latest": dict(self.progress.latest),
                "streak": dict(self.streak), "raised": sorted(self.raised)}

    def load_state(self, state: dict[str, Any]) -> None:
        self.pending = {int(b): {g: (float(s), ref) for g, s, ref in got} for b, got in state.get("pending", [])}
        self.judged = OrderedDict((int(b), (float(m), float(sc), int(n))) for b, m, sc, n in state.get("judged", []))
        self.progress = LatestIndex((g, int(b)) for g, b in state.get("latest", {}).items())
        self.streak = {g: int(n) for g, n in state.get("streak", {}).items()}
        self.raised = set(state.get("raised", []))
