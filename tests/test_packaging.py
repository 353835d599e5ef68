"""Packaging: the README's demo installs with `pip install .` (not editable), so every package must be in the
wheel; and the C accelerator kafka-python needs for throughput is installed with it."""

from __future__ import annotations

from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]


def test_every_package_directory_is_listed_for_the_wheel():
    tool = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(tool["packages"])
    dirs = {"rankwatch": ROOT / "rankwatch", **{f"rankwatch.{k.split('.', 1)[1]}": ROOT / v
                                                for k, v in tool["package-dir"].items() if "." in k}}
    found = set()
    for name, base in dirs.items():
        for init in base.rglob("__init__.py"):
            rel = init.parent.relative_to(base).parts
            if "__pycache__" not in rel:
                found.add(".".join((name, *rel)))
    assert found <= listed, f"packages missing from pyproject.toml: {sorted(found - listed)}"


def test_kafka_python_checksums_record_batches_in_c():
    """kafka-python computes each record batch's CRC-32C in pure Python unless the `crc32c` package is there
    (~3 ms per 24 KB batch: a shipper, the GPU sampler or a load generator capped at ~8 MB/s). The dependency
    is `kafka-python[crc32c]`; this fails where an install left it out."""
    from kafka.record import util

    assert util.crc32c_c is not None
    assert util.calc_crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value
