"""Log messages -> log keys: masking plus drain3's Drain tree, with JSON persistence (no jsonpickle).

A log key is the id of the template a message belongs to ("PacketResponder <*> for block <*> terminating").
Masking runs before Drain and replaces the parts of a message that vary between occurrences of one event:
paths, IPv4/IPv6 addresses with ports, hex numbers, long hex ids and UUIDs, numbers with or without units
(durations, sizes, percentages, scientific notation); NCCL's `host:pid:tid [dev]` header is dropped. Every mask becomes Drain's own wildcard `<*>`, so a masked
token and a token Drain generalised read the same. The torchrun prefix and the timestamp are stripped by the
parser before a message gets here.

Measured grouping accuracy on loghub's 2k samples with the corrected ground truth (tests/test_templates.py,
bench/bench_logparse.py): HDFS 0.9975, BGL 0.9695 with the defaults below (Drain's published 0.998 / 0.963).

State: `save_state()` writes the templates (id, tokens, size), the id counter, the prefix tree exactly as built
(a rebuilt tree can route differently, because Drain places a cluster by the first message it saw, not by its
current template) and the settings, all as plain JSON. drain3's own persistence is jsonpickle, which can
construct arbitrary objects from a file: not used.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from drain3.drain import Drain, LogCluster, Node

WILDCARD = "<*>"

# (pattern, replacement), applied in order. Paths and addresses go first, because their digits would otherwise
# be masked piecemeal into several wildcards (different token counts = different templates). Each pattern starts
# with its first character and checks what precedes it with a lookbehind placed after it: Python's regex engine
# then skips quickly to candidate characters (3x faster than a leading lookbehind on long lines).
DEFAULT_MASKS: tuple[tuple[str, str], ...] = (
    (r"^\S+:\d+:\d+ \[\d+\] ", ""),  # NCCL's "host:pid:tid [dev] " header: who, not what (like a timestamp)
    # Python logging's headers around the level: "- __main__ - INFO - " (asctime - name - levelname), "- INFO -
    # __main__ - " (transformers' examples), "INFO:root:" (basicConfig), loguru's "| INFO     | mod:fn:12 - ",
    # fairseq's "| INFO | fairseq.trainer | ", Hydra's "[__main__][INFO] - ". The
    # logger name is who, not what; the level stays, first: Drain routes by a message's first tokens, so with the
    # header in front every message of a logger shared a route, and one of the same length was merged into
    # another, level token included ("- __main__ - <*> - ...": an ERROR line judged by an INFO line's template)
    (r"^-?\s*[\w.<>\[\]-]+ - (DEBUG|INFO|WARNING|WARN|ERROR|CRITICAL|FATAL) - ", r"\1 "),  # name - LEVEL -
    # LEVEL - name - : only after a time was stripped (its dash is left): "INFO - rank0 - step 5" keeps rank0
    (r"^-\s*(DEBUG|INFO|WARNING|WARN|ERROR|CRITICAL|FATAL) - [\w.<>\[\]-]+ - ", r"\1 "),
    (r"^(DEBUG|INFO|WARNING|ERROR|CRITICAL):[\w.<>-]*:", r"\1 "),
    (r"^\|\s*(TRACE|DEBUG|INFO|SUCCESS|WARNING|ERROR|CRITICAL)\s*\|\s*[\w.<>:-]+ [-|] ", r"\1 "),  # and fairseq's
    (r"^\[[\w.<>-]+\]\[(DEBUG|INFO|WARNING|ERROR|CRITICAL)\] - ", r"\1 "),  # Hydra's "[name][LEVEL] - "
    (r"blk_-?\d+", WILDCARD),  # HDFS block ids (loghub's own preprocessing rule)
    (r"/(?<![\w./-]/)[\w.\-+@=]+(?:/[\w.\-+@=]+)*/?", WILDCARD),  # absolute paths; not "NET/IB"
    (r"[0-9a-fA-F](?<![\w.:].)[0-9a-fA-F]{0,3}:(?:[0-9a-fA-F]{0,4}:){1,6}[0-9a-fA-F]{1,4}(?![\w:])",
     WILDCARD),  # IPv6 addresses and GIDs (fe80::a288:c2ff:fe1b:7d3c), clock times
    (r"\d(?<![\w.].)\d{0,2}(?:\.\d{1,3}){3}(?::\d+|<\d+>)?(?![\w.])", WILDCARD),  # IPv4[:port|<port>]
    (r"<\d+>", WILDCARD),  # NCCL's host<port>
    (r"0(?<!\w0)[xX][0-9a-fA-F]+\b", WILDCARD),  # hex numbers, pointers, comm ids
    (r"[0-9a-fA-F](?<![\w-].)[0-9a-fA-F]{7}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
     r"(?![\w-])", WILDCARD),  # UUIDs
    (r"[0-9a-fA-F](?<!\w.)[0-9a-fA-F]{11,}(?!\w)", WILDCARD),  # hashes, long hex ids
    # numbers: signed, decimal or scientific, with an optional unit (durations, sizes, %, x)
    (r"(?:[-+](?<![\w.].)\d|\d(?<![\w.].))\d*(?:\.\d+)?(?:[eE][-+]?\d+)?"
     r"(?:ms|us|µs|ns|s|sec|secs|min|h|%|[KMGTP]i?B|x)?(?!\w)", WILDCARD),
)


class LogTemplateMiner:
    """Streaming template mining: `add(message)` returns the message's template id (a log key) and whether the
    template was created or changed. Picklable; state as JSON via save_state/load_state."""

    def __init__(self, sim_th: float = 0.5, depth: int = 4, max_children: int = 100,
                 max_templates: int = 5000, masks: Iterable[tuple[str, str]] = DEFAULT_MASKS,
                 max_chars: int = 4000) -> None:
        self.sim_th = sim_th
        self.depth = depth
        self.max_children = max_children
        self.max_templates = max_templates  # beyond it, unmatched messages get OVERFLOW_ID (never evicted)
        self.masks = [(str(p), str(r)) for p, r in masks]
        self.max_chars = max_chars
        self._compiled = [(re.compile(p), r) for p, r in self.masks]
        self.drain = Drain(depth=depth, sim_th=sim_th, max_children=max_children, param_str=WILDCARD)
        self.overflow = 0  # messages that matched no template once the vocabulary was full

    OVERFLOW_ID = -1

    # ---- mining ---------------------------------------------------------------------------------------
    def mask(self, message: str) -> str:
        text = message[: self.max_chars]
        for rx, repl in self._compiled:
            text = rx.sub(repl, text)
        return text

    def add(self, message: str) -> tuple[int, str]:
        """Learn from one message. Returns (template id, change): change is "created", "changed" (the template
        was generalised, e.g. a token became <*>) or "none". Ids never change meaning and are never reused."""
        masked = self.mask(message)
        drain = self.drain
        if len(drain.id_to_cluster) >= self.max_templates:
            tokens = drain.get_content_as_tokens(masked)
            if drain.tree_search(drain.root_node, tokens, drain.sim_th, False) is None:
                self.overflow += 1
                return self.OVERFLOW_ID, "none"
        cluster, change = drain.add_log_message(masked)
        kind = {"cluster_created": "created", "cluster_template_changed": "changed"}.get(change, "none")
        return cluster.cluster_id, kind

    def match(self, message: str) -> int | None:
        """The template id of a message without learning from it (None: no template fits)."""
        cluster = self.drain.match(self.mask(message), "fallback")
        return None if cluster is None else cluster.cluster_id

    def seed(self, templates: dict[int, str]) -> None:
        """Start from known templates (e.g. those a trained model knows, with their ids), so that this miner's
        ids mean what the model's keys mean. Later messages matching them get these ids."""
        drain = self.drain
        for tid in sorted(templates):
            if tid in drain.id_to_cluster:
                continue
            cluster = LogCluster(drain.get_content_as_tokens(templates[tid]), int(tid))
            drain.id_to_cluster[int(tid)] = cluster
            drain.add_seq_to_prefix_tree(drain.root_node, cluster)
            drain.clusters_counter = max(drain.clusters_counter, int(tid))

    # ---- reading ---------------------------------------------------------------------------------------
    def template(self, tid: int) -> str:
        cluster = self.drain.id_to_cluster.get(tid)
        return "<overflow>" if cluster is None else cluster.get_template()

    def templates(self) -> dict[int, str]:
        return {cid: c.get_template() for cid, c in self.drain.id_to_cluster.items()}

    def size(self, tid: int) -> int:
        cluster = self.drain.id_to_cluster.get(tid)
        return 0 if cluster is None else cluster.size

    def __len__(self) -> int:
        return len(self.drain.id_to_cluster)

    # ---- persistence ----------------------------------------------------------------------------------
    def save_state(self) -> dict[str, Any]:
        clusters = [[c.cluster_id, list(c.log_template_tokens), c.size]
                    for c in sorted(self.drain.id_to_cluster.values(), key=lambda c: c.cluster_id)]
        return {"version": 1, "sim_th": self.sim_th, "depth": self.depth, "max_children": self.max_children,
                "max_templates": self.max_templates, "max_chars": self.max_chars,
                "masks": [list(m) for m in self.masks], "counter": self.drain.clusters_counter,
                "overflow": self.overflow, "clusters": clusters, "tree": _tree_to_json(self.drain.root_node)}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> LogTemplateMiner:
        miner = cls(sim_th=float(state["sim_th"]), depth=int(state["depth"]),
                    max_children=int(state["max_children"]), max_templates=int(state["max_templates"]),
                    masks=[(str(p), str(r)) for p, r in state["masks"]],
                    max_chars=int(state.get("max_chars", 4000)))
        miner.load_state(state)
        return miner

    def load_state(self, state: dict[str, Any]) -> None:
        drain = self.drain
        drain.id_to_cluster = {}
        for cid, tokens, size in state.get("clusters", []):
            cluster = LogCluster([str(t) for t in tokens], int(cid))
            cluster.size = int(size)
            drain.id_to_cluster[int(cid)] = cluster
        drain.clusters_counter = int(state.get("counter", max(drain.id_to_cluster, default=0)))
        drain.root_node = _tree_from_json(state["tree"]) if "tree" in state else Node()
        self.overflow = int(state.get("overflow", 0))


def _tree_to_json(node: Node) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if node.cluster_ids:
        out["ids"] = list(node.cluster_ids)
    if node.key_to_child_node:
        out["c"] = {tok: _tree_to_json(child) for tok, child in node.key_to_child_node.items()}
    return out


def _tree_from_json(d: dict[str, Any], depth: int = 0) -> Node:
    if depth > 64:  # a Drain tree is `depth` levels deep; anything deeper is not one of ours
        raise ValueError("template tree too deep")
    node = Node()
    node.cluster_ids = [int(i) for i in d.get("ids", [])]
    node.key_to_child_node = {str(tok): _tree_from_json(child, depth + 1) for tok, child in d.get("c", {}).items()}
    return node
