"""Routed-expert MoE kernels (schedules/moe.py) vs a PyTorch MoE (tokens sorted by expert, one
matmul per expert) on the DeepSeek-V2-Lite layer: 64 experts, top-6, hidden 2048, inter 1408.

    python -m benchmarks.bench_moe --out $OUT/bench_moe.json [--tokens 1,16,512,2048]
    python -m benchmarks.bench_moe --out $OUT/moe_sweep.json --sweep [--tokens 512,2048]

Two paths: ``grouped`` (route, align, grouped gate_up / down GEMMs, combine: the prefill path,
with the tiles the model build uses: wgmma on sm_90a)
and, for T <= moe_gemv.GEMV_MAX_TOKENS, ``gemv`` (route, per-(token, slot) expert GEMVs with the
combine folded into down: the decode path). For each: the wall time of the Python launch loop
(``wall_us``: includes host launch cost, ~5-20 us per kernel), the GPU time (``gpu_us``: sum of
the kernels' CUPTI times via torch.profiler) with its per-kernel split, TFLOP/s and GB/s on the
GPU time, and the max error vs the float64 reference (T <= 64) or the PyTorch MoE.

``--sweep``: the grouped path with every config of ``moe.CANDIDATES[arch]`` (prefill tiles).
"""

from __future__ import annotations

import argparse
import collections
import json
import sys

import torch

try:  # as benchmarks.bench_moe
    from benchmarks import bench_gemm as BG
    from benchmarks import timing
except ImportError:  # by file path, benchmarks/ on sys.path (tests/conftest.load_benchmark)
    import bench_gemm as BG
    import timing

from mla_compiler import reference
from mla_compiler.schedules import gemm as G
from mla_compiler.schedules import gemm_wgmma as W
from mla_compiler.schedules import moe as M
from mla_compiler.schedules import moe_gemv as MG
from mla_compiler.schedules.target import tvm_target

E, K, D, INTER = 64, 6, 2048, 1408  # V2-Lite: greedy softmax routing, no norm, scale 1


def torch_moe(x, logits, gate_up, down):
    """Sorted-token PyTorch MoE: softmax top-k, argsort by expert, one matmul per expert."""
    w, ids = torch.topk(torch.softmax(logits, dim=-1), K, dim=-1)
    flat = ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=E).tolist()  # host sync, as eager MoEs do
    tok = order // K
    xs = x[tok]
    out = torch.zeros(x.shape[0], D, device=x.device, dtype=torch.float32)
    start = 0
    for e, c in enumerate(counts):
        if c:
            h = xs[start : start + c] @ gate_up[e].T
            h = torch.nn.functional.silu(h[:, :INTER]) * h[:, INTER:]
            y = (h @ down[e].T).float() * w.reshape(-1)[order[start : start + c], None]
            out.index_add_(0, tok[start : start + c], y)
            start += c
    return out.to(x.dtype)


def gpu_time(fn, *, iters: int = 20) -> tuple[float, dict[str, float]]:
    """(GPU seconds per call, {kernel: seconds per call}) from CUPTI (``timing.kernel_totals``;
    the wall clock in a CPU smoke run)."""
    if BG.SMOKE:
        return timing.loop_s(fn, iters=iters, warmup=0, cuda=False), {}
    total, _ = timing.kernel_totals([fn], reps=iters)
    per = collections.Counter()
    for name, us in total.items():
        per[name.split("(")[0][:60]] += us * 1e-6 / iters
    return sum(per.values()), dict(per)


def grouped_configs(target, arch, *, sweep: bool):
    """The prefill path's tiles, as the model build picks them (``LowerMoE``): the wgmma grouped
    GEMMs where ``gemm_wgmma.moe_config`` applies (sm_90a), else ``moe.default_config``;
    ``sweep``: every mma.sync candidate of ``moe.CANDIDATES[arch]`` too."""
    wg = None if BG.SMOKE else W.moe_config(target, hidden=D, inter=INTER)
    configs = [wg] if wg is not None else [M.default_config(target)]
    if sweep and not BG.SMOKE:
        configs += [c for c in M.CANDIDATES.get(arch, ()) if G.keep(c, target)]
    return configs


def grouped_label(cfg) -> str:
    if isinstance(cfg, W.WgmmaConfig):
        return f"wgmma-{cfg.block_m}x{cfg.block_n}x{cfg.block_k}s{cfg.stages}"
    return f"{cfg.block_m}x{cfg.block_n}x{cfg.block_k}s{cfg.stages}w{cfg.threads // 32}"


def dense_ceiling_tflops() -> float:
    """cuBLAS (torch.matmul) f16 TFLOP/s at 4096^3, this GPU, this run."""
    n = 512 if BG.SMOKE else 4096
    a = torch.randn(n, n, device=BG.device(), dtype=BG.torch_dtype())
    return 2 * n**3 / BG.timeit(lambda: torch.matmul(a, a), iters=20) / 1e12


