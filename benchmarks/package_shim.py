"""Import this checkout's ``mla_compiler`` in a benchmark script run from the checkout
(``python -m benchmarks.NAME``) without an install of it (the GPU box has no package registry).
Only a script's ``__main__`` block calls ``use_checkout_package``, before its first import of
``mla_compiler``: it rewires the import system, and tests import the scripts."""

from __future__ import annotations

import atexit
import pathlib
import shutil
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parent.parent


def use_checkout_package() -> None:
    """Where ``mla_compiler`` is not installed from this checkout (not at all, or from another
    checkout), link the package-dir layout (schedules/ -> mla_compiler.schedules) in a temporary
    directory first on ``sys.path`` (removed at exit)."""
    try:
        import mla_compiler.schedules.attention_decode as mine

        if pathlib.Path(mine.__file__).resolve() == ROOT / "schedules" / "attention_decode.py":
            return
    except ImportError:
        pass
    tmp = tempfile.mkdtemp(prefix="mla-shim-")
    atexit.register(shutil.rmtree, tmp, ignore_errors=True)  # unlinks the links, not targets
    shim = pathlib.Path(tmp) / "mla_compiler"
    shim.mkdir()
    for entry in (ROOT / "mla_compiler").iterdir():
        if entry.suffix == ".py" or (entry / "__init__.py").exists():
            (shim / entry.name).symlink_to(entry)
    for sub in ("runtime", "schedules", "model_export"):
        (shim / sub).symlink_to(ROOT / sub)
    sys.path.insert(0, tmp)
    for name in [m for m in sys.modules if m == "mla_compiler" or m.startswith("mla_compiler.")]:
        del sys.modules[name]
