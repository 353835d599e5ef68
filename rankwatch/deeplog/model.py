"""DeepLog (Du et al., CCS 2017): an LSTM reads the last h log keys and predicts the next one; a key outside the
top-g predictions is an anomaly. The model, its vocabulary and its checkpoints, for the CLIs and users' code.

    from rankwatch.deeplog import load_checkpoint
    model, vocab, _ = load_checkpoint("out/checkpoints/best_model.pt")
    ids = [vocab.encode_many(session) for session in sessions]   # raw keys -> class indices
    scores = model.anomaly_score(ids, top_k=9)                   # per sequence: share of keys outside top-9

Class indices: 0 pads short histories, 1 stands for every key the model never saw (a key never seen in training
is an anomaly, per the paper), 2.. are the keys. Models trained on complete sequences (sessions) also know the
key "<eos>" (`EOS`): append `vocab.encode(EOS)` to a complete sequence, so that one stopping where normal ones
never stop is judged too. Checkpoints hold only tensors and plain Python values, so they
load with `torch.load(..., weights_only=True)`.
"""

from __future__ import annotations

import base64
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

PAD, UNK = 0, 1
RESERVED = ("<pad>", "<unk>")
EOS = "<eos>"  # appended to complete sequences (sessions): where a sequence stops is an event too
CHECKPOINT_FORMAT = "rankwatch.deeplog/v1"


@dataclass
class ModelArgs:
    """Everything needed to rebuild the network (stored in every checkpoint)."""

    vocab_size: int
    embedding_dim: int = 128
    hidden_size: int = 256
    num_layers: int = 2
    dropout: float = 0.2
    window: int = 10  # h: keys of history per prediction


