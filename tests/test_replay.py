"""replay-anomalies on a small real torch model: recomputed loss matches, gradients are ranked by module."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import torch
from rankwatch.producers.training import TrainingMonitor

MODEL = textwrap.dedent('''
    import torch

    class TinyNet(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1 = torch.nn.Linear(6, 16)
            self.fc2 = torch.nn.Linear(16, 1)

        def forward(self, x):
            return self.fc2(torch.relu(self.fc1(x)))

    def make():
        return TinyNet()

    def loss(model, batch):
        return torch.nn.functional.mse_loss(model(batch["x"]), batch["y"])
''')


def test_replay_recomputes_the_anomalous_step_from_checkpoint(tmp_path):
    (tmp_path / "tinymodel.py").write_text(MODEL)
    sys.path.insert(0, str(tmp_path))
    try:
        import tinymodel
    finally:
        sys.path.remove(str(tmp_path))
    torch.manual_seed(0)
    model = tinymodel.make()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    g = torch.Generator().manual_seed(1)
    run = tmp_path / "run"
    mon = TrainingMonitor(run, rank=0)
    original = {}
    for step in range(70):
        x = torch.randn(32, 6, generator=g)
        y = x.sum(dim=1, keepdim=True)
        if step == 60:
            ckpt = run / "checkpoint-60.pt"
            run.mkdir(exist_ok=True)
            torch.save({"model": model.state_dict(), "model_args": {}}, ckpt)
            mon.set_checkpoint(str(ckpt))
            y = y + 40.0  # corrupted labels
        loss = tinymodel.loss(model, {"x": x, "y": y})
        opt.zero_grad()
        loss.backward()
        gn = torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        if mon.observe(step, loss, gn, batch={"x": x, "y": y}):
            original[step] = (float(loss.detach()), float(gn))
            continue  # skip the update on an anomalous step, as users do
        opt.step()
    mon.close()
    assert 60 in original
    out = tmp_path / "replay"
    r = subprocess.run([sys.executable, "-m", "rankwatch.cli", "replay-anomalies", "--anomaly-dir", str(run),
                        "--output-dir", str(out), "--model", "tinymodel:make", "--loss", "tinymodel:loss",
                        "--visualize", "--step", "60"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    res = json.loads((out / "replay_step_60_rank_0.json").read_text())
    assert abs(res["recomputed_loss"] - original[60][0]) < 1e-4 * max(1.0, original[60][0])
    assert abs(res["recomputed_grad_norm"] - original[60][1]) < 1e-3 * max(1.0, original[60][1])
    assert res["checkpoint_loaded"].endswith("checkpoint-60.pt")
    names = [t["module"] for t in res["top_gradients"]]
    assert set(names) == {"fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"}
    norms = [t["grad_norm"] for t in res["top_gradients"]]
    assert norms == sorted(norms, reverse=True)
    summary = json.loads((out / "analysis_summary.json").read_text())
    assert summary["count"] == 1 and abs(summary["mean_loss"] - res["recomputed_loss"]) < 1e-9
    for png in ("overview.png", "replay_step_60_rank_0_top_gradients.png"):
        data = (out / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
