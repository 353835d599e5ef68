"""Detector contract shared by every model: `score_one` judges, `learn_one` updates, `update` does both."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Protocol


@dataclass(frozen=True, slots=True)
class Score:
    """A detector's verdict on one value. `score` is in units of the detector's scale (robust z)."""

    value: float
    expected: float | None
    scale: float | None
    threshold: float | None
    score: float
    is_anomaly: bool
    ready: bool  # False during warm-up: no verdict is given yet


class Detector(Protocol):
    def score_one(self, x: float) -> Score: ...

    def learn_one(self, x: float) -> None: ...

    def update(self, x: float) -> Score: ...

    def save_state(self) -> dict[str, Any]: ...

    def load_state(self, state: dict[str, Any]) -> None: ...


class StateMixin:
    """save_state/load_state over plain attributes: JSON-friendly dicts, no pickle of untrusted data."""

    _state_fields: tuple[str, ...] = ()

    def save_state(self) -> dict[str, Any]:
        return {name: copy.deepcopy(_plain(getattr(self, name))) for name in self._state_fields}

    def load_state(self, state: dict[str, Any]) -> None:
        for name in self._state_fields:
            if name in state:
                self._restore(name, state[name])

    def _restore(self, name: str, value: Any) -> None:
        setattr(self, name, value)


def _plain(value: Any) -> Any:
    if isinstance(value, (list, tuple)) or type(value).__name__ == "deque":
        return list(value)
    return value
