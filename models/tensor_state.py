"""Model weights as JSON-safe data (dtype, shape, base64 of the raw little-endian bytes): detector state goes
through `save_state()` into the worker's JSON snapshot, and nothing is ever unpickled."""

from __future__ import annotations

import base64
from typing import Any

import numpy as np


def array_to_json(a: np.ndarray) -> dict[str, Any]:
    a = np.ascontiguousarray(a)
    return {"dtype": str(a.dtype), "shape": list(a.shape),
            "b64": base64.b64encode(a.astype(a.dtype.newbyteorder("<"), copy=False).tobytes()).decode()}


def array_from_json(d: dict[str, Any]) -> np.ndarray:
    dtype = np.dtype(str(d["dtype"]))
    if dtype.kind not in "fiub":  # numbers only: an object dtype would be a way to smuggle code in
        raise ValueError(f"unsupported dtype {dtype}")
    raw = base64.b64decode(d["b64"])
    return np.frombuffer(raw, dtype=dtype.newbyteorder("<")).astype(dtype).reshape(d["shape"]).copy()


def state_dict_to_json(sd: dict[str, Any]) -> dict[str, Any]:
    """A torch state_dict (tensors) -> {name: array json}."""
    return {name: array_to_json(t.detach().cpu().numpy()) for name, t in sd.items()}


def state_dict_from_json(d: dict[str, Any]) -> dict[str, Any]:
    import torch

    return {name: torch.from_numpy(array_from_json(v)) for name, v in d.items()}
