"""Where DeepLog's training and evaluation keys come from, streamed (memory never grows with the input):

- session files: one sequence per line, keys separated by spaces (`../shared/data/hdfs/hdfs_train`);
- JSON / JSON lines, parsed with ijson one value at a time: sequences (`{"keys": [...], "label": 0}`, a list of
  keys, or `{"session_id": [...]}` objects), per-line keys (`{"job", "rank", "template_id"}`, grouped into one
  sequence per job/rank), and template records exported from the log-keys topic (`schema:
  rankwatch.logkey/v1`), which name the keys;
- raw log folders: parsed by rankwatch's parser and mined into templates on the fly, one sequence per job/rank;
- the topics of a known-good run (`--from-topic`): its log lines, mined with the vocabulary it published.

Every source yields `Chunk`s: some keys of one sequence, with `done` when the sequence is complete.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

SEQUENCE_FIELDS = ("keys", "event_ids", "EventSequence", "EventId", "sequence", "template_ids", "log_keys",
                   "events")
LABEL_FIELDS = ("label", "Label", "anomaly", "is_anomaly")
KEY_FIELDS = ("template_id", "key", "event_id", "EventId")
TEMPLATE_SCHEMA = "rankwatch.logkey/v1"


class DataError(ValueError):
    """Input that cannot be read as DeepLog data."""


@dataclass
class Chunk:
    sid: Any  # sequence id (line number, session id, (job, rank))
    keys: list[str]
    label: int | None = None
    done: bool = True


@dataclass
class SourceStats:
    files: int = 0
    sequences: int = 0
    keys: int = 0
    skipped: int = 0  # records that were not sequences, keys or templates (counted, not fatal)
    templates: dict[str, str] = field(default_factory=dict)  # key -> template, from template records / mining
    miner: dict[str, Any] | None = None  # raw logs: the template miner's state after mining


def discover_files(paths: Iterable[str]) -> list[str]:
    out: list[str] = []
    for p in paths:
        if os.path.isdir(p):
            for root, dirs, files in os.walk(p):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                out.extend(os.path.join(root, f) for f in sorted(files) if not f.startswith("."))
        elif os.path.isfile(p):
            out.append(p)
        else:
            raise DataError(f"no such file or folder: {p}")
    return out


def sniff_format(path: str) -> str:
    """sessions (space-separated keys), json (JSON or JSON lines) or logs (anything else)."""
    if path.endswith((".json", ".jsonl", ".ndjson")):
        return "json"
    with open(path, "rb") as fh:
        head = fh.read(4096)
    text = head.decode("utf-8", "replace").lstrip()
    if text[:1] in ("[", "{") and _parses_as_json(head.lstrip()):
        return "json"
    first = text.splitlines()[0] if text else ""
    tokens = first.split()
    if tokens and all(t.lstrip("-").isdigit() for t in tokens):
        return "sessions"
    return "logs"


def _parses_as_json(head: bytes) -> bool:
    """The first few JSON events parse (a log line like "[default0]:..." does not)."""
    import ijson

    n = 0
    try:
        for _ in ijson.parse(head):
            n += 1
            if n >= 3:
                return True
    except ijson.common.JSONError:
        return False
    return n > 0


def parse_label(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, (int, float)):
        return int(value != 0)
    text = str(value).strip().lower()
    if text in ("1", "true", "anomaly", "abnormal", "yes"):
        return 1
    if text in ("0", "false", "normal", "no", "-"):
        return 0
    return None


def session_chunks(path: str, stats: SourceStats, label: int | None = None) -> Iterator[Chunk]:
    with open(path, encoding="utf-8", errors="replace") as fh:
        for lineno, line in enumerate(fh):
            keys = line.split()
            if not keys:
                continue
            stats.sequences += 1
            stats.keys += len(keys)
            yield Chunk((path, lineno), keys, label)


def _object_of_sequences(head: bytes) -> bool:
    """Does the document start like {"<id>": [...], ...} (sequences by id) rather than a record?"""
    import ijson

    events = []
    try:
        for ev in ijson.parse(head):
            events.append(ev)
            if len(events) == 3:
                break
    except ijson.common.IncompleteJSONError:
        pass
    if len(events) < 3 or events[0][1] != "start_map" or events[1][1] != "map_key":
        return False
    key = events[1][2]
    known = (*SEQUENCE_FIELDS, *KEY_FIELDS, *LABEL_FIELDS, "schema", "job", "rank", "session_id", "id")
    return events[2][1] == "start_array" and key not in known


def _json_values(path: str) -> Iterator[tuple[Any, Any]]:
    """(id, value) for each record: JSON lines, a top-level array, or a top-level object of id -> value."""
    import ijson

    with open(path, "rb") as fh:
        head = fh.read(65536).lstrip()
        fh.seek(0)
        if head[:1] == b"[":
            for i, v in enumerate(ijson.items(fh, "item", use_float=True)):
                yield i, v
        elif _object_of_sequences(head):
            yield from ijson.kvitems(fh, "", use_float=True)
        else:
            for i, v in enumerate(ijson.items(fh, "", multiple_values=True, use_float=True)):
                yield i, v


def json_chunks(path: str, stats: SourceStats, sequence_field: str = "auto", label: int | None = None
                ) -> Iterator[Chunk]:
    fields = SEQUENCE_FIELDS if sequence_field == "auto" else (sequence_field,)
    for rid, value in _json_values(path):
        if isinstance(value, list):
            keys, lab = value, label
        elif isinstance(value, dict):
            if value.get("schema") == TEMPLATE_SCHEMA:  # a template from the log-keys topic: names a key
                if "template_id" in value and "template" in value:
                    stats.templates[str(value["template_id"])] = str(value["template"])
                continue
            seq_field = next((f for f in fields if isinstance(value.get(f), list)), None)
            lab = next((parse_label(value[f]) for f in LABEL_FIELDS if f in value), None)
            lab = label if lab is None else lab
            if seq_field is not None:
                keys = value[seq_field]
                rid = value.get("session_id", value.get("id", rid))
            else:
                key_field = next((f for f in KEY_FIELDS if f in value and not isinstance(value[f], list)), None)
                if key_field is None:
                    stats.skipped += 1
                    continue
                stats.keys += 1
                yield Chunk((value.get("job"), value.get("rank")), [str(value[key_field])], lab, done=False)
                continue
        else:
            stats.skipped += 1
            continue
        stats.sequences += 1
        stats.keys += len(keys)
        yield Chunk((path, rid), [str(k) for k in keys], lab)


def record_chunks(records: Iterable[Any], stats: SourceStats, miner: Any) -> Iterator[Chunk]:
    """Parsed log records (files or topic) -> one open sequence per job/rank, keys mined as the stream does."""
    for rec in records:
        if rec.kind != "log":
            continue
        msg = rec.data.get("msg")
        if not isinstance(msg, str):
            stats.skipped += 1
            continue
        tid, _ = miner.add(msg)
        stats.keys += 1
        yield Chunk((rec.job, rec.rank), [str(tid)], None, done=False)
    stats.templates.update({str(t): text for t, text in miner.templates().items()})
    stats.miner = miner.save_state()


def new_miner(sim_th: float = 0.5, depth: int = 4, templates: dict[str, str] | None = None,
              state: dict[str, Any] | None = None) -> Any:
    """A template miner: restored from `state` (a model's own miner: same ids), or seeded with templates."""
    from rankwatch.models.templates import LogTemplateMiner

    if state:
        return LogTemplateMiner.from_state(state)
    miner = LogTemplateMiner(sim_th=sim_th, depth=depth)
    if templates:
        miner.seed({int(k): t for k, t in templates.items() if k.lstrip("-").isdigit()})
    return miner


def file_chunks(paths: Iterable[str], stats: SourceStats, fmt: str = "auto", sequence_field: str = "auto",
                job: str | None = None, label: int | None = None, miner_sim_th: float = 0.5,
                miner_depth: int = 4, miner_templates: dict[str, str] | None = None,
                miner_state: dict[str, Any] | None = None) -> Iterator[Chunk]:
    """Every sequence under `paths`. Raw logs are parsed and mined together (one vocabulary for all)."""
    files = discover_files(paths)
    logs: list[str] = []
    for f in files:
        kind = sniff_format(f) if fmt == "auto" else fmt
        if kind == "logs":
            logs.append(f)
            continue
        stats.files += 1
        if kind == "sessions":
            yield from session_chunks(f, stats, label)
        else:
            yield from json_chunks(f, stats, sequence_field, label)
    if logs:
        from rankwatch.processors.offline import read_records

        stats.files += len(logs)
        miner = new_miner(miner_sim_th, miner_depth, miner_templates or stats.templates, miner_state)
        yield from record_chunks(read_records(logs, job), stats, miner)


def topic_chunks(settings: Any, stats: SourceStats, job: str | None, miner_sim_th: float = 0.5,
                 miner_depth: int = 4) -> Iterator[Chunk]:
    """A known-good run from the topics: the log-keys topic names its templates (the miner starts from them, so
    ids match what the stream published), the logs topic holds its lines. Streamed message by message: each
    job/rank is in order within its partition, which is all a per-rank sequence needs."""
    import orjson

    from rankwatch.consume import messages_from_beginning
    from rankwatch.records import decode_records

    templates: dict[str, str] = {}
    for m in messages_from_beginning(settings, [settings.topic_logkeys]):
        try:
            d = orjson.loads(m.value)
        except orjson.JSONDecodeError:
            stats.skipped += 1
            continue
        if isinstance(d, dict) and d.get("schema") == TEMPLATE_SCHEMA and (job is None or d.get("job") == job):
            templates[str(d["template_id"])] = str(d["template"])
    stats.templates.update(templates)

    def records() -> Iterator[Any]:
        for m in messages_from_beginning(settings, [settings.topic_logs]):
            recs, errors = decode_records(m.value)
            stats.skipped += len(errors)
            yield from (r for r in recs if job is None or r.job == job)

    yield from record_chunks(records(), stats, new_miner(miner_sim_th, miner_depth, templates))
