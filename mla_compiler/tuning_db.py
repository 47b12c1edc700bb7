"""The tuning database: one JSON object per line in ``DB_DIR/records.jsonl``.

Nothing here imports ``tvm`` or the schedules, so the GPU-side measuring process (TVM runtime
only) writes records with it too.

Record format (version ``v = 1``), one per measured (kernel, target, shape, config)::

    {"v": 1,
     "kernel": "attn_decode",            # family name (schedules.families.FAMILIES)
     "target": "sm_90a",                 # what the candidate was compiled for
     "arch": "sm_90a",                   # the GPU that measured it ("" when not run)
     "device": "NVIDIA H100 80GB HBM3",
     "shape_key": "h16-r512-p64-ctx4096",
     "shape": {"heads": 16, "ctx": 4096, "batch": 1, "splits": 38},
     "config": {"block_n": 64, "stages": 2, "warps_n": 8, "tensor_cores": true},
     "median_us": 21.4,                  # null when not ok
     "ok": true, "err": null,            # err: "build: ...", "check: ...", "run: ..."
     "max_abs_err": 0.0009, "reps": 30,
     "tvm_version": "0.27.0.post1", "timestamp": "2026-11-24T20:01:02Z"}

Writes append one line with one ``write`` on an ``O_APPEND`` descriptor and ``fsync`` it, so a
killed job loses at most the line being written; a torn last line is reported by ``read`` and
skipped, and the next append starts on a fresh line. A candidate is identified by
``record_key`` (kernel, target, shape key, config): a re-run skips keys already recorded,
failed ones included.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from pathlib import Path

from mla_compiler.errors import TuningError

RECORDS = "records.jsonl"
VERSION = 1
REQUIRED = ("kernel", "target", "shape_key", "config", "ok")


class CorruptRecordWarning(UserWarning):
    """A line of ``records.jsonl`` that is not a complete record (skipped)."""


def records_path(db_dir: str | Path) -> Path:
    return Path(db_dir) / RECORDS


def config_json(config: dict) -> str:
    """Canonical text of a config dict (sorted keys): equal configs compare equal."""
    return json.dumps(config, sort_keys=True, separators=(",", ":"))


def record_key(kernel: str, target: str, shape_key: str, config: dict) -> tuple[str, ...]:
    return (kernel, target, shape_key, config_json(config))


def _key_of(record: dict) -> tuple[str, ...]:
    return record_key(record["kernel"], record["target"], record["shape_key"], record["config"])


def open_db(db_dir: str | Path, *, create: bool = True) -> Path:
    """The database directory, created if asked; ``TuningError`` if it cannot be used."""
    path = Path(db_dir)
    if path.exists() and not path.is_dir():
        raise TuningError(f"tuning database {path} is not a directory: pass a directory to --db")
    if not path.exists():
        if not create:
            raise TuningError(f"tuning database {path} does not exist: run `mla-compiler tune`")
        try:
            path.mkdir(parents=True)
        except OSError as err:
            raise TuningError(f"cannot create tuning database {path}: {err.strerror}") from err
    file = records_path(path)
    if file.exists() and not os.access(file, os.R_OK):
        raise TuningError(f"tuning database {file} is not readable: check its permissions")
    return path


def read(db_dir: str | Path) -> list[dict]:
    """Every valid record, in file order. A corrupt line (torn write, bad JSON, missing
    fields) is skipped with a ``CorruptRecordWarning`` naming its line number."""
    path = open_db(db_dir, create=False)
    file = records_path(path)
    if not file.exists():
        return []
    try:
        lines = file.read_bytes().split(b"\n")
    except OSError as err:
        raise TuningError(f"cannot read tuning database {file}: {err.strerror}") from err
    out = []
    for number, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw)
            if not isinstance(record, dict) or any(k not in record for k in REQUIRED):
                raise ValueError("not a record (missing fields)")
            if not isinstance(record["config"], dict):
                raise ValueError("config is not an object")
        except (ValueError, UnicodeDecodeError) as err:
            warnings.warn(
                f"{file}:{number}: corrupt tuning record skipped ({str(err)[:80]})",
                CorruptRecordWarning,
                stacklevel=2,
            )
            continue
        out.append(record)
    return out


def recorded_keys(db_dir: str | Path) -> set[tuple[str, ...]]:
    """``record_key`` of every record already in the database (empty for a new one)."""
    if not records_path(db_dir).exists():
        return set()
    return {_key_of(r) for r in read(db_dir)}


def append(db_dir: str | Path, record: dict) -> dict:
    """Append one record durably (one O_APPEND write + fsync); returns it with ``v`` and
    ``timestamp`` filled in."""
    missing = [k for k in REQUIRED if k not in record]
    if missing:
        raise ValueError(f"tuning record lacks {', '.join(missing)}")
    record = {"v": VERSION, **record}
    record.setdefault("timestamp", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    line = json.dumps(record, sort_keys=True, separators=(",", ":")) + "\n"
    path = open_db(db_dir)
    file = records_path(path)
    try:
        fd = os.open(file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    except OSError as err:
        raise TuningError(f"cannot write tuning database {file}: {err.strerror}") from err
    try:
        size = os.fstat(fd).st_size
        if size and _last_byte(file, size) != b"\n":  # a torn line from a killed writer
            line = "\n" + line
        os.write(fd, line.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    return record


def _last_byte(file: Path, size: int) -> bytes:
    with open(file, "rb") as f:
        f.seek(size - 1)
        return f.read(1)


def best_record(db_dir: str | Path, kernel: str, target: str, shape_key: str) -> dict | None:
    """The fastest ok record of (kernel, target, shape key); errors never win."""
    best = None
    for r in read(db_dir):
        if (r["kernel"], r["target"], r["shape_key"]) != (kernel, target, shape_key):
            continue
        if not r["ok"] or r.get("median_us") is None:
            continue
        if best is None or r["median_us"] < best["median_us"]:
            best = r
    return best


def summary(db_dir, *, target: str | None = None) -> list[dict]:
    """One row per (kernel, target, shape key): measurements, failures, the fastest ok record
    and that of the default config (plan candidate ``...-000``: spaces list it first)."""
    rows: dict[tuple, dict] = {}
    for r in read(db_dir):
        if target and r["target"] != target:
            continue
        key = (r["kernel"], r["target"], r["shape_key"])
        row = rows.setdefault(
            key,
            {"kernel": key[0], "target": key[1], "shape_key": key[2], "measured": 0, "failed": 0,
             "best": None, "default": None},
        )  # fmt: skip
        row["measured"] += 1
        if not r["ok"] or r.get("median_us") is None:
            row["failed"] += 1
            continue
        if row["best"] is None or r["median_us"] < row["best"]["median_us"]:
            row["best"] = r
        if str(r.get("candidate", "")).endswith("-000"):
            row["default"] = r
    return list(rows.values())


def format_summary(rows: list[dict]) -> str:
    """A markdown table of ``summary`` rows."""
    lines = [
        "| kernel | shape | best us | default us | speedup | best config | measured | failed |",
        "|---|---|---:|---:|---:|---|---:|---:|",
    ]
    for r in rows:
        best, default = r["best"], r["default"]
        us = f"{best['median_us']:.1f}" if best else "-"
        dus = f"{default['median_us']:.1f}" if default else "-"
        gain = f"{default['median_us'] / best['median_us']:.2f}x" if best and default else "-"
        cfg = config_json(best["config"]) if best else "-"
        lines.append(
            f"| {r['kernel']} | {r['shape_key']} | {us} | {dus} | {gain} | {cfg} "
            f"| {r['measured']} | {r['failed']} |"
        )
    return "\n".join(lines)
