"""The LSTM that predicts a collective's next interval from the last `sequence_length` standardised intervals.

One network per job (shared weights), not one per rank/stream: 4,096 ranks x 4 streams would otherwise be 16k
networks of ~50k parameters each (GBs of weights and optimizer state). Every key brings its own normalisation
(models/op_timing.py), so the shared network sees each stream in its own units. Each time step's input is
[z, s]: the standardised log interval and the standardised seasonal reference for the *next* position (the same
phase of the previous steps), so a step boundary, which is periodic, is expected rather than surprising.

Training is online: windows that were just scored go into a reservoir; a round of a few Adam steps runs every
`train_every` new windows (after `budget` steps, every ~50 new windows per key), on a separate copy of the
weights, on a background thread in the worker so it never blocks the event loop; the inference copy takes the
new weights between micro-batches. Inference runs in chunks of 1,024 windows on one more thread, beside the loop
that builds the next chunk (models/op_timing.py).
"""

from __future__ import annotations

import os
import sys
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np

try:  # torch is a dependency, but the moving-average predictor must work without it (seed semantics)
    import torch
    from torch import nn
except ImportError:  # pragma: no cover - exercised by tests that hide torch
    torch = None  # type: ignore[assignment]
    nn = None  # type: ignore[assignment]

N_FEATURES = 2
CHUNK = 1024  # windows per forward pass (see predict)
MAX_INFER_THREADS = 4  # auto: one inference thread per usable core, at most this many
_EXECUTOR: ThreadPoolExecutor | None = None
_INFER: dict[int, ThreadPoolExecutor] = {}  # threads -> pool (one per process and size)


def torch_available() -> bool:
    return torch is not None


def _executor() -> ThreadPoolExecutor:
    global _EXECUTOR
    if _EXECUTOR is None:
        _EXECUTOR = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rankwatch-op-train")
    return _EXECUTOR


def resolve_infer_threads(wanted: int = 0) -> int:
    """`wanted` inference threads, or for 0 one per core this process may run on, at most MAX_INFER_THREADS."""
    if wanted > 0:
        return wanted
    try:
        cores = len(os.sched_getaffinity(0))  # a container's CPU set, not the host's count
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        cores = os.cpu_count() or 1
    return max(1, min(MAX_INFER_THREADS, cores))


def infer_executor(threads: int = 1) -> ThreadPoolExecutor:
    """Threads for forward passes: torch releases the GIL inside the LSTM kernel, so chunks' forward passes run
    on the other cores while the event loop builds the next chunk's windows (models/op_timing.py). More than one:
    when the loop has built a batch's windows it waits for their verdicts, and then every core can take a
    chunk (2 on the 2-core dev machine: 37-40k -> 43-50k op records/s with the LSTM judging, docs/PERFORMANCE.md).
    Concurrent forward passes of one network give the same numbers as one after the other (tested)."""
    pool = _INFER.get(threads)
    if pool is None:
        pool = _INFER[threads] = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="rankwatch-op-infer")
        # the forward pass takes the GIL back a few times per chunk (module calls, tensor conversions); at the
        # default 5 ms switch interval each hand-over waits out the event loop's slice and the two threads run
        # one after the other (measured: no overlap at all); at 0.5 ms they overlap
        sys.setswitchinterval(min(sys.getswitchinterval(), 0.0005))
    return pool


def pick_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch is not None and torch.cuda.is_available() else "cpu"
    return name


