"""``benchmarks/`` is a package of scripts run as ``python -m benchmarks.NAME``; they time
through ``benchmarks.timing`` and leave the import system alone when imported."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

from conftest import load_benchmark

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(
    p.stem for p in (ROOT / "benchmarks").glob("*.py") if p.stem not in ("__init__", "timing")
)


def _package_env(tmp_path) -> dict:
    """An environment importing ``benchmarks`` (a link to the checkout's folder) and whatever
    ``mla_compiler`` is installed: the checkout root itself would shadow a plain install."""
    (tmp_path / "benchmarks").symlink_to(ROOT / "benchmarks")
    env = dict(os.environ, PYTHONWARNINGS="ignore", PYTHONSAFEPATH="1")
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), env.get("PYTHONPATH", "")])
    return env


def test_scripts_import_as_package_modules(tmp_path):
    """Every script but the runtime-only ones imports as ``benchmarks.<name>``; one runs as a
    module (``--help``)."""
    skip = {"debug_nonfinite", "logits_check"}  # load the runtime-only TVM at import
    names = [n for n in SCRIPTS if n not in skip]
    code = "import importlib, sys\n" + "".join(
        f"importlib.import_module('benchmarks.{n}')\n" for n in names
    )
    env = _package_env(tmp_path)
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.bench_gemm", "--help"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    assert proc.returncode == 0 and "--cpu-smoke" in proc.stdout, proc.stderr[-3000:]


def test_scripts_time_through_the_timing_module():
    """No script keeps a timing helper of its own (CUDA events, the profiler, triton's
    ``do_bench``) or edits ``sys.path``: ``timing`` and ``package_shim`` are the only places."""
    for name in SCRIPTS:
        if name == "package_shim":
            continue
        source = (ROOT / "benchmarks" / f"{name}.py").read_text()
        for needle in ("cuda.Event(", "profiler import", "triton.testing"):
            assert needle not in source, (name, needle)
        uses_sys_path = any(
            isinstance(node, ast.Attribute)
            and node.attr == "path"
            and isinstance(node.value, ast.Name)
            and node.value.id == "sys"
            for node in ast.walk(ast.parse(source))
        )
        assert not uses_sys_path, name


def test_timing_rotation_and_wall_clock():
    """The CPU-side helpers: rotation indices count up from 1, the copies cover the bytes asked
    for, and ``loop_s`` falls back to the wall clock (warm-up calls untimed)."""
    timing = load_benchmark("timing")
    seen = []
    step = timing.rotating(seen.append)
    for _ in range(3):
        step()
    assert seen == [1, 2, 3]
    assert timing.copies_for(100 << 20) == 3 and timing.copies_for(1 << 30) == 1
    calls = []
    assert timing.loop_s(lambda: calls.append(1), iters=4, warmup=2, cuda=False) >= 0
    assert len(calls) == 6
