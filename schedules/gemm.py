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

import dataclasses

import numpy as np
import tvm
from tvm import s_tir, te, tirx
from tvm.script import tirx as T

from . import gemv_mma
from .quant_formats import FORMATS
from .target import PASS_CONFIG, gpu_spec, is_gpu  # noqa: F401  (PASS_CONFIG: re-exported)

SWIGLU_GROUP = 32  # gate/up rows interleave in groups of this many rows (see transform_weight)
EPILOGUES = (None, "residual", "silu_mul")
GEMV_MAX_M = 16


@dataclasses.dataclass(frozen=True)
class GemmConfig:
    """Tensor-core tile config: block tile = (warps_m * warp_m) x (warps_n * warp_n) x block_k."""

    warps_m: int = 2
    warps_n: int = 2
    warp_m: int = 64  # rows per warp (multiple of 16)
    warp_n: int = 64  # cols per warp (multiple of 16)
    block_k: int = 32  # multiple of 16
    stages: int = 3  # shared-memory pipeline depth (>= 2)

    @property
    def block_m(self) -> int:
        return self.warps_m * self.warp_m

    @property
    def block_n(self) -> int:
        return self.warps_n * self.warp_n

    @property
    def threads(self) -> int:
        return 32 * self.warps_m * self.warps_n

    def shared_bytes(self, dtype_bytes: int = 2) -> int:
        """Pipeline buffers (padded rows) and the f32 output staging tile, whichever is larger."""
        row = self.block_k + 8
        pipe = self.stages * (self.block_m + self.block_n) * row * dtype_bytes
        return max(pipe, self.block_m * (self.block_n + 4) * 4)


@dataclasses.dataclass(frozen=True)
class FmaGemvConfig:
    """Memory-bound schedule for static M <= 16: a block owns ``rows`` weight rows; each of its
    ``warps`` warps reduces ``rows // warps`` of them (lanes split K, ``vec`` halves per load)."""

    rows: int = 16
    warps: int = 4
    vec: int = 8


SILU_GEMV = FmaGemvConfig(rows=2 * SWIGLU_GROUP, warps=8)


@dataclasses.dataclass(frozen=True)
class GemmCpuConfig:
    tile_n: int = 16


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


# ---------------------------------------------------------------------------------------------
# Schedules


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
    values = te.compute(
        (*rows, k), lambda *i: fmt.value(wq, i[:-1], i[-1], dtype), name="dequantize"
    )
    return wq, values


def inline_producers(sch: s_tir.Schedule, block) -> None:
    """Inline every block feeding ``block`` (pad copies, a weight's ``dequantize``), nearest
    first, so that ``block`` reads the function's inputs."""
    producers = sch.get_producers(block)
    while producers:
        for producer in producers:
            sch.compute_inline(producer)
        producers = sch.get_producers(block)


