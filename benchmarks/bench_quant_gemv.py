"""Decode GEMV on GGUF-quantized weights (schedules/quant_gemv.py) vs f16 GEMVs, V2-Lite shapes.

    python -m benchmarks.bench_quant_gemv --out $OUT/bench_quant_gemv.json \
        [--formats q4_k,q6_k,...] [--shapes q_proj,lm_head,...] [--tokens 1,8] [--reps 20]
    python -m benchmarks.bench_quant_gemv --out smoke.json --cpu-smoke   # the logic, on a CPU

Defaults: every format, the shapes of ``DEFAULT_SHAPES``, 1 token (each kernel is built here,
through nvcc: about 10 s for one token, up to a minute for 8).

For each format, V2-Lite decode shape (where K is a whole number of the format's blocks) and
token count: ``quant_gemv`` with its default config, our f16 GEMV (``schedules.gemm.gemm`` at
that token count: the tensor-core GEMV of ``gemv_mma``) and torch's f16 matmul on the same
(dequantized) weight. Times are GPU kernel times (CUPTI, ``timing.kernel_totals``: no launch
gaps), each call on another copy of the weight (>= 256 MB of copies), so weights come from DRAM
as in a decode step. GB/s counts the bytes each kernel's weight takes (quantized bytes for
``quant_gemv``, 2 per value for the f16 kernels); ``of_ceiling`` divides by a device-to-device
copy of 1 GiB timed the same way (bytes read + written). Each quantized result is checked
against ``x @ dequantize(W)^T`` (float32 on the GPU) before it is timed.

Needs torch with CUDA, TVM with its compiler and nvcc (kernels are built here).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
import torch
import tvm

if __name__ == "__main__":  # run from the checkout (maybe uninstalled): import its package
    from benchmarks import package_shim

    package_shim.use_checkout_package()

try:  # as benchmarks.bench_quant_gemv
    from benchmarks import timing
except ImportError:  # by file path, benchmarks/ on sys.path (tests/conftest.load_benchmark)
    import timing

# name -> (n, k): V2-Lite decode products by weight matrix (SiLU·up counted as its 2N rows)
SHAPES = {
    "q_proj": (3072, 2048),
    "kv_a": (576, 2048),
    "o_proj": (2048, 2048),
    "shared_gate_up": (5632, 2048),
    "shared_down": (2048, 2816),
    "mlp_gate_up": (21888, 2048),
    "mlp_down": (2048, 10944),
    "expert_down": (2048, 1408),
    "lm_head": (102400, 2048),
}
DEFAULT_SHAPES = ("q_proj", "kv_a", "o_proj", "expert_down", "mlp_down", "lm_head")
FORMATS = ("q4_0", "q5_0", "q8_0", "q4_k", "q5_k", "q6_k", "iq4_nl", "iq4_xs")
TOKENS = (1,)  # --tokens 1,8: 8-token kernels take nvcc 5-50 s each to build
TILE_ROWS = 256  # rows quantized once and tiled to the full weight (quantizing 100k rows is slow)
SMOKE = False  # --cpu-smoke: llvm kernels, small shapes, wall-clock times


def device() -> str:
    return "cpu" if SMOKE else "cuda"


def arch_of_device() -> str:
    return "cpu" if SMOKE else timing.device_arch()


def build(func, target):
    return timing.build_kernel(func, target)


def kernel_us(call, *, reps: int) -> float:
    """Microseconds per call: every GPU kernel the call launches (CUPTI), averaged over
    ``reps`` calls; the wall clock in a CPU smoke run."""
    if SMOKE:
        us = timing.loop_s(call, iters=reps, warmup=1, cuda=False) * 1e6
    else:
        total, _ = timing.kernel_totals([call], reps=reps)
        us = sum(total.values()) / reps
    if not us > 0:  # a time of 0 would divide the GB/s and speed-ups by zero
        raise RuntimeError(
            f"{us} us per call over {reps} calls: below the clock's resolution"
            + ("" if SMOKE else " (or no kernel recorded)")
        )
    return us


def timed_us(fn, x, weights, y, *, reps: int) -> float:
    """Microseconds per ``fn(x, w, y)``, each call on the next of the ``weights`` copies."""
    return kernel_us(timing.rotating(lambda i: fn(x, weights[i % len(weights)], y)), reps=reps)


def copy_ceiling_gbps(reps: int) -> float:
    """DRAM ceiling: GB/s of a 1 GiB device-to-device copy (bytes read + written)."""
    nbytes = 1 << (20 if SMOKE else 30)
    src = torch.empty(nbytes, dtype=torch.uint8, device=device())
    dst = torch.empty_like(src)
    us = kernel_us(lambda: dst.copy_(src), reps=max(3, reps // 4))
    return 2 * nbytes / us / 1e3


def weights(fmt: str, n: int, k: int, seed: int = 0):
    """(GGUF bytes [n, row_bytes] uint8, their values [n, k] float32): TILE_ROWS rows of
    N(0, 1/k) quantized, tiled to n rows."""
    from mla_compiler.model_export.quantize import dequantize, quantize

    rows = min(n, TILE_ROWS)
    w = np.random.default_rng(seed).standard_normal((rows, k)).astype(np.float32) / k**0.5
    q = quantize(w, fmt)
    wd = dequantize(q, fmt).reshape(rows, k)
    reps = -(-n // rows)
    return np.tile(q, (reps, 1))[:n], np.tile(wd, (reps, 1))[:n]


def aligned(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor where TVM takes it (64-byte aligned): CUDA allocations are; on the CPU
    (smoke run) a copy in TVM's memory, seen by torch through DLPack."""
    if not SMOKE:
        return tensor
    return torch.from_dlpack(tvm.runtime.tensor(tensor.numpy()))


