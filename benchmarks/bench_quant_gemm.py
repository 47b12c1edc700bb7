"""Prompt-chunk GEMMs over GGUF-quantized weights vs our f16 kernels of the same run (issue 28:
"Prompt GEMMs / MoE at T = 2048: Q4_K >= 0.85x our f16 kernels of the same run"), V2-Lite shapes.

    python -m benchmarks.bench_quant_gemm --out $OUT/quant_gemm.json \
        [--formats q4_k,q8_0,...] [--shapes q_proj,moe_down,...] [--tokens 2048,512] [--reps 20]
        [--jobs 8] [--tuning-db DIR]
    python -m benchmarks.bench_quant_gemm --out smoke.json --cpu-smoke   # the logic, on a CPU

For each shape (where K is a whole number of the format's blocks; a skipped line otherwise),
format and token count T:

- dense products (``schedules.gemm.gemm``, symbolic M as in the model build): the quantized
  kernel (``weight_format``: GGUF bytes decoded in the mma.sync tile loads) and the f16 kernel
  the compiler picks (``kernel_configs.dense_gemm_config``: wgmma on sm_90a, else mma.sync);
  SiLU·up shapes take interleaved ``[gate; up]`` rows (whole block rows for the quantized one);
- routed experts (64 experts, top-6, random routing): the grouped GEMMs of ``schedules.moe``
  (``moe_gate_up`` / ``moe_down`` with ``weight_format``, gate_up blocks in [gate; up] order)
  and the f16 ones the compiler picks (``kernel_configs.moe_config``: ``gemm_wgmma.moe_grouped``
  on sm_90a, interleaved f16 gate_up), each on the rows ``moe_align`` grouped for its block_m.

Times are GPU kernel times (CUPTI, ``timing.kernel_totals``), ``ratio`` = f16 us / quant us
(>= 0.85: the issue's target). cuBLAS (``torch.matmul``, f16) is timed in the same run: on the
same weight for dense shapes, on a dense product of the same FLOPs for the experts
([T * top_k, K] x one expert's weight). TFLOP/s count 2 * rows * N_w * K (routed rows for the
experts); ``of_ceiling`` divides by ``ceilings.py``'s cuBLAS f16 8192^3 rate of this run.
Weights are not rotated (a prompt GEMM re-reads each weight tile T / block_m times anyway).

Numerics: every quantized output (poisoned with NaN first) is checked against a float32 matmul
over the dequantized weights (gguf-py's decoders): ``quant_max_rel_err`` = max |err| / max |ref|;
the f16 kernel runs on the same values rounded to f16 and is checked the same way. The weights
are ``BASE_ROWS`` (prime) rows of N(0, 1/K) quantized once and repeated, so experts and gate/up
halves still differ.

Kernels (symbolic M: one per shape and format) build in ``--jobs`` threads while earlier cases
run. Needs torch with CUDA, TVM with its compiler (the FULL device bundle).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import sys
import time

import numpy as np
import torch
import tvm

if __name__ == "__main__":  # run from the checkout (maybe uninstalled): import its package
    from benchmarks import package_shim

    package_shim.use_checkout_package()

try:  # as benchmarks.bench_quant_gemm
    from benchmarks import timing
except ImportError:  # by file path, benchmarks/ on sys.path (tests/conftest.load_benchmark)
    import timing

# name -> (n, k, epilogue): V2-Lite prompt products (silu_mul: n outputs from 2n weight rows)
DENSE = {
    "q_proj": (3072, 2048, None),
    "kv_a": (576, 2048, None),
    "o_proj": (2048, 2048, None),
    "mlp_gate_up": (10944, 2048, "silu_mul"),
    "mlp_down": (2048, 10944, None),
    "shared_gate_up": (2816, 2048, "silu_mul"),
    "shared_down": (2048, 2816, None),
}
MOE = {"moe_gate_up": "gate_up", "moe_down": "down"}  # grouped expert GEMMs
MOE_DIMS = (64, 6, 2048, 1408)  # experts, top-k, hidden, expert inter
SMOKE_DENSE = {
    "q_proj": (64, 256, None),
    "mlp_gate_up": (32, 256, "silu_mul"),
    "mlp_down": (64, 288, None),  # K = 288: no 256-value blocks (skipped for q4_k, q6_k)
}
SMOKE_MOE_DIMS = (8, 2, 256, 64)
FORMATS = ("q4_k", "q5_0", "q8_0", "q6_k", "iq4_nl", "q4_0")
TOKENS = (2048, 512)
SMOKE_TOKENS = (37,)
TARGET_RATIO = 0.85  # issue 28: quantized >= 0.85x our f16 kernels
BASE_ROWS = 251  # rows quantized once, repeated (prime: gate/up halves and experts differ)
SMOKE = False  # --cpu-smoke: llvm kernels, float32, small shapes, wall-clock times


def device() -> str:
    return "cpu" if SMOKE else "cuda"


def torch_dtype():
    return torch.float32 if SMOKE else torch.float16


def tvm_dtype() -> str:
    return "float32" if SMOKE else "float16"


def tolerance() -> float:
    """Max |err| / max |ref|: f16 operands and output on the GPU, float32 on the CPU."""
    return 1e-4 if SMOKE else 5e-3


def moe_dims() -> tuple[int, int, int, int]:
    return SMOKE_MOE_DIMS if SMOKE else MOE_DIMS


def dense_shapes() -> dict:
    return SMOKE_DENSE if SMOKE else DENSE


def kernel_us(call, *, reps: int) -> float:
    """Microseconds per call: the GPU kernels the call launches (CUPTI), averaged over ``reps``
    calls; the wall clock in a CPU smoke run."""
    if SMOKE:
        us = timing.loop_s(call, iters=reps, warmup=1, cuda=False) * 1e6
    else:
        total, _ = timing.kernel_totals([call], reps=reps)
        us = sum(total.values()) / reps
    if not us > 0:
        raise RuntimeError(f"{us} us per call over {reps} calls: no kernel time recorded")
    return us


def aligned(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor where TVM takes it (64-byte aligned): CUDA allocations are; on the CPU a copy
    in TVM's memory, seen by torch through DLPack."""
    if not SMOKE:
        return tensor.contiguous()
    return torch.from_dlpack(tvm.runtime.tensor(np.ascontiguousarray(tensor.numpy())))