if nn is not None:

    class IntervalNet(nn.Module):
        def __init__(self, hidden_size: int = 64, num_layers: int = 2) -> None:
            super().__init__()
            self.lstm = nn.LSTM(N_FEATURES, hidden_size, num_layers, batch_first=True)
            self.head = nn.Linear(hidden_size, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out, _ = self.lstm(x)
            return self.head(out[:, -1]).squeeze(-1)


class _Reservoir:
    """A uniform sample of the windows of one length offered so far (reservoir sampling, vectorised)."""

    def __init__(self, size: int, shape: tuple[int, ...]) -> None:
        self.x = np.zeros((size, *shape), np.float32)
        self.y = np.zeros(size, np.float32)
        self.seen = 0

    def filled(self) -> int:
        return min(self.seen, len(self.y))

    def add(self, x: np.ndarray, y: np.ndarray, rng: np.random.Generator) -> None:
        n, size = len(x), len(self.y)
        fill = max(0, min(n, size - self.seen))  # item i is kept with probability size / (seen + i + 1)
        if fill:
            self.x[self.seen:self.seen + fill], self.y[self.seen:self.seen + fill] = x[:fill], y[:fill]
        if n > fill:
            slots = rng.integers(0, self.seen + np.arange(fill, n) + 1)
            keep = slots < size
            self.x[slots[keep]], self.y[slots[keep]] = x[fill:][keep], y[fill:][keep]
        self.seen += n


class SharedIntervalModel:
    """Shared weights for the keys of one job: batched prediction, reservoir, training rounds."""

    def __init__(self, seed: int, hidden_size: int = 64, num_layers: int = 2, buffer: int = 8192,
                 train_every: int = 2000, train_steps: int = 20, train_batch: int = 128, lr: float = 1e-3,
                 background: bool = False, device: str = "auto", budget: int = 600, infer_threads: int = 0
                 ) -> None:
        if torch is None:
            raise RuntimeError("torch is not installed")
        # Small batches on a small LSTM: more intra-op threads only contend (measured 0.36 s per training round
        # on one thread, 11-20 s on two, on the 2-core CI machine). This runs in the worker and `analyze`,
        # never in a training process (the hook sees no collective ops).
        if torch.get_num_threads() > 1:
            torch.set_num_threads(1)
        self.args = {"hidden_size": hidden_size, "num_layers": num_layers}
        self.device = pick_device(device)
        gen = torch.Generator().manual_seed(seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
            self.net = IntervalNet(hidden_size, num_layers).to(self.device).eval()
            self.trainer = IntervalNet(hidden_size, num_layers).to(self.device)
        self.trainer.load_state_dict(self.net.state_dict())
        self.optim = torch.optim.Adam(self.trainer.parameters(), lr=lr)
        self.rng = np.random.default_rng(seed)
        self.buffer = buffer
        self.train_every, self.train_steps, self.train_batch = train_every, train_steps, train_batch
        self.background = background
        self.infer_threads = resolve_infer_threads(infer_threads)
        self.budget = budget  # training steps until the model has converged; then rounds are 10x rarer
        self.seen = 0  # windows offered (all lengths)
        self.since_round = 0
        self.keys = 0  # rank/stream keys sharing this model (the detector counts them)
        self.steps_trained = 0
        # a reservoir per window length: the keys of one job can have different ones (`stream_params`)
        self.reservoirs: dict[int, _Reservoir] = {}
        self._pending: dict[str, Any] | None = None  # weights a background round finished with
        self._lock = threading.Lock()
        self._round: Future | None = None

    # ---- inference -----------------------------------------------------------------------------------
    def predict(self, x: np.ndarray, net: Any = None) -> np.ndarray:
        """x: [B, L, 2] float32 -> predicted standardised next value [B], by `net` (a batch's windows name the
        network that was current when the batch began) or the current one. Thread-safe: training rounds write
        another copy, new weights come in a new network (take_weights), and concurrent forward passes of one
        network only read it."""
        net = self.net if net is None else net
        out = np.empty(len(x), np.float32)
        with torch.inference_mode():
            # chunks of 1,024: the CPU LSTM is ~40% slower per window on larger batches (cache), and a bounded
            # set of batch sizes keeps the kernels' per-shape caches bounded
            for i in range(0, len(x), CHUNK):
                out[i:i + CHUNK] = net(torch.from_numpy(x[i:i + CHUNK]).to(self.device)).float().cpu().numpy()
        return out

    # ---- training -------------------------------------------------------------------------------------
    def offer(self, x: np.ndarray, y: np.ndarray) -> None:
        """Scored windows join the reservoir (uniform sample of everything seen), then maybe a round."""
        n = len(x)
        if n == 0:
            return
        res = self.reservoirs.get(x.shape[1])
        if res is None:
            res = self.reservoirs[x.shape[1]] = _Reservoir(self.buffer, x.shape[1:])
        res.add(x, y, self.rng)
        self.seen += n
        self.since_round += n
        # once converged, rounds only follow drift: every ~50 new windows per key (at least 10x rarer). Per job
        # and not per key, the rate would grow with the job: a 4,096-rank job judged by the LSTM offers ~60k
        # windows/s, a round every 20k would keep a core busy training (measured: 0.36 s per round)
        every = (self.train_every if self.steps_trained < self.budget
                 else max(10 * self.train_every, 50 * self.keys))
        if self.since_round >= every and any(r.filled() >= self.train_batch for r in self.reservoirs.values()):
            self.since_round = 0
            self._start_round()

    def _start_round(self) -> None:
        # each window length gets a share of the round's steps by how much of the job's traffic it is (a step's
        # batch is of one length); one length, the usual case: every step
        ready = {n: r for n, r in self.reservoirs.items() if r.filled() >= self.train_batch}
        total = sum(r.seen for r in ready.values())
        xs: list[np.ndarray] = []
        ys: list[np.ndarray] = []
        for res in ready.values():
            steps = self.train_steps if len(ready) == 1 else max(1, round(self.train_steps * res.seen / total))
            idx = self.rng.integers(0, res.filled(), (steps, self.train_batch))
            xs.extend(res.x[idx])  # copies: the round never reads the live reservoir
            ys.extend(res.y[idx])
        if not self.background:
            self._train(xs, ys)
            self.take_weights()
        elif self._round is None or self._round.done():
            self._round = _executor().submit(self._train, xs, ys)

    def _train(self, xs: list[np.ndarray], ys: list[np.ndarray]) -> None:
        self.trainer.train()
        loss_fn = nn.SmoothL1Loss()  # heavy-tailed intervals: robust to the rare huge gap
        for x, y in zip(xs, ys, strict=True):
            xb = torch.from_numpy(x).to(self.device)
            yb = torch.from_numpy(y).to(self.device)
            self.optim.zero_grad(set_to_none=True)
            loss = loss_fn(self.trainer(xb), yb)
            loss.backward()
            nn.utils.clip_grad_norm_(self.trainer.parameters(), 1.0)
            self.optim.step()
        weights = {k: v.detach().clone() for k, v in self.trainer.state_dict().items()}
        with self._lock:
            self._pending = weights
            self.steps_trained += len(xs)

    def take_weights(self) -> None:
        """The weights of a finished training round become the inference weights, in a new network: forward
        passes of a batch begun earlier may still be running on the old one (the detector calls this as a batch
        begins, so every window of a batch is scored by the same weights)."""
        if self._pending is None:
            return
        with self._lock:
            weights, self._pending = self._pending, None
        if weights is not None:
            net = IntervalNet(**self.args).to(self.device).eval()
            net.load_state_dict(weights)
            self.net = net

    def wait(self) -> None:
        """Finish a background round (tests, shutdown)."""
        if self._round is not None:
            self._round.result()
        self.take_weights()

    # ---- persistence ----------------------------------------------------------------------------------
    def save_state(self) -> dict[str, Any]:
        from rankwatch.models.tensor_state import state_dict_to_json

        self.wait()
        return {"args": dict(self.args), "weights": state_dict_to_json(self.trainer.state_dict()),
                "steps_trained": self.steps_trained}

    def load_state(self, state: dict[str, Any]) -> None:
        from rankwatch.models.tensor_state import state_dict_from_json

        weights = state_dict_from_json(state["weights"])
        self.trainer.load_state_dict(weights)
        self.net.load_state_dict(weights)
        self.steps_trained = int(state.get("steps_trained", 0))

    def __getstate__(self) -> dict[str, Any]:  # picklable (detector contract): no lock, no future
        self.wait()
        d = dict(self.__dict__)
        d["_lock"] = None
        d["_round"] = None
        return d

    def __setstate__(self, d: dict[str, Any]) -> None:
        d.setdefault("infer_threads", 1)
        self.__dict__.update(d)
        self._lock = threading.Lock()
