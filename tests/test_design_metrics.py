"""``tools/design_metrics.py`` (issue #27's before/after numbers) runs on this checkout."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_design_metrics_report():
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "design_metrics.py"), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    for heading in (
        "python files over 600 lines:",
        "  product (mla_compiler, schedules, runtime, model_export): ",
        "longest functions:",
        "import cycles: ",
        "config classes (dataclasses named *Config, product code): ",
        "files under benchmarks/results/: ",
    ):
        assert heading in out, (heading, out)
    assert "ModelConfig              model_export/config.py:" in out
