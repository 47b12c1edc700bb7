"""The compiled artifact: a directory written atomically (temp dir + rename).

    model.so            Relax VM executable: prefill, decode, transform_params (+ device code)
    weights.safetensors the model's parameters in export order (absent for seeded random weights)
    metadata.json       config, target, dtype, TVM version, MLA mode, max context, cache sizes,
                        creation command

``transform_params`` (W_UK/W_UV absorption, transposes into kernel layouts) runs once when the
runtime loads the artifact.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from mla_compiler.errors import ArtifactError, TargetError

FORMAT_VERSION = 1
MODULE = "model.so"
WEIGHTS = "weights.safetensors"
METADATA = "metadata.json"


def tvm_version() -> str:
    import importlib.metadata as md

    try:
        return md.version("apache-tvm")
    except md.PackageNotFoundError:  # a TVM runtime bundle unpacked without dist-info
        import tvm

        return tvm.__version__


def write_atomic(output: str | Path, write_into) -> Path:
    """Call ``write_into(tmpdir)`` and move the result to ``output`` only if it succeeded."""
    out = Path(output).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        write_into(tmp)
        if out.exists():
            old = out.with_name(f".{out.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def read_metadata(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_dir():
        raise ArtifactError(
            f"artifact {p} does not exist: run `mla-compiler compile ... --output {p}` first"
        )
    meta = p / METADATA
    if not meta.exists() or not (p / MODULE).exists():
        raise ArtifactError(
            f"{p} is not a complete artifact (no {METADATA} or {MODULE}): compile it again"
        )
    try:
        data = json.loads(meta.read_text())
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{meta} is corrupt ({e}): compile the artifact again") from None
    if data.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(
            f"{p} has artifact format {data.get('format_version')}, this mla-compiler reads "
            f"{FORMAT_VERSION}: compile it again"
        )
    return data


def check_tvm_version(meta: dict[str, Any]) -> None:
    """Refuse an artifact built with another TVM version (the device/arch checks are the
    loader's: ``mla_compiler.runtime.loader.select_image``)."""
    built = meta["tvm_version"]
    if built != tvm_version():
        raise TargetError(
            f"artifact was built with TVM {built}, this runtime has TVM {tvm_version()}: "
            f"recompile it, or install apache-tvm=={built}"
        )
