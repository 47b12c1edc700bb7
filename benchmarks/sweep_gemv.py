"""Decode GEMVs (one token): every ``gemv_mma`` config of each V2-Lite decode product, the FMA
GEMV and the small-M tile kernel, checked against float32 PyTorch and timed against cuBLAS.

Build here (no GPU needed), run there with TVM's runtime only:

    python -m benchmarks.sweep_gemv build .device/gemv
    python -m benchmarks.sweep_gemv run .device/gemv --json $OUT/sweep_gemv.json

Times are GPU kernel times (CUPTI through torch.profiler: no launch gaps), each call on a
different copy of the weights (>= 256 MB in all), as in a decode step where every weight comes
from DRAM; MoE calls rotate over expert choices. GB/s counts the weight bytes read.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path

from benchmarks import timing

# name -> (n, k, epilogue, out_dtype, heads): the dense products of a V2-Lite decode step
DENSE = {
    "q_proj": (3072, 2048, None, None, None),
    "kv_a": (576, 2048, None, None, None),
    "w_uk": (512, 128, None, None, 16),
    "w_uv": (128, 512, None, None, 16),
    "o_proj+res": (2048, 2048, "residual", None, None),
    "router_f32": (64, 2048, None, "float32", None),
    "shared_gate_up": (2816, 2048, "silu_mul", None, None),
    "shared_down+res": (2048, 2816, "residual", None, None),
    "mlp_gate_up": (10944, 2048, "silu_mul", None, None),
    "mlp_down+res": (2048, 10944, "residual", None, None),
    "lm_head": (102400, 2048, None, None, None),
}
MOE = dict(num_experts=64, top_k=6, hidden=2048, inter=1408)


def _name(c) -> str:
    if hasattr(c, "unroll"):
        return f"t{c.tiles}w{c.warps}u{c.unroll}"
    if hasattr(c, "vec"):
        return "fma"
    return "tile"


def build(out: Path) -> None:
    import tvm

    from mla_compiler import cuda_build
    from mla_compiler.schedules import gemm as G
    from mla_compiler.schedules import gemv_mma as GM
    from mla_compiler.schedules import moe_gemv as MG
    from mla_compiler.schedules.target import tvm_target

    target = tvm_target("sm_90a")
    funcs, index = {}, []

    def add(shape, cfg, func, default):
        sym = f"{shape.replace('+', '_')}__{_name(cfg)}"
        funcs[sym] = func.with_attr("global_symbol", sym)
        index.append({"symbol": sym, "shape": shape, "config": _name(cfg), "default": default})

    for shape, (n, k, epi, odt, heads) in DENSE.items():
        rows = 2 * n if epi == "silu_mul" else n
        d = GM.default_config(rows=rows, k=k, items=heads or 1, epilogue=epi, target=target)
        others = [G.default_config(target, 1)]
        if not heads and k % (32 * G.gemv_config(epi).vec) == 0:
            others.append(G.gemv_config(epi))  # the FMA GEMV takes whole lane steps only
        for cfg in [d] + [c for c in GM.candidates(rows=rows, k=k, epilogue=epi) if c != d]:
            kw = dict(target=target, config=cfg, epilogue=epi, out_dtype=odt, batch=heads)
            add(shape, cfg, G.gemm(1, n, k, **kw), cfg == d)
        for cfg in others:
            kw = dict(target=target, config=cfg, epilogue=epi, out_dtype=odt, batch=heads)
            add(shape, cfg, G.gemm(1, n, k, **kw), False)
    e, k_top, hid, inter = (MOE[key] for key in ("num_experts", "top_k", "hidden", "inter"))
    for kind, rows, k, slots, epi in (
        ("gate_up", 2 * inter, hid, 1, "silu_mul"),
        ("down", hid, inter, k_top, None),
    ):
        items = k_top if kind == "gate_up" else 1
        d = GM.default_config(rows=rows, k=k, items=items, epilogue=epi, slots=slots, target=target)
        factory = MG.moe_gate_up_gemv if kind == "gate_up" else MG.moe_down_gemv
        fma = MG.GEMV_GATE_UP if kind == "gate_up" else MG.GEMV_DOWN
        cands = [d] + [
            c for c in GM.candidates(rows=rows, k=k, epilogue=epi, slots=slots) if c != d
        ]
        for cfg in cands + [fma]:
            f = factory(hid, inter, num_experts=e, top_k=k_top, target=target, config=cfg)
            add(f"moe_{kind}", cfg, f, cfg == d)
    out.mkdir(parents=True, exist_ok=True)
    with tvm.transform.PassContext(config=G.PASS_CONFIG):
        res = cuda_build.build(tvm.IRModule(funcs), ["sm_90a"], output=out, name="gemv")
    kernels = res.device_modules[0].kernels["sm_90a"]
    spills = {k: v.spill_bytes for k, v in kernels.items() if v.spill_bytes}
    (out / "index.json").write_text(json.dumps(index, indent=1))
    print(f"built {len(funcs)} kernels into {out}; spills: {spills or 'none'}")


def _kernel_times(calls, *, reps: int) -> dict[str, float]:
    """{kernel name: mean GPU microseconds} of ``calls`` (each run ``reps`` times), CUPTI."""
    total, count = timing.kernel_totals(calls, reps=reps)
    return {name: total[name] / count[name] for name in total}


def _interleave(w):
    """``gemm.transform_weight(..., epilogue="silu_mul")`` in torch (the runtime-only GPU box
    cannot import the schedules): [gate; up] rows -> groups of 32 gate rows, 32 up rows, ..."""
    *lead, rows, k = w.shape
    g = w.view(*lead, 2, rows // 64, 32, k).transpose(-4, -3)  # [.., groups, gate/up, 32, k]
    return g.reshape(*lead, rows, k).contiguous()


def _copy_ceiling_gbps() -> float:
    """DRAM ceiling: GB/s of a 1 GiB device-to-device copy (bytes read + written)."""
    import torch

    buf = torch.empty(2, 1 << 30, dtype=torch.uint8, device="cuda")
    us = _kernel_times([lambda: buf[1].copy_(buf[0])], reps=5)
    return 2 * buf.shape[1] / min(us.values()) / 1e3


def _kernel_of(times: dict[str, float], symbol: str) -> float:
    hits = [us for name, us in times.items() if name.startswith(symbol)]
    return min(hits) if hits else float("nan")


def run(out: Path, json_path: str | None, reps: int) -> int:
    import torch
    import tvm

    from mla_compiler.runtime import loader

    loader.use_runtime_only()
    mod = loader.load_module(out / "gemv.so", "cuda")
    index = json.loads((out / "index.json").read_text())
    t = tvm.runtime.from_dlpack
    gen = torch.Generator("cuda").manual_seed(0)
    rows_out, bad = [], 0
    ceiling = _copy_ceiling_gbps()
    print(f"device copy ceiling: {ceiling:.0f} GB/s")

    def check_and_time(shape, items, call, ref, y, blas, wbytes):
        nonlocal bad
        calls, results = [], []
        for item in items:
            fn = mod[item["symbol"]]
            y.fill_(float("nan"))
            call(fn, 0)
            torch.cuda.synchronize()
            err = float((y.float() - ref).abs().max())
            ok = bool(torch.isfinite(y).all()) and err <= 2e-2 * float(ref.abs().max()) + 1e-2
            bad += not ok
            results.append((item, err, ok))
            calls.append(timing.rotating(functools.partial(call, fn)))
        times = _kernel_times(calls + ([blas] if blas else []), reps=reps)
        # cuBLAS: every kernel of one matmul call (a split-K GEMV launches two)
        blas_us = (
            sum(us for name, us in times.items() if not any(i["symbol"] in name for i in items))
            if blas
            else None
        )
        for item, err, ok in results:
            us = _kernel_of(times, item["symbol"])
            row = {
                "shape": shape,
                "config": item["config"],
                "default": item["default"],
                "us": us,
                "gbps": wbytes / us / 1e3,
                "of_ceiling": wbytes / us / 1e3 / ceiling,
                "cublas_us": blas_us,
                "max_abs_err": err,
                "ok": ok,
            }
            rows_out.append(row)
        mine = [r for r in rows_out if r["shape"] == shape and r["ok"]]
        best = min(mine, key=lambda r: r["us"]) if mine else None
        dflt = next((r for r in mine if r["default"]), None)
        other = {r["config"]: r["us"] for r in mine if r["config"] in ("fma", "tile")}
        if best:
            print(
                f"{shape:16s} best {best['config']:10s} {best['us']:7.1f} us "
                f"{best['gbps']:6.0f} GB/s ({best['of_ceiling']:.0%})  default "
                f"{dflt['config'] if dflt else '-'} {dflt['us'] if dflt else float('nan'):7.1f} us"
                + (f"  cuBLAS {blas_us:7.1f} us" if blas_us else "")
                + "".join(f"  {k} {v:.1f} us" for k, v in other.items())
            )
        else:
            print(f"{shape:16s} NO CORRECT CONFIG")

    for shape, (n, k, epi, odt, heads) in DENSE.items():
        items = [i for i in index if i["shape"] == shape]
        nw = 2 * n if epi == "silu_mul" else n
        lead = (heads,) if heads else ()
        wbytes = (heads or 1) * nw * k * 2
        copies = timing.copies_for(wbytes)
        ws = [(torch.randn(*lead, nw, k, device="cuda", generator=gen) / k**0.5).half()]
        ws += [ws[0].clone() for _ in range(copies - 1)]
        wk = ws  # the kernels' layout: SiLU·up takes gate/up rows interleaved
        if epi == "silu_mul":
            w0 = _interleave(ws[0])
            wk = [w0] + [w0.clone() for _ in range(copies - 1)]
        x = torch.randn(1, *lead, k, device="cuda", generator=gen).half()
        r = torch.randn(1, *lead, n, device="cuda", generator=gen).half()
        y = torch.empty(1, *lead, n, device="cuda", dtype=getattr(torch, odt or "float16"))
        if heads:
            h = torch.einsum("mbk,bnk->mbn", x.float(), ws[0].float())
        else:
            h = x.float() @ ws[0].float().T
        ref = h + r.float() if epi == "residual" else h
        if epi == "silu_mul":  # torch layout [gate; up] (the kernel gets the interleaved copy)
            ref = torch.nn.functional.silu(h[..., :n]) * h[..., n:]

        def call(fn, i, x=x, wl=wk, r=r, y=y, epi=epi):
            w = wl[i % len(wl)]
            fn(*([t(x), t(w)] + ([t(r)] if epi == "residual" else []) + [t(y)]))

        blas = None
        if not heads:
            blas = timing.rotating(lambda i, x=x, ws=ws: torch.matmul(x, ws[i % len(ws)].T))

        check_and_time(shape, items, call, ref, y, blas, wbytes)

    e, k_top, hid, inter = (MOE[key] for key in ("num_experts", "top_k", "hidden", "inter"))
    gate_up = (torch.randn(e, 2 * inter, hid, device="cuda", generator=gen) / hid**0.5).half()
    down = (torch.randn(e, hid, inter, device="cuda", generator=gen) / inter**0.5).half()
    gate_up_k = _interleave(gate_up)
    x = torch.randn(1, hid, device="cuda", generator=gen).half()
    ids = [torch.randperm(e, device="cuda")[:k_top].int()[None] for _ in range(10)]
    wts = torch.rand(1, k_top, device="cuda", generator=gen)
    hid_act = torch.randn(k_top, inter, device="cuda", generator=gen).half()
    # gate_up: h[j] = silu(x Wg[e_j]^T) * (x Wu[e_j]^T) for the first ids
    g = torch.einsum("k,jnk->jn", x[0].float(), gate_up[ids[0][0].long()].float())
    ref_gu = torch.nn.functional.silu(g[:, :inter]) * g[:, inter:]
    h_out = torch.empty(k_top, inter, device="cuda", dtype=torch.float16)

    def call_gu(fn, i):
        fn(t(x), t(ids[i % len(ids)]), t(gate_up_k), t(h_out))

    items = [i for i in index if i["shape"] == "moe_gate_up"]
    check_and_time("moe_gate_up", items, call_gu, ref_gu, h_out, None, k_top * 2 * inter * hid * 2)
    dn = torch.einsum("jk,jnk->jn", hid_act.float(), down[ids[0][0].long()].float())
    ref_dn = (wts[0][:, None] * dn).sum(0, keepdim=True)
    out_dn = torch.empty(1, hid, device="cuda", dtype=torch.float16)

    def call_dn(fn, i):
        fn(t(hid_act), t(ids[i % len(ids)]), t(down), t(wts), t(out_dn))

    items = [i for i in index if i["shape"] == "moe_down"]
    check_and_time("moe_down", items, call_dn, ref_dn, out_dn, None, k_top * hid * inter * 2)
    for row in rows_out:
        if not row["ok"]:
            print(f"BAD {row['shape']} {row['config']} err={row['max_abs_err']}")
    if json_path:
        dev = torch.cuda.get_device_name()
        Path(json_path).write_text(
            json.dumps({"device": dev, "copy_ceiling_gbps": ceiling, "rows": rows_out}, indent=1)
        )
    return 1 if bad else 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("action", choices=("build", "run"))
    p.add_argument("dir", type=Path)
    p.add_argument("--json", default=None)
    p.add_argument("--reps", type=int, default=20)
    a = p.parse_args()
    if a.action == "build":
        build(a.dir)
        return 0
    return run(a.dir, a.json, a.reps)


if __name__ == "__main__":
    sys.exit(main())