def build_grouped(target, cfg, dt):
    kw = dict(num_experts=E, top_k=K, dtype=dt, target=target, config=cfg)
    wgmma = isinstance(cfg, W.WgmmaConfig)
    gate_up = W.moe_grouped("gate_up", D, INTER, **kw) if wgmma else M.moe_gate_up(D, INTER, **kw)
    down = W.moe_grouped("down", D, INTER, **kw) if wgmma else M.moe_down(D, INTER, **kw)
    return {
        "route": BG.build(M.moe_route(M.RouteSpec(num_experts=E, top_k=K), target=target), target),
        "align": BG.build(M.moe_align(E, K, block_m=cfg.block_m, target=target), target),
        "gate_up": BG.build(gate_up, target),
        "down": BG.build(down, target),
        "combine": BG.build(M.moe_combine(D, top_k=K, dtype=dt, target=target), target),
    }


def build_gemv(target, dt, route, *, fma: bool = False):
    """The decode GEMVs: tensor-core (default) or the FMA configs (``fma``)."""
    kw = dict(num_experts=E, top_k=K, dtype=dt, target=target)
    gu, dn = (MG.GEMV_GATE_UP, MG.GEMV_DOWN) if fma else (None, None)
    return {
        "route": route,
        "gate_up": BG.build(MG.moe_gate_up_gemv(D, INTER, **kw, config=gu), target),
        "down": BG.build(MG.moe_down_gemv(D, INTER, **kw, config=dn), target),
    }


