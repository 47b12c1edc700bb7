"""pyproject's explicit package list covers every package folder (a plain `pip install .`
ships only what is listed; an editable install would hide a missing one)."""

from __future__ import annotations

from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]


def test_every_package_folder_is_listed():
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(cfg["packages"])
    dirs = {v: k for k, v in cfg["package-dir"].items()}
    found = set()
    for module in ROOT.glob("**/*.py"):  # any folder of modules, __init__.py or not
        rel = module.parent.relative_to(ROOT)
        if not rel.parts:
            continue
        if rel.parts[0] in ("tests", "build", "benchmarks") or rel.parts[0].startswith("."):
            continue
        top = rel.parts[0]
        if top in dirs:
            found.add(".".join([dirs[top], *rel.parts[1:]]))
    assert found and found <= listed, sorted(found - listed)
