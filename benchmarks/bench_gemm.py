"""Dense GEMM kernels (schedules/gemm.py) vs torch.matmul (cuBLAS) on DeepSeek-V2-Lite shapes.

    python -m benchmarks.bench_gemm --out $OUT/bench_gemm.json [--tokens 16,512,2048,4096]

Decode (T <= 8, the tensor-core GEMVs of ``schedules/gemv_mma.py``) is measured by
``benchmarks.sweep_gemv`` instead: CUPTI kernel times over rotating weight copies. Here a
call's time includes its launch, which dominates kernels of a few microseconds.

For each shape and token count: TVM time (best of the configs that fit, plus the default
config's time), cuBLAS time in the same run, TFLOP/s, ratio TVM/cuBLAS throughput, max error vs
cuBLAS. Needs torch with CUDA, TVM with its compiler, nvcc.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

try:  # as benchmarks.bench_gemm
    from benchmarks import timing
except ImportError:  # by file path, benchmarks/ on sys.path (bench_moe loaded by the tests)
    import timing

from mla_compiler.schedules import gemm as G
from mla_compiler.schedules.target import is_gpu, tvm_target

# name -> (output width N, K, epilogue); gate_up computes 2*10944 weight rows, 10944 outputs
SHAPES = {
    "q_proj": (3072, 2048, None),
    "kv_a": (576, 2048, None),
    "kv_b": (4096, 512, None),
    "o_proj": (2048, 2048, None),
    "o_proj+res": (2048, 2048, "residual"),
    "mlp_gate_up": (10944, 2048, "silu_mul"),
    "mlp_down": (2048, 10944, None),
    "lm_head": (102400, 2048, None),
    "shared_gate_up": (2816, 2048, "silu_mul"),  # 2 shared experts x 1408
    "shared_down+res": (2048, 2816, "residual"),
    "mlp_down+res": (2048, 10944, "residual"),
}
TOKENS = (16, 512, 2048, 4096)
SMOKE = False  # --cpu-smoke: run the script's logic on the CPU (llvm, fp32, wall-clock timing)


def device() -> str:
    return "cpu" if SMOKE else "cuda"


def torch_dtype():
    return torch.float32 if SMOKE else torch.float16


def tvm_dtype() -> str:
    return "float32" if SMOKE else "float16"


def timeit(fn, *, iters: int = 50, warmup: int = 5) -> float:
    """Seconds per call (``timing.loop_s``: CUDA events, or the wall clock in a CPU smoke run)."""
    return timing.loop_s(fn, iters=iters, warmup=warmup, cuda=not SMOKE)


def arch_of_device() -> str:
    return "cpu" if SMOKE else timing.device_arch()


def build(func, target):
    return timing.build_kernel(func, target)


def candidates(m, target, epilogue=None):
    """(label, config) pairs to try, the default first: for small static M every kept small-M
    tensor-core config and the FMA GEMV, else every kept tensor-core config."""
    if not is_gpu(target):
        return [("cpu", None)]
    arch = str(target.attrs["arch"])
    small = m <= G.GEMV_MAX_M
    default = G.default_config(target, m if small else None)
    table = G.SMALL_M_CONFIGS if small else G.CONFIGS
    cfgs = [default] + [c for c in table.get(arch, ()) if c != default and G.keep(c, target)]
    out = [(f"{c.block_m}x{c.block_n}x{c.block_k}s{c.stages}", c) for c in cfgs]
    if small:
        out.append(("gemv-fma", G.gemv_config(epilogue)))
    return out


def bench_shape(name, n, k, epilogue, tokens, target, libs):
    """All token counts of one shape (one weight)."""
    dev = device()
    rows = G.weight_layout(n, k, epilogue=epilogue)[0]
    w = torch.randn(rows, k, device=dev, dtype=torch_dtype()) / k**0.5
    w_kernel = torch.from_numpy(G.transform_weight(w.cpu().numpy(), epilogue=epilogue)).to(dev)
    return [bench_one(name, n, k, epilogue, m, w, w_kernel, target, libs) for m in tokens]


def bench_one(name, n, k, epilogue, m, w, w_kernel, target, libs):
    """TVM (best config) vs cuBLAS for M = m."""
    dev, rows = device(), w.shape[0]
    x = torch.randn(m, k, device=dev, dtype=torch_dtype())
    r = torch.randn(m, n, device=dev, dtype=torch_dtype()) if epilogue == "residual" else None
    y = torch.empty(m, n, device=dev, dtype=torch_dtype())
    args = (x, w_kernel, r, y) if r is not None else (x, w_kernel, y)

    def ref():
        h = torch.matmul(x, w.T)
        if epilogue == "silu_mul":
            h = torch.nn.functional.silu(h[:, :n]) * h[:, n:]
        if epilogue == "residual":
            h = h + r
        return h

    t_blas = timeit(lambda: torch.matmul(x, w.T))
    t_ref_full = timeit(ref)
    best, t_default, per_config = None, None, {}
    for label, cfg in candidates(m, target, epilogue):
        key = (name, m if m <= G.GEMV_MAX_M else None, label)
        if key not in libs:
            t0 = time.time()
            func = G.gemm(
                key[1], n, k, dtype=tvm_dtype(), target=target, config=cfg, epilogue=epilogue
            )
            libs[key] = build(func, target)
            print(f"  built {key} in {time.time() - t0:.1f}s", file=sys.stderr)
        lib = libs[key]
        t = timeit(lambda lib=lib: lib(*args))
        per_config[label] = t
        if best is None or t < best[1]:
            best = (label, t)
        t_default = t if t_default is None else t_default  # the first candidate is the default
    lib = libs[(name, m if m <= G.GEMV_MAX_M else None, best[0])]
    lib(*args)
    err = (y.float() - ref().float()).abs().max().item()
    flops = 2.0 * m * rows * k
    rec = {
        "shape": name,
        "tokens": m,
        "n": n,
        "k": k,
        "epilogue": epilogue,
        "config": best[0],
        "tvm_s": best[1],
        "tvm_default_s": t_default,
        "cublas_s": t_blas,
        "torch_with_epilogue_s": t_ref_full,
        "tvm_tflops": flops / best[1] / 1e12,
        "cublas_tflops": flops / t_blas / 1e12,
        "ratio_vs_cublas": t_blas / best[1],
        "weight_gbps": rows * k * 2 / best[1] / 1e9,
        "max_abs_err": err,
        "per_config_s": per_config,
    }
    print(
        f"{name:12s} T={m:5d} {best[0]:16s} tvm {best[1] * 1e6:9.1f}us "
        f"cublas {t_blas * 1e6:9.1f}us ratio {t_blas / best[1]:.2f} err {err:.3g}  "
        + " ".join(f"{lab}={v * 1e6:.1f}us" for lab, v in per_config.items()),
        file=sys.stderr,
    )
    return rec


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--tokens", default=",".join(map(str, TOKENS)))
    p.add_argument("--shapes", default=None, help="default: all")
    p.add_argument("--cpu-smoke", action="store_true", help="check the script on a CPU")
    a = p.parse_args(argv)
    a.shapes = a.shapes or ",".join(SHAPES)
    global SMOKE
    SMOKE = a.cpu_smoke
    target = tvm_target(arch_of_device())
    tokens = [int(t) for t in a.tokens.split(",")]
    results, libs = [], {}
    for name in a.shapes.split(","):
        n, k, ep = SHAPES[name]
        try:
            results += bench_shape(name, n, k, ep, tokens, target, libs)
        except Exception as err:  # keep going: one failing shape must not hide the others
            print(f"{name}: FAILED {type(err).__name__}: {err}", file=sys.stderr)
            results.append({"shape": name, "error": f"{type(err).__name__}: {err}"})
    with open(a.out, "w") as f:
        json.dump(
            {
                "device": "cpu" if SMOKE else torch.cuda.get_device_name(),
                "target": arch_of_device(),
                "results": results,
            },
            f,
            indent=1,
        )
    print(
        "| shape | T | config | TVM us | cuBLAS us | TVM TFLOP/s | cuBLAS TFLOP/s | ratio | err "
        "| weight GB/s | all configs us |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        if "error" in r:
            print(f"| {r['shape']} | - | FAILED: {r['error'][:60]} | | | | | | | | |")
            continue
        print(
            f"| {r['shape']} | {r['tokens']} | {r['config']} | {r['tvm_s'] * 1e6:.1f} | "
            f"{r['cublas_s'] * 1e6:.1f} | {r['tvm_tflops']:.1f} | {r['cublas_tflops']:.1f} | "
            f"{r['ratio_vs_cublas']:.2f} | {r['max_abs_err']:.2g} | {r['weight_gbps']:.0f} | "
            + " ".join(f"{k}={v * 1e6:.1f}" for k, v in r["per_config_s"].items())
            + " |"
        )


if __name__ == "__main__":
    main()