def poisoned(shape) -> torch.Tensor:
    return aligned(torch.full(shape, float("nan"), device=device(), dtype=torch_dtype()))


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    """max |got - ref| / max |ref| (inf where got is not finite), after the kernels finished."""
    if not SMOKE:
        torch.cuda.synchronize()
    got = got.float()
    if not bool(torch.isfinite(got).all()):
        return float("inf")
    return float((got - ref).abs().max() / ref.abs().max())


def weight_pair(fmt: str, rows: int, k: int, seed: int):
    """(GGUF bytes [rows, row_bytes] uint8, their values [rows, k] float32) on the device:
    ``BASE_ROWS`` rows of N(0, 1/k) quantized, row r being base row r % BASE_ROWS."""
    from mla_compiler.model_export.quantize import dequantize, quantize

    base = min(rows, BASE_ROWS)
    w = np.random.default_rng(seed).standard_normal((base, k)).astype(np.float32) / k**0.5
    q = quantize(w, fmt)
    wd = dequantize(q, fmt).reshape(base, k)
    idx = torch.arange(rows, device=device()) % base
    q_t = torch.from_numpy(np.ascontiguousarray(q)).to(device())[idx]
    return aligned(q_t), torch.from_numpy(wd).to(device())[idx]


class Kernels:
    """Kernels built in a thread pool (TVM's FFI releases the GIL: NVRTC / nvcc jobs overlap),
    each once per key; ``get`` waits for one."""

    def __init__(self, target, jobs: int):
        self.target, self.build_s = target, {}
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=max(1, jobs))
        self.futures: dict = {}

    def submit(self, key, make) -> None:
        if key not in self.futures:
            self.futures[key] = self.pool.submit(self._build, key, make)

    def _build(self, key, make):
        t0 = time.time()
        lib = timing.build_kernel(make(), self.target)
        self.build_s[key] = time.time() - t0
        return lib

    def get(self, key):
        return self.futures[key].result()


