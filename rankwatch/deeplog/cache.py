"""The encoded keys of a training run on disk, read back in chunks: flat memory whatever the input size.

One pass over the sources writes (under `<output_dir>/cache/`):
- `tokens.i32`: class indices, sequence after sequence, cut into pieces of at most `max_seq_length` targets;
  a piece after the first of a sequence starts with up to h context keys copied from the one before (so every
  window lies inside its piece);
- `hist.i8`: per token, how many keys of its sequence precede it (capped at 127), -1 for context keys;
- `pieces.i64`: where each piece starts (plus the end). Pieces are the unit of the train/validation split and of
  sharding across processes;
- `meta.json`: counts, the vocabulary, where the data came from.
Epochs read the files with positioned reads (not mmap, so resident memory stays the size of one chunk), build
windows with numpy and pass them through a shuffle buffer of `buffer_size` windows.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from rankwatch.deeplog.data import Chunk
from rankwatch.deeplog.model import EOS, PAD, UNK, Vocabulary

HIST_CAP = 127
_HASH_MUL = np.uint64(0x9E3779B97F4A7C15)


def piece_fraction(piece_ids: np.ndarray, seed: int) -> np.ndarray:
    """A deterministic pseudo-random number in [0, 1) per piece id (which pieces are validation)."""
    x = (piece_ids.astype(np.uint64) + np.uint64(seed * 7919 + 1)) * _HASH_MUL
    x ^= x >> np.uint64(29)
    return (x >> np.uint64(11)).astype(np.float64) / float(1 << 53)


class _SequenceBuffer:
    __slots__ = ("tokens", "pos", "recent")

    def __init__(self) -> None:
        self.tokens: list[int] = []
        self.pos = 0  # keys of this sequence already written
        self.recent: list[int] = []  # the last h written keys (context for the next piece)


class CacheWriter:
    """Encodes chunks with a vocabulary and writes pieces; memory: one buffer per open sequence."""

    def __init__(self, directory: str, vocab: Vocabulary, window: int, max_len: int,
                 vocab_cap: int | None = None, flush_tokens: int = 1 << 20, end_of_sequence: bool = True) -> None:
        os.makedirs(directory, exist_ok=True)
        self.directory, self.vocab, self.h, self.max_len = directory, vocab, window, max_len
        self.vocab_cap = vocab_cap
        self._tok = open(os.path.join(directory, "tokens.i32"), "wb")
        self._hist = open(os.path.join(directory, "hist.i8"), "wb")
        self._pieces = open(os.path.join(directory, "pieces.i64"), "wb")
        self.n_tokens = self.n_pieces = self.n_targets = self.unknown = self.labelled_abnormal = 0
        self.counts: Counter[str] = Counter()
        self.open: dict[Any, _SequenceBuffer] = {}
        self._buf_tok: list[int] = []
        self._buf_hist: list[int] = []
        self._buf_pieces: list[int] = []
        self.flush_tokens = flush_tokens
        self.end_of_sequence = end_of_sequence  # complete sequences end with EOS (streams never complete)

    def encode(self, key: str) -> int:
        idx = self.vocab.index.get(key)
        if idx is None:
            if self.vocab_cap is not None and len(self.vocab) >= self.vocab_cap:
                self.unknown += 1
                return UNK  # the configured vocab_size is full
            idx = self.vocab.add(key)
        return idx

    def encode_many(self, keys: list[str]) -> list[int]:
        index = self.vocab.index
        try:
            idxs = [index[k] for k in keys]  # the common case: every key known (C-speed lookups)
        except KeyError:
            idxs = [self.encode(k) for k in keys]
        self.counts.update(keys)
        return idxs

    def add(self, chunk: Chunk) -> None:
        if chunk.label == 1:  # DeepLog learns normal behaviour only
            self.labelled_abnormal += 1
            return
        buf = self.open.get(chunk.sid)
        if buf is None:
            buf = self.open[chunk.sid] = _SequenceBuffer()
        buf.tokens.extend(self.encode_many(chunk.keys))
        if chunk.done and self.end_of_sequence:
            buf.tokens.extend(self.encode_many([EOS]))
        while len(buf.tokens) >= self.max_len:
            self._write_piece(buf, self.max_len)
        if chunk.done:
            self.finish_sequence(chunk.sid)

    def finish_sequence(self, sid: Any) -> None:
        buf = self.open.pop(sid, None)
        if buf is not None and buf.tokens:
            self._write_piece(buf, len(buf.tokens))

    def _write_piece(self, buf: _SequenceBuffer, n: int) -> None:
        targets, buf.tokens = buf.tokens[:n], buf.tokens[n:]
        self._buf_pieces.append(self.n_tokens)
        ctx = buf.recent[-self.h:] if buf.pos else []
        self._buf_tok.extend(ctx)
        self._buf_hist.extend([-1] * len(ctx))
        self._buf_tok.extend(targets)
        capped = max(0, min(n, HIST_CAP - buf.pos))
        self._buf_hist.extend(range(buf.pos, buf.pos + capped))
        self._buf_hist.extend([HIST_CAP] * (n - capped))
        buf.pos += n
        buf.recent = (buf.recent + targets)[-self.h:]
        self.n_tokens += len(ctx) + n
        self.n_targets += n
        self.n_pieces += 1
        if len(self._buf_tok) >= self.flush_tokens:
            self._flush()

    def _flush(self) -> None:
        np.asarray(self._buf_tok, dtype=np.int32).tofile(self._tok)
        np.asarray(self._buf_hist, dtype=np.int8).tofile(self._hist)
        np.asarray(self._buf_pieces, dtype=np.int64).tofile(self._pieces)
        self._buf_tok, self._buf_hist, self._buf_pieces = [], [], []

    def close(self, meta: dict[str, Any]) -> KeyCache:
        for sid in list(self.open):
            self.finish_sequence(sid)
        self._buf_pieces.append(self.n_tokens)  # the end of the last piece
        self._flush()
        for f in (self._tok, self._hist, self._pieces):
            f.close()
        self.vocab.counts = {k: int(v) for k, v in self.counts.items() if k in self.vocab.index}
        info = {"window": self.h, "max_seq_length": self.max_len, "n_tokens": self.n_tokens,
                "n_pieces": self.n_pieces, "n_targets": self.n_targets, "unknown": self.unknown,
                "labelled_abnormal_skipped": self.labelled_abnormal, "vocabulary": self.vocab.to_dict(), **meta}
        tmp = os.path.join(self.directory, "meta.json.tmp")
        with open(tmp, "w") as fh:
            json.dump(info, fh)
        os.replace(tmp, os.path.join(self.directory, "meta.json"))
        return KeyCache(self.directory)


def build_cache(directory: str, chunks: Iterable[Chunk], vocab: Vocabulary, window: int, max_len: int,
                vocab_cap: int | None = None, meta: dict[str, Any] | None = None,
                end_of_sequence: bool = True) -> KeyCache:
    writer = CacheWriter(directory, vocab, window, max_len, vocab_cap, end_of_sequence=end_of_sequence)
    for chunk in chunks:
        writer.add(chunk)
    return writer.close(meta or {})


@dataclass
class Batch:
    windows: np.ndarray  # (n, h) int64
    targets: np.ndarray  # (n,) int64
    pieces: np.ndarray | None = None  # (n,) the piece each window belongs to (cache chunks only)


class KeyCache:
    def __init__(self, directory: str) -> None:
        self.directory = directory
        with open(os.path.join(directory, "meta.json")) as fh:
            self.meta = json.load(fh)
        self.h = int(self.meta["window"])

    @property
    def vocab(self) -> Vocabulary:
        return Vocabulary.from_dict(self.meta["vocabulary"])

    def _pieces(self, start: int, count: int) -> np.ndarray:
        """count + 1 piece boundaries from piece `start`."""
        return np.fromfile(os.path.join(self.directory, "pieces.i64"), dtype=np.int64, count=count + 1,
                           offset=start * 8)

    def _selected(self, bounds: np.ndarray, first_piece: int, split: str, shard: int, world: int,
                  val_fraction: float, seed: int) -> np.ndarray:
        ids = np.arange(first_piece, first_piece + len(bounds) - 1)
        if split == "all":
            keep = np.ones(len(ids), dtype=bool)
        else:
            frac = piece_fraction(ids, seed)
            keep = frac < val_fraction if split == "val" else frac >= val_fraction
        return keep & (ids % world == shard)

    def count(self, split: str = "train", shard: int = 0, world: int = 1, val_fraction: float = 0.1,
              seed: int = 0, pieces_per_chunk: int = 1 << 18) -> int:
        """Targets in a split/shard, from the piece index and the context counts."""
        total = 0
        for first in range(0, int(self.meta["n_pieces"]), pieces_per_chunk):
            n = min(pieces_per_chunk, int(self.meta["n_pieces"]) - first)
            bounds = self._pieces(first, n)
            keep = self._selected(bounds, first, split, shard, world, val_fraction, seed)
            if not keep.any():
                continue
            hist = np.fromfile(os.path.join(self.directory, "hist.i8"), dtype=np.int8,
                               count=int(bounds[-1] - bounds[0]), offset=int(bounds[0]))
            piece_of = np.repeat(np.arange(n), np.diff(bounds))
            total += int(((hist >= 0) & keep[piece_of]).sum())
        return total

    def chunks(self, split: str = "train", shard: int = 0, world: int = 1, val_fraction: float = 0.1,
               seed: int = 0, tokens_per_chunk: int = 1 << 18, order: np.random.Generator | None = None
               ) -> Iterator[Batch]:
        """Windows and targets of the selected pieces, a chunk of consecutive pieces at a time: in file order,
        or with `order` in a random order of chunks (with a shuffle buffer several chunks deep, that mixes
        the whole input, not just neighbouring sequences)."""
        n_pieces = int(self.meta["n_pieces"])
        avg = max(1.0, int(self.meta["n_tokens"]) / max(1, n_pieces))
        per = max(1, int(tokens_per_chunk / avg))
        starts = np.arange(0, n_pieces, per)
        if order is not None:
            starts = order.permutation(starts)
        for first in starts:
            first = int(first)
            n = min(per, n_pieces - first)
            bounds = self._pieces(first, n)
            keep = self._selected(bounds, first, split, shard, world, val_fraction, seed)
            if not keep.any():
                continue
            lo, hi = int(bounds[0]), int(bounds[-1])
            tok = np.fromfile(os.path.join(self.directory, "tokens.i32"), dtype=np.int32, count=hi - lo,
                              offset=lo * 4)
            hist = np.fromfile(os.path.join(self.directory, "hist.i8"), dtype=np.int8, count=hi - lo, offset=lo)
            piece_of = np.repeat(np.arange(n), np.diff(bounds))
            pos = np.nonzero((hist >= 0) & keep[piece_of])[0]
            batch = window_batch(tok, hist, pos, self.h)
            batch.pieces = piece_of[pos] + first
            yield batch


def window_batch(tok: np.ndarray, hist: np.ndarray, pos: np.ndarray, h: int) -> Batch:
    """The h keys before each target position (PAD where the sequence had none), and the targets."""
    offsets = np.arange(-h, 0)
    idx = pos[:, None] + offsets[None, :]
    valid = (-offsets)[None, :] <= hist[pos].astype(np.int64)[:, None]
    windows = np.where(valid, tok[np.clip(idx, 0, None)], PAD).astype(np.int64)
    return Batch(windows, tok[pos].astype(np.int64))


def shuffled_batches(chunks: Iterable[Batch], batch_size: int, buffer_size: int, shuffle: bool,
                     rng: np.random.Generator, drop_last: bool = True) -> Iterator[Batch]:
    """Batches drawn from a buffer of at least `buffer_size` windows refilled chunk by chunk."""
    pending_w: list[np.ndarray] = []
    pending_t: list[np.ndarray] = []
    held = 0
    for chunk in chunks:
        pending_w.append(chunk.windows)
        pending_t.append(chunk.targets)
        held += len(chunk.targets)
        if held < buffer_size + batch_size:
            continue
        w, t = np.concatenate(pending_w), np.concatenate(pending_t)
        if shuffle:
            order = rng.permutation(len(t))
            w, t = w[order], t[order]
        n_out = ((len(t) - buffer_size) // batch_size) * batch_size
        for s in range(0, n_out, batch_size):
            yield Batch(w[s:s + batch_size], t[s:s + batch_size])
        pending_w, pending_t, held = [w[n_out:]], [t[n_out:]], len(t) - n_out
    if held:
        w, t = np.concatenate(pending_w), np.concatenate(pending_t)
        if shuffle:
            order = rng.permutation(len(t))
            w, t = w[order], t[order]
        end = (len(t) // batch_size) * batch_size if drop_last else len(t)
        for s in range(0, end, batch_size):
            yield Batch(w[s:s + batch_size], t[s:s + batch_size])
