"""The sm_90a wgmma GEMM (``schedules/gemm_wgmma.py``) at DeepSeek-V2-Lite's prefill shapes,
checked against a float32 PyTorch reference and timed against cuBLAS (``torch.matmul``).

Build here (no GPU needed), run there with TVM's runtime only:

    python -m benchmarks.bench_gemm_wgmma build .device/wgmma
    python -m benchmarks.bench_gemm_wgmma run .device/wgmma --json $OUT/bench_gemm_wgmma.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from benchmarks import timing

# (name, n, k, epilogue, out_dtype): every dense product of a V2-Lite prefill (mla=3)
SHAPES = (
    ("q_proj", 3072, 2048, None, None),
    ("kv_a", 576, 2048, None, None),
    ("kv_b", 4096, 512, None, None),
    ("o_proj+res", 2048, 2048, "residual", None),
    ("shared_gate_up", 2816, 2048, "silu_mul", None),
    ("shared_down+res", 2048, 2816, "residual", None),
    ("mlp_gate_up", 10944, 2048, "silu_mul", None),
    ("mlp_down+res", 2048, 10944, "residual", None),
    ("router_f32", 64, 2048, None, "float32"),
)
TOKENS = (77, 512, 2048, 4096)  # 77: a partial row tile
MOE = dict(num_experts=64, top_k=6, hidden=2048, inter=1408)  # V2-Lite's routed experts
MOE_TOKENS = (1, 77, 2048)


def _configs():
    from mla_compiler.schedules.gemm_wgmma import WgmmaConfig

    return (
        WgmmaConfig(128, 256, 64, 4, overlap=True),
        WgmmaConfig(128, 256, 64, 4),
        WgmmaConfig(128, 128, 64, 5, overlap=True),
        WgmmaConfig(256, 128, 64, 4, overlap=True),
        WgmmaConfig(128, 256, 64, 4, overlap=True, swizzle=False),
    )


def _moe_configs():
    from mla_compiler.schedules.gemm_wgmma import WgmmaConfig

    return (
        WgmmaConfig(128, 128, 64, 5, overlap=True),
        WgmmaConfig(128, 256, 64, 4, overlap=True),
        WgmmaConfig(256, 128, 64, 4, overlap=True),  # padding skipped per 64-row warpgroup
        WgmmaConfig(192, 192, 64, 4, overlap=True),  # 3 warpgroups: ~an expert's rows at T=2048
        WgmmaConfig(64, 256, 64, 4, overlap=True),
        WgmmaConfig(64, 128, 64, 6, overlap=True),
    )


def _cfg_name(c) -> str:
    flags = ("o" if c.overlap else "") + ("" if c.swizzle else "_nosw")
    return f"m{c.block_m}n{c.block_n}k{c.block_k}s{c.stages}{flags}"


def build(out: Path) -> None:
    import tvm

    from mla_compiler import cuda_build
    from mla_compiler.schedules import gemm_wgmma as W
    from mla_compiler.schedules.target import tvm_target

    target = tvm_target("sm_90a")
    funcs, index = {}, []
    for name, n, k, epi, odt in SHAPES:
        for cfg in _configs():
            if not W.keep(cfg, target, k=k):
                continue
            sym = f"{name.replace('+', '_')}__{_cfg_name(cfg)}"
            f = W.wgmma_gemm(
                None, n, k, dtype="float16", target=target, config=cfg, epilogue=epi, out_dtype=odt
            )
            funcs[sym] = f.with_attr("global_symbol", sym)
            index.append({"symbol": sym, "shape": name, "config": dataclasses.asdict(cfg)})
    # the default grouped tile also without the padding skip: the A/B of one run
    moe_variants = [(cfg, True) for cfg in _moe_configs()] + [(W.MOE_CONFIG, False)]
    for cfg, skip in moe_variants:
        for kind in ("gate_up", "down"):
            sym = f"moe_{kind}__{_cfg_name(cfg)}" + ("" if skip else "_noskip")
            f = W.moe_grouped(
                kind,
                MOE["hidden"],
                MOE["inter"],
                num_experts=MOE["num_experts"],
                top_k=MOE["top_k"],
                target=target,
                config=cfg,
                skip_padding=skip,
            )
            funcs[sym] = f.with_attr("global_symbol", sym)
            cfg_dict = dataclasses.asdict(cfg)
            index.append(
                {"symbol": sym, "shape": f"moe_{kind}", "config": cfg_dict, "skip_padding": skip}
            )
    out.mkdir(parents=True, exist_ok=True)
    res = cuda_build.build(tvm.IRModule(funcs), ["sm_90a"], output=out, name="wgmma")
    spills = {
        k: v.spill_bytes
        for k, v in res.device_modules[0].kernels["sm_90a"].items()
        if v.spill_bytes
    }
    (out / "index.json").write_text(json.dumps(index, indent=1))
    print(f"built {len(funcs)} kernels into {out}; spills: {spills or 'none'}")


def run(out: Path, json_path: str | None, reps: int) -> int:
    import torch
    import tvm

    from mla_compiler import reference
    from mla_compiler.runtime import loader

    loader.use_runtime_only()
    mod = loader.load_module(out / "wgmma.so", "cuda")
    index = json.loads((out / "index.json").read_text())
    t = tvm.runtime.from_dlpack
    rows, bad = [], 0

    def timed(fn) -> float:
        return timing.median_us(fn, reps=reps)

    gen = torch.Generator("cuda").manual_seed(0)
    for m in TOKENS:
        for name, n, k, epi, odt in SHAPES:
            nw = 2 * n if epi == "silu_mul" else n
            x = torch.randn(m, k, device="cuda", generator=gen).half()
            w = (torch.randn(nw, k, device="cuda", generator=gen) / k**0.5).half()
            r = torch.randn(m, n, device="cuda", generator=gen).half()
            h = x.float() @ w.float().T
            ref = reference.silu_mul_interleaved(h) if epi == "silu_mul" else h
            ref = ref + r.float() if epi == "residual" else ref
            cublas_us = timed(lambda x=x, w=w: torch.matmul(x, w.T))
            flops = 2 * m * nw * k
            best = None
            for item in (i for i in index if i["shape"] == name):
                fn = mod[item["symbol"]]
                y = torch.full(
                    (m, n), float("nan"), device="cuda", dtype=getattr(torch, odt or "float16")
                )
                args = [t(x), t(w)] + ([t(r)] if epi == "residual" else []) + [t(y)]
                fn(*args)
                torch.cuda.synchronize()
                err = float((y.float() - ref).abs().max())
                tol = 2e-2 * float(ref.abs().max()) + 1e-2
                ok = bool(torch.isfinite(y).all()) and err <= tol
                bad += not ok
                us = timed(lambda fn=fn, args=args: fn(*args))
                row = {
                    "tokens": m,
                    "shape": name,
                    "n": n,
                    "k": k,
                    "config": item["config"],
                    "us": us,
                    "tflops": flops / us / 1e6,
                    "cublas_us": cublas_us,
                    "cublas_tflops": flops / cublas_us / 1e6,
                    "vs_cublas": cublas_us / us,
                    "max_abs_err": err,
                    "ok": ok,
                }
                rows.append(row)
                if ok and (best is None or us < best["us"]):
                    best = row
            if best:
                c = best["config"]
                print(
                    f"T={m:5d} {name:16s} best m{c['block_m']}n{c['block_n']}s{c['stages']}"
                    f"{'o' if c['overlap'] else ''}{'' if c['swizzle'] else '-nosw'}: "
                    f"{best['tflops']:6.1f} TFLOP/s  cuBLAS {best['cublas_tflops']:6.1f}  "
                    f"{best['vs_cublas']:.2f}x"
                )
            else:
                print(f"T={m:5d} {name:16s} NO CORRECT CONFIG")
    bad += _run_moe(mod, index, rows, timed)
    for row in rows:
        if not row["ok"]:
            print(f"BAD {row['shape']} T={row['tokens']} {row['config']} err={row['max_abs_err']}")
    if json_path:
        dev = torch.cuda.get_device_name()
        Path(json_path).write_text(json.dumps({"device": dev, "rows": rows}, indent=1))
    return 1 if bad else 0


def _run_moe(mod, index, rows, timed) -> int:
    """Grouped gate_up and down at V2-Lite's expert shapes vs a float32 per-block reference;
    TFLOP/s counted on the routed rows only; baseline: one cuBLAS GEMM over as many rows."""
    import torch
    import tvm

    from mla_compiler import reference

    t = tvm.runtime.from_dlpack
    e_num, k_top, d, inter = MOE["num_experts"], MOE["top_k"], MOE["hidden"], MOE["inter"]
    gen = torch.Generator("cuda").manual_seed(1)
    bad = 0
    wgu = (torch.randn(e_num, 2 * inter, d, device="cuda", generator=gen) / d**0.5).half()
    wd = (torch.randn(e_num, d, inter, device="cuda", generator=gen) / inter**0.5).half()
    for tokens in MOE_TOKENS:
        x = torch.randn(tokens, d, device="cuda", generator=gen).half()
        scores = torch.rand(tokens, e_num, device="cuda", generator=gen)
        ids = scores.topk(k_top, dim=-1).indices.int()
        weights = torch.rand(tokens, k_top, device="cuda", generator=gen)
        for kind in ("gate_up", "down"):
            for item in (i for i in index if i["shape"] == f"moe_{kind}"):
                bm = item["config"]["block_m"]
                sr, be, used = reference.moe_grouping(ids, e_num, bm)
                real = sr >= 0
                src = sr.clamp(min=0).long()
                tok, slot = src // k_top, src % k_top
                blocks = [(b, int(be[b])) for b in range(used)]
                if kind == "gate_up":
                    ref = torch.zeros(sr.numel(), inter, device="cuda")
                    for b, e in blocks:  # per row block: its expert's weight
                        rs = slice(b * bm, (b + 1) * bm)
                        ref[rs] = reference.silu_mul_interleaved(
                            x[tok[rs]].float() @ wgu[e].float().T
                        )
                    out = torch.full((sr.numel(), inter), float("nan"), device="cuda").half()
                    args = [t(x), t(sr), t(be), t(wgu), t(out)]
                    n_cols, k_dim = 2 * inter, d
                else:
                    h = torch.randn(sr.numel(), inter, device="cuda", generator=gen).half()
                    ref = torch.zeros(sr.numel(), d, device="cuda")
                    for b, e in blocks:
                        rs = slice(b * bm, (b + 1) * bm)
                        ref[rs] = h[rs].float() @ wd[e].float().T
                    ref = ref * torch.where(real, weights[tok, slot], 0.0)[:, None]
                    out = torch.full((sr.numel(), d), float("nan"), device="cuda").half()
                    args = [t(h), t(sr), t(be), t(wd), t(weights), t(out)]
                    n_cols, k_dim = d, inter
                fn = mod[item["symbol"]]
                fn(*args)
                torch.cuda.synchronize()
                n_used = used * bm
                keep = real[:n_used]  # padding rows are not written (skip_padding)
                got, want = out[:n_used].float()[keep], ref[:n_used][keep]
                err = float((got - want).abs().max())
                tol = 2e-2 * float(want.abs().max()) + 1e-2
                ok = bool(torch.isfinite(got).all()) and err <= tol
                bad += not ok
                us = timed(lambda fn=fn, args=args: fn(*args))
                flops = 2 * tokens * k_top * n_cols * k_dim
                a = torch.randn(tokens * k_top, k_dim, device="cuda").half()
                b = torch.randn(n_cols, k_dim, device="cuda").half()
                cublas_us = timed(lambda a=a, b=b: torch.matmul(a, b.T))
                c, skip = item["config"], item["skip_padding"]
                rows.append(
                    {
                        "tokens": tokens,
                        "shape": f"moe_{kind}",
                        "config": c,
                        "skip_padding": skip,
                        "us": us,
                        "tflops": flops / us / 1e6,
                        "cublas_dense_us": cublas_us,
                        "max_abs_err": err,
                        "ok": ok,
                    }
                )
                print(
                    f"T={tokens:5d} moe_{kind:8s} m{c['block_m']}n{c['block_n']}s{c['stages']}"
                    f"{'' if skip else ' noskip'}: "
                    f"{us:8.1f} us {flops / us / 1e6:6.1f} TFLOP/s (dense cuBLAS {cublas_us:7.1f}"
                    f" us)  err {err:.2e} {'ok' if ok else 'BAD'}"
                )
    return bad


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["build", "run"])
    ap.add_argument("dir")
    ap.add_argument("--json")
    ap.add_argument("--reps", type=int, default=20)
    a = ap.parse_args()
    if a.mode == "build":
        build(Path(a.dir))
        return 0
    return run(Path(a.dir), a.json, a.reps)


if __name__ == "__main__":
    sys.exit(main())