def rotations(tensor: torch.Tensor) -> list[torch.Tensor]:
    """The tensor and clones of it: >= 256 MB in all (one copy in a CPU smoke run)."""
    copies = 1 if SMOKE else timing.copies_for(tensor.numel() * tensor.element_size())
    return [aligned(tensor)] + [tensor.clone() for _ in range(copies - 1)]


def bench_weight(fmt, shape, n, k, tokens, target, reps, f16_times):
    """Records of one format and shape, a token count each. The f16 GEMV and torch times
    depend on (n, k, tokens) only: ``f16_times`` keeps them for the next format."""
    from mla_compiler.schedules import gemm as G
    from mla_compiler.schedules import quant_gemv as QG

    dev, tv = device(), tvm.runtime.from_dlpack
    dt = torch.float32 if SMOKE else torch.float16
    tvm_dt = "float32" if SMOKE else "float16"
    wq_np, wd_np = weights(fmt, n, k)
    wq = rotations(torch.from_numpy(wq_np).to(dev))
    wq_t = [tv(w) for w in wq]
    w0 = torch.from_numpy(wd_np).to(dev, dt)
    for m in tokens:
        x = aligned(torch.randn(m, k, device=dev).to(dt))
        y = aligned(torch.full((m, n), float("nan"), device=dev, dtype=dt))
        x_t, y_t = tv(x), tv(y)
        ref = x.float() @ w0.float().T
        # CUDA: the schedule's config. The CPU kernel has none (quant_gemv builds it without
        # one), and default_config sizes for a GPU: on the CPU target it divides by zero.
        cfg = None if SMOKE else QG.default_config(fmt, n, k, target, m)
        t0 = time.time()
        func = QG.quant_gemv(m, n, k, target=target, weight_format=fmt, dtype=tvm_dt)
        lib = build(func, target)
        t_build = time.time() - t0
        lib(x_t, wq_t[0], y_t)
        if not SMOKE:
            torch.cuda.synchronize()
        err = float((y.float() - ref).abs().max())
        ok = bool(torch.isfinite(y).all()) and err <= 2e-3 * float(ref.abs().max())
        t_q = timed_us(lib, x_t, wq_t, y_t, reps=reps)
        if (n, k, m) not in f16_times:  # our f16 GEMV and torch on the f16 weight
            wf = rotations(w0)
            wf_t = [tv(w) for w in wf]
            f16 = build(G.gemm(m, n, k, dtype=tvm_dt, target=target), target)
            f16_times[n, k, m] = (
                timed_us(f16, x_t, wf_t, y_t, reps=reps),
                timed_us(lambda a, w, _: torch.matmul(a, w.T), x, wf, None, reps=reps),
            )
            del wf, wf_t
        t_f16, t_torch = f16_times[n, k, m]
        qbytes, fbytes = wq_np.nbytes, n * k * 2
        yield {
            "format": fmt,
            "shape": shape,
            "n": n,
            "k": k,
            "tokens": m,
            "config": None if cfg is None else str(cfg),
            "quant_us": t_q,
            "f16_gemv_us": t_f16,
            "torch_f16_us": t_torch,
            "quant_bytes": qbytes,
            "quant_gbps": qbytes / t_q / 1e3,
            "f16_gemv_gbps": fbytes / t_f16 / 1e3,
            "torch_f16_gbps": fbytes / t_torch / 1e3,
            "speedup_vs_f16_gemv": t_f16 / t_q,
            "speedup_vs_torch": t_torch / t_q,
            "max_abs_err": err,
            "ok": ok,
            "build_s": t_build,
        }