def _mma_index_map(*lead):
    """(…, i, j) of a 16-multiple warp tile -> (…, i//16, j//16, thread, local) mma layout."""
    from tvm.s_tir.tensor_intrin.cuda import shared_16x16_to_ldmatrix_32x8_layout as lay

    def fn(*idx):
        i, j = idx[-2], idx[-1]
        return (*idx[:-2], i // 16, j // 16, *lay(i % 16, j % 16))

    return fn


_BF16_INTRINS = {
    "load_a": "gemm_ldmatrix_bf16_a_dyn",
    "load_b": "gemm_ldmatrix_bf16_b_trans_dyn",
    "compute": "gemm_mma_bf16bf16f32_trans_b",
}


def _register_bf16_intrinsics() -> None:
    """bf16 variants of TVM's f16 ldmatrix/mma.sync tensor intrinsics (TVM ships f16 only):
    same fragment layout, ``.b16`` ldmatrix, ``mma.sync ... .bf16.bf16`` with f32 accumulate."""
    from tvm.s_tir import TensorIntrin
    from tvm.s_tir.tensor_intrin.cuda import shared_16x16_to_ldmatrix_32x8_layout as lay

    if TensorIntrin.get(_BF16_INTRINS["compute"], allow_missing=True) is not None:
        return
    bf = "bfloat16"

    def ldmatrix(offset):
        @T.prim_func(s_tir=True)
        def desc(warp_h: T.handle, shared_h: T.handle) -> None:
            shared = T.match_buffer(
                shared_h, (16, 16), bf, align=64, offset_factor=16, scope="shared.dyn"
            )
            warp = T.match_buffer(warp_h, (32, 8), bf, align=64, offset_factor=16, scope="warp")
            with T.sblock("root"):
                T.reads(shared[0:16, 0:16])
                T.writes(warp[0:32, 0:8])
                for ax0, ax1 in T.grid(16, 16):
                    with T.sblock("shared_warp"):
                        v0, v1 = T.axis.remap("SS", [ax0, ax1])
                        t, loc = T.meta_var(lay(v0, v1))
                        T.reads(shared[v0, v1])
                        T.writes(warp[t, loc])
                        warp[t, loc] = shared[v0, v1]

        @T.prim_func(s_tir=True)
        def impl(warp_h: T.handle, shared_h: T.handle) -> None:
            s0 = T.int32()
            s1 = T.int32()
            shared = T.match_buffer(
                shared_h,
                (16, 16),
                bf,
                align=64,
                offset_factor=16,
                scope="shared.dyn",
                strides=[s0, s1],
            )
            warp = T.match_buffer(warp_h, (32, 8), bf, align=64, offset_factor=16, scope="warp")
            with T.sblock("root"):
                T.reads(shared[0:16, 0:16])
                T.writes(warp[0:32, 0:8])
                for tx in T.thread_binding(0, 32, "threadIdx.x"):
                    T.evaluate(
                        T.ptx_legacy.ldmatrix(
                            False,
                            4,
                            ".b16",
                            warp.data,
                            warp.elem_offset + 8 * tx,
                            shared.access_ptr("r"),
                            offset(tx, s0),
                            dtype=bf,
                        )
                    )

        return desc, impl

    # A [m, k]: lanes 0-15 rows 0-15 at k 0, lanes 16-31 the same rows at k 8
    a_off = lambda tx, s0: s0 * (tx % 16) + 8 * (tx // 16)  # noqa: E731
    # B stored [n, k]: lanes 0-7 rows 0-7 k 0, 8-15 rows 0-7 k 8, 16-23 rows 8-15 k 0, ...
    b_off = lambda tx, s0: s0 * 8 * (tx // 16) + s0 * (tx % 8) + 8 * ((tx % 16) // 8)  # noqa: E731

    @T.prim_func(s_tir=True)
    def mma_desc(a_h: T.handle, b_h: T.handle, c_h: T.handle) -> None:
        a = T.match_buffer(a_h, (32, 8), bf, align=64, offset_factor=16, scope="warp")
        b = T.match_buffer(b_h, (32, 8), bf, align=64, offset_factor=16, scope="warp")
        c = T.match_buffer(c_h, (32, 8), "float32", align=64, offset_factor=16, scope="warp")
        with T.sblock("root"):
            T.reads(c[0:32, 0:8], a[0:32, 0:8], b[0:32, 0:8])
            T.writes(c[0:32, 0:8])
            for i, j, k in T.grid(16, 16, 16):
                with T.sblock("C"):
                    vi, vj, vk = T.axis.remap("SSR", [i, j, k])
                    tc, lc = T.meta_var(lay(vi, vj))
                    ta, la = T.meta_var(lay(vi, vk))
                    tb, lb = T.meta_var(lay(vj, vk))
                    T.reads(c[tc, lc], a[ta, la], b[tb, lb])
                    T.writes(c[tc, lc])
                    c[tc, lc] = c[tc, lc] + T.Cast("float32", a[ta, la]) * T.Cast(
                        "float32", b[tb, lb]
                    )

    @T.prim_func(s_tir=True)
    def mma_impl(a_h: T.handle, b_h: T.handle, c_h: T.handle) -> None:
        a = T.match_buffer(a_h, (32, 8), bf, align=64, offset_factor=16, scope="warp")
        b = T.match_buffer(b_h, (32, 8), bf, align=64, offset_factor=16, scope="warp")
        c = T.match_buffer(c_h, (32, 8), "float32", align=64, offset_factor=16, scope="warp")
        with T.sblock("root"):
            T.reads(c[0:32, 0:8], a[0:32, 0:8], b[0:32, 0:8])
            T.writes(c[0:32, 0:8])
            for tx in T.thread_binding(0, 32, "threadIdx.x"):
                for half in T.unroll(2):  # two m16n8k16: columns 0-7, then 8-15
                    T.evaluate(
                        T.ptx_legacy.mma(
                            "m16n8k16",
                            "row",
                            "col",
                            "bf16",
                            "bf16",
                            "fp32",
                            a.data,
                            a.elem_offset + tx * 8,
                            b.data,
                            b.elem_offset + tx * 8 + half * 4,
                            c.data,
                            c.elem_offset + tx * 8 + half * 4,
                            False,
                            dtype="float32",
                        )
                    )

    TensorIntrin.register(_BF16_INTRINS["load_a"], *ldmatrix(a_off))
    TensorIntrin.register(_BF16_INTRINS["load_b"], *ldmatrix(b_off))
    TensorIntrin.register(_BF16_INTRINS["compute"], mma_desc, mma_impl)


def schedule_mma(
    sch: s_tir.Schedule,
    cfg: GemmConfig,
    *,
    batched: bool = False,
    heads: bool = False,
    epilogue: str | None = None,
    dtype: str = "float16",
    decoded_weight: bool = False,
) -> None:
    """Tensor-core schedule of block ``gemm`` (loops [b,] i, j, k) and its ``epilogue``.

    The epilogue's loops ([b,] i, j over the accumulator's columns) are tiled first and carry
    the block binding; the GEMM is computed at the epilogue's tile loop, so epilogues that read
    several accumulator columns per output (SiLU * up) need no inverse index analysis.
    ``batched``: an outer spatial loop (MoE row blocks) goes to blockIdx.y; then the i extent
    must equal ``cfg.block_m``. Otherwise i and j are padded to the block tile.
    ``heads``: the workload's head axis (``gemm_workload(batch=...)``) goes to blockIdx.z.
    ``decoded_weight``: the weight operand is computed (a GGUF decode, inlined with the other
    producers of the W tile into its shared-memory load), not copied: no cp.async, no vectors.
    """
    import tvm.s_tir.tensor_intrin.cuda  # noqa: F401  (registers the intrinsics)

    block = sch.get_sblock("gemm")
    epi = sch.get_sblock("epilogue")
    pad = [cfg.block_m, cfg.block_n, cfg.block_k]
    sch.pad_einsum(block, [1, *pad] if batched or heads else pad)
    for consumer in sch.get_consumers(block):  # the un-padding copy folds into the epilogue
        if sch.get(consumer).name_hint != "epilogue":
            sch.compute_inline(consumer)

    # 16x16x16 tensor-core tiles (blockize before moving the nest: keeps the stage pipeline)
    i, j, k = sch.get_loops(block)[-3:]
    i, i_tc = sch.split(i, [None, 16])
    j, j_tc = sch.split(j, [None, 16])
    k, k_tc = sch.split(k, [None, 16])
    sch.reorder(i, j, k, i_tc, j_tc, k_tc)
    inner = block
    outer = sch.blockize(i_tc)

    # block tiles from the epilogue's iteration space
    eloops = sch.get_loops(epi)
    if heads:  # epilogue loops (i, b, j) -> (b, i, j)
        sch.reorder(eloops[1], eloops[0])
        eloops = [eloops[1], eloops[0], eloops[2]]
    ei0, ei1 = sch.split(eloops[-2], [None, cfg.block_m])
    out_cols = cfg.block_n // 2 if epilogue == "silu_mul" else cfg.block_n
    ej0, ej1 = sch.split(eloops[-1], [None, out_cols])
    sch.reorder(ei0, ej0, ei1, ej1)
    if batched:
        sch.bind(eloops[0], "blockIdx.y")
        bx = sch.fuse(ei0, ej0)
        sch.bind(bx, "blockIdx.x")
    else:
        sch.bind(ej0, "blockIdx.x")
        sch.bind(ei0, "blockIdx.y")
        if heads:
            sch.bind(eloops[0], "blockIdx.z")
        bx = ej0
    sch.compute_at(outer, bx, preserve_unit_loops=True)
    i, j, k = sch.get_loops(outer)[-3:]

    i1, i2 = sch.split(i, [cfg.warps_m, cfg.warp_m // 16])
    j1, j2 = sch.split(j, [cfg.warps_n, cfg.warp_n // 16])
    k0, k1 = sch.split(k, [None, cfg.block_k // 16])
    sch.reorder(i1, j1, k0, k1, i2, j2)
    ty = sch.fuse(i1, j1)
    sch.bind(ty, "threadIdx.y")
    warps = cfg.warps_m * cfg.warps_n

    def fetch(idx):
        decoded = idx == 1 and decoded_weight  # per element: no bool vectors in CUDA
        cache = sch.cache_read(outer, idx, "shared.dyn")
        if heads and idx == 0:  # X[i, b, k] -> shared [b, i, k]: mma tiles on the last two axes
            sch.transform_layout(cache, ("write", 0), lambda i, b, kk: (b, i, kk))
        sch.compute_at(cache, k0)
        loops = sch.get_loops(cache)
        below = [sch.get(lp).same_as(sch.get(k0)) for lp in loops].index(True) + 1
        fused = sch.fuse(*loops[below:])
        _, f1, f2, f3 = sch.split(fused, [None, warps, 32, 8])
        sch.bind(f2, "threadIdx.x")
        sch.bind(f1, "threadIdx.y")
        if decoded:
            sch.unroll(f3)
        else:
            sch.vectorize(f3)
        sch.storage_align(cache, 0, axis=-2, factor=32, offset=8)
        return cache

    for cache in (fetch(0), fetch(1)):  # zero-filling pad copies and weight decoding fold in
        inline_producers(sch, cache)
    a_warp = sch.cache_read(outer, 0, "warp")
    b_warp = sch.cache_read(outer, 1, "warp")
    sch.compute_at(a_warp, k1)
    sch.compute_at(b_warp, k1)

    # accumulators: warp registers -> f32 tile in shared memory -> epilogue -> global
    c_warp = sch.cache_write(outer, 0, "warp")
    sch.reverse_compute_at(c_warp, ty)
    ci, cj = sch.get_loops(c_warp)[-2:]
    cio, cii = sch.split(ci, [None, 16])
    cjo, cji = sch.split(cj, [None, 16])
    sch.reorder(cio, cjo, cii, cji)
    sch.set_scope(c_warp, 0, "shared.dyn")
    sch.storage_align(c_warp, 0, axis=-2, factor=32, offset=4)
    init = sch.decompose_reduction(outer, k0)

    def tile(blk, rows, cols):
        r, c = sch.get_loops(blk)[-2:]
        ro, ri = sch.split(r, [None, rows])
        co, cj2 = sch.split(c, [None, cols])
        sch.reorder(ro, co, ri, cj2)
        return ri

    la = tile(a_warp, 16, 16)
    lb = tile(b_warp, 16, 16)
    sch.transform_layout(a_warp, ("write", 0), _mma_index_map())
    sch.transform_layout(b_warp, ("write", 0), _mma_index_map())
    sch.transform_layout(c_warp, ("read", 0), _mma_index_map())
    intrins = {
        "load_a": "mma_ldmatrix_f16_a_dyn",
        "load_b": "mma_ldmatrix_f16_b_trans_dyn",
        "compute": "mma_f16f16f32_trans_b",
    }
    if dtype == "bfloat16":
        _register_bf16_intrinsics()
        intrins = _BF16_INTRINS
    sch.tensorize(la, intrins["load_a"])
    sch.tensorize(lb, intrins["load_b"])
    sch.tensorize(sch.get_loops(inner)[-3], intrins["compute"])
    sch.tensorize(sch.get_loops(sch.get_child_blocks(init)[0])[-2], "mma_fill_16x16_f32")
    sch.tensorize(sch.get_loops(c_warp)[-2], "mma_store_16x16_f32_shared_dyn_simple_")

    # k0's body after the inner pipeline expands: 2 copies + (prologue, body, epilogue) of k1
    sch.annotate(k0, "software_pipeline_stage", [0, 0] + [cfg.stages - 1] * 3)
    sch.annotate(k0, "software_pipeline_order", [0, 1, 2, 3, 4])
    sch.annotate(k0, "software_pipeline_async_stages", [0])
    sch.annotate(k1, "software_pipeline_stage", [0, 0, 1])
    sch.annotate(k1, "software_pipeline_order", [0, 1, 2])

    # epilogue: per block tile, all threads
    fused = sch.fuse(*sch.get_loops(epi)[-2:])
    _, f1, f2 = sch.split(fused, [None, warps, 32])
    sch.bind(f2, "threadIdx.x")
    sch.bind(f1, "threadIdx.y")


def schedule_gemv(sch: s_tir.Schedule, cfg: FmaGemvConfig, *, epilogue: str | None = None) -> None:
    """GEMV schedule of block ``gemm`` (static, small M): weight rows read once, f32 partials
    per lane, a warp all-reduce per row into a shared row tile, then the epilogue."""
    block = sch.get_sblock("gemm")
    epi = sch.get_sblock("epilogue")
    ei, ej = sch.get_loops(epi)
    out_rows = cfg.rows // 2 if epilogue == "silu_mul" else cfg.rows
    ej0, ej1 = sch.split(ej, [None, out_rows])
    sch.reorder(ej0, ei, ej1)
    sch.bind(ej0, "blockIdx.x")

    i, j, k = sch.get_loops(block)
    kv, v = sch.split(k, [None, cfg.vec])
    ko, tx = sch.split(kv, [None, 32])
    sch.reorder(tx, ko, i, j, v)
    rf = sch.rfactor(tx, 0)  # rf[tx, i, j]: one f32 partial per lane
    sch.compute_at(block, ej0, preserve_unit_loops=True)
    sch.compute_at(rf, ej0, preserve_unit_loops=True)
    tx, i, j, ko, v = sch.get_loops(rf)[-5:]
    ty, jr = sch.split(j, [cfg.warps, cfg.rows // cfg.warps])
    sch.reorder(ty, jr, tx, ko, i, v)
    sch.bind(ty, "threadIdx.y")
    sch.bind(tx, "threadIdx.x")
    sch.set_scope(rf, 0, "local")
    w_local = sch.cache_read(rf, 1, "local")
    sch.compute_at(w_local, ko)
    sch.vectorize(sch.get_loops(w_local)[-1])
    x_local = sch.cache_read(rf, 0, "local")
    sch.compute_at(x_local, i)
    sch.vectorize(sch.get_loops(x_local)[-1])
    sch.decompose_reduction(rf, ko)
    # cross-lane reduction per row: lanes stay bound to threadIdx.x
    sch.reverse_compute_at(block, jr, preserve_unit_loops=True)
    r_tx, r_i, r_j = sch.get_loops(block)[-3:]
    sch.reorder(r_i, r_j, r_tx)
    sch.bind(r_tx, "threadIdx.x")
    sch.set_scope(block, 0, "shared")
    fused = sch.fuse(*sch.get_loops(epi)[-2:])
    _, f1, f2 = sch.split(fused, [None, cfg.warps, 32])
    sch.bind(f1, "threadIdx.y")
    sch.bind(f2, "threadIdx.x")


def schedule_cpu(sch: s_tir.Schedule, cfg: GemmCpuConfig) -> None:
    """Plain CPU schedule: rows in parallel, the epilogue fused per row, inner K vectorized."""
    block = sch.get_sblock("gemm")
    epi = sch.get_sblock("epilogue")
    i = sch.get_loops(epi)[0]
    sch.parallel(i)
    sch.compute_at(block, i, preserve_unit_loops=True)
    sch.set_scope(block, 0, "local")
    inline_producers(sch, block)  # a quantized weight's decode: into the reduction


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

    if weight_format is not None:
        return _quant_gemm(
            m, n, k, dtype=dtype, target=target, config=config, epilogue=epilogue,
            out_dtype=out_dtype, batch=batch, weight_format=weight_format,
        )  # fmt: skip
    if isinstance(config, W.WgmmaConfig):
        wg = config
    elif config is None:
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
    # (predicated loads and stores), specialised only by its config
    wm = None if small and is_gpu(target) and not gemv else m
    func = gemm_workload(wm, n, k, dtype=dtype, epilogue=epilogue, out_dtype=out_dtype, batch=batch)
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
        schedule_mma(sch, cfg, heads=batch is not None, epilogue=epilogue, dtype=dtype)
    return sch.mod["main"].with_attr(
        "global_symbol", kernel_name(m, n, k, epilogue=epilogue, out_dtype=out_dtype, batch=batch)
    )


def _quant_gemm(m, n, k, *, dtype, target, config, epilogue, out_dtype, batch, weight_format):
    """GEMM over GGUF blocks: the workload's ``dequantize`` inlined into the W tile loads."""
    if isinstance(config, (FmaGemvConfig, gemv_mma.GemvMmaConfig)) or type(config).__name__ == (
        "WgmmaConfig"
    ):
        raise ValueError(f"{type(config).__name__} has no quantized-weight form: use GemmConfig")
    small = isinstance(m, int) and m <= GEMV_MAX_M
    wm = None if is_gpu(target) else m  # tensor cores: the symbolic-M kernel, predicated
    func = gemm_workload(
        wm, n, k, dtype=dtype, epilogue=epilogue, out_dtype=out_dtype, batch=batch,
        weight_format=weight_format,
    )  # fmt: skip
    sch = s_tir.Schedule(func)
    if not is_gpu(target):
        schedule_cpu(sch, config or GemmCpuConfig())
    else:
        if dtype not in ("float16", "bfloat16"):
            raise NotImplementedError(f"tensor-core GEMM supports float16/bfloat16, not {dtype}")
        cfg = config or default_config(target, m if small else None)
        if not keep(cfg, target):
            raise ValueError(f"config {cfg} does not fit {target}")
        schedule_mma(
            sch, cfg, heads=batch is not None, epilogue=epilogue, dtype=dtype, decoded_weight=True
        )
    name = kernel_name(m, n, k, epilogue=epilogue, out_dtype=out_dtype, batch=batch)
    return sch.mod["main"].with_attr("global_symbol", f"{name}_{weight_format}")


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


def kernel_name(m, n: int, k: int, *, epilogue=None, out_dtype=None, batch=None) -> str:
    tag = f"_{epilogue}" if epilogue else ""
    tag += f"_{out_dtype}" if out_dtype else ""
    head = "" if batch is None else f"_h{batch}"
    return f"gemm{head}_n{n}_k{k}{tag}" + ("" if m is None else f"_m{m}")