def wgmma_label(cfg) -> str:
    return f"wgmma-{cfg.block_m}x{cfg.block_n}x{cfg.block_k}s{cfg.stages}"


def mma_label(cfg) -> str:
    return f"mma-{cfg.block_m}x{cfg.block_n}x{cfg.block_k}s{cfg.stages}"


def f16_dense_config(choice, target, n, k, epilogue):
    """(config, label) of the f16 dense kernel the compiler builds for a prompt chunk."""
    from mla_compiler import kernel_configs
    from mla_compiler.schedules import gemm as G
    from mla_compiler.schedules.target import is_gpu

    if not is_gpu(target):
        return None, "cpu"
    wg = kernel_configs.dense_gemm_config(
        choice, None, n, k, target=target, epilogue=epilogue, out_dtype=None
    )
    return wg, wgmma_label(wg) if wg is not None else mma_label(G.default_config(target))


def f16_moe_config(choice, target):
    """(wgmma config or None, label, block_m) of the f16 grouped GEMMs the compiler builds."""
    from mla_compiler import kernel_configs
    from mla_compiler.schedules import moe as M
    from mla_compiler.schedules.target import is_gpu

    e, k, d, i = moe_dims()
    cfg = M.default_config(target)
    wg = None
    if is_gpu(target):
        wg = kernel_configs.moe_config(choice, target, num_experts=e, top_k=k, hidden=d, inter=i)
    if wg is not None:
        return wg, wgmma_label(wg), wg.block_m
    return None, mma_label(cfg) if is_gpu(target) else "cpu", cfg.block_m


def plan(kernels: Kernels, cases, choice) -> None:
    """Submit every case's kernels, in case order (the first cases' kernels come first)."""
    from mla_compiler.schedules import gemm as G
    from mla_compiler.schedules import gemm_wgmma as W
    from mla_compiler.schedules import moe as M

    target, dt = kernels.target, tvm_dtype()
    e, top_k, d, inter = moe_dims()
    moe_kw = dict(num_experts=e, top_k=top_k, dtype=dt, target=target)
    for shape, fmt in cases:
        if shape in MOE:
            kind = MOE[shape]
            grouped = M.moe_gate_up if kind == "gate_up" else M.moe_down
            wg, _, bm = f16_moe_config(choice, target)
            bm_q = M.default_config(target).block_m
            for b in {bm, bm_q}:
                kernels.submit(
                    ("align", b), lambda b=b: M.moe_align(e, top_k, block_m=b, target=target)
                )

            def make(kind=kind, wg=wg, grouped=grouped):  # f16: wgmma where the compiler picks it
                if wg is not None:
                    return W.moe_grouped(kind, d, inter, config=wg, **moe_kw)
                return grouped(d, inter, **moe_kw)

            kernels.submit((shape, None), make)
            kernels.submit(
                (shape, fmt), lambda g=grouped, f=fmt: g(d, inter, **moe_kw, weight_format=f)
            )
            continue
        n, k, ep = dense_shapes()[shape]
        cfg, _ = f16_dense_config(choice, target, n, k, ep)
        kw = dict(dtype=dt, target=target, epilogue=ep)
        kernels.submit(
            (shape, None), lambda n=n, k=k, c=cfg, kw=kw: G.gemm(None, n, k, config=c, **kw)
        )
        kernels.submit(
            (shape, fmt), lambda n=n, k=k, f=fmt, kw=kw: G.gemm(None, n, k, weight_format=f, **kw)
        )


