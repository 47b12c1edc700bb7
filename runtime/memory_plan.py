"""The device memory an artifact needs, by part, before anything is allocated.

Parts: the weights as stored (by format: the bytes ``Engine.load`` uploads), the weights the
kernels read (``transform_params``' outputs), the KV cache at the context asked for and the
attention workspace the compiler recorded. Loading holds the stored weights and what
``transform_params`` allocates (its outputs that are not its inputs) at once; running holds the
transformed weights, the cache and the workspace. What TVM's allocator keeps beyond these
(activations of a prompt chunk, freed temporaries) is not predicted here:
``benchmarks/memory_probe.py`` measures it.
"""

from __future__ import annotations

from mla_compiler.errors import InputError

GiB = 2**30


def plan(meta: dict, *, max_context: int, slots: int = 1) -> dict:
    """``{"parts": [(name, bytes)], "load_peak": bytes, "run": bytes}`` for ``meta`` (an
    artifact's metadata.json) at ``max_context`` tokens per sequence and ``slots`` sequences."""
    layers = meta["model"]["num_hidden_layers"]
    item = 2 if meta["kv_dtype"] == "float16" else 4
    cache = slots * layers * max_context * meta["kv_cache_width"] * item
    wb = meta.get("weight_bytes") or {}
    stored = wb.get("stored") or {}
    device = int(wb.get("device", sum(stored.values())))
    new = int(wb.get("device_new", device))  # what transform_params allocates
    work = _workspace(meta.get("attention_workspace_bytes") or {}, max_context)
    parts = [(f"weights stored {fmt}", int(b)) for fmt, b in sorted(stored.items())]
    parts += [
        ("weights read by the kernels", device),
        (f"KV cache ({max_context} x {slots})", cache),
    ]
    parts += [("attention workspace", work)]
    return {
        "parts": parts,
        "load_peak": sum(stored.values()) + new,
        "run": device + cache + work,
    }


def _workspace(recorded: dict, context: int) -> int:
    """The recorded workspace of the smallest recorded context >= ``context`` (else the
    largest), max over prefill and decode."""
    if not recorded:
        return 0
    sizes = sorted(int(c) for c in recorded)
    at = next((c for c in sizes if c >= context), sizes[-1])
    return max(int(v) for v in recorded[str(at)].values())


def format_plan(p: dict) -> str:
    rows = [*p["parts"], ("at load (stored + read)", p["load_peak"])]
    rows.append(("running (read + cache + work)", p["run"]))
    return "device memory plan:\n" + "\n".join(f"  {n:<32} {_size(b):>11}" for n, b in rows)


def _size(b: int) -> str:
    return f"{b / GiB:.2f} GiB" if b >= GiB else f"{b / 2**20:.1f} MiB"


def check_fits(p: dict, free: int, *, max_context: int) -> None:
    """``InputError`` with how much is missing and what to lower when the plan exceeds
    ``free`` bytes."""
    need = max(p["load_peak"], p["run"])
    if need <= free:
        return
    cache = next(b for name, b in p["parts"] if name.startswith("KV cache"))
    raise InputError(
        f"the artifact needs {need / GiB:.2f} GiB of device memory ({p['run'] / GiB:.2f} GiB "
        f"running, {p['load_peak'] / GiB:.2f} GiB while loading; KV cache {cache / GiB:.2f} GiB "
        f"at --max-context {max_context}), the GPU has {free / GiB:.2f} GiB free: "
        f"{(need - free) / GiB:.2f} GiB short; lower --max-context or compile with a smaller "
        "--quant"
    )