class Vocabulary:
    """Raw log keys (strings: template ids, event ids) <-> class indices, plus what makes the keys readable
    online: the templates by key and, for models mined from raw logs, the template miner's state."""

    def __init__(self, keys: Iterable[str] = (), templates: dict[str, str] | None = None,
                 miner: dict[str, Any] | None = None, counts: dict[str, int] | None = None) -> None:
        self.keys: list[str] = list(RESERVED)
        self.index: dict[str, int] = {k: i for i, k in enumerate(self.keys)}
        for k in keys:
            self.add(k)
        self.templates: dict[str, str] = dict(templates or {})
        self.miner = miner
        self.counts: dict[str, int] = dict(counts or {})  # how often each key was a target in training

    def add(self, key: str) -> int:
        key = str(key)
        idx = self.index.get(key)
        if idx is None:
            idx = self.index[key] = len(self.keys)
            self.keys.append(key)
        return idx

    def encode(self, key: object) -> int:
        return self.index.get(str(key), UNK)

    def encode_many(self, keys: Iterable[object]) -> list[int]:
        get = self.index.get
        return [get(str(k), UNK) for k in keys]

    def decode(self, idx: int) -> str:
        return self.keys[idx] if 0 <= idx < len(self.keys) else RESERVED[UNK]

    def template(self, idx: int) -> str:
        key = self.decode(idx)
        return self.templates.get(key, key)

    def __len__(self) -> int:
        return len(self.keys)

    def __contains__(self, key: object) -> bool:
        return str(key) in self.index

    def base_rates(self) -> np.ndarray:
        """Per class, the share of training targets it was (0 where unknown): how common a key is anywhere."""
        counts = np.array([self.counts.get(k, 0) for k in self.keys], dtype=np.float64)
        total = counts.sum()
        return counts / total if total > 0 else counts

    def to_dict(self) -> dict[str, Any]:
        return {"keys": self.keys[len(RESERVED):], "templates": dict(self.templates), "miner": self.miner,
                "counts": dict(self.counts)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Vocabulary:
        return cls([str(k) for k in d.get("keys", [])],
                   {str(k): str(v) for k, v in (d.get("templates") or {}).items()}, d.get("miner"),
                   {str(k): int(v) for k, v in (d.get("counts") or {}).items()})


class DeepLog(nn.Module):
    """Embedding -> stacked LSTM -> linear over the vocabulary, predicting the key that follows a window."""

    def __init__(self, vocab_size: int, embedding_dim: int = 128, hidden_size: int = 256, num_layers: int = 2,
                 dropout: float = 0.2, window: int = 10) -> None:
        super().__init__()
        self.model_args = ModelArgs(int(vocab_size), int(embedding_dim), int(hidden_size), int(num_layers),
                                    float(dropout), int(window))
        self.embedding = nn.Embedding(vocab_size, embedding_dim, padding_idx=PAD)
        self.lstm = nn.LSTM(embedding_dim, hidden_size, num_layers, batch_first=True,
                            dropout=dropout if num_layers > 1 else 0.0)
        self.head = nn.Linear(hidden_size, vocab_size)

    @classmethod
    def from_args(cls, args: ModelArgs | dict[str, Any]) -> DeepLog:
        a = args if isinstance(args, ModelArgs) else ModelArgs(**args)
        return cls(**asdict(a))

    @property
    def window(self) -> int:
        return self.model_args.window

    def reset_parameters(self, seed: int) -> None:
        """Deterministic initialisation from a private generator (the global RNG is shared across threads)."""
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            nn.init.normal_(self.embedding.weight, 0.0, 1.0, generator=g)
            self.embedding.weight[PAD].zero_()
            bound = 1.0 / math.sqrt(self.model_args.hidden_size)
            for p in self.lstm.parameters():
                nn.init.uniform_(p, -bound, bound, generator=g)
            nn.init.uniform_(self.head.weight, -bound, bound, generator=g)
            nn.init.uniform_(self.head.bias, -bound, bound, generator=g)

    def forward(self, windows: torch.Tensor) -> torch.Tensor:
        """(batch, h) class indices -> (batch, vocab) logits for the next key."""
        out, _ = self.lstm(self.embedding(windows))
        return self.head(out[:, -1])

    def forward_bucketed(self, windows: torch.Tensor) -> torch.Tensor:
        """forward() on a batch padded to a power-of-two size (sliced back). For inference on batches of any
        size: the CPU LSTM kernels (oneDNN) cache a primitive per input shape, and a stream of distinct batch
        sizes grows the process by hundreds of MB (measured: 246 -> 790 MB over 3,000 sizes; flat with this)."""
        n = windows.shape[0]
        size = max(16, 1 << (n - 1).bit_length()) if n else 16
        if size != n:
            pad = torch.full((size - n, windows.shape[1]), PAD, dtype=windows.dtype, device=windows.device)
            windows = torch.cat([windows, pad])
        return self(windows)[:n]

    @torch.no_grad()
    def predict_proba(self, windows: torch.Tensor | np.ndarray) -> torch.Tensor:
        x = torch.as_tensor(np.asarray(windows) if not isinstance(windows, torch.Tensor) else windows,
                            dtype=torch.long, device=self.head.weight.device)
        was = self.training
        self.eval()
        try:
            return torch.softmax(self.forward_bucketed(x).float(), dim=-1)
        finally:
            self.train(was)

    def sliding_windows(self, key_ids: torch.Tensor) -> torch.Tensor:
        """(batch, L) -> (batch, L, h): the h keys before each position, left-padded."""
        h = self.window
        pad = torch.full((key_ids.shape[0], h), PAD, dtype=key_ids.dtype, device=key_ids.device)
        return torch.cat([pad, key_ids], dim=1).unfold(1, h, 1)[:, : key_ids.shape[1]]

    @torch.no_grad()
    def key_flags(self, key_ids: torch.Tensor | Sequence[Sequence[int]], top_k: int = 9, min_prob: float = 0.0
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per position: (is the key outside the top-k predictions, or predicted below `min_prob`?, is it a
        real key and not padding?)."""
        x = _as_batch(key_ids, self.head.weight.device)
        if x.numel() == 0:
            return torch.zeros_like(x, dtype=torch.bool), torch.zeros_like(x, dtype=torch.bool)
        windows = self.sliding_windows(x).reshape(-1, self.window)
        flags = torch.empty(windows.shape[0], dtype=torch.bool, device=x.device)
        actual = x.reshape(-1)
        for start in range(0, windows.shape[0], 8192):  # bounded memory on long inputs
            sl = slice(start, start + 8192)
            probs = self.predict_proba(windows[sl])
            top = probs.topk(min(top_k, probs.shape[1]), dim=-1).indices
            p_actual = probs.gather(1, actual[sl, None])[:, 0]
            flags[sl] = ~(top == actual[sl, None]).any(dim=-1) | (p_actual < min_prob)
        valid = x != PAD
        flags = flags.reshape(x.shape) & valid | ((x == UNK) & valid)
        return flags, valid

    @torch.no_grad()
    def anomaly_score(self, key_ids: torch.Tensor | Sequence[Sequence[int]], top_k: int = 9,
                      min_prob: float = 0.0) -> torch.Tensor:
        """Per sequence, the share of its keys that fall outside the model's top-k predictions (unknown keys
        count as outside; with `min_prob`, so do keys predicted less likely than that). 0 = every key
        expected. DeepLog calls a sequence abnormal when any key is."""
        flags, valid = self.key_flags(key_ids, top_k, min_prob)
        return flags.sum(dim=1).float() / valid.sum(dim=1).clamp(min=1).float()

    # users of the earlier standalone tool called it this
    calculate_anomaly_score = anomaly_score


def _as_batch(key_ids: torch.Tensor | Sequence[Sequence[int]], device: torch.device) -> torch.Tensor:
    if isinstance(key_ids, torch.Tensor):
        x = key_ids.to(device=device, dtype=torch.long)
        return x.unsqueeze(0) if x.dim() == 1 else x
    seqs = [list(s) for s in key_ids]
    if seqs and not isinstance(seqs[0], list):
        seqs = [seqs]  # type: ignore[list-item]  # a single flat sequence
    width = max((len(s) for s in seqs), default=0)
    out = torch.full((len(seqs), width), PAD, dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            out[i, : len(s)] = torch.as_tensor(s, dtype=torch.long)
    return out.to(device)


def unwrap(model: nn.Module) -> DeepLog:
    """The DeepLog inside DataParallel / DistributedDataParallel."""
    return model.module if hasattr(model, "module") else model  # type: ignore[return-value]


# ---- checkpoints ---------------------------------------------------------------------------------------------
def save_checkpoint(path: str | os.PathLike[str], model: nn.Module, vocab: Vocabulary, *,
                    optimizer: torch.optim.Optimizer | None = None, scheduler: Any = None, scaler: Any = None,
                    step: int = 0, epoch: int = 0, **extra: Any) -> None:
    """Weights, the args to rebuild the model, the vocabulary, optimizer/scheduler/scaler state and the step.
    Written to a temp file and renamed, so a reader (a worker reloading it) never sees half a file."""
    net = unwrap(model)
    ckpt: dict[str, Any] = {
        "format": CHECKPOINT_FORMAT,
        "model_state_dict": {k: v.detach().cpu() for k, v in net.state_dict().items()},
        "model_args": asdict(net.model_args),
        "vocabulary": vocab.to_dict(),
        "step": int(step),
        "epoch": int(epoch),
    }
    if optimizer is not None:
        ckpt["optimizer_state_dict"] = optimizer.state_dict()
    if scheduler is not None:
        ckpt["scheduler_state_dict"] = scheduler.state_dict()
    if scaler is not None:
        ckpt["scaler_state_dict"] = scaler.state_dict()
    ckpt.update(extra)
    tmp = f"{os.fspath(path)}.tmp{os.getpid()}"
    torch.save(ckpt, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str | os.PathLike[str], map_location: str | torch.device = "cpu"
                    ) -> tuple[DeepLog, Vocabulary, dict[str, Any]]:
    """(model in eval mode, vocabulary, the whole checkpoint dict). Never unpickles arbitrary objects."""
    ckpt = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(ckpt, dict) or "model_state_dict" not in ckpt or "model_args" not in ckpt:
        raise ValueError(f"{path}: not a DeepLog checkpoint (no model_state_dict/model_args)")
    model = DeepLog.from_args(ckpt["model_args"])
    model.load_state_dict(ckpt["model_state_dict"])
    model.eval()
    vocab = Vocabulary.from_dict(ckpt.get("vocabulary") or {})
    if len(vocab) > model.model_args.vocab_size:
        raise ValueError(f"{path}: vocabulary has {len(vocab)} entries, the model {model.model_args.vocab_size}")
    return model, vocab, ckpt


def weights_to_json(model: DeepLog) -> dict[str, Any]:
    """Weights as JSON-safe data (raw little-endian float32, base64) for detector state files."""
    tensors = {}
    for name, t in model.state_dict().items():
        arr = t.detach().cpu().numpy().astype("<f4")
        tensors[name] = {"shape": list(arr.shape), "dtype": "float32",
                         "data": base64.b64encode(arr.tobytes()).decode("ascii")}
    return {"args": asdict(model.model_args), "tensors": tensors}


def weights_from_json(d: dict[str, Any]) -> DeepLog:
    model = DeepLog.from_args(d["args"])
    state = {}
    for name, t in d["tensors"].items():
        if t.get("dtype") != "float32":
            raise ValueError(f"unsupported dtype {t.get('dtype')!r} for {name}")
        arr = np.frombuffer(base64.b64decode(t["data"]), dtype="<f4").reshape(t["shape"])
        state[name] = torch.from_numpy(arr.copy())
    model.load_state_dict(state)
    model.eval()
    return model


# ---- a small training loop for models fitted online (the CLI has the full one) --------------------------
def fit_windows(model: DeepLog, windows: np.ndarray, targets: np.ndarray, weights: np.ndarray | None = None,
                steps: int = 300, batch_size: int = 128, lr: float = 3e-3, seed: int = 0) -> float:
    """Fit on (window, next key) pairs, optionally weighted (deduplicated pairs with their counts), for a fixed
    number of optimizer steps: the cost is bounded whatever the data. CPU, deterministic for a seed (private
    RNGs; dropout should be 0). Returns the mean loss over the last epoch's worth of steps."""
    n = len(targets)
    if n == 0:
        return float("nan")
    x_all = torch.as_tensor(windows, dtype=torch.long)
    y_all = torch.as_tensor(targets, dtype=torch.long)
    w_all = torch.as_tensor(weights if weights is not None else np.ones(n), dtype=torch.float32)
    w_all = w_all / w_all.mean()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    loss_fn = nn.CrossEntropyLoss(reduction="none")
    rng = np.random.default_rng(seed)
    per_epoch = max(1, -(-n // batch_size))
    recent: list[float] = []
    model.train()
    done = 0
    while done < steps:
        order = torch.as_tensor(rng.permutation(n))
        for start in range(0, n, batch_size):
            idx = order[start:start + batch_size]
            loss = (loss_fn(model(x_all[idx]), y_all[idx]) * w_all[idx]).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            recent = (recent + [float(loss.detach())])[-per_epoch:]
            done += 1
            if done >= steps:
                break
    model.eval()
    return float(np.mean(recent))