def record(shape, fmt, m, *, n, k, epilogue, flops, times, errs, label, quant_bytes) -> dict:
    t_q, t_f, t_b = times
    return {
        "shape": shape,
        "format": fmt,
        "tokens": m,
        "n": n,
        "k": k,
        "epilogue": epilogue,
        "f16_kernel": label,
        "quant_us": t_q,
        "f16_us": t_f,
        "cublas_us": t_b,
        "ratio": t_f / t_q,  # f16 time / quantized time: >= TARGET_RATIO meets the target
        "meets_target": t_f / t_q >= TARGET_RATIO,
        "quant_tflops": flops / t_q / 1e6,
        "f16_tflops": flops / t_f / 1e6,
        "cublas_tflops": flops / t_b / 1e6,
        "quant_vs_cublas": t_b / t_q,
        "quant_bytes": quant_bytes,
        "quant_max_rel_err": errs[0],
        "f16_max_rel_err": errs[1],
        "ok": errs[0] <= tolerance() and errs[1] <= tolerance(),
    }


def dense_records(shape, fmt, tokens, kernels, label, *, reps, seed):
    """Records of one dense shape and format, a token count each."""
    from mla_compiler.schedules import gemm as G

    n, k, ep = dense_shapes()[shape]
    nw = G.weight_layout(n, k, epilogue=ep)[0]
    wq, wd = weight_pair(fmt, nw, k, seed)  # [gate; up] rows for silu_mul
    w16 = wd.to(torch_dtype())
    wq_k, w16_k = wq, aligned(w16)
    if ep == "silu_mul":  # the kernels take gate/up interleaved (whole block rows move)
        order = torch.from_numpy(G.swiglu_row_order(n)).to(device())
        wq_k, w16_k = aligned(wq[order]), aligned(w16[order])
    lib_q, lib_f = kernels.get((shape, fmt)), kernels.get((shape, None))
    tv = tvm.runtime.from_dlpack
    gen = torch.Generator().manual_seed(seed)
    for m in tokens:
        x = aligned(torch.randn(m, k, generator=gen).to(device(), torch_dtype()))
        h = x.float() @ wd.T
        ref = torch.nn.functional.silu(h[:, :n]) * h[:, n:] if ep == "silu_mul" else h
        yq, yf = poisoned((m, n)), poisoned((m, n))
        args_q, args_f = (tv(x), tv(wq_k), tv(yq)), (tv(x), tv(w16_k), tv(yf))
        lib_q(*args_q)
        lib_f(*args_f)
        errs = (rel_err(yq, ref), rel_err(yf, ref))
        times = (
            kernel_us(lambda a=args_q: lib_q(*a), reps=reps),
            kernel_us(lambda a=args_f: lib_f(*a), reps=reps),
            kernel_us(lambda x=x: torch.matmul(x, w16.T), reps=reps),
        )
        yield record(
            shape, fmt, m, n=n, k=k, epilogue=ep, flops=2.0 * m * nw * k, times=times,
            errs=errs, label=label, quant_bytes=wq.numel(),
        )  # fmt: skip


