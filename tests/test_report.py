"""`rankwatch report`: plots exist and are non-empty, the HTML shows them and the anomalies."""

from __future__ import annotations

import subprocess
import sys

from rankwatch.simulate import Fault, Scenario, write_job

PNG = b"\x89PNG\r\n\x1a\n"


def test_report_plots_marks_anomalies_and_links_them(tmp_path):
    job = tmp_path / "job"
    write_job(Scenario(ranks=4, steps=150, seed=3, faults=[Fault("loss_spike", 2, 100, magnitude=3.0),
                                                           Fault("throughput_drop", -1, 120, 5, 2.0)]), job)
    out = tmp_path / "report"
    r = subprocess.run([sys.executable, "-m", "rankwatch.cli", "report", str(job), "--out", str(out)],
                       capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr
    page = (out / "index.html").read_text()
    for png in ("loss.png", "throughput.png", "step_time_s.png", "gpu_util.png"):
        data = (out / png).read_bytes()
        assert data.startswith(PNG) and len(data) > 10_000, png
        assert f"src='{png}'" in page
    assert "<td>mad</td><td>loss</td>" in page and "<td>throughput</td>" in page
    assert "No " not in page  # nothing missing


def test_report_says_which_metrics_are_missing_and_plots_the_rest(tmp_path):
    job = tmp_path / "job"
    (job / "rank0").mkdir(parents=True)
    with open(job / "rank0" / "train.log", "w") as fh:
        for step in range(40):
            fh.write(f'{{"ts": {1000 + step}, "step": {step}, "loss": {2.0 - step * 0.01}}}\n')
    out = tmp_path / "report"
    r = subprocess.run([sys.executable, "-m", "rankwatch.cli", "report", str(job), "--out", str(out), "--per-rank"],
                       capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr
    assert (out / "loss.png").read_bytes().startswith(PNG)
    assert not (out / "throughput.png").exists()
    page = (out / "index.html").read_text()
    assert "No throughput in the input" in page and "No GPU utilisation in the input" in page
    assert "note: no throughput" in r.stderr
