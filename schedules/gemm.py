"""Dense GEMM ``Y[M, N] = X[M, K] @ W[N, K]^T`` (torch Linear layout) with fused epilogues.

- CUDA, M >= 17 or symbolic: tensor cores (mma.sync m16n8k16, ldmatrix, multi-stage cp.async
  pipeline through dynamic shared memory), f32 accumulation, f16 output. M and N need not be
  multiples of the block tile: loads are zero-filled and stores predicated.
- CUDA, static M <= 8 (decode): ``gemv_mma.dense``, a tensor-core GEMV (weight rows as the mma's
  A operand loaded straight into registers, tokens as its 8 columns, warps splitting K).
- CUDA, static M <= 16: the same tensor-core schedule with a small-M config
  (``SMALL_M_CONFIGS``: one 16-row tile, 4 warps along N, block_k 128-256, 4-6 stages: the
  product is memory-bound, so many weight bytes in flight). The FMA GEMV schedule (each warp
  reduces one weight row for all M tokens) stays available as ``config=FmaGemvConfig(...)``.
- ``llvm``: a simple parallel/vectorized schedule for CPU tests.

Options: ``out_dtype`` (e.g. f32 router logits from f16 operands), ``batch`` (per-head products
reading ``X[T, H, K]`` and writing ``Y[T, H, N]`` in place, head axis on blockIdx.z: the absorbed
W_UK / W_UV products). ``passes/lower_dense_gemm.py`` routes the model's dense products here.

Epilogues (``epilogue=``): ``None`` (cast), ``"residual"`` (``Y = X W^T + R``), ``"silu_mul"``
(W holds ``[gate; up]`` rows; ``Y = silu(X Wg^T) * (X Wu^T)``, N output columns from 2N weight
rows). For ``silu_mul`` the weight must be pre-transformed with :func:`transform_weight`: gate and
up rows interleaved in groups of ``SWIGLU_GROUP`` so one block tile holds matching gate/up columns.

cp.async is only emitted when the build runs under ``tvm.transform.PassContext(config=PASS_CONFIG)``
(TVM's ``tirx.use_async_copy`` switch); without it the same kernel uses synchronous copies.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import s_tir, te, tirx

from . import gemv_mma
from .elementwise import thread_per_element
from .gemm_schedules import (  # noqa: F401  (configs and schedules: re-exported)
    FmaGemvConfig,
    GemmConfig,
    GemmCpuConfig,
    inline_producers,
    schedule_cpu,
    schedule_gemv,
    schedule_mma,
)
from .quant_decode import fast_value
from .quant_formats import FORMATS
from .target import PASS_CONFIG, gpu_spec, is_gpu  # noqa: F401  (PASS_CONFIG: re-exported)

SWIGLU_GROUP = 32  # gate/up rows interleave in groups of this many rows (see transform_weight)
EPILOGUES = (None, "residual", "silu_mul")
GEMV_MAX_M = 16
SILU_GEMV = FmaGemvConfig(rows=2 * SWIGLU_GROUP, warps=8)


def keep(config: GemmConfig, target: tvm.target.Target) -> bool:
    """Whether a tensor-core config fits the target (shared memory, threads, tile divisibility)."""
    spec = gpu_spec(target)
    ok_tiles = config.warp_m % 16 == 0 and config.warp_n % 16 == 0 and config.block_k % 16 == 0
    loads = (config.block_m + config.block_n) * config.block_k // 8  # 16-byte vectors per stage
    return (
        ok_tiles
        and config.stages >= 2
        and config.threads <= 1024
        and config.block_n % (2 * SWIGLU_GROUP) == 0
        and loads % config.threads == 0
        and config.shared_bytes() <= spec.max_shared_bytes_per_block
        # mma.sync accumulators: warp_m * warp_n / 32 f32 registers per thread
        and config.warp_m * config.warp_n // 32 <= 128
    )


CONFIGS: dict[str, tuple[GemmConfig, ...]] = {
    # sm_89: 99 KB shared; 128x128x32, 3 stages = 30 KB pipeline + 66 KB f32 staging
    "sm_89": (
        GemmConfig(warps_m=2, warps_n=2, warp_m=64, warp_n=64, block_k=32, stages=3),
        GemmConfig(warps_m=2, warps_n=4, warp_m=64, warp_n=32, block_k=32, stages=4),
        GemmConfig(warps_m=2, warps_n=2, warp_m=32, warp_n=64, block_k=32, stages=4),
    ),
    # sm_90a: 227 KB shared; deeper pipelines and 128x256 tiles fit
    "sm_90a": (
        GemmConfig(warps_m=2, warps_n=4, warp_m=64, warp_n=64, block_k=32, stages=4),
        GemmConfig(warps_m=2, warps_n=2, warp_m=64, warp_n=64, block_k=32, stages=4),
        GemmConfig(warps_m=2, warps_n=2, warp_m=64, warp_n=64, block_k=64, stages=3),
        GemmConfig(warps_m=4, warps_n=2, warp_m=64, warp_n=64, block_k=32, stages=4),
        GemmConfig(warps_m=2, warps_n=4, warp_m=64, warp_n=64, block_k=64, stages=3),
    ),
}


# Static M <= 16 (decode): one 16-row mma tile, warps along N, a deep cp.async pipeline with a
# large block_k so that enough weight bytes are in flight (the product is memory-bound).
SMALL_M_CONFIGS: dict[str, tuple[GemmConfig, ...]] = {
    # 4 stages x (16 + 64) x 128 halfs = 85 KB
    "sm_89": (
        GemmConfig(warps_m=1, warps_n=4, warp_m=16, warp_n=16, block_k=128, stages=4),
        GemmConfig(warps_m=1, warps_n=4, warp_m=16, warp_n=16, block_k=64, stages=6),
    ),
    # 6 stages x (16 + 64) x 128 halfs = 128 KB
    "sm_90a": (
        GemmConfig(warps_m=1, warps_n=4, warp_m=16, warp_n=16, block_k=128, stages=6),
        GemmConfig(warps_m=1, warps_n=4, warp_m=16, warp_n=16, block_k=256, stages=4),
        GemmConfig(warps_m=1, warps_n=4, warp_m=16, warp_n=32, block_k=128, stages=4),
    ),
}


def default_config(target: tvm.target.Target, m=None) -> GemmConfig:
    """The first kept config of the target: ``SMALL_M_CONFIGS`` for a static ``m <= 16``."""
    arch = str(target.attrs.get("arch", ""))
    table = SMALL_M_CONFIGS if isinstance(m, int) and m <= GEMV_MAX_M else CONFIGS
    for cfg in table.get(arch, table["sm_89"]):
        if keep(cfg, target):
            return cfg
    raise ValueError(f"no GEMM config fits {arch}")


# ---------------------------------------------------------------------------------------------
# Weight layout for the SiLU(gate) * up epilogue


def swiglu_row_order(n_out: int) -> np.ndarray:
    """Row permutation of ``[gate; up]`` (2*n_out rows) that interleaves SWIGLU_GROUP groups."""
    if n_out % SWIGLU_GROUP:
        raise ValueError(f"silu_mul needs N % {SWIGLU_GROUP} == 0, got {n_out}")
    g = np.arange(n_out // SWIGLU_GROUP)[:, None, None]
    c = np.arange(SWIGLU_GROUP)[None, None, :]
    half = np.array([0, n_out])[None, :, None]
    return (half + g * SWIGLU_GROUP + c).reshape(-1)  # [g0 gate, g0 up, g1 gate, ...]


def weight_layout(n: int, k: int, *, epilogue: str | None = None) -> tuple[int, int]:
    """Shape of the weight the kernel takes for an output width ``n`` (rows, cols)."""
    return (2 * n if epilogue == "silu_mul" else n), k


def transform_weight(w: np.ndarray, *, epilogue: str | None = None) -> np.ndarray:
    """Torch-layout weight ``[N_w, K]`` (or ``[E, N_w, K]``) -> the kernel's layout."""
    if epilogue != "silu_mul":
        return w
    return np.ascontiguousarray(np.take(w, swiglu_row_order(w.shape[-2] // 2), axis=-2))


# ---------------------------------------------------------------------------------------------
# Workload


def gemm_workload(
    m,
    n: int,
    k: int,
    *,
    dtype: str,
    epilogue: str | None = None,
    out_dtype: str | None = None,
    batch: int | None = None,
    weight_format: str | None = None,
):
    """Unscheduled PrimFunc: blocks ``gemm`` (f32 accumulate) and ``epilogue`` (-> Y).

    ``m`` is an int or None (symbolic ``m``); ``n`` is the output width. ``batch``: a head axis
    in the middle of X and Y (``X[m, b, k]``, ``W[b, n_w, k]``, ``Y[m, b, n]``: the layout of
    per-head products in a ``[T, H, D]`` activation, read and written in place, no transpose).
    ``weight_format``: W is that GGUF format's bytes ``[(b,) n_w, row_bytes(k)]`` uint8, decoded
    by a block ``dequantize`` that the schedules inline into their weight loads.
    """
    if epilogue not in EPILOGUES:
        raise ValueError(f"unknown epilogue {epilogue!r}: use one of {EPILOGUES}")
    out_dtype = out_dtype or dtype
    i64 = lambda v: tirx.IntImm("int64", v)  # noqa: E731  (one index type: Relax uses int64)
    nc, n, k, g = i64(weight_layout(n, k, epilogue=epilogue)[0]), i64(n), i64(k), SWIGLU_GROUP
    mm = tirx.Var("m", "int64") if m is None else i64(m)
    lead = () if batch is None else (i64(batch),)

    def at(i, b, j):  # index of an [m, (b,) cols] activation
        return (i, j) if batch is None else (i, b, j)

    x = te.placeholder((mm, *lead, k), dtype, name="x")
    w_arg, w = weight_placeholder((*lead, nc), k, dtype, weight_format)
    r = te.placeholder((mm, *lead, n), dtype, name="r")
    kk = te.reduce_axis((i64(0), k), name="k")
    f32 = "float32"

    def acc(*idx):  # ([b,] i, j) -> f32 dot product
        b, i, j = (None, *idx) if batch is None else idx
        xi = x[at(i, b, kk)]
        wj = w[(j, kk) if batch is None else (b, j, kk)]
        return te.sum(xi.astype(f32) * wj.astype(f32), axis=kk)

    c = te.compute((*lead, mm, nc), acc, name="gemm")

    def epi(*idx):  # output index (i, [b,] j)
        i, b, j = (idx[0], None, idx[1]) if batch is None else idx
        cc = (lambda col: c[i, col]) if batch is None else (lambda col: c[b, i, col])
        if epilogue == "silu_mul":  # output column j pairs gate column jc and up column jc + g
            jc = j // g * 2 * g + j % g
            return (tirx.sigmoid(cc(jc)) * cc(jc) * cc(jc + g)).astype(out_dtype)
        if epilogue == "residual":
            return (cc(j) + r[at(i, b, j)].astype(f32)).astype(out_dtype)
        return cc(j).astype(out_dtype)

    y = te.compute((mm, *lead, n), epi, name="epilogue")
    args = [x, w_arg, r, y] if epilogue == "residual" else [x, w_arg, y]
    return te.create_prim_func(args).with_attr("tirx.noalias", True)


def weight_placeholder(rows: tuple, k, dtype: str, weight_format: str | None):
    """(parameter, values) of a weight ``[*rows, k]``: one ``dtype`` placeholder, or for a GGUF
    ``weight_format`` its bytes ``wq [*rows, row_bytes(k)]`` uint8 and a block ``dequantize``
    (``dtype`` values) over them."""
    if weight_format is None:
        w = te.placeholder((*rows, k), dtype, name="w")
        return w, w
    fmt = FORMATS[weight_format]
    rb = tirx.IntImm("int64", fmt.row_bytes(int(k)))
    wq = te.placeholder((*rows, rb), "uint8", name="wq")
    # int -> float of quants and scales by the exponent trick (LOP3 + FADD, not I2F), exact
    values = te.compute(
        (*rows, k), lambda *i: fast_value(fmt, wq, i[:-1], i[-1], dtype), name="dequantize"
    )
    return wq, values


def gemm(
    m,
    n: int,
    k: int,
    *,
    dtype: str = "float16",
    target: tvm.target.Target,
    config: GemmConfig | FmaGemvConfig | GemmCpuConfig | gemv_mma.GemvMmaConfig | None = None,
    epilogue: str | None = None,
    out_dtype: str | None = None,
    batch: int | None = None,
    weight_format: str | None = None,
) -> tirx.PrimFunc:
    """``Y[m, n] = epilogue(X[m, k] @ W^T)``; W is ``weight_layout(n, k, epilogue=...)``.

    ``m``: an int, or None for a symbolic row count (dynamic tokens). Parameters are
    ``(x, w, y)``, or ``(x, w, residual, y)`` for ``epilogue="residual"``. ``out_dtype``: Y's
    dtype (default ``dtype``; e.g. float32 router logits from f16 inputs). ``batch``: per-head
    products ``Y[m, b, :] = X[m, b, :] @ W[b]^T`` (see :func:`gemm_workload`).

    On CUDA, a static ``m <= 8`` takes ``gemv_mma.dense`` (or a given
    ``gemv_mma.GemvMmaConfig``), a static ``m <= 16`` the small-M tensor-core config of the target
    (or a given :class:`GemmConfig`), unless a :class:`FmaGemvConfig` (the FMA GEMV schedule) is
    given. On sm_90a a symbolic or
    > 64-row ``m`` takes ``gemm_wgmma`` with ``config`` (a ``WgmmaConfig``) or, given none,
    :func:`wgmma_default`.

    ``weight_format``: W is given as that GGUF format's bytes (``weight_placeholder``), decoded
    inside the kernel: on CUDA as each tile is loaded into shared memory (the mma.sync schedule
    for every M; decode of <= 8 tokens is ``quant_gemv``'s, see ``passes/lower_dense_gemm``).
    """
    from . import gemm_wgmma as W

    quant = weight_format is not None
    if quant and isinstance(config, (FmaGemvConfig, gemv_mma.GemvMmaConfig, W.WgmmaConfig)):
        raise ValueError(f"{type(config).__name__} has no quantized-weight form: use GemmConfig")
    if isinstance(config, W.WgmmaConfig):
        wg = config
    elif config is None and not quant:
        wg = wgmma_default(m, n, k, target=target, epilogue=epilogue, batch=batch)
    else:
        wg = None
    if wg is not None:  # sm_90a, many rows: warpgroup MMAs (schedules/gemm_wgmma.py)
        from . import gemm_wgmma

        func = gemm_wgmma.wgmma_gemm(
            m, n, k, dtype=dtype, target=target, config=wg, epilogue=epilogue, out_dtype=out_dtype
        )
        return func.with_attr(
            "global_symbol", kernel_name(m, n, k, epilogue=epilogue, out_dtype=out_dtype)
        )
    mma_gemv = is_gpu(target) and gemv_mma.applies(m, k, dtype=dtype) and config is None
    mma_gemv &= not quant  # <= 8 tokens on blocks: quant_gemv, not this kernel
    if mma_gemv or isinstance(config, gemv_mma.GemvMmaConfig):
        # decode, <= 8 tokens: weight rows as the mma's A operand straight from DRAM
        func = gemv_mma.dense(
            m, n, k, dtype=dtype, target=target, config=config, epilogue=epilogue,
            out_dtype=out_dtype, batch=batch,
        )  # fmt: skip
        return func.with_attr(
            "global_symbol",
            kernel_name(m, n, k, epilogue=epilogue, out_dtype=out_dtype, batch=batch),
        )
    small = isinstance(m, int) and m <= GEMV_MAX_M
    gemv = is_gpu(target) and isinstance(config, FmaGemvConfig)
    # tensor cores pad M to the 16-row tile: the small-M kernel is the symbolic-M kernel
    # (predicated loads and stores), specialised only by its config (so is every quantized one)
    wm = None if (small or quant) and is_gpu(target) and not gemv else m
    func = gemm_workload(
        wm, n, k, dtype=dtype, epilogue=epilogue, out_dtype=out_dtype, batch=batch,
        weight_format=weight_format,
    )  # fmt: skip
    sch = s_tir.Schedule(func)
    if not is_gpu(target):
        schedule_cpu(sch, config or GemmCpuConfig())
    elif gemv:
        if batch is not None or not small:
            raise ValueError("the GEMV schedule serves static M <= 16 without a batch axis")
        nc = weight_layout(n, k, epilogue=epilogue)[0]
        # whole lane steps only: K = 10944 (42.75 steps of 32 lanes x 8) summed wrongly on the
        # H100 (benchmarks/sweep_gemv.py, 2026-11-25)
        if k % (32 * config.vec) or nc % config.rows:
            raise ValueError(f"GEMV config {config} does not tile N={nc}, K={k}")
        schedule_gemv(sch, config, epilogue=epilogue)
    else:
        if dtype not in ("float16", "bfloat16"):
            raise NotImplementedError(f"tensor-core GEMM supports float16/bfloat16, not {dtype}")
        cfg = config or default_config(target, m)
        if not keep(cfg, target):
            raise ValueError(f"config {cfg} does not fit {target}")
        schedule_mma(
            sch, cfg, heads=batch is not None, epilogue=epilogue, dtype=dtype, decoded_weight=quant
        )
    name = kernel_name(
        m, n, k, epilogue=epilogue, out_dtype=out_dtype, batch=batch, weight_format=weight_format
    )
    return sch.mod["main"].with_attr("global_symbol", name)


SILU_LAYOUTS = ("interleaved", "stacked")


def silu_mul_epilogue(
    m: int,
    n: int,
    *,
    layout: str = "interleaved",
    dtype: str = "float16",
    target: tvm.target.Target,
) -> tirx.PrimFunc:
    """``(acc [m, 2n], y [m, n])``: ``y = silu(gate) * up`` on finished gate/up products, for
    GEMV kernels that write plain products. ``layout``: the columns of ``acc``, "interleaved"
    (``transform_weight``'s order, gate/up groups of SWIGLU_GROUP: ``quant_gemv``) or
    "stacked" (``[gate; up]``: ``quant_moe_gemv`` on checkpoint-ordered expert blocks)."""
    if layout not in SILU_LAYOUTS:
        raise ValueError(f"unknown gate/up layout {layout!r}: use one of {SILU_LAYOUTS}")
    i64 = lambda v: tirx.IntImm("int64", v)  # noqa: E731
    g, f32 = SWIGLU_GROUP, "float32"
    acc = te.placeholder((i64(m), i64(2 * n)), dtype, name="acc")

    def epi(i, j):  # output column j: gate column jc, up column jc + the gate/up offset
        jc, up_off = (j // g * 2 * g + j % g, g) if layout == "interleaved" else (j, n)
        gate, up = acc[i, jc].astype(f32), acc[i, jc + up_off].astype(f32)
        return (tirx.sigmoid(gate) * gate * up).astype(dtype)

    y = te.compute((i64(m), i64(n)), epi, name="epilogue")
    sch = s_tir.Schedule(te.create_prim_func([acc, y]).with_attr("tirx.noalias", True))
    thread_per_element(sch, sch.get_sblock("epilogue"), target)
    tag = "" if layout == "interleaved" else f"_{layout}"
    return sch.mod["main"].with_attr("global_symbol", f"silu_mul_epilogue{tag}_n{n}_m{m}")


def wgmma_default(m, n: int, k: int, *, target, epilogue, batch):
    """The wgmma tile for this GEMM on sm_90a (symbolic or > 64 rows, no head axis), or None.

    SiLU·up takes 256 x 128 tiles, outputs of 2048+ columns 128 x 256, narrower ones 128 x 128
    with 5 stages (the fastest of each shape class; benchmarks/NOTES_gemm.md).
    """
    from . import gemm_wgmma as W

    if batch is not None or not is_gpu(target):
        return None
    if isinstance(m, int) and m <= 64:
        return None
    nw = weight_layout(n, k, epilogue=epilogue)[0]
    if epilogue == "silu_mul":
        cfg = W.WgmmaConfig(256, 128, 64, 4, overlap=True)
    elif nw >= 2048:
        cfg = W.WgmmaConfig(128, 256, 64, 4, overlap=True)
    else:
        cfg = W.WgmmaConfig(128, 128, 64, 5, overlap=True)
    return cfg if W.applies(n, k, target=target, config=cfg) else None


def gemv_config(epilogue: str | None = None) -> FmaGemvConfig:
    """The FMA GEMV config (kept for comparison with the small-M tensor-core schedule)."""
    return SILU_GEMV if epilogue == "silu_mul" else FmaGemvConfig()


def kernel_name(
    m, n: int, k: int, *, epilogue=None, out_dtype=None, batch=None, weight_format=None
) -> str:
    tag = f"_{epilogue}" if epilogue else ""
    tag += f"_{out_dtype}" if out_dtype else ""
    tag += f"_{weight_format}" if weight_format else ""
    head = "" if batch is None else f"_h{batch}"
    return f"gemm{head}_n{n}_k{k}{tag}" + ("" if m is None else f"_m{m}")