def align(lib, ids, block_m: int):
    """(sorted_rows, block_expert) of ``moe_align`` for ``ids`` [T, top_k] int32."""
    from mla_compiler.schedules import moe as M

    e, top_k, _, _ = moe_dims()
    t = ids.shape[0]
    nb = M.num_row_blocks(t, top_k=top_k, num_experts=e, block_m=block_m)
    i32 = dict(device=device(), dtype=torch.int32)
    outs = [
        aligned(torch.full(shape, -7, **i32))
        for shape in (
            (nb * block_m,),
            (nb,),
            (t * top_k,),
            (e + 1,),
            ((t + M.CHUNK - 1) // M.CHUNK, e),
        )
    ]
    lib(*(tvm.runtime.from_dlpack(v) for v in (ids, *outs)))
    if not SMOKE:  # torch reads them next (TVM's stream)
        torch.cuda.synchronize()
    return outs[0], outs[1]


def moe_reference(kind, a, sorted_rows, block_expert, block_m, wd, wts):
    """(routed rows, float32 reference of them): gate_up rows silu(x Wg^T) * (x Wu^T) of their
    token, down rows the routing weight times h W^T, each with its block's expert."""
    top_k, inter = wts.shape[1], wd.shape[1] // 2
    rows = torch.nonzero(sorted_rows >= 0).flatten()
    src = sorted_rows[rows].long()  # token * top_k + slot
    expert = block_expert[rows // block_m].long()
    lhs = a[src // top_k] if kind == "gate_up" else a[rows]
    ref = torch.empty(len(rows), inter if kind == "gate_up" else wd.shape[1], device=a.device)
    for ex in torch.unique(expert).tolist():
        sel = expert == ex
        h = lhs[sel].float() @ wd[ex].T
        if kind == "gate_up":
            ref[sel] = torch.nn.functional.silu(h[:, :inter]) * h[:, inter:]
        else:
            ref[sel] = h * wts.reshape(-1)[src[sel]][:, None]
    return rows, ref


def moe_records(shape, fmt, tokens, kernels, f16_moe, *, reps, seed):
    """Records of one grouped expert GEMM and format, a token count each."""
    from mla_compiler.schedules import gemm as G
    from mla_compiler.schedules import moe as M

    e, top_k, d, inter = moe_dims()
    kind = MOE[shape]
    rows, kin = (2 * inter, d) if kind == "gate_up" else (d, inter)
    nout = inter if kind == "gate_up" else d
    wq, wd = weight_pair(fmt, e * rows, kin, seed)
    wq, wd = aligned(wq.reshape(e, rows, -1)), wd.reshape(e, rows, kin)
    w16 = wd.to(torch_dtype())  # quantized gate_up stays [gate; up], f16 is interleaved
    order = torch.from_numpy(G.swiglu_row_order(inter)).to(device())
    w16_k = aligned(w16[:, order] if kind == "gate_up" else w16)
    _, label, bm_f = f16_moe
    bm_q = M.default_config(kernels.target).block_m
    tv, dev, dt = tvm.runtime.from_dlpack, device(), torch_dtype()
    gen = torch.Generator().manual_seed(seed)
    for m in tokens:
        ids = aligned(torch.rand(m, e, generator=gen).argsort(dim=1)[:, :top_k].int().to(dev))
        wts = aligned((torch.rand(m, top_k, generator=gen) + 0.1).to(dev))
        x = torch.randn(m, d, generator=gen).to(dev, dt)  # gate_up: token rows
        h_slot = torch.randn(m * top_k, inter, generator=gen).to(dev, dt)  # down: routed rows
        errs, times = [], []
        for fmt_k, bm, w in ((fmt, bm_q, wq), (None, bm_f, w16_k)):
            lib = kernels.get((shape, fmt_k))
            sr, be = align(kernels.get(("align", bm)), ids, bm)
            if kind == "gate_up":
                a = aligned(x)
            else:  # the gate_up output rows moe_align grouped: routed rows, padding 0
                a = torch.zeros(sr.shape[0], inter, device=dev, dtype=dt)
                a[sr >= 0] = h_slot[sr[sr >= 0].long()]
                a = aligned(a)
            y = poisoned((sr.shape[0], nout))
            args = [tv(a), tv(sr), tv(be), tv(w)] + ([] if kind == "gate_up" else [tv(wts)])
            args.append(tv(y))
            lib(*args)
            routed, ref = moe_reference(kind, a, sr, be, bm, wd, wts)
            errs.append(rel_err(y[routed], ref))
            times.append(kernel_us(lambda lib=lib, args=args: lib(*args), reps=reps))
        dense = torch.randn(m * top_k, kin, generator=gen).to(dev, dt)  # cuBLAS: same FLOPs
        times.append(kernel_us(lambda b=dense: torch.matmul(b, w16[0].T), reps=reps))
        yield record(
            shape, fmt, m, n=rows, k=kin, epilogue="silu_mul" if kind == "gate_up" else None,
            flops=2.0 * m * top_k * rows * kin, times=times, errs=errs, label=label,
            quant_bytes=wq.numel(),
        )  # fmt: skip


def cases(shapes, formats):
    """(shape, format, why skipped or None) of every shape and format asked for."""
    from mla_compiler.schedules.quant_formats import FORMATS as QF

    _, _, d, inter = moe_dims()
    for shape in shapes:
        k = {"moe_gate_up": d, "moe_down": inter}.get(shape) or dense_shapes()[shape][1]
        for fmt in formats:
            block = QF[fmt].block
            skip = f"K = {k} is no multiple of {fmt}'s {block}-value blocks" if k % block else None
            yield shape, fmt, skip


def matmul_ceiling() -> dict:
    """The GPU's measured f16 GEMM ceiling (``ceilings.measure``: cuBLAS 8192^3, with its DRAM
    copy / read rates) in this run; a float32 256^3 matmul in a CPU smoke run."""
    if SMOKE:
        a = torch.randn(256, 256)
        s = timing.loop_s(lambda: a @ a, iters=5, warmup=1, cuda=False)
        return {"gemm_f16_tflops": 2 * 256**3 / s / 1e12, "note": "CPU float32 256^3 (smoke)"}
    try:  # as benchmarks.bench_quant_gemm
        from benchmarks import ceilings
    except ImportError:  # by file path
        import ceilings
    return ceilings.measure()


def summary_line(r: dict) -> str:
    return (
        f"{r['shape']:14s} {r['format']:7s} T={r['tokens']:<5d} quant {r['quant_us']:9.1f} us "
        f"{r['quant_tflops']:6.1f} TFLOP/s  f16 {r['f16_us']:9.1f} us  cuBLAS "
        f"{r['cublas_us']:9.1f} us  ratio {r['ratio']:.2f}"
        + ("" if r["meets_target"] else " (< 0.85)")
        + f"  err {r['quant_max_rel_err']:.2g}/{r['f16_max_rel_err']:.2g}"
        + ("" if r["ok"] else "  BAD")
    )


def print_table(results, ceiling: dict) -> None:
    tflops = ceiling.get("gemm_f16_tflops")
    if tflops:
        print(f"f16 GEMM ceiling (ceilings.py, this run): {tflops:.3g} TFLOP/s")
    print(
        "| shape | format | T | f16 kernel | quant us | f16 us | cuBLAS us | f16/quant | "
        "quant TFLOP/s | f16 TFLOP/s | cuBLAS TFLOP/s | of ceiling | rel err quant / f16 |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        if "skipped" in r or "error" in r:
            what = f"skipped: {r['skipped']}" if "skipped" in r else f"FAILED: {r['error']}"
            print(f"| {r['shape']} | {r['format']} | | {what} | | | | | | | | | |")
            continue
        of = r.get("of_ceiling")
        print(
            f"| {r['shape']} | {r['format']} | {r['tokens']} | {r['f16_kernel']} | "
            f"{r['quant_us']:.1f} | {r['f16_us']:.1f} | {r['cublas_us']:.1f} | "
            f"{r['ratio']:.2f}{'' if r['meets_target'] else ' (miss)'} | {r['quant_tflops']:.1f} | "
            f"{r['f16_tflops']:.1f} | {r['cublas_tflops']:.1f} | "
            f"{'' if of is None else f'{of:.0%}'} | {r['quant_max_rel_err']:.2g} / "
            f"{r['f16_max_rel_err']:.2g} |"
        )
    timed = [r for r in results if "ratio" in r]
    met = sum(r["meets_target"] for r in timed)
    print(f"{met} of {len(timed)} timed cases at f16/quant >= {TARGET_RATIO}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--formats", default=",".join(FORMATS))
    p.add_argument("--shapes", default=None, help=f"default all: {', '.join([*DENSE, *MOE])}")
    p.add_argument("--tokens", default=None, help="default 2048,512 (smoke: 37)")
    p.add_argument("--reps", type=int, default=None, help="timed calls (default 20; smoke 2)")
    p.add_argument("--jobs", type=int, default=min(8, os.cpu_count() or 1), help="build threads")
    p.add_argument("--tuning-db", default=None, help="f16 configs as the compiler picks with it")
    p.add_argument("--cpu-smoke", action="store_true", help="check the script on a CPU")
    a = p.parse_args(argv)
    global SMOKE
    SMOKE = a.cpu_smoke
    from mla_compiler.kernel_configs import KernelChoice
    from mla_compiler.schedules.target import tvm_target

    arch = "cpu" if SMOKE else timing.device_arch()
    target, choice = tvm_target(arch), KernelChoice(db=a.tuning_db)
    shapes = a.shapes.split(",") if a.shapes else [*dense_shapes(), *MOE]
    unknown = [s for s in shapes if s not in dense_shapes() and s not in MOE]
    if unknown:
        p.error(f"unknown shapes {unknown}: use {', '.join([*dense_shapes(), *MOE])}")
    tokens = [
        int(t)
        for t in (a.tokens or ",".join(map(str, SMOKE_TOKENS if SMOKE else TOKENS))).split(",")
    ]
    reps = a.reps or (2 if SMOKE else 20)
    all_cases = list(cases(shapes, a.formats.split(",")))
    if not SMOKE:  # the tensor-core intrinsics (~30 s): once here, not by build threads at once
        try:
            import tvm.s_tir.tensor_intrin  # noqa: F401
        except ImportError:
            pass
    kernels = Kernels(target, a.jobs)
    plan(kernels, [(s, f) for s, f, skip in all_cases if skip is None], choice)
    try:
        ceiling = matmul_ceiling()
    except Exception as err:  # noqa: BLE001  (the table goes on without a denominator)
        ceiling = {"error": f"{type(err).__name__}: {err}"}
    print(f"ceiling: {json.dumps(ceiling)}", file=sys.stderr)
    f16_moe = f16_moe_config(choice, target)
    results, bad = [], 0
    for shape, fmt, skip in all_cases:
        if skip is not None:
            print(f"{shape:14s} {fmt:7s} skipped: {skip}", file=sys.stderr)
            results.append({"shape": shape, "format": fmt, "skipped": skip})
            continue
        seed = shapes.index(shape)
        try:
            if shape in MOE:
                recs = moe_records(shape, fmt, tokens, kernels, f16_moe, reps=reps, seed=seed)
            else:
                label = f16_dense_config(choice, target, *dense_shapes()[shape])[1]
                recs = dense_records(shape, fmt, tokens, kernels, label, reps=reps, seed=seed)
            for r in recs:
                r["quant_build_s"] = kernels.build_s.get((shape, fmt))
                tflops = ceiling.get("gemm_f16_tflops")
                r["of_ceiling"] = r["quant_tflops"] / tflops if tflops else None
                bad += not r["ok"]
                results.append(r)
                print(summary_line(r), file=sys.stderr)
        except Exception as err:  # noqa: BLE001  (one failing case must not hide the others)
            msg = f"{type(err).__name__}: {err}"
            print(f"{shape} {fmt}: FAILED {msg}", file=sys.stderr)
            results.append({"shape": shape, "format": fmt, "error": msg})
            bad += 1
    kernels.pool.shutdown()
    with open(a.out, "w") as f:
        json.dump(
            {
                "device": "cpu" if SMOKE else torch.cuda.get_device_name(),
                "target": arch,
                "target_ratio": TARGET_RATIO,
                "ceiling": ceiling,
                "f16_moe_kernel": f16_moe[1],
                "tokens": tokens,
                "results": results,
            },
            f,
            indent=1,
        )
    print_table(results, ceiling)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
