from __future__ import annotations

import os

import pytest

os.environ.setdefault("RANKWATCH_STATE_DIR", "/tmp/rankwatch-test-state")


@pytest.fixture()
def job_dir(tmp_path):
    d = tmp_path / "job7"
    d.mkdir()
    return d
