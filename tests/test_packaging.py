"""The README's demo installs with `pip install .` (not editable): every package must be in the wheel."""

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
