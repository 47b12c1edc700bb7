"""Schedules of the dense GEMM workload (``gemm.gemm_workload``) and their tile configs.

- :func:`schedule_mma`: tensor cores (mma.sync m16n8k16 via ldmatrix, a multi-stage cp.async
  pipeline through dynamic shared memory), f32 accumulators staged through shared memory into
  the epilogue; a decoded (GGUF) weight tile is computed into shared memory instead of copied.
- :func:`schedule_gemv`: the FMA GEMV for static M <= 16 (kept as a config for comparison).
- :func:`schedule_cpu`: llvm, rows in parallel.

``schedules/moe.py`` schedules its grouped expert GEMMs with the same functions.
"""

from __future__ import annotations

import dataclasses

from tvm import s_tir
from tvm.script import tirx as T


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


@dataclasses.dataclass(frozen=True)
class GemmCpuConfig:
    tile_n: int = 16


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
