"""A safe reader for the Python repr of a dict, as `print(dict)` writes it (Hugging Face Trainer, Accelerate,
TRL): `{'loss': 2.3456, 'grad_norm': nan, 'learning_rate': 4.9e-05, 'epoch': 0.01}`.

Never `eval`: a small tokenizer that knows literals only: numbers (exponents, `_` separators), `nan`/`inf`,
True/False/None, quoted strings, nested dicts/lists/tuples, and the scalar wrappers that leak into logs
(`np.float64(0.5)`, `tensor(0.5, device='cuda:0')`), which are read as their first argument.
"""

from __future__ import annotations

import math
import re
from typing import Any

_WS = re.compile(r"\s*")
_NUM = re.compile(r"[-+]?(?:(?:\d[\d_]*)?\.?\d[\d_]*(?:[eE][-+]?\d+)?|nan|inf(?:inity)?)(?![\w.])", re.IGNORECASE)
_STR = re.compile(r"'((?:[^'\\]|\\.)*)'|\"((?:[^\"\\]|\\.)*)\"")
_WORD = re.compile(r"(True|False|None)\b")
_CALL = re.compile(r"(?:np|numpy|torch)?\.?(?:float(?:16|32|64)|int(?:8|16|32|64)|tensor|bfloat16)\(")
_CONST = {"True": True, "False": False, "None": None}
MAX_DEPTH = 8


class ReprError(ValueError):
    """Not a Python literal dict."""


# Fast path for the common case, a flat dict of quoted keys and scalars: one regex validates the whole text, a
# second walks its pairs. Anything else (nesting, wrappers, odd spacing) takes the tokenizer below.
_SCALAR = r"[-+]?(?:\d[\d_]*\.?\d*(?:[eE][-+]?\d+)?|\.\d+(?:[eE][-+]?\d+)?|nan|inf)|'[^'\\]*'|True|False|None"
_ITEM = r"'[^'\\]*'\s*:\s*(?:" + _SCALAR + r")\s*"
_FLAT = re.compile(r"\s*\{\s*(?:" + _ITEM + r",\s*)*" + _ITEM + r",?\s*\}\s*")
_PAIR = re.compile(r"'([^'\\]*)'\s*:\s*(" + _SCALAR + ")")


def _flat(text: str, start: int) -> dict[str, Any] | None:
    if _FLAT.fullmatch(text, start) is None:
        return None
    out: dict[str, Any] = {}
    for key, raw in _PAIR.findall(text, start):
        c = raw[0]
        if c == "'":
            out[key] = raw[1:-1]
        elif raw in _CONST:
            out[key] = _CONST[raw]
        else:
            raw = raw.replace("_", "")
            if raw.lstrip("+-").isdigit():
                out[key] = int(raw)
            else:
                out[key] = float(raw)
    return out


def parse_dict(text: str, start: int = 0) -> dict[str, Any]:
    """`text[start:]` must be exactly one dict literal (whitespace around allowed)."""
    flat = _flat(text, start)
    if flat is not None:
        return flat
    value, pos = _value(text, _WS.match(text, start).end(), 0)
    if not isinstance(value, dict):
        raise ReprError("not a dict")
    if _WS.match(text, pos).end() != len(text):
        raise ReprError(f"trailing text at {pos}")
    return value


def _value(s: str, pos: int, depth: int) -> tuple[Any, int]:
    if depth > MAX_DEPTH:
        raise ReprError("nested too deep")
    if pos >= len(s):
        raise ReprError("unexpected end")
    c = s[pos]
    if c == "{":
        return _container(s, pos + 1, "}", depth, is_dict=True)
    if c == "[":
        return _container(s, pos + 1, "]", depth, is_dict=False)
    if c == "(":
        return _container(s, pos + 1, ")", depth, is_dict=False)
    if c in "'\"":
        m = _STR.match(s, pos)
        if not m:
            raise ReprError(f"unterminated string at {pos}")
        text = m.group(1) if m.group(1) is not None else m.group(2)
        return text.replace("\\'", "'").replace('\\"', '"').replace("\\\\", "\\"), m.end()
    m = _NUM.match(s, pos)
    if m:
        text = m.group(0).replace("_", "")
        try:
            x = float(text)
        except ValueError as exc:
            raise ReprError(f"bad number {text!r}") from exc
        if math.isfinite(x) and x == int(x) and not any(ch in text for ch in ".eEn"):
            return int(text), m.end()
        return x, m.end()
    m = _WORD.match(s, pos)
    if m:
        return _CONST[m.group(1)], m.end()
    m = _CALL.match(s, pos)
    if m:  # np.float64(0.5), tensor(0.5, device='cuda:0'): the first argument is the value
        args, end = _container(s, m.end(), ")", depth, is_dict=False, allow_kwargs=True)
        if not args:
            raise ReprError(f"empty call at {pos}")
        return args[0], end
    raise ReprError(f"unexpected {s[pos:pos + 12]!r} at {pos}")


def _container(s: str, pos: int, close: str, depth: int, is_dict: bool,
               allow_kwargs: bool = False) -> tuple[Any, int]:
    out_d: dict[str, Any] = {}
    out_l: list[Any] = []
    pos = _WS.match(s, pos).end()
    if pos < len(s) and s[pos] == close:
        return (out_d if is_dict else out_l), pos + 1
    while True:
        if is_dict:
            key, pos = _value(s, pos, depth + 1)
            if not isinstance(key, (str, int, float)):
                raise ReprError(f"bad key at {pos}")
            pos = _WS.match(s, pos).end()
            if pos >= len(s) or s[pos] != ":":
                raise ReprError(f"expected ':' at {pos}")
            value, pos = _value(s, _WS.match(s, pos + 1).end(), depth + 1)
            out_d[str(key)] = value
        else:
            kw = re.match(r"[A-Za-z_]\w*=", s[pos:pos + 40]) if allow_kwargs else None
            value, pos = _value(s, pos + (kw.end() if kw else 0), depth + 1)
            if not kw:
                out_l.append(value)
        pos = _WS.match(s, pos).end()
        if pos >= len(s):
            raise ReprError("unexpected end")
        if s[pos] == ",":
            pos = _WS.match(s, pos + 1).end()
            if pos < len(s) and s[pos] == close:  # trailing comma
                return (out_d if is_dict else out_l), pos + 1
            continue
        if s[pos] == close:
            return (out_d if is_dict else out_l), pos + 1
        raise ReprError(f"expected ',' or {close!r} at {pos}")


__all__ = ["parse_dict", "ReprError"]
