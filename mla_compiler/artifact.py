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

from mla_compiler.errors import ArtifactError, InputError, TargetError

FORMAT_VERSION = 1
MODULE = "model.so"
WEIGHTS = "weights.safetensors"
METADATA = "metadata.json"


# what the runtime reads from metadata.json, with its JSON type
METADATA_KEYS = {
    "model": dict,
    "target": str,
    "dtype": str,
    "kv_dtype": str,
    "tvm_version": str,
    "mla": int,
    "max_context": int,
    "kv_cache_width": int,
    "kv_cache_bytes_per_token": int,
    "param_names": list,
    "weights": dict,
}


def tvm_version() -> str:
    import importlib.metadata as md

    try:
        return md.version("apache-tvm")
    except md.PackageNotFoundError:  # a TVM runtime bundle unpacked without dist-info
        import tvm

        return tvm.__version__


def is_artifact(path: str | Path) -> bool:
    """Whether ``path`` is a directory this package wrote: its ``metadata.json`` parses and
    carries our format key (the only kind of directory ``compile`` may replace)."""
    meta = Path(path) / METADATA
    try:
        return Path(path).is_dir() and "format_version" in json.loads(meta.read_text())
    except (OSError, ValueError, TypeError):
        return False


def check_output(output: str | Path, *, force: bool = False, inputs=()) -> Path:
    """Refuse an ``--output`` whose replacement would lose data; return it resolved.

    A missing path, an empty directory or an existing artifact may be (re)written; anything
    else only with ``force``. Never, even with ``force``: a path holding one of ``inputs``
    (the model being compiled) or the current directory."""
    out = Path(os.path.abspath(output))  # a symlink at ``output`` is itself what is replaced
    for src in [*inputs, Path.cwd()]:
        src = Path(src).resolve()
        if any(src == o or o in src.parents for o in (out, out.resolve())):
            what = "the current directory" if src == Path.cwd().resolve() else f"the input {src}"
            raise InputError(
                f"--output {output} would replace {what}: choose a new directory for the artifact"
            )
    missing = not out.exists() and not out.is_symlink()
    if missing or is_artifact(out) or _empty_dir(out) or force:
        return out
    kind = "directory that is not an mla-compiler artifact" if out.is_dir() else "file"
    raise InputError(
        f"--output {output} is an existing {kind}: choose a new path, or pass --force to replace it"
    )


def _empty_dir(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink() and not any(path.iterdir())


def write_atomic(output: str | Path, write_into, *, force: bool = False, inputs=()) -> Path:
    """Call ``write_into(tmpdir)`` and move the result to ``output`` only if it succeeded.
    ``output`` is checked first (``check_output``): only an artifact, an empty directory or
    (``force``) another file or directory is replaced, and only once the new one is complete."""
    out = check_output(output, force=force, inputs=inputs)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        write_into(tmp)
        check_output(output, force=force, inputs=inputs)  # the path may have changed meanwhile
        if out.exists() or out.is_symlink():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=out.parent)) / "old"
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old.parent)  # a symlink at ``output`` goes, not what it points to
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
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{meta} is corrupt ({e}): compile the artifact again") from None
    if not isinstance(data, dict):
        raise ArtifactError(f"{meta} is not a JSON object: compile the artifact again")
    if data.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(
            f"{p} has artifact format {data.get('format_version')}, this mla-compiler reads "
            f"{FORMAT_VERSION}: compile it again"
        )
    for key, kind in METADATA_KEYS.items():
        if not isinstance(data.get(key), kind) or isinstance(data.get(key), bool):
            state = "lacks" if key not in data else "has a malformed"
            raise ArtifactError(f"{meta} {state} {key!r}: compile the artifact again")
    from mla_compiler.model_export.config import ModelConfig

    try:
        ModelConfig.from_dict(data["model"])
    except (KeyError, TypeError, ValueError) as e:
        raise ArtifactError(
            f"{meta} has a malformed model config ({e}): compile the artifact again"
        ) from None
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
