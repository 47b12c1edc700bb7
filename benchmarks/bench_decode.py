"""Decode attention bandwidth: our split-KV TensorIR kernels vs PyTorch baselines, on one GPU.

    python -m benchmarks.bench_decode --out bench_decode.json [--configs 3] [--reps 50]
    python -m benchmarks.bench_decode --out b.json --only bn64-st2-w8-r64,bn64-st1-w8-r64

For each (batch, context) with 16 heads, one new token, f16 latent rows (576 wide, V = first 512):
builds the kernels for the GPU's arch (every ``--configs`` best candidate config), checks O and
LSE against ``mla_compiler.reference`` (first and last sequence), then times split + merge two
ways:

- ``ours``: CUDA events around one call, L2 flushed before each (``--flush``: by reading
  256 MB, the default, or by writing it), median of ``--reps``;
- ``ours_graph``: a decode step's pattern: ``--layers`` (27) calls back to back, each over a
  DIFFERENT layer of one ``[layers, C, 576]`` cache (at least 4x the L2: short contexts get
  more layers), captured in one CUDA graph and replayed (L2 flushed before each replay);
  time per call = median replay time / layers.

Baselines (per-call method): matmul-softmax-matmul and SDPA (memory-efficient backend) over
the same rows. GB/s counts the cache rows read once + Q + O per call. ``read_roofline``:
``torch.sum`` over the same cache rows (a plain read), per call and in the graph mode.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import sys
import time

import torch
import tvm

if __name__ == "__main__":  # run from the checkout (maybe uninstalled): import its package
    from benchmarks import package_shim

    package_shim.use_checkout_package()

try:  # as benchmarks.bench_decode
    from benchmarks import timing
except ImportError:  # by file path, benchmarks/ on sys.path (tests/conftest.load_benchmark)
    import timing

from mla_compiler import reference  # noqa: E402
from mla_compiler.model_export.config import MLADims, preset  # noqa: E402
from mla_compiler.schedules import attention_decode as dec  # noqa: E402
from mla_compiler.schedules.target import GPUS, tvm_target  # noqa: E402

# (batch, ctx, max_context the split count is chosen for); the first: the model's decode
# (workspace sized for a 16K max_context, a short actual context)
SHAPES = [
    (1, 600, 16384),
    (1, 4096, 4096),
    (1, 16384, 16384),
    (1, 32768, 32768),
    (32, 4096, 4096),
    (128, 4096, 4096),
    (128, 8192, 8192),
]
HEADS = 16


def parse_shapes(spec: str) -> list[tuple[int, int]]:
    """``"1x16384,32x4096"`` -> [(1, 16384), (32, 4096)] (batch, context); exits with the
    expected form on anything else."""
    try:
        shapes = [tuple(int(x) for x in w.split("x")) for w in spec.split(",")]
    except ValueError:
        shapes = []
    if not shapes or any(len(s) != 2 or min(s) < 1 for s in shapes):
        sys.exit(f"--shapes {spec!r}: use a comma list of BATCHxCTX, e.g. 1x16384,32x4096")
    return shapes


def gpu_arch() -> str:
    major, minor = torch.cuda.get_device_capability()
    arch = f"sm_{major}{minor}" + ("a" if major == 9 else "")
    if arch not in GPUS:
        sys.exit(f"no GPU spec for {arch}: known archs are {', '.join(GPUS)}")
    return arch


def _t(x: torch.Tensor):
    return tvm.runtime.from_dlpack(x)


def call_bytes(dims: MLADims, *, batch: int, ctx: int, heads: int = HEADS) -> int:
    """Bytes one decode attention call must move: its cache rows once, Q and O (f16)."""
    return 2 * batch * (ctx * dims.latent_dim + heads * (dims.latent_dim + dims.kv_lora_rank))


def graph_layers(dims: MLADims, *, batch: int, ctx: int, min_layers: int, l2_bytes: int) -> int:
    """Cache layers of the graph mode: ``min_layers`` (a model's layer count), more where a
    short context would otherwise fit the cache read by one replay into 4x the L2."""
    per_layer = batch * ctx * dims.latent_dim * 2
    return max(min_layers, -(-4 * l2_bytes // per_layer))


def make_inputs(dims: MLADims, batch: int, ctx: int, *, layers: int, device="cuda"):
    """q (per layer [B, 1, H, 576]: one tensor each, every one 64-byte aligned as TVM requires),
    kv [layers, B*ctx, 576] (f16, random), kv_indptr [B+1]: ``batch`` sequences of ``ctx`` rows
    at the same rows of every layer."""
    gen = torch.Generator(device=device).manual_seed(batch * 1000 + ctx)
    f16 = dict(device=device, generator=gen, dtype=torch.float16)
    q = [torch.randn(batch, 1, dims.heads, dims.latent_dim, **f16) for _ in range(layers)]
    kv = torch.randn(layers, batch * ctx, dims.latent_dim, **f16)
    indptr = torch.arange(0, batch * ctx + 1, ctx, dtype=torch.int32, device=device)
    return q, kv, indptr


def ours(mod, dims, q, kv, indptr, *, splits: int):
    """One closure per layer ``l`` running split (+ merge) over layer ``l`` of ``kv`` (its own
    q[l], o[l], lse[l]; one shared preallocated workspace, as in the model), plus the per-layer
    outputs o[l] [B, 1, H, 512] and lse[l] [B, 1, H], NaN until run."""
    layers, (batch, _, heads, _) = len(q), q[0].shape
    dev = q[0].device
    ws = dec.workspace_shapes(dims, batch=batch, q_tokens=1, num_splits=splits)
    o_part = torch.full(ws["o_part"], float("nan"), device=dev)  # [S, B, 1, H, 512]
    lse_part = torch.full(ws["lse_part"], float("nan"), device=dev)  # [S, B, 1, H]
    nan = dict(fill_value=float("nan"), device=dev)
    o = [torch.full((batch, 1, heads, dims.kv_lora_rank), **nan).half() for _ in range(layers)]
    lse = [torch.full((batch, 1, heads), **nan) for _ in range(layers)]
    split, merge = mod["decode_split"], mod["decode_merge"]
    calls = []
    for layer in range(layers):
        args_split = [_t(q[layer]), _t(kv), _t(indptr), layer, _t(o_part), _t(lse_part)]
        args_split += [_t(o[layer]), _t(lse[layer])]
        args_merge = [_t(o_part), _t(lse_part), _t(indptr), _t(o[layer]), _t(lse[layer])]

        def run(args_split=args_split, args_merge=args_merge):
            split(*args_split)
            if splits > 1:  # one split per sequence: the split kernel wrote O and LSE
                merge(*args_merge)

        calls.append(run)
    return calls, o, lse


def verify(dims, q, kv, indptr, o, lse, *, layer: int, sm_scale) -> float:
    """Max abs error of layer ``layer``'s O vs the float64 reference on the first and last
    sequence (raises)."""
    worst = 0.0
    for b in sorted({0, q[layer].shape[0] - 1}):
        k0, k1 = int(indptr[b]), int(indptr[b + 1])
        ref_o, ref_lse = reference.absorbed_attention(
            q[layer][b], kv[layer, k0:k1], v_dim=dims.kv_lora_rank, sm_scale=sm_scale
        )
        torch.testing.assert_close(o[layer][b].double(), ref_o, atol=4e-3, rtol=1e-2)
        torch.testing.assert_close(lse[layer][b].double(), ref_lse, atol=2e-3, rtol=1e-4)
        worst = max(worst, (o[layer][b].double() - ref_o).abs().max().item())
    return worst


def torch_matmul(dims, q, kv, *, sm_scale):
    batch, ctx = q.shape[0], kv.shape[1] // q.shape[0]
    k = kv.view(batch, ctx, dims.latent_dim)  # [B, N, 576]
    v = k[..., : dims.kv_lora_rank]  # [B, N, 512] (strided view: the same rows)
    qh = q.view(batch, HEADS, dims.latent_dim)

    def run():
        s = torch.bmm(qh, k.transpose(1, 2)) * sm_scale  # [B, H, N]
        p = torch.softmax(s.float(), dim=-1).half()
        return torch.bmm(p, v)  # [B, H, 512]

    return run


def torch_sdpa(dims, q, kv, *, sm_scale):
    """SDPA, memory-efficient backend; K/V heads broadcast (stride 0) where the kernel takes it,
    else materialised per head (what a non-MLA-aware kernel has to read)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    batch, ctx = q.shape[0], kv.shape[1] // q.shape[0]
    k = kv.view(batch, 1, ctx, dims.latent_dim).expand(batch, HEADS, ctx, dims.latent_dim)
    v = k[..., : dims.kv_lora_rank]
    qh = q.view(batch, 1, HEADS, dims.latent_dim).transpose(1, 2)  # [B, H, 1, 576]

    def call(k, v):
        with sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION):
            return torch.nn.functional.scaled_dot_product_attention(qh, k, v, scale=sm_scale)

    try:
        call(k, v)
    except RuntimeError:
        k, v = k.contiguous(), v.contiguous()
        call(k, v)
    return lambda: call(k, v)