def cases(formats, shapes):
    """(format, shape, n, k) where K is a whole number of the format's blocks."""
    from mla_compiler.schedules.quant_formats import FORMATS as QF

    for shape in shapes:
        n, k = SHAPES[shape]
        n = min(n, 64) if SMOKE else n  # a few rows: the CPU kernels are plain loops
        for fmt in formats:
            if k % QF[fmt].block == 0:
                yield fmt, shape, n, k


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--formats", default=",".join(FORMATS))
    p.add_argument("--shapes", default=",".join(DEFAULT_SHAPES), help=f"of {', '.join(SHAPES)}")
    p.add_argument("--tokens", default=",".join(map(str, TOKENS)))
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--cpu-smoke", action="store_true", help="check the script on a CPU")
    a = p.parse_args(argv)
    global SMOKE
    SMOKE = a.cpu_smoke
    from mla_compiler.schedules.target import tvm_target

    target = tvm_target(arch_of_device())
    ceiling = copy_ceiling_gbps(a.reps)
    print(f"device copy ceiling: {ceiling:.1f} GB/s", file=sys.stderr)
    tokens = [int(t) for t in a.tokens.split(",")]
    results, f16_times, bad = [], {}, 0
    for fmt, shape, n, k in cases(a.formats.split(","), a.shapes.split(",")):
        try:
            for r in bench_weight(fmt, shape, n, k, tokens, target, a.reps, f16_times):
                r["of_ceiling"] = r["quant_gbps"] / ceiling
                bad += not r["ok"]
                results.append(r)
                print(
                    f"{fmt:7s} {shape:12s} T={r['tokens']} {r['quant_us']:8.1f} us "
                    f"{r['quant_gbps']:6.0f} GB/s ({r['of_ceiling']:.0%})  f16 GEMV "
                    f"{r['f16_gemv_us']:8.1f} us  torch {r['torch_f16_us']:8.1f} us  "
                    f"x{r['speedup_vs_f16_gemv']:.2f} vs f16  err {r['max_abs_err']:.2g}"
                    + ("" if r["ok"] else "  BAD"),
                    file=sys.stderr,
                )
        except Exception as err:  # keep going: one failing case must not hide the others
            msg = f"{type(err).__name__}: {err}"
            print(f"{fmt} {shape}: FAILED {msg}", file=sys.stderr)
            results.append({"format": fmt, "shape": shape, "tokens": None, "error": msg})
            bad += 1
    with open(a.out, "w") as f:
        json.dump(
            {
                "device": "cpu" if SMOKE else torch.cuda.get_device_name(),
                "target": arch_of_device(),
                "copy_ceiling_gbps": ceiling,
                "results": results,
            },
            f,
            indent=1,
        )
    print(
        "| format | shape | T | quant us | GB/s | of ceiling | f16 GEMV us | torch us | "
        "vs f16 GEMV | err |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        if "error" in r:
            print(f"| {r['format']} | {r['shape']} | {r['tokens']} | FAILED | | | | | | |")
            continue
        print(
            f"| {r['format']} | {r['shape']} | {r['tokens']} | {r['quant_us']:.1f} | "
            f"{r['quant_gbps']:.0f} | {r['of_ceiling']:.0%} | {r['f16_gemv_us']:.1f} | "
            f"{r['torch_f16_us']:.1f} | {r['speedup_vs_f16_gemv']:.2f} | {r['max_abs_err']:.2g} |"
        )
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
