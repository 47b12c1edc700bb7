"""Kernel choice, explicit: which config each tuned kernel family is built with.

``KernelChoice`` is made once from the compile options (``KernelChoice.from_options``) and handed
to the lowering passes; nothing reads ambient state. Each ``*_config`` function returns the
config recorded fastest in the tuning database for the shape (``config_for``), else the
schedule's default. The shape keys name problems in the database; ``tuning`` (the ``tune``
command) writes records under the same keys.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable

from mla_compiler import tuning_db
from mla_compiler.defaults import DEFAULT_MAX_CONTEXT, DEFAULT_UBATCH
from mla_compiler.errors import TuningError
from mla_compiler.model_export.config import MLADims


@dataclasses.dataclass(frozen=True)
class KernelChoice:
    """What kernel configs depend on beyond the shapes and the target: the tuning database
    (``db``, None: defaults only), the prompt chunk (``ubatch``) prompt kernels are picked for,
    the context (``max_context``) decode kernels are picked for, and where notes go (``log``)."""

    db: str | None = None
    ubatch: int = DEFAULT_UBATCH
    max_context: int = DEFAULT_MAX_CONTEXT
    log: Callable[[str], None] | None = dataclasses.field(default=None, compare=False)

    @classmethod
    def from_options(cls, options, *, log=None) -> KernelChoice:
        """From ``CompileOptions``; a database is read once here, so a bad one fails early."""
        db = None if options.tuning_db is None else str(options.tuning_db)
        if db is not None:
            tuning_db.read(db)
        return cls(db, options.ubatch, options.max_context, log)


# --- shape keys: names of problems in the tuning database -----------------------------------


def _latent_prefix(dims: MLADims) -> str:
    return f"h{dims.heads}-r{dims.kv_lora_rank}-p{dims.qk_rope_head_dim}"


def decode_shape_key(dims: MLADims, ctx: int, *, batch: int = 1) -> str:
    return f"{_latent_prefix(dims)}-b{batch}-ctx{ctx}"


def prefill_shape_key(kind: str, dims: MLADims, n: int) -> str:
    if kind == "absorbed":
        return f"{_latent_prefix(dims)}-n{n}"
    return f"h{dims.heads}-k{dims.qk_head_dim}-v{dims.v_head_dim}-n{n}"


def gemm_shape_key(n: int, k: int, epilogue: str | None, out_dtype: str | None, tokens: int):
    tag = (epilogue or "plain") + ("-f32" if out_dtype == "float32" else "")
    return f"n{n}-k{k}-{tag}-t{tokens}"


def moe_shape_key(*, num_experts: int, top_k: int, hidden: int, inter: int, tokens: int) -> str:
    return f"e{num_experts}-k{top_k}-d{hidden}-i{inter}-t{tokens}"


# --- configs <-> database records ----------------------------------------------------------


def config_type(kernel: str) -> type:
    """The config class of a tuned kernel family (what its database records hold)."""
    if kernel == "attn_decode":
        from mla_compiler.schedules.attention_decode import DecodeConfig

        return DecodeConfig
    if kernel in ("attn_prefill_absorbed", "attn_prefill_decompressed"):
        from mla_compiler.schedules.attention_prefill import PrefillConfig

        return PrefillConfig
    if kernel in ("gemm_prefill", "moe_grouped"):
        from mla_compiler.schedules.gemm_wgmma import WgmmaConfig

        return WgmmaConfig
    raise TuningError(f"unknown tuned kernel {kernel!r}")


def config_from_dict(kernel: str, data: dict):
    """The kernel's config from a database dict; ``TuningError`` for unknown fields."""
    cls = config_type(kernel)
    names = {f.name for f in dataclasses.fields(cls)}
    extra = set(data) - names
    if extra:
        raise TuningError(
            f"tuning record of {kernel} has config fields {sorted(extra)} that {cls.__name__} "
            "does not know: the database was written by another version; re-tune"
        )
    return cls(**data)


def target_name(target) -> str:
    if isinstance(target, str):
        return target
    return str(target.attrs.get("arch", "cpu")) if target.kind.name == "cuda" else "cpu"


def best_config(db_dir, kernel: str, target: str, shape_key: str):
    """``(config, record)`` of the fastest correct measurement, or None when there is none."""
    tuning_db.open_db(db_dir, create=False)
    record = tuning_db.best_record(db_dir, kernel, target_name(target), shape_key)
    if record is None:
        return None
    return config_from_dict(kernel, record["config"]), record


_SIZE = re.compile(r"^(.*\D)(\d+)$")