def config_name(cfg) -> str:
    """Short name of a decode config in tables and JSON, e.g. ``bn64-st2-w4-r64-tma`` (the
    JSON keys: two configs must not share one)."""
    name = f"bn{cfg.block_n}-st{cfg.stages}-w{cfg.warps_n}-r{cfg.min_split_rows}"
    name += ("-tma" if cfg.tma else "") + ("-qr" if cfg.q_regs else "")
    name += "-pdl" if cfg.pdl else ""
    return name + ("" if cfg.tensor_cores else "-simple")


def select_configs(configs: list, only: str | None, *, arch: str, first: int) -> list:
    """The configs named by ``only`` (comma list of ``config_name`` labels, in that order), or
    the first ``first`` of ``configs``; an unknown label exits with the known ones."""
    if not only:
        return configs[:first]
    by_name = {config_name(c): c for c in configs}
    wanted = only.split(",")
    missing = [x for x in wanted if x not in by_name]
    if missing:
        sys.exit(f"--only: no candidate config {missing} on {arch}; known: {sorted(by_name)}")
    return [by_name[x] for x in wanted]


def split_counts(chosen: int, ctx: int, config) -> list[int]:
    """The split counts timed: the model's choice, half and twice it, those past what a
    context of ``ctx`` rows uses (``effective_splits``) dropped: they would time the same."""

    def used(s):
        return dec.effective_splits(
            ctx, s, block_n=config.block_n, min_split_rows=config.min_split_rows
        )

    return sorted({used(chosen), used(max(1, chosen // 2)), used(2 * chosen)})


def time_ours(calls, o, lse, *, check, nbytes: int, reps: int, flush) -> dict:
    """Per-call time of ``calls[0]`` and, with more than one layer, CUDA-graph time per call of
    all ``calls`` (``flush()`` before each); outputs checked (``check(layer=l)``: max abs error,
    raises) before timing (the last layer after the graph replays)."""
    calls[0]()
    torch.cuda.synchronize()
    res = {"max_abs_err": check(layer=0)}
    us = timing.median_us(calls[0], reps=reps, before=flush)
    res.update(us=us, gbps=nbytes / us / 1e3)
    if len(calls) > 1:
        try:
            us = timing.graph_us(calls, reps=reps, before=flush)
            res.update(graph_us=us, graph_gbps=nbytes / us / 1e3)
            res["max_abs_err"] = max(res["max_abs_err"], check(layer=len(calls) - 1))
        except Exception as e:  # the per-call result stands
            res["graph_error"] = f"{type(e).__name__}: {str(e)[:300]}"
    return res


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="JSON file for the results")
    ap.add_argument("--configs", type=int, default=6, help="candidate configs to try (best kept)")
    ap.add_argument(
        "--only",
        help="comma list of config labels (config_name) to time instead of the first --configs",
    )
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument(
        "--shapes",
        help="comma list of BATCHxCTX (e.g. 1x16384,32x4096) to run instead of all SHAPES",
    )
    ap.add_argument(
        "--layers",
        type=int,
        default=27,
        help="cache layers of the graph mode (at least; 1: no graph mode)",
    )
    ap.add_argument(
        "--min-split-rows",
        type=int,
        default=dec.MIN_SPLIT_ROWS,
        help="DecodeConfig.min_split_rows of every config",
    )
    ap.add_argument(
        "--flush",
        choices=("clean", "dirty"),
        default="clean",
        help="L2 flush before each timed call: read (clean lines) or write (dirty) 256 MB",
    )
    return ap.parse_args()


def build_configs(configs, target, dims, *, sm_scale) -> dict:
    """{config: built module} of the configs that build (failures printed, skipped)."""
    mods = {}
    for cfg in configs:
        t0 = time.time()
        try:
            kernels = dec.absorbed_decode(dims, target=target, config=cfg, sm_scale=sm_scale)
            mods[cfg] = dec.build(kernels, target)
            print(f"built {cfg} in {time.time() - t0:.1f}s", flush=True)
        except Exception as e:  # keep benchmarking the configs that build
            print(f"build of {cfg} failed: {type(e).__name__}: {str(e)[:500]}", flush=True)
    return mods


def selected_shapes(spec: str | None) -> list[tuple[int, int, int]]:
    """The ``SHAPES`` rows ``--shapes`` names (all without it); exits on an unknown one."""
    if not spec:
        return SHAPES
    wanted = set(parse_shapes(spec))
    shapes = [s for s in SHAPES if s[:2] in wanted]
    if len(shapes) != len(wanted):
        sys.exit(f"--shapes: known are {', '.join(f'{b}x{c}' for b, c, _ in SHAPES)}")
    return shapes


def measure_shape(shape, mods, target, dims, args, *, sms: int, l2_bytes: int, flush) -> dict:
    """One table row: every built config at the split counts ``split_counts`` picks (per call
    and in graph mode), the best and the default of each mode, the read roofline and the
    PyTorch baselines."""
    batch, ctx, max_context = shape
    sm_scale = dims.qk_head_dim**-0.5
    layers = 1
    if args.layers > 1:
        layers = graph_layers(dims, batch=batch, ctx=ctx, min_layers=args.layers, l2_bytes=l2_bytes)
    q, kv, indptr = make_inputs(dims, batch, ctx, layers=layers)
    q0, kv0 = q[0], kv[:1]  # [B, 1, H, 576], [1, B*ctx, 576]: the per-call baselines' input
    nbytes = call_bytes(dims, batch=batch, ctx=ctx)
    row = {
        "batch": batch,
        "ctx": ctx,
        "splits_for_context": max_context,
        "bytes": nbytes,
        "layers": layers,
        "cache_bytes": kv.numel() * kv.element_size(),
        "arch": str(target.attrs["arch"]),
        "configs": {},
    }
    for cfg, mod in mods.items():
        name = config_name(cfg)
        chosen = dec.splits_for(
            cfg,
            target,
            dims,
            q_tokens=1,
            batch=batch,
            max_context=max_context,
            sm_count=sms,
        )
        for splits in split_counts(chosen, max_context, cfg):
            key = f"{name}/s{splits}"
            calls, o, lse = ours(mod, dims, q, kv, indptr, splits=splits)
            check = functools.partial(
                verify, dims, q, kv, indptr, o, lse, sm_scale=sm_scale
            )  # check(layer=l): max abs error of layer l's output
            try:
                res = time_ours(
                    calls, o, lse, check=check, nbytes=nbytes, reps=args.reps, flush=flush
                )
            except Exception as e:  # a wrong config is reported, not timed
                res = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
            res.update(config=name, splits=splits, model_choice=splits == chosen)
            row["configs"][key] = res
            print(batch, ctx, key, res, flush=True)
            del calls, o, lse
    for mode, field in (("ours", "us"), ("ours_graph", "graph_us")):
        good = {k: v for k, v in row["configs"].items() if field in v}
        if good:
            row[mode] = good[min(good, key=lambda k, g=good, f=field: g[k][f])]
            modelled = [v for v in good.values() if v["model_choice"]]
            if modelled:  # the default config at the split count the model picks
                row[f"{mode}_default"] = modelled[0]
    # what streaming the cache alone costs here: torch.sum over the rows (a read roofline)
    timed = dict(reps=args.reps, before=flush)
    us = timing.median_us(lambda kv=kv0: kv.sum(dtype=torch.float32), **timed)
    row["read_roofline"] = {"us": us, "gbps": kv0.numel() * 2 / us / 1e3}
    if layers > 1:  # the same read in the graph mode's pattern: one sum per cache layer
        sums = [lambda x=kv[i]: x.sum(dtype=torch.float32) for i in range(layers)]
        us = timing.graph_us(sums, **timed)
        row["read_roofline"].update(graph_us=us, graph_gbps=kv0.numel() * 2 / us / 1e3)
    for base, make in (("torch_matmul", torch_matmul), ("torch_sdpa_mem_eff", torch_sdpa)):
        try:
            us = timing.median_us(make(dims, q0, kv0, sm_scale=sm_scale), **timed)
            row[base] = {"us": us, "gbps": nbytes / us / 1e3}
        except Exception as e:
            row[base] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
        print(batch, ctx, base, row[base], flush=True)
    return row


def print_table(rows, *, arch: str, flush: str) -> None:
    def cell(d, field="us"):
        gb = "gbps" if field == "us" else "graph_gbps"
        return f"{d[gb]:.0f} ({d[field]:.1f} us)" if d and gb in d else "err"

    print(
        f"\n{torch.cuda.get_device_name()} ({arch}), 16 heads, f16, GB/s (median time), "
        f"{flush} L2 flush\n"
    )
    print(
        "| batch | ctx | splits for | ours (best) | config / splits | ours (default) "
        "| ours_graph (best) | config / splits | ours_graph (default) "
        "| torch matmul | torch SDPA mem-eff | cache read roofline (torch.sum) "
        "| read roofline, graph |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        o, g = r.get("ours"), r.get("ours_graph")
        print(
            f"| {r['batch']} | {r['ctx']} | {r['splits_for_context']} | {cell(o)} | "
            f"{o['config'] + '/' + str(o['splits']) if o else '-'} | "
            f"{cell(r.get('ours_default'))} | {cell(g, 'graph_us')} | "
            f"{g['config'] + '/' + str(g['splits']) if g else '-'} | "
            f"{cell(r.get('ours_graph_default'), 'graph_us')} | "
            f"{cell(r['torch_matmul'])} | {cell(r['torch_sdpa_mem_eff'])} | "
            f"{cell(r['read_roofline'])} | {cell(r['read_roofline'], 'graph_us')} |"
        )


def main() -> None:
    args = parse_args()
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU")
    arch = gpu_arch()
    target = tvm_target(arch)
    props = torch.cuda.get_device_properties(0)
    sms = props.multi_processor_count
    dims = dataclasses.replace(preset("deepseek-v2-lite").dims, heads=HEADS)
    configs = [
        dataclasses.replace(c, min_split_rows=args.min_split_rows)
        for c in dec.candidate_configs(target, dims, q_tokens=1)
    ]
    configs = select_configs(configs, args.only, arch=arch, first=args.configs)
    mods = build_configs(configs, target, dims, sm_scale=dims.qk_head_dim**-0.5)
    flush = timing.l2_flusher(args.flush)
    rows = []
    for shape in selected_shapes(args.shapes):
        rows.append(
            measure_shape(
                shape, mods, target, dims, args, sms=sms, l2_bytes=props.L2_cache_size, flush=flush
            )
        )
        torch.cuda.empty_cache()
    with open(args.out, "w") as f:
        head = {"device": torch.cuda.get_device_name(), "sms": sms, "flush": args.flush}
        json.dump({**head, "rows": rows}, f, indent=1)
    print_table(rows, arch=arch, flush=args.flush)


if __name__ == "__main__":
    main()