def steps_grouped(t, libs, bm, x, logits, gate_up_k, down):
    dev, dt = BG.device(), BG.torch_dtype()
    nb = M.num_row_blocks(t, top_k=K, num_experts=E, block_m=bm)
    i32 = dict(device=dev, dtype=torch.int32)
    wts, ids = torch.empty(t, K, device=dev, dtype=torch.float32), torch.empty(t, K, **i32)
    rows, blocks = torch.empty(nb * bm, **i32), torch.empty(nb, **i32)
    row_of, offs = torch.empty(t * K, **i32), torch.empty(E + 1, **i32)
    ws = torch.empty((t + M.CHUNK - 1) // M.CHUNK, E, **i32)
    h = torch.empty(nb * bm, INTER, device=dev, dtype=dt)
    y = torch.empty(nb * bm, D, device=dev, dtype=dt)
    out = torch.full((t, D), float("nan"), device=dev, dtype=dt)
    steps = {
        "route": lambda: libs["route"](logits, wts, ids),
        "align": lambda: libs["align"](ids, rows, blocks, row_of, offs, ws),
        "gate_up": lambda: libs["gate_up"](x, rows, blocks, gate_up_k, h),
        "down": lambda: libs["down"](h, rows, blocks, down, wts, y),
        "combine": lambda: libs["combine"](y, row_of, out),
    }
    return steps, out, ids


def steps_gemv(t, libs, x, logits, gate_up_k, down):
    dev, dt = BG.device(), BG.torch_dtype()
    wts = torch.empty(t, K, device=dev, dtype=torch.float32)
    ids = torch.empty(t, K, device=dev, dtype=torch.int32)
    h = torch.empty(t * K, INTER, device=dev, dtype=dt)
    out = torch.full((t, D), float("nan"), device=dev, dtype=dt)
    steps = {
        "route": lambda: libs["route"](logits, wts, ids),
        "gate_up": lambda: libs["gate_up"](x, ids, gate_up_k, h),
        "down": lambda: libs["down"](h, ids, down, wts, out),
    }
    return steps, out, ids


def measure(path, t, steps, out, ids, ref, label):
    def run_all():
        for fn in steps.values():
            fn()

    run_all()
    err = (out.cpu().double() - ref).abs().max().item()
    kernel_gpu = {name: gpu_time(fn)[0] for name, fn in steps.items()}
    gpu, per_kernel = gpu_time(run_all)
    wall = BG.timeit(run_all, iters=20)
    used = len(torch.unique(ids))
    flops = 2.0 * t * K * (D * 2 * INTER + INTER * D)
    nbytes = used * 3 * INTER * D * 2 + t * D * 2 * 2
    rec = {
        "tokens": t,
        "path": path,
        "config": label,
        "gpu_us": gpu * 1e6,
        "wall_us": wall * 1e6,
        "step_gpu_us": {k: v * 1e6 for k, v in kernel_gpu.items()},
        "kernel_gpu_us": {k: v * 1e6 for k, v in per_kernel.items()},
        "tflops": flops / gpu / 1e12,
        "gbps": nbytes / gpu / 1e9,
        "experts_used": used,
        "max_abs_err": err,
        "ok": bool(err < (0.05 if not BG.SMOKE else 1e-3)),
    }
    print(json.dumps(rec), file=sys.stderr)
    return rec


def inputs(t, gate_up):
    dev, dt = BG.device(), BG.torch_dtype()
    gen = torch.Generator().manual_seed(t)
    x = torch.randn(t, D, generator=gen).to(dev, dt)
    logits = torch.randn(t, E, generator=gen).to(dev)
    return x, logits


def reference_out(t, x, logits, gate_up, down):
    if t <= 64:  # the float64 reference loops over tokens: only for small T
        w, ids = reference.moe_route_lowest_index(logits.cpu(), top_k=K)
        return reference.moe_experts(x.cpu(), w, ids, gate_up.cpu(), down.cpu())
    return torch_moe(x, logits, gate_up, down).cpu().double()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--tokens", default=None, help="default 1,16,512,2048 (sweep: 512,2048)")
    p.add_argument("--sweep", action="store_true", help="grouped path over moe.CANDIDATES")
    p.add_argument("--cpu-smoke", action="store_true", help="check the script on a CPU")
    a = p.parse_args(argv)
    global E, K, D, INTER
    if a.cpu_smoke:
        BG.SMOKE = True
        E, K, D, INTER = 8, 2, 64, 64
    tokens = [int(v) for v in (a.tokens or ("512,2048" if a.sweep else "1,16,512,2048")).split(",")]
    arch = BG.arch_of_device()
    target, dev, dt = tvm_target(arch), BG.device(), BG.tvm_dtype()
    gen = torch.Generator().manual_seed(0)
    gate_up = (torch.randn(E, 2 * INTER, D, generator=gen) / D**0.5).to(BG.torch_dtype())
    down = (torch.randn(E, D, INTER, generator=gen) / INTER**0.5).to(BG.torch_dtype())
    gate_up_k = torch.from_numpy(G.transform_weight(gate_up.numpy(), epilogue="silu_mul")).to(dev)
    gate_up, down = gate_up.to(dev), down.to(dev)

    configs = grouped_configs(target, arch, sweep=a.sweep)
    results, torch_s = [], {}
    libs_by_cfg = {}
    for t in tokens:
        x, logits = inputs(t, gate_up)
        ref = reference_out(t, x, logits, gate_up, down)
        if not a.sweep:
            bound = (x, logits, gate_up, down)
            torch_s[t] = BG.timeit(lambda b=bound: torch_moe(*b), iters=5, warmup=2)
        for cfg in configs:
            label = grouped_label(cfg)
            if label not in libs_by_cfg:
                libs_by_cfg[label] = build_grouped(target, cfg, dt)
            steps, out, ids = steps_grouped(
                t, libs_by_cfg[label], cfg.block_m, x, logits, gate_up_k, down
            )
            results.append(measure("grouped", t, steps, out, ids, ref, label))
        if t <= MG.GEMV_MAX_TOKENS and not a.sweep:
            for kind in ("gemv", "gemv-fma")[: 1 if BG.SMOKE else 2]:
                if kind not in libs_by_cfg:
                    route = libs_by_cfg[label]["route"]
                    libs_by_cfg[kind] = build_gemv(target, dt, route, fma=kind == "gemv-fma")
                steps, out, ids = steps_gemv(t, libs_by_cfg[kind], x, logits, gate_up_k, down)
                results.append(measure("gemv", t, steps, out, ids, ref, kind))
    device_name = "cpu" if BG.SMOKE else torch.cuda.get_device_name()
    # the dense-GEMM ceiling the MoE layer is held against: cuBLAS f16 4096^3 in this run
    ceiling = dense_ceiling_tflops()
    for r in results:
        r["of_dense_ceiling"] = r["tflops"] / ceiling if ceiling else None
    with open(a.out, "w") as f:
        json.dump(
            {
                "device": device_name,
                "dense_ceiling_tflops": ceiling,
                "torch_s": torch_s,
                "results": results,
            },
            f,
            indent=1,
        )
    print(f"dense ceiling (cuBLAS f16 4096^3): {ceiling:.1f} TFLOP/s")
    print(f"{device_name}: GPU us = CUPTI kernel time; wall us includes host launch cost")
    print(
        "| T | path | config | GPU us | wall us | TFLOP/s | of ceiling | GB/s | gate_up | down "
        "| other | err |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        st = r["step_gpu_us"]
        other = sum(v for k, v in st.items() if k not in ("gate_up", "down"))
        print(
            f"| {r['tokens']} | {r['path']} | {r['config']} | {r['gpu_us']:.1f} | "
            f"{r['wall_us']:.1f} | {r['tflops']:.1f} | {r['of_dense_ceiling'] or 0:.0%} | "
            f"{r['gbps']:.0f} | {st['gate_up']:.1f} | "
            f"{st['down']:.1f} | {other:.1f} | {r['max_abs_err']:.2g} |"
        )
    for t, s in torch_s.items():
        print(f"PyTorch sorted-token MoE, T={t}: {s * 1e6:.1f} us (wall)")
    bad = [r for r in results if not r["ok"]]
    if bad:
        print(f"FAILED: {len(bad)} result(s) with a large error", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
