"""Routed-expert MoE kernels (schedules/moe.py) vs a PyTorch MoE (tokens sorted by expert, one
matmul per expert) on the DeepSeek-V2-Lite layer: 64 experts, top-6, hidden 2048, inter 1408.

    python benchmarks/bench_moe.py --out $OUT/bench_moe.json [--tokens 1,2048]

Reports per-kernel and total times, TFLOP/s (useful expert FLOPs) and GB/s (expert weights of
the experts used + activations), and the max error vs the float64 reference.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_gemm as BG  # noqa: E402

from mla_compiler import reference  # noqa: E402
from mla_compiler.schedules import gemm as G  # noqa: E402
from mla_compiler.schedules import moe as M  # noqa: E402
from mla_compiler.schedules.target import tvm_target  # noqa: E402

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


def bench_tokens(t, libs, cfg, gate_up, gate_up_k, down):
    """One token count: the TVM pipeline, each kernel, and the PyTorch MoE."""
    dev, bm, dt = BG.device(), cfg.block_m, BG.torch_dtype()
    x = torch.randn(t, D, device=dev, dtype=dt)
    logits = torch.randn(t, E, device=dev, dtype=torch.float32)
    nb = M.num_row_blocks(t, top_k=K, num_experts=E, block_m=bm)
    i32 = dict(device=dev, dtype=torch.int32)
    wts = torch.empty(t, K, device=dev, dtype=torch.float32)
    ids = torch.empty(t, K, **i32)
    rows, blocks = torch.empty(nb * bm, **i32), torch.empty(nb, **i32)
    row_of, offs = torch.empty(t * K, **i32), torch.empty(E + 1, **i32)
    ws = torch.empty((t + M.CHUNK - 1) // M.CHUNK, E, **i32)
    h = torch.empty(nb * bm, INTER, device=dev, dtype=dt)
    y = torch.empty(nb * bm, D, device=dev, dtype=dt)
    out = torch.empty(t, D, device=dev, dtype=dt)
    steps = {
        "route": lambda: libs["route"](logits, wts, ids),
        "align": lambda: libs["align"](ids, rows, blocks, row_of, offs, ws),
        "gate_up": lambda: libs["gate_up"](x, rows, blocks, gate_up_k, h),
        "down": lambda: libs["down"](h, rows, blocks, down, wts, y),
        "combine": lambda: libs["combine"](y, row_of, out),
    }

    def run_all():
        for fn in steps.values():
            fn()

    run_all()
    if t <= 64:  # the float64 reference loops over tokens: only for small T
        ref = reference.moe_experts(
            x.cpu(), *reference.moe_route(logits.cpu(), top_k=K), gate_up.cpu(), down.cpu()
        )
    else:
        ref = torch_moe(x, logits, gate_up, down).cpu().double()
    err = (out.cpu().double() - ref).abs().max().item()
    times = {name: BG.timeit(fn, iters=20) for name, fn in steps.items()}
    total = BG.timeit(run_all, iters=20)
    t_torch = BG.timeit(lambda: torch_moe(x, logits, gate_up, down), iters=5, warmup=2)
    used = len(torch.unique(ids))
    flops = 2.0 * t * K * (D * 2 * INTER + INTER * D)
    nbytes = used * 3 * INTER * D * 2 + t * D * 2 * 2 + t * K * (INTER + D) * 2 * 2
    rec = {
        "tokens": t,
        "config": f"{cfg.block_m}x{cfg.block_n}x{cfg.block_k}s{cfg.stages}",
        "err_vs": "reference" if t <= 64 else "torch",
        "kernel_s": times,
        "tvm_s": total,
        "torch_s": t_torch,
        "speedup_vs_torch": t_torch / total,
        "tvm_tflops": flops / total / 1e12,
        "tvm_gbps": nbytes / total / 1e9,
        "torch_tflops": flops / t_torch / 1e12,
        "experts_used": used,
        "max_abs_err": err,
    }
    print(json.dumps(rec), file=sys.stderr)
    return rec


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--tokens", default="1,2048")
    p.add_argument("--cpu-smoke", action="store_true", help="check the script on a CPU")
    a = p.parse_args(argv)
    global E, K, D, INTER
    if a.cpu_smoke:
        BG.SMOKE = True
        E, K, D, INTER = 8, 2, 64, 64
    target, dev, dt = tvm_target(BG.arch_of_device()), BG.device(), BG.tvm_dtype()
    cfg = M.default_config(target)
    bm = cfg.block_m
    libs = {
        "route": BG.build(M.moe_route(M.RouteSpec(num_experts=E, top_k=K), target=target), target),
        "align": BG.build(M.moe_align(E, K, block_m=bm, target=target), target),
        "gate_up": BG.build(
            M.moe_gate_up(D, INTER, num_experts=E, top_k=K, dtype=dt, target=target), target
        ),
        "down": BG.build(
            M.moe_down(D, INTER, num_experts=E, top_k=K, dtype=dt, target=target), target
        ),
        "combine": BG.build(M.moe_combine(D, top_k=K, dtype=dt, target=target), target),
    }
    gen = torch.Generator().manual_seed(0)
    gate_up = (torch.randn(E, 2 * INTER, D, generator=gen) / D**0.5).to(BG.torch_dtype())
    down = (torch.randn(E, D, INTER, generator=gen) / INTER**0.5).to(BG.torch_dtype())
    gate_up_k = torch.from_numpy(G.transform_weight(gate_up.numpy(), epilogue="silu_mul")).to(dev)
    gate_up, down = gate_up.to(dev), down.to(dev)
    results = [
        bench_tokens(t, libs, cfg, gate_up, gate_up_k, down)
        for t in [int(v) for v in a.tokens.split(",")]
    ]
    with open(a.out, "w") as f:
        json.dump(
            {"device": "cpu" if BG.SMOKE else torch.cuda.get_device_name(), "results": results},
            f,
            indent=1,
        )
    print("| T | TVM us | torch us | x | TFLOP/s | GB/s | gate_up us | down us | other us | err |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        kt = r["kernel_s"]
        small = (kt["route"] + kt["align"] + kt["combine"]) * 1e6
        print(
            f"| {r['tokens']} | {r['tvm_s'] * 1e6:.1f} | {r['torch_s'] * 1e6:.1f} | "
            f"{r['speedup_vs_torch']:.2f} | {r['tvm_tflops']:.1f} | {r['tvm_gbps']:.0f} | "
            f"{kt['gate_up'] * 1e6:.1f} | {kt['down'] * 1e6:.1f} | {small:.1f} | "
            f"{r['max_abs_err']:.2g} |"
        )


if __name__ == "__main__":
    main()
