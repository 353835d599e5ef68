"""What a person reads: the anomalies table at 80 columns (piped output defaults to 80) and wide."""

from __future__ import annotations

import io

from rich.console import Console

from rankwatch.consume import anomaly_table

FINDINGS = [
    {"event_time": "2025-05-05T15:44:14.120246Z", "job": "llama-70b-pretrain", "rank": 2, "detector": "hang",
     "signal": "collective_progress", "value": 0.0857, "threshold": 30.0, "severity": "critical",
     "message": "hang at the end of the logs: rank(s) [2] never reached AllReduce opCount 1458 of comm "
                "id:0xdbbe8513c7c0c104, which the others enqueued and waited in"},
    {"event_time": "2025-05-05T15:40:01.000000Z", "job": "llama-70b-pretrain", "rank": None, "detector": "deeplog",
     "signal": "log_key", "value": 1.0, "threshold": 0.001, "severity": "warning", "message": "new key"},
]


def _render(width: int) -> list[str]:
    out = io.StringIO()
    Console(file=out, width=width, color_system=None).print(anomaly_table(FINDINGS, width=width))
    return out.getvalue().splitlines()


def test_at_80_columns_every_line_fits_and_the_message_keeps_its_words():
    lines = _render(80)
    assert max(len(line) for line in lines) <= 80
    text = "\n".join(lines)
    for word in ("AllReduce", "opCount", "id:0xdbbe8513c7c0c104", "llama-70b-pretrain rank 2", "hang critical",
                 "2025-05-05 15:44:14.120"):
        assert word in text, word  # not folded into pieces, as nine 8-character columns did
    assert len(lines) < 16  # two findings, not a word per line


def test_wide_terminals_get_a_column_per_field():
    header = "\n".join(_render(160)[:4])
    for col in ("detector", "signal", "threshold", "severity", "message"):
        assert col in header


def test_anomalies_without_a_broker_says_so_at_once(capsys):
    # a blind test ran `rankwatch anomalies --json` against the default port while its broker listened on
    # another: 30 s of the client's connection errors, then a traceback
    import socket

    from rankwatch.cli import main

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert main(["anomalies", "--json", "--bootstrap", f"127.0.0.1:{port}"]) == 2
    err = capsys.readouterr().err
    assert f"no broker answers at 127.0.0.1:{port}" in err and "--bootstrap" in err and "Traceback" not in err
