"""The tests pass whatever install of ``mla_compiler`` they import (editable from this checkout, a
plain ``pip install .``, another clone): loading a benchmark script leaves the import system
alone, so a test never sees a second copy of a package module
(``DecodeConfig(...) == DecodeConfig(...)`` False, PicklingError)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]

# The benchmark scripts tests load (conftest.load_benchmark), and those importing a sibling script
SCRIPTS = ["bench_decode", "bench_attention", "bench_moe", "profile_decode", "timeline_decode"]
SCRIPTS += ["ncu_attention"]


def installed_copy(site: Path) -> Path:
    """This checkout's package laid out in ``site`` as ``pip install .`` lays it out
    (pyproject's package-dir mapping: schedules/ -> mla_compiler/schedules ...)."""
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    mapping = sorted(cfg["package-dir"].items())  # the top package before its subpackages
    for package, folder in mapping:
        shutil.copytree(
            ROOT / folder,
            site.joinpath(*package.split(".")),
            ignore=shutil.ignore_patterns("__pycache__"),
        )
    return site


def test_loading_benchmarks_keeps_the_installed_package_modules(tmp_path):
    """With ``mla_compiler`` installed elsewhere than this checkout, loading the benchmark
    scripts keeps every imported package module the same object and ``sys.path`` as it was."""
    site = installed_copy(tmp_path / "site")
    code = textwrap.dedent(f"""
        import json, sys
        import conftest
        import mla_compiler.schedules.attention_decode
        import mla_compiler.model_export.config
        import mla_compiler.reference
        import mla_compiler.runtime

        where = mla_compiler.schedules.attention_decode.__file__
        before = {{k: m for k, m in sys.modules.items() if k.split(".")[0] == "mla_compiler"}}
        path = list(sys.path)
        loaded = [conftest.load_benchmark(name) for name in {SCRIPTS!r}]
        after = {{k: m for k, m in sys.modules.items() if k.split(".")[0] == "mla_compiler"}}
        replaced = sorted(k for k, m in before.items() if after.get(k) is not m)
        dec = loaded[0].dec  # bench_decode's schedule module: the installed one
        print(json.dumps(dict(where=where, replaced=replaced, path_kept=sys.path == path,
                              same=dec is mla_compiler.schedules.attention_decode)))
    """)
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    env["PYTHONPATH"] = os.pathsep.join([str(site), str(ROOT / "tests")])
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    row = json.loads(proc.stdout.splitlines()[-1])
    assert Path(row["where"]).is_relative_to(site), row  # the copy is what was imported
    assert row["replaced"] == [] and row["path_kept"] and row["same"], row
