"""Simple attention kernels: one (token, head) per thread, online softmax, ragged, causal.

They define the call sites the MLA passes emit and are the fallback everywhere a tuned kernel
(``attention_prefill``, ``attention_decode``) does not apply; on the CPU they are the kernels.
Two variants of one factory:
- ``absorbed``: q [T, H, R+dr] against latent cache rows ``cache[layer, kv_rows[...]]``,
  V = the first R columns of the same rows; o [T, H, R].
- ``decompressed``: q [T, H, dn+dr], k [N, H, dn+dr], v [N, H, dv] (ragged over kv_indptr).
Both also return lse [T, H] (float32, natural log, see ``mla_compiler.reference``).
"""

from __future__ import annotations

import tvm
from tvm.script import tirx as T

from mla_compiler.model_export.config import MLADims
from mla_compiler.schedules.target import is_gpu

VARIANTS = ("absorbed", "decompressed")


def _latent_at(kv, j, h, d):
    """Element d of the j-th KV row of the latent cache (shared by all heads h)."""
    cache, kv_rows, layer = kv
    return T.Cast("float32", cache[layer, T.Cast("int64", kv_rows[j]), d])


def _dense_at(buf, j, h, d):
    return T.Cast("float32", buf[j, h, d])


def simple_attention(
    dims: MLADims,
    *,
    dtype: str,
    target: tvm.target.Target,
    variant: str,
    sm_scale: float,
    kv_dtype: str | None = None,
    threads: int = 64,
) -> tvm.tirx.PrimFunc:
    """``kv_dtype`` is the cache's dtype (absorbed only; f16 even when q is f32)."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    absorbed = variant == "absorbed"
    kv_dtype = kv_dtype or dtype
    dk = dims.latent_dim if absorbed else dims.qk_head_dim
    dv = dims.kv_lora_rank if absorbed else dims.v_head_dim
    heads = dims.heads
    neg_inf = T.float32(-3.0e38)

    @T.macro
    def body(q, load, kbuf, vbuf, o, lse, q_indptr, kv_indptr, n_seq, vt, vh):
        seq = T.alloc_buffer((1,), "int32", scope="local")
        acc = T.alloc_buffer((dv,), "float32", scope="local")
        st = T.alloc_buffer((3,), "float32", scope="local")  # running max, sum, score
        seq[0] = 0
        for b in range(n_seq):
            if q_indptr[b] <= T.Cast("int32", vt):
                seq[0] = T.Cast("int32", b)
        q0 = q_indptr[seq[0]]
        k0 = kv_indptr[seq[0]]
        n_kv = kv_indptr[seq[0] + 1] - k0
        limit = T.Cast("int32", vt) - q0 + n_kv - (q_indptr[seq[0] + 1] - q0)
        st[0] = neg_inf
        st[1] = T.float32(0)
        for d in range(dv):
            acc[d] = T.float32(0)
        for j in range(limit + 1):
            st[2] = T.float32(0)
            for d in range(dk):
                st[2] = st[2] + T.Cast("float32", q[vt, vh, d]) * load(kbuf, k0 + j, vh, d)
            st[2] = st[2] * T.float32(sm_scale)
            m_new = T.max(st[0], st[2])
            alpha = T.exp(st[0] - m_new)
            p = T.exp(st[2] - m_new)
            st[1] = st[1] * alpha + p
            for d in range(dv):
                acc[d] = acc[d] * alpha + p * load(vbuf, k0 + j, vh, d)
            st[0] = m_new
        for d in range(dv):
            o[vt, vh, d] = T.Cast(dtype, acc[d] / st[1])
        lse[vt, vh] = st[0] + T.log(st[1])

    if absorbed:

        @T.prim_func(s_tir=True)
        def kernel(
            var_q: T.handle,
            var_cache: T.handle,
            var_q_indptr: T.handle,
            var_kv_rows: T.handle,
            var_kv_indptr: T.handle,
            layer: T.int64,
            var_o: T.handle,
            var_lse: T.handle,
        ):
            T.func_attr({"global_symbol": "attn_absorbed_simple", "tirx.noalias": True})
            n_tok, n_layers, n_rows = T.int64(), T.int64(), T.int64()
            n_kv, n_seq1 = T.int64(), T.int64()
            q = T.match_buffer(var_q, (n_tok, heads, dk), dtype)
            cache = T.match_buffer(var_cache, (n_layers, n_rows, dk), kv_dtype)
            q_indptr = T.match_buffer(var_q_indptr, (n_seq1,), "int32")
            kv_rows = T.match_buffer(var_kv_rows, (n_kv,), "int32")
            kv_indptr = T.match_buffer(var_kv_indptr, (n_seq1,), "int32")
            o = T.match_buffer(var_o, (n_tok, heads, dv), dtype)
            lse = T.match_buffer(var_lse, (n_tok, heads), "float32")

            for t, h in T.grid(n_tok, heads):
                with T.sblock("attn"):
                    vt, vh = T.axis.remap("SS", [t, h])
                    T.reads(q[vt, vh, :], cache[layer, :, :], kv_rows[:], q_indptr[:], kv_indptr[:])
                    T.writes(o[vt, vh, :], lse[vt, vh])
                    kv = (cache, kv_rows, layer)
                    body(q, _latent_at, kv, kv, o, lse, q_indptr, kv_indptr, n_seq1 - 1, vt, vh)

    else:

        @T.prim_func(s_tir=True)
        def kernel(
            var_q: T.handle,
            var_k: T.handle,
            var_v: T.handle,
            var_q_indptr: T.handle,
            var_kv_indptr: T.handle,
            var_o: T.handle,
            var_lse: T.handle,
        ):
            T.func_attr({"global_symbol": "attn_decompressed_simple", "tirx.noalias": True})
            n_tok, n_kv, n_seq1 = T.int64(), T.int64(), T.int64()
            q = T.match_buffer(var_q, (n_tok, heads, dk), dtype)
            k = T.match_buffer(var_k, (n_kv, heads, dk), dtype)
            v = T.match_buffer(var_v, (n_kv, heads, dv), dtype)
            q_indptr = T.match_buffer(var_q_indptr, (n_seq1,), "int32")
            kv_indptr = T.match_buffer(var_kv_indptr, (n_seq1,), "int32")
            o = T.match_buffer(var_o, (n_tok, heads, dv), dtype)
            lse = T.match_buffer(var_lse, (n_tok, heads), "float32")

            for t, h in T.grid(n_tok, heads):
                with T.sblock("attn"):
                    vt, vh = T.axis.remap("SS", [t, h])
                    T.reads(q[vt, vh, :], k[:, vh, :], v[:, vh, :], q_indptr[:], kv_indptr[:])
                    T.writes(o[vt, vh, :], lse[vt, vh])
                    body(q, _dense_at, k, v, o, lse, q_indptr, kv_indptr, n_seq1 - 1, vt, vh)

    sch = tvm.s_tir.Schedule(kernel)
    fused = sch.fuse(*sch.get_loops(sch.get_sblock("attn")))
    if is_gpu(target):
        bx, tx = sch.split(fused, [None, threads])
        sch.bind(bx, "blockIdx.x")
        sch.bind(tx, "threadIdx.x")
    else:
        sch.parallel(fused)
    return sch.mod["main"]
