"""`rankwatch inspect`: what it reports per file and format, malformed lines with examples, 80-column tables,
and --json for machines."""

from __future__ import annotations

import io
import json

from rankwatch.cli import main
from rankwatch.inspect_logs import inspect_paths, render

MEGATRON = (" iteration {i}/ 100 | consumed samples: {s} | elapsed time per iteration (ms): 1234.5 | learning rate: "
            "1.0E-04 | global batch size: 8 | lm loss: 2.5E+00 | loss scale: 1.0 | grad norm: 1.2 | number of "
            "skipped iterations: 0 | number of nan iterations: 0 |")


def make_job(root):
    (root / "job" / "rank0").mkdir(parents=True)
    (root / "job" / "rank1").mkdir(parents=True)
    lines = [MEGATRON.format(i=i, s=8 * i) for i in range(1, 6)]
    lines += ['{"step": 7, "loss": "high"}', '{"loss": 2.0}', "plain message", "{not json}"]
    (root / "job" / "rank0" / "train.log").write_text("\n".join(lines) + "\n")
    (root / "job" / "rank1" / "metrics.csv").write_text("epoch,step,train_loss\n0,1,2.5\n0,2,2.4\n")
    (root / "job" / "all.log").write_text(
        "[rank3]:{'loss': 1.5, 'grad_norm': 0.5, 'learning_rate': 1e-05, 'epoch': 0.1}\n")
    return root / "job"


def test_inspect_reports_formats_fields_ranks_and_malformed_lines(tmp_path):
    res = inspect_paths([str(make_job(tmp_path))])
    by_name = {f.path.rsplit("/", 2)[-2] + "/" + f.path.rsplit("/", 1)[-1]: f for f in res.files}
    r0 = by_name["rank0/train.log"]
    assert (r0.rank, r0.rank_source, r0.lines) == (0, "path", 9)
    assert r0.formats == {"megatron": 5, "plain text": 2}
    assert r0.malformed == {"training metrics without a step": 1, "loss is not a number": 1}
    assert by_name["rank1/metrics.csv"].formats == {"lightning_csv": 3}
    top = by_name["job/all.log"]
    assert top.rank is None and top.line_ranks == {3: 1}
    d = res.to_dict()
    assert d["formats"]["megatron"]["fields"]["metrics"][:3] == ["consumed_samples", "global_batch_size",
                                                                 "grad_norm"]
    bad = {m["reason"]: m for m in d["malformed"]}["loss is not a number"]
    assert bad["examples"][0]["offset"] > 0 and "high" in bad["examples"][0]["line"]


def test_tables_fit_80_columns_when_piped(tmp_path):
    buf = io.StringIO()
    render(inspect_paths([str(make_job(tmp_path))]), buf)
    text = buf.getvalue()
    assert max(len(line) for line in text.splitlines()) <= 80
    for needle in ("Formats recognised", "megatron", "lightning_csv", "hf_trainer", "Malformed lines",
                   "training metrics without a step", "0 (path)", "in lines: 3"):
        assert needle in text, needle


def test_cli_json_and_hint_when_nothing_is_recognised(tmp_path, capsys):
    job = make_job(tmp_path)
    assert main(["inspect", str(job), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["lines"] == 13 and {f["rank_source"] for f in d["files"]} == {"path", "none"}
    (tmp_path / "plain.log").write_text("hello\nworld\n")
    assert main(["inspect", str(tmp_path / "plain.log")]) == 0
    assert "no training metrics recognised" in capsys.readouterr().out