def config_for(db_dir, kernel: str, target, shape_key: str, default, *, log=None):
    """The config the compiler should use: the best one recorded for ``shape_key``, else the
    best one of the nearest size of the same family (``...-ctx16384`` for ``...-ctx8192``),
    else ``default`` (with a note through ``log``). ``db_dir`` None returns ``default``."""
    if db_dir is None:
        return default
    tname = target_name(target)
    found = best_config(db_dir, kernel, tname, shape_key)
    if found is not None:
        return found[0]
    m = _SIZE.match(shape_key)
    if m:
        family, size = m.group(1), int(m.group(2))
        sizes = {
            int(r["shape_key"][len(family) :])
            for r in tuning_db.read(db_dir)
            if r["kernel"] == kernel
            and r["target"] == tname
            and r["ok"]
            and r["shape_key"].startswith(family)
            and r["shape_key"][len(family) :].isdigit()
        }
        for near in sorted(sizes, key=lambda s: (abs(s - size), s)):
            found = best_config(db_dir, kernel, tname, f"{family}{near}")
            if found is not None:
                if log:
                    log(f"tuning: {kernel} {shape_key}: using the config tuned for {near}")
                return found[0]
    if log:
        log(f"tuning: no record for {kernel} {tname} {shape_key} in {db_dir}: default config")
    return default


# --- one function per tuned family -----------------------------------------------------------


def decode_config(choice: KernelChoice, target, dims: MLADims):
    """The split-KV decode config: tuned for the nearest context, else the target's default."""
    from mla_compiler.schedules import attention_decode as ad

    default = ad.default_config(target, dims, q_tokens=1)
    key = decode_shape_key(dims, choice.max_context)
    return config_for(choice.db, "attn_decode", target, key, default, log=choice.log)


def prefill_kind(op: str) -> str:
    """The prefill kernel kind of a call-site op (attn_absorbed / attn_decompressed)."""
    return "absorbed" if op == "attn_absorbed" else "decompressed"


def prefill_config(choice: KernelChoice, op: str, target, dims: MLADims):
    """The first-chunk prefill config for ``op``: tuned for the prompt chunk, else the
    target's default."""
    from mla_compiler.schedules import attention_prefill as ap

    kind = prefill_kind(op)
    default = ap.default_config(target, kind=kind, dims=dims)
    key = prefill_shape_key(kind, dims, choice.ubatch)
    return config_for(choice.db, f"attn_prefill_{kind}", target, key, default, log=choice.log)


def prefill_extend_config(choice: KernelChoice, op: str, target, dims: MLADims):
    """The config of the chunks after a prompt's first (a cached prefix), picked for the
    prompt chunk (not tuned: the tuner times the causal first chunk)."""
    from mla_compiler.schedules import attention_prefill as ap

    return ap.extend_config(target, kind=prefill_kind(op), dims=dims, tokens=choice.ubatch)


def prefill_short_config(op: str, target, dims: MLADims):
    """The config of causal prompts of one wave of the default's tiles (not tuned)."""
    from mla_compiler.schedules import attention_prefill as ap

    return ap.short_config(target, kind=prefill_kind(op), dims=dims)


def gemm_config(choice: KernelChoice, target, *, n: int, k: int, epilogue, out_dtype, default):
    """The wgmma config of a prompt-chunk GEMM: tuned for the prompt chunk, else ``default``."""
    key = gemm_shape_key(n, k, epilogue, out_dtype, choice.ubatch)
    return config_for(choice.db, "gemm_prefill", target, key, default, log=choice.log)


def moe_config(choice: KernelChoice, target, *, default, **shape):
    """The grouped-GEMM config (``num_experts``, ``top_k``, ``hidden``, ``inter``) tuned for
    the prompt chunk, else ``default``."""
    key = moe_shape_key(**shape, tokens=choice.ubatch)
    return config_for(choice.db, "moe_grouped", target, key, default, log=choice.log)


def dense_gemm_config(choice: KernelChoice, m, n: int, k: int, *, target, epilogue, out_dtype):
    """The wgmma config of a dense product on sm_90a (``schedules.gemm.wgmma_default`` where it
    applies: symbolic or > 64 rows), the tuned one where recorded and it fits; else None (the
    factory picks its own mma.sync / GEMV schedule)."""
    from mla_compiler.schedules import gemm as G
    from mla_compiler.schedules import gemm_wgmma as W

    default = G.wgmma_default(m, n, k, target=target, epilogue=epilogue, batch=None)
    if default is None:
        return None
    tuned = gemm_config(choice, target, n=n, k=k, epilogue=epilogue, out_dtype=out_dtype,
                        default=default)  # fmt: skip
    return tuned if W.applies(n, k, target=target, config=tuned) else default
