"""Test runs leave no large files behind: pytest keeps the temp dirs of the last three runs, so
session fixtures remove what they wrote (lite2's HF checkpoint alone is 2.6 GB)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path


def test_hf_checkpoints_are_removed_after_the_session(tmp_path):
    """An inner pytest session with this conftest writes a checkpoint through ``hf_checkpoint``;
    once the session ends, the checkpoint's folder is gone (its session temp dir stays)."""
    inner = tmp_path / "inner"
    inner.mkdir()
    (inner / "conftest.py").write_text((Path(__file__).parent / "conftest.py").read_text())
    record = tmp_path / "where.txt"
    (inner / "test_write.py").write_text(
        textwrap.dedent(f"""
            from pathlib import Path


            def test_write(hf_checkpoint):
                path = hf_checkpoint("small-yarn")
                assert (path / "config.json").is_file()
                Path({str(record)!r}).write_text(str(path))
        """)
    )
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_write.py"]
    cmd += ["--basetemp", str(tmp_path / "base")]
    proc = subprocess.run(cmd, cwd=inner, capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    written = Path(record.read_text())
    assert written.is_relative_to(tmp_path / "base") and written.parent.is_dir()
    assert not written.exists()
