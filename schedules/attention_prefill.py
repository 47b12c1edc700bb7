"""FlashMLA-style prefill attention: ragged batch, causal with offset, O and LSE.

Two kernel factories share one kernel body per target:

- ``absorbed_prefill``: MLA with the up-projections absorbed. Every query head reads the same
  576-wide latent rows of one layer of the f16 cache (one KV head, GQA ratio = heads); V is the
  first ``kv_lora_rank`` columns of the same rows. The heads of a token are folded into the row
  (M) dimension: the ``[T, H, 576]`` queries of a sequence are one ``[T*H, 576]`` matrix whose
  row ``r`` is token ``r // H``.
- ``decompressed_prefill``: ordinary multi-head attention with per-head K ``[N, H, 192]`` and
  V ``[N, H, 128]`` (MLA mode 0); one block row-tile per head.

Both are described by ``_Layout``: rows of the query matrix per token (``rows_per_token``),
head groups mapped to ``blockIdx.y`` (``groups``) and the strides of the K / V rows, so the
kernels are written once (``_cpu_body`` for llvm, ``attention_prefill_mma.mma_body`` for CUDA).

Conventions (see ``mla_compiler.reference``): ``lse`` is the natural log of the sum of exp of the
scaled logits; query ``i`` of sequence ``b`` (``T_b`` queries, ``N_b`` KV rows) sees KV rows
``j <= i + N_b - T_b``; sequences are delimited by CSR ``q_indptr`` / ``kv_indptr``.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import tvm
from tvm.script import tirx as T

from mla_compiler.errors import TargetError
from mla_compiler.model_export.config import MLADims
from mla_compiler.schedules import attention_prefill_mma as _mma
from mla_compiler.schedules import attention_prefill_tiles as _tiles
from mla_compiler.schedules.target import gpu_spec, is_gpu

LOG2E = math.log2(math.e)
LN2 = math.log(2.0)


@dataclasses.dataclass(frozen=True)
class PrefillCpuConfig:
    """llvm schedule: queries in parallel, KV rows in chunks of ``tile_kv`` per softmax update."""

    tile_kv: int = 32


PrefillConfig = _tiles.PrefillConfig


@dataclasses.dataclass(frozen=True)
class _Layout:
    """How one kernel body reads q / k / v / o of either kind of attention.

    Query row ``r`` of sequence ``b`` and head group ``g`` lives at
    ``((q_indptr[b] * rows_per_token + r) * groups + g)`` in rows of ``dk`` (q) / ``dv`` (o) /
    1 (lse). KV row ``j`` lives at ``k_base + ((kv_indptr[b] + j) * groups + g) * k_stride``
    (K, ``dk`` wide) and the same row index times ``v_stride`` for V (``dv`` wide).
    """

    dk: int
    dv: int
    rows_per_token: int
    groups: int
    k_stride: int
    v_stride: int
    shared_kv: bool  # V is the first dv columns of the K rows (absorbed MLA)
    sm_scale: float

    @property
    def heads(self) -> int:
        return self.rows_per_token * self.groups


def _absorbed_layout(dims: MLADims, sm_scale: float) -> _Layout:
    d = dims.latent_dim
    return _Layout(
        dk=d,
        dv=dims.kv_lora_rank,
        rows_per_token=dims.heads,
        groups=1,
        k_stride=d,
        v_stride=d,
        shared_kv=True,
        sm_scale=sm_scale,
    )


def _decompressed_layout(dims: MLADims, sm_scale: float) -> _Layout:
    dk, dv = dims.qk_head_dim, dims.v_head_dim
    return _Layout(
        dk=dk,
        dv=dv,
        rows_per_token=1,
        groups=dims.heads,
        k_stride=dk,
        v_stride=dv,
        shared_kv=False,
        sm_scale=sm_scale,
    )


# ----------------------------------------------------------------------------------------------
# Configs
# ----------------------------------------------------------------------------------------------


def _target_of(target) -> tvm.target.Target:
    if isinstance(target, str):
        from mla_compiler.schedules.target import tvm_target

        return tvm_target(target)
    return target


FULL_WAVES = 0.9  # wave_efficiency a prompt chunk's grid must reach for the fastest config


def default_config(target, *, kind: str = "absorbed", dims: MLADims):
    """The config each target uses when none is given (first candidate that ``keep`` accepts)."""
    target = _target_of(target)
    if not is_gpu(target):
        return PrefillCpuConfig()
    for cfg in candidates(target, kind=kind, dims=dims):
        return cfg
    raise TargetError(f"no {kind} prefill config fits {gpu_spec(target).arch}")


def extend_config(target, *, kind: str, dims: MLADims, tokens: int):
    """The config for a prompt chunk of ``tokens`` tokens after the first (a cached prefix):
    the first candidate whose grid fills ``FULL_WAVES`` of the SMs' block slots, else the
    fullest. Such a chunk sees a long prefix, so its query tiles are about equally heavy and a
    partial last wave costs its share: 2048 tokens x 16 heads in 192-row tiles make 176 blocks,
    1.33 waves on 132 SMs (the causal first chunk, whose tiles are unequal, keeps
    ``default_config``)."""
    target = _target_of(target)
    if not is_gpu(target):
        return PrefillCpuConfig()
    found = candidates(target, kind=kind, dims=dims)
    if not found:
        raise TargetError(f"no {kind} prefill config fits {gpu_spec(target).arch}")
    eff = [wave_efficiency(c, target, kind=kind, dims=dims, tokens=tokens) for c in found]
    full = [c for c, e in zip(found, eff, strict=True) if e >= FULL_WAVES]
    return full[0] if full else found[eff.index(max(eff))]


def wave_efficiency(config, target, *, kind: str, dims: MLADims, tokens: int) -> float:
    """Busy fraction of the block slots over the waves of one ``tokens``-token chunk's grid
    (blocks of equal work assumed; slots = SMs x blocks per SM by shared memory)."""
    layout = _layout_for(kind, dims)
    blocks = -(-tokens * layout.rows_per_token // config.tile_q) * layout.groups
    slots = _block_slots(config, target, kind=kind, dims=dims)
    return blocks / (-(-blocks // slots) * slots)


def _block_slots(config, target, *, kind: str, dims: MLADims) -> int:
    """Blocks of ``config`` the GPU runs at once: SMs x blocks per SM by shared memory."""
    spec = gpu_spec(_target_of(target))
    smem = shared_bytes(config, kind=kind, dims=dims) + 1024  # +1 KB reserved per block
    per_sm = (spec.max_shared_bytes_per_block + 1024) // smem
    warps = config.warps + config.producer_warps
    return spec.sm_count * max(1, min(per_sm, 2048 // (32 * warps)))


def short_config(target, *, kind: str, dims: MLADims):
    """The config for causal prompts whose grid in the default's tiles is a single wave: the
    first candidate with the smallest query tiles, or None (CPU, or none smaller than the
    default's). A single wave lasts as long as its longest causal tile, which smaller tiles
    shorten (and 512 tokens x 16 heads in 192-row tiles are 48 blocks for 132 SMs)."""
    target = _target_of(target)
    if not is_gpu(target):
        return None
    default = default_config(target, kind=kind, dims=dims)
    found = candidates(target, kind=kind, dims=dims)
    smallest = min(c.tile_q for c in found)
    return next((c for c in found if c.tile_q == smallest < default.tile_q), None)


def short_tokens(config, target, *, kind: str, dims: MLADims) -> int:
    """Longest causal prompt whose grid in ``config``'s tiles fits one wave of block slots: the
    short config's range (1536 tokens for 192-row tiles and 16 heads on 132 SMs: 128 blocks)."""
    layout = _layout_for(kind, dims)
    slots = _block_slots(config, target, kind=kind, dims=dims)
    return slots // layout.groups * config.tile_q // layout.rows_per_token


def candidates(target, *, kind: str = "absorbed", dims: MLADims) -> list:
    """Configs worth tuning over on ``target``, best guess first, already pruned by ``keep``."""
    target = _target_of(target)
    if not is_gpu(target):
        return [PrefillCpuConfig(t) for t in (32, 64, 16)]
    arch = gpu_spec(target).arch
    # The first one that fits is the default; all free of spills under ptxas
    # (tests/test_attention_prefill.py). wgmma configs are pruned where the arch lacks it. The
    # order is what the GPU runs measured (benchmarks/NOTES.md).
    mma = PrefillConfig
    wg = functools.partial(PrefillConfig, mma="wgmma")
    sw = functools.partial(PrefillConfig, mma="wgmma_swizzled")
    if kind == "absorbed" and arch == "sm_89":
        out = [mma(32, 16, 8, 3, split_s=False), mma(32, 16, 8, 2, split_s=False)]
    elif kind == "absorbed":
        # O is [rows, 512] f32: 2-4 warps (or 2 warpgroups) split V's columns of each row slice.
        # tile_kv = 64 = the rope width: P is stored over the K tile's dead rope columns.
        # sm_90a: swizzled wgmma first, the hand-off first of all: warpgroup 0 computes all of S
        # (m64n64, not two m64n32) and the softmax, the other loads KV; both run P·V from
        # registers (FlashMLA's first kernel's split of the work).
        handoff = functools.partial(sw, split_s=False, p_operand="regs")
        out = [handoff(64, 64, 8, 2), sw(64, 64, 8, 2)]
        out += [handoff(64, 32, 8, 4), handoff(64, 32, 8, 3)]
        out += [mma(64, 32, 8, 3), mma(64, 64, 8, 2), mma(64, 32, 8, 2)]
        out += [mma(64, 16, 8, 3, split_s=False)]
        out += [wg(64, 64, 8, 2), wg(64, 48, 8, 2), wg(64, 32, 8, 3)]
    elif arch == "sm_89":
        out = [mma(64, 32, 4, 2), mma(128, 32, 8, 2), mma(64, 16, 4, 3)]
    else:
        # sm_90a: swizzled wgmma, P in registers (wgmma rs form), 96-row KV tiles; 256 x 64
        # stays near the front for extend_config's one-wave chunks.
        rs = functools.partial(sw, p_operand="regs")
        pipe = functools.partial(sw, p_operand="regs_pipelined")
        tma = functools.partial(rs, kv_loads="tma")
        warp = functools.partial(rs, kv_loads="tma_producer_warp")
        # KV tiles by TMA first: one thread issues each tile's boxes into an mbarrier ring; with
        # a producer warp the consumers meet at no CTA barrier per tile. 12 warps + a producer
        # warp get only 128 registers, so 192-row tiles need a producer warpgroup that gives its
        # registers up (setmaxnreg: the consumers get 160).
        mx = functools.partial(rs, kv_loads="tma_producer_warpgroup")
        out = [mx(192, 96, 12, 2), warp(128, 128, 8, 2)]
        out += [tma(256, 64, 16, 2, s_first=True), warp(128, 96, 8, 2)]
        out += [tma(192, 96, 12, 2), tma(128, 128, 8, 2), tma(128, 96, 8, 2)]
        out += [warp(128, 64, 8, 3), warp(128, 112, 8, 2)]
        # 64-row query tiles (one warpgroup + the producer warp; 64 x 64 two blocks a SM):
        # short_config's pick for prompts of one wave in the default's tiles
        out += [warp(64, 64, 4, 2), warp(64, 128, 4, 2)]
        # More for the register split (192 x 64 x 3 stages spills at 160 registers)
        out += [mx(192, 80, 12, 2), mx(192, 112, 12, 2), mx(128, 128, 8, 2)]
        # cp.async rings (every thread copies its share of each tile)
        out += [rs(192, 96, 12, 2), rs(256, 64, 16, 2, s_first=True), rs(192, 64, 12, 2)]
        out += [rs(128, 96, 8, 2), rs(256, 64, 16, 2)]
        out += [rs(192, 64, 12, 3), rs(128, 64, 8, 3), pipe(128, 64, 8, 4)]
        out += [sw(128, 64, 8, 3)]
        out += [mma(128, 64, 8, 2), mma(128, 32, 8, 2), mma(64, 32, 4, 2)]
        out += [wg(128, 64, 8, 2), wg(128, 64, 8, 3)]
        # FA3's in-warpgroup pipeline on a two-stage split ring (K one tile ahead of V, no
        # third stage); 128 x 128 x 8 warps and 192 x 64 x 12 warps spill with it (keep
        # rejects them)
        out += [pipe(128, 96, 8, 2)]
    return [c for c in out if keep(c, target, kind=kind, dims=dims)]


def _layout_for(kind: str, dims: MLADims) -> _Layout:
    if kind == "absorbed":
        return _absorbed_layout(dims, 1.0)
    if kind == "decompressed":
        return _decompressed_layout(dims, 1.0)
    raise ValueError(f"unknown prefill kind {kind!r}: use 'absorbed' or 'decompressed'")


def keep(config, target, *, kind: str = "absorbed", dims: MLADims) -> bool:
    """Whether ``config`` is valid on ``target``: tile shapes, registers, shared memory."""
    target = _target_of(target)
    if not is_gpu(target):
        return isinstance(config, PrefillCpuConfig) and config.tile_kv > 0
    if not isinstance(config, PrefillConfig):
        return False
    layout = _layout_for(kind, dims)
    spec = gpu_spec(target)
    return _tiles.fits(config, layout, spec.max_shared_bytes_per_block, has_wgmma=spec.has_wgmma)


def shared_bytes(config: PrefillConfig, *, kind: str = "absorbed", dims: MLADims) -> int:
    """Dynamic shared memory one block of the CUDA kernel allocates."""
    return _tiles.shared_bytes(config, _layout_for(kind, dims))


# ----------------------------------------------------------------------------------------------
# llvm body
# ----------------------------------------------------------------------------------------------


@T.macro(hygienic=False)
def _cpu_body(P, tile_kv, qf, kf, vf, k_base, q_indptr, kv_indptr, of, lsef, batch, t_total):
    # P: _Layout; qf/kf/vf/of/lsef: flat views of q, k (or the latent cache), v, o, lse.
    for b in T.serial(batch):
        q0 = q_indptr[b]
        t_b = q_indptr[b + 1] - q0
        k0 = kv_indptr[b]
        n_b = kv_indptr[b + 1] - k0
        for rg in T.parallel(t_b * P.rows_per_token * P.groups):
            r = rg // P.groups
            g = rg % P.groups
            qrow = T.Cast("int64", (q0 * P.rows_per_token + r) * P.groups + g)
            limit = r // P.rows_per_token + n_b - t_b + 1  # KV rows [0, limit) are visible
            acc = T.alloc_buffer((P.dv,), "float32")  # [dv]
            qv = T.alloc_buffer((P.dk,), "float32")  # [dk]
            s = T.alloc_buffer((tile_kv,), "float32")  # [tile_kv]
            st = T.alloc_buffer((3,), "float32")  # running max, running sum, tile max
            for d in T.serial(P.dk):
                qv[d] = T.Cast("float32", qf[qrow * P.dk + d]) * T.float32(P.sm_scale * LOG2E)
            for d in T.serial(P.dv):
                acc[d] = T.float32(0)
            st[0] = T.float32(-math.inf)
            st[1] = T.float32(0)
            for jt in T.serial((limit + tile_kv - 1) // tile_kv):
                st[2] = T.float32(-math.inf)
                for jj in T.serial(tile_kv):
                    j = jt * tile_kv + jj
                    s[jj] = T.float32(-math.inf)
                    if j < limit:
                        krow = k_base + T.Cast("int64", (k0 + j) * P.groups + g) * P.k_stride
                        s[jj] = T.float32(0)
                        for d in T.serial(P.dk):
                            s[jj] = s[jj] + qv[d] * T.Cast("float32", kf[krow + d])
                        st[2] = T.max(st[2], s[jj])
                m_new = T.max(st[0], st[2])
                alpha = T.exp2(st[0] - m_new)
                st[0] = m_new
                st[1] = st[1] * alpha
                for d in T.serial(P.dv):
                    acc[d] = acc[d] * alpha
                for jj in T.serial(tile_kv):
                    j = jt * tile_kv + jj
                    if j < limit:
                        p = T.exp2(s[jj] - m_new)
                        st[1] = st[1] + p
                        vrow = T.Cast("int64", (k0 + j) * P.groups + g) * P.v_stride
                        for d in T.serial(P.dv):
                            acc[d] = acc[d] + p * T.Cast("float32", vf[k_base + vrow + d])
            for d in T.serial(P.dv):
                of[qrow * P.dv + d] = T.Cast(of.dtype, acc[d] / st[1])
            lsef[qrow] = (st[0] + T.log2(st[1])) * T.float32(LN2)


# ----------------------------------------------------------------------------------------------
# Factories
# ----------------------------------------------------------------------------------------------


def _body_for(target, config, layout: _Layout, *, kind: str, dims: MLADims, dtype: str):
    """(macro, static args) of the kernel body for ``target``, checking ``config``."""
    target = _target_of(target)
    if is_gpu(target) and dtype != "float16":
        raise TargetError(
            f"the CUDA prefill kernels take float16 q/kv/o (f16 tensor-core MMAs), got {dtype}: "
            "cast to float16 or compile for cpu"
        )
    if config is None:
        config = default_config(target, kind=kind, dims=dims)
    if not keep(config, target, kind=kind, dims=dims):
        raise TargetError(f"prefill config {config} does not fit {target}")
    if is_gpu(target):
        return _mma.mma_body, (layout, _tiles.geometry(config, layout))
    return _cpu_body, (layout, config.tile_kv)


def _bodies(
    target, config, extend, short, layout: _Layout, *, kind: str, dims: MLADims, dtype: str
):
    """(macro, static args of the causal kernel, of the extend kernel or None, of the short
    kernel or None, the short kernel's longest prompt)."""
    body, static = _body_for(target, config, layout, kind=kind, dims=dims, dtype=dtype)
    if not is_gpu(_target_of(target)):
        return body, static, None, None, 0

    def other(cfg):
        if cfg is None:
            return None
        _, got = _body_for(target, cfg, layout, kind=kind, dims=dims, dtype=dtype)
        return None if got[1] == static[1] else got

    config = config or default_config(target, kind=kind, dims=dims)
    limit = short_tokens(config, target, kind=kind, dims=dims) if short is not None else 0
    return body, static, other(extend), other(short), limit


@T.macro(hygienic=True)
def _dispatch(
    body,
    kernels,
    extend_now,
    short_now,
    qf,
    kf,
    vf,
    k_base,
    q_indptr,
    kv_indptr,
    of,
    lsef,
    batch,
    t,
):
    # kernels: static args of the causal kernel, of the extend kernel and of the short one (None
    # where not built); the host picks one per call: extend for chunks after a prefix, short
    # for prompts of one wave, else the causal kernel
    if kernels[1] is not None and extend_now:
        body(*kernels[1], qf, kf, vf, k_base, q_indptr, kv_indptr, of, lsef, batch, t)
    elif kernels[2] is not None and short_now:
        body(*kernels[2], qf, kf, vf, k_base, q_indptr, kv_indptr, of, lsef, batch, t)
    else:
        body(*kernels[0], qf, kf, vf, k_base, q_indptr, kv_indptr, of, lsef, batch, t)


def absorbed_prefill(
    dims: MLADims,
    *,
    dtype: str = "float16",
    target,
    config=None,
    extend_config=None,
    short_config=None,
    sm_scale: float,
) -> tvm.tirx.PrimFunc:
    """Absorbed-MLA prefill over one layer of the whole latent cache ``kv [L, C, 576]``.

    Sequence ``b`` reads ``kv[layer, kv_indptr[b]:kv_indptr[b+1]]`` (its new rows at the end).
    Arguments: q, kv, q_indptr, kv_indptr, layer (int32 scalar), o, lse — the scalar before the
    outputs, as Relax's ``call_tir`` passes it. With ``extend_config`` (CUDA) a second kernel
    built with it runs when the cache holds more rows than there are queries (``C > T``: a
    chunk after a prompt's first); ``short_config`` as for ``decompressed_prefill``. The host
    picks one per call.
    """
    layout = _absorbed_layout(dims, sm_scale)
    body, static, static_x, static_s, short_t = _bodies(
        target, config, extend_config, short_config, layout, kind="absorbed", dims=dims, dtype=dtype
    )
    dl, dv, h = dims.latent_dim, dims.kv_lora_rank, dims.heads
    kernels = (static, static_x, static_s)

    @T.prim_func
    def absorbed_prefill(
        q_h: T.handle,
        kv_h: T.handle,
        q_indptr_h: T.handle,
        kv_indptr_h: T.handle,
        layer: T.int32,
        o_h: T.handle,
        lse_h: T.handle,
    ):
        T.func_attr({"tir.noalias": True})
        t_total, batch1, n_layers, rows = T.int64(), T.int64(), T.int64(), T.int64()
        q = T.match_buffer(q_h, (t_total, h, dl), dtype)  # [T, H, 576]
        kv = T.match_buffer(kv_h, (n_layers, rows, dl), dtype)  # [L, C, 576]
        q_indptr = T.match_buffer(q_indptr_h, (batch1,), "int32")  # [B+1]
        kv_indptr = T.match_buffer(kv_indptr_h, (batch1,), "int32")  # [B+1]
        o = T.match_buffer(o_h, (t_total, h, dv), dtype)  # [T, H, 512]
        lse = T.match_buffer(lse_h, (t_total, h), "float32")  # [T, H]
        qf = T.decl_buffer((t_total * h * dl,), dtype, data=q.data)
        kf = T.decl_buffer((n_layers * rows * dl,), dtype, data=kv.data)
        of = T.decl_buffer((t_total * h * dv,), dtype, data=o.data)
        lsef = T.decl_buffer((t_total * h,), "float32", data=lse.data)
        # (the layer's first element is passed inline: a variable bound here would reach the
        # kernels as a pointer to host memory)
        _dispatch(
            body, kernels, rows > t_total, t_total <= short_t,
            qf, kf, kf, T.Cast("int64", layer) * rows * dl, q_indptr, kv_indptr, of, lsef,
            batch1 - 1, t_total,
        )  # fmt: skip

    return absorbed_prefill


def decompressed_prefill(
    dims: MLADims,
    *,
    dtype: str = "float16",
    target,
    config=None,
    extend_config=None,
    short_config=None,
    sm_scale: float,
) -> tvm.tirx.PrimFunc:
    """Multi-head prefill with decompressed per-head K [N, H, 192] and V [N, H, 128].

    With ``extend_config`` (CUDA) a second kernel built with it runs for calls with more KV rows
    than queries (``N > T``: a chunk after a prompt's first); the host picks one per call.
    """
    layout = _decompressed_layout(dims, sm_scale)
    body, static, static_x, static_s, short_t = _bodies(
        target,
        config,
        extend_config,
        short_config,
        layout,
        kind="decompressed",
        dims=dims,
        dtype=dtype,
    )
    dk, dv, h = dims.qk_head_dim, dims.v_head_dim, dims.heads
    kernels = (static, static_x, static_s)

    @T.prim_func
    def decompressed_prefill(
        q_h: T.handle,
        k_h: T.handle,
        v_h: T.handle,
        q_indptr_h: T.handle,
        kv_indptr_h: T.handle,
        o_h: T.handle,
        lse_h: T.handle,
    ):
        T.func_attr({"tir.noalias": True})
        t_total, n_total, batch1 = T.int64(), T.int64(), T.int64()
        q = T.match_buffer(q_h, (t_total, h, dk), dtype)  # [T, H, 192]
        k = T.match_buffer(k_h, (n_total, h, dk), dtype)  # [N, H, 192]
        v = T.match_buffer(v_h, (n_total, h, dv), dtype)  # [N, H, 128]
        q_indptr = T.match_buffer(q_indptr_h, (batch1,), "int32")  # [B+1]
        kv_indptr = T.match_buffer(kv_indptr_h, (batch1,), "int32")  # [B+1]
        o = T.match_buffer(o_h, (t_total, h, dv), dtype)  # [T, H, 128]
        lse = T.match_buffer(lse_h, (t_total, h), "float32")  # [T, H]
        qf = T.decl_buffer((t_total * h * dk,), dtype, data=q.data)
        kf = T.decl_buffer((n_total * h * dk,), dtype, data=k.data)
        vf = T.decl_buffer((n_total * h * dv,), dtype, data=v.data)
        of = T.decl_buffer((t_total * h * dv,), dtype, data=o.data)
        lsef = T.decl_buffer((t_total * h,), "float32", data=lse.data)
        _dispatch(
            body, kernels, n_total > t_total, t_total <= short_t,
            qf, kf, vf, T.int64(0), q_indptr, kv_indptr, of, lsef, batch1 - 1, t_total,
        )  # fmt: skip

    return decompressed_prefill
