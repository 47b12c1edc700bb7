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


# --- configs <-> database records ----------------------------------------------------------


def kernel_family(kernel: str):
    """The registered family of a tuned kernel name (``schedules.families.FAMILIES``)."""
    from mla_compiler.schedules.families import FAMILIES

    if kernel not in FAMILIES:
        raise TuningError(f"unknown tuned kernel {kernel!r}: one of {', '.join(FAMILIES)}")
    return FAMILIES[kernel]


def config_type(kernel: str) -> type:
    """The config class of a tuned kernel family (what its database records hold)."""
    return kernel_family(kernel).config_type


def config_from_dict(kernel: str, data: dict):
    """The kernel's config from a database dict; ``TuningError`` for unknown fields."""
    family = kernel_family(kernel)
    try:
        return family.config_from_dict(data)
    except (TypeError, ValueError) as err:
        raise TuningError(
            f"tuning record of {kernel} has a config {family.config_type.__name__} cannot read "
            f"({err}): the database was written by another version; re-tune"
        ) from None


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


# --- the compiler's questions ---------------------------------------------------------------


def choose(choice: KernelChoice, kernel: str, shape, target):
    """The config of family ``kernel`` for ``shape``: the tuned one where recorded (nearest size
    otherwise) and valid, else the family's default (None where the family does not apply)."""
    family = kernel_family(kernel)
    default = family.default(shape, target)
    if default is None:  # the family does not serve this shape on this target
        return None
    key = family.shape_key(shape)
    tuned = config_for(choice.db, kernel, target, key, default, log=choice.log)
    return tuned if tuned is default or family.keep(tuned, shape, target) else default


def decode_config(choice: KernelChoice, target, dims: MLADims, *, sm_scale: float):
    """The split-KV decode config, picked for ``choice.max_context``."""
    from mla_compiler.schedules.families import DecodeShape

    return choose(choice, "attn_decode", DecodeShape(dims, choice.max_context, sm_scale), target)


def prefill_kind(op: str) -> str:
    """The prefill kernel kind of a call-site op (attn_absorbed / attn_decompressed)."""
    return "absorbed" if op == "attn_absorbed" else "decompressed"


def prefill_config(choice: KernelChoice, op: str, target, dims: MLADims, *, sm_scale: float):
    """The first-chunk prefill config for ``op``, picked for the prompt chunk."""
    from mla_compiler.schedules.families import PrefillShape

    shape = PrefillShape(dims, choice.ubatch, sm_scale)
    return choose(choice, f"attn_prefill_{prefill_kind(op)}", shape, target)


def prefill_extend_config(choice: KernelChoice, op: str, target, dims: MLADims):
    """The config of the chunks after a prompt's first (a cached prefix), picked for the
    prompt chunk (not tuned: the tuner times the causal first chunk)."""
    from mla_compiler.schedules import attention_prefill as ap

    return ap.extend_config(target, kind=prefill_kind(op), dims=dims, tokens=choice.ubatch)


def prefill_short_config(op: str, target, dims: MLADims):
    """The config of causal prompts of one wave of the default's tiles (not tuned)."""
    from mla_compiler.schedules import attention_prefill as ap

    return ap.short_config(target, kind=prefill_kind(op), dims=dims)


def moe_config(choice: KernelChoice, target, *, num_experts, top_k, hidden, inter):
    """The grouped-GEMM config, picked for the prompt chunk; None where wgmma does not apply."""
    from mla_compiler.schedules.families import MoeShape

    shape = MoeShape(num_experts, top_k, hidden, inter, choice.ubatch)
    return choose(choice, "moe_grouped", shape, target)


def dense_gemm_config(choice: KernelChoice, m, n: int, k: int, *, target, epilogue, out_dtype):
    """The wgmma config of a dense product on sm_90a where it applies (symbolic or > 64 rows:
    ``schedules.gemm.wgmma_default``), picked for the prompt chunk; else None (the factory
    picks its own mma.sync / GEMV schedule)."""
    from mla_compiler.schedules import gemm as G
    from mla_compiler.schedules.families import GemmShape

    if G.wgmma_default(m, n, k, target=target, epilogue=epilogue, batch=None) is None:
        return None
    return choose(
        choice, "gemm_prefill", GemmShape(n, k, epilogue, out_dtype, choice.ubatch), target
    )
