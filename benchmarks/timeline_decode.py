"""Inside one decode split kernel: per-CTA timelines from a probe build, and launch overheads.

    python -m benchmarks.timeline_decode --out timeline_decode.json [--shapes 1x16384,1x32768]

Per (batch, ctx), default config at the model's split count, the graph mode of
``bench_decode.py`` (``--layers`` calls over other cache layers, L2 flushed before each replay):

- ``cupti``: CUPTI spans of split + merge (as ``profile_decode.py``), and of a graph of the
  split kernel alone (no merge between two splits: does the merge cost the next split anything,
  e.g. a shared-memory carveout switch?);
- ``probe``: the same graph with the split built with ``probe=True`` (``split_mma``): thread 0
  of every CTA stamps globaltimer at entry and end and clock64 at entry, end and when each of the
  first tiles has landed / is done. From the last layer's stamps: when the CTAs start (spread
  after the first), the span from the first entry to the last end (vs CUPTI's kernel duration:
  the rest is launch and teardown), and per CTA the phases in ns (median and max over CTAs):
  ``first_tile`` entry to tile 0 landed (the load latency chain), ``math_j`` tile j landed to
  done, ``wait_j`` tile j-1 done to tile j landed (exposed load time), ``epilogue``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics

import torch
import tvm

if __name__ == "__main__":  # run from the checkout (maybe uninstalled): import its package
    from benchmarks import package_shim

    package_shim.use_checkout_package()

try:  # as benchmarks.timeline_decode
    from benchmarks import bench_decode as bd
    from benchmarks import profile_decode as pdc
    from benchmarks import timing
except ImportError:  # by file path, benchmarks/ on sys.path (tests/conftest.load_benchmark)
    import bench_decode as bd
    import profile_decode as pdc
    import timing

from mla_compiler.model_export.config import preset  # noqa: E402
from mla_compiler.schedules import attention_decode as dec  # noqa: E402
from mla_compiler.schedules.attention_decode_mma import PROBE_TILES, split_mma  # noqa: E402
from mla_compiler.schedules.target import tvm_target  # noqa: E402


def probe_module(dims, cfg, target, *, sm_scale: float):
    """decode_split built with ``probe=True`` next to the regular merge."""
    k = dec.absorbed_decode(dims, target=target, config=cfg, sm_scale=sm_scale)
    split = split_mma(dims, q_tokens=1, config=cfg, sm_scale=sm_scale, probe=True).with_attr(
        "global_symbol", "decode_split"
    )
    return dec.build(dec.DecodeKernels(split=split, merge=k.merge, config=cfg), target)


def layer_calls(mod, q, kv, indptr, o_part, lse_part, *, merge: bool):
    """One closure per layer: the split kernel (writing into the workspace given), then the
    merge if ``merge`` (into per-layer outputs)."""
    split, merge_f = mod["decode_split"], mod["decode_merge"]
    batch, heads, dv = q[0].shape[0], q[0].shape[2], o_part.shape[-1]
    calls = []
    for layer in range(len(q)):
        o = torch.empty(batch, 1, heads, dv, device="cuda", dtype=torch.float16)
        lse = torch.empty(batch, 1, heads, device="cuda")
        args = [bd._t(q[layer]), bd._t(kv), bd._t(indptr), layer, bd._t(o_part)]
        args += [bd._t(lse_part), bd._t(o), bd._t(lse)]
        margs = [bd._t(o_part), bd._t(lse_part), bd._t(indptr), bd._t(o), bd._t(lse)]

        def run(args=args, margs=margs, keep=(o, lse)):
            split(*args)
            if merge:
                merge_f(*margs)

        calls.append(run)
    return calls


def phases(stamps: torch.Tensor, tiles: int) -> dict:
    """Per-CTA phase durations (ns) from stamps [CTAs, 12] (uint32 bits as int64)."""

    def d(a, b):  # wrap-safe uint32 difference
        return (stamps[:, b] - stamps[:, a]) % (1 << 32)

    gt_entry, gt_span = stamps[:, 0], d(0, 1)
    clk_span = d(2, 3)
    ns_per_clk = statistics.median((gt_span.double() / clk_span.double()).tolist())
    first = int(gt_entry.min())
    start = ((gt_entry - first) % (1 << 32)).double()
    end = start + gt_span.double()
    out = {
        "ns_per_clock": ns_per_clk,
        "start_spread_ns": _stats(start),
        "span_ns": float(end.max()),
        "cta_ns": _stats(gt_span.double()),
    }
    land = [4 + 2 * j for j in range(min(tiles, PROBE_TILES))]
    prev = 2  # entry clock
    for j, slot in enumerate(land):
        key = "first_tile" if j == 0 else f"wait_{j}"
        out[key + "_ns"] = _stats(d(prev, slot).double() * ns_per_clk)
        out[f"math_{j}_ns"] = _stats(d(slot, slot + 1).double() * ns_per_clk)
        prev = slot + 1
    if tiles <= PROBE_TILES:
        out["epilogue_ns"] = _stats(d(prev, 3).double() * ns_per_clk)
    return out


def _stats(x: torch.Tensor) -> dict:
    return {"median": float(x.median()), "max": float(x.max()), "min": float(x.min())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--shapes", default="1x16384,1x32768,32x4096")
    ap.add_argument("--layers", type=int, default=27)
    ap.add_argument("--replays", type=int, default=5)
    ap.add_argument("--only", help="comma list of config labels (default: the default config)")
    args = ap.parse_args()
    arch = bd.gpu_arch()
    target = tvm_target(arch)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    dims = dataclasses.replace(preset("deepseek-v2-lite").dims, heads=bd.HEADS)
    found = dec.candidate_configs(target, dims, q_tokens=1)
    configs = bd.select_configs(found, args.only, arch=arch, first=1)
    rows = []
    for cfg in configs:
        rows += timelines(cfg, target, dims, args, sms=sms, l2=l2)
    with open(args.out, "w") as f:
        info = {"device": torch.cuda.get_device_name(), "sms": sms, "tvm": tvm.__version__}
        json.dump({**info, "rows": rows}, f, indent=1)


def timelines(cfg, target, dims, args, *, sms: int, l2: int) -> list[dict]:
    """One row per shape of ``args.shapes`` for ``cfg`` (printed as it lands)."""
    sm_scale = dims.qk_head_dim**-0.5
    mod = dec.build(
        dec.absorbed_decode(dims, target=target, config=cfg, sm_scale=sm_scale),
        target,
    )
    pmod = probe_module(dims, cfg, target, sm_scale=sm_scale)
    rows = []
    for batch, ctx in bd.parse_shapes(args.shapes):
        layers = bd.graph_layers(dims, batch=batch, ctx=ctx, min_layers=args.layers, l2_bytes=l2)
        q, kv, indptr = bd.make_inputs(dims, batch, ctx, layers=layers)
        nbytes = bd.call_bytes(dims, batch=batch, ctx=ctx)
        splits = dec.splits_for(
            cfg, target, dims, q_tokens=1, batch=batch, max_context=ctx,
            sm_count=sms,
        )  # fmt: skip
        row = {"batch": batch, "ctx": ctx, "splits": splits, "config": bd.config_name(cfg)}
        calls, o, lse = bd.ours(mod, dims, q, kv, indptr, splits=splits)
        graph = timing.capture_graph(calls)
        row["cupti"] = pdc.summarize(pdc.kernel_spans(graph, replays=args.replays), nbytes=nbytes)
        del graph
        ws = dec.workspace_shapes(dims, batch=batch, q_tokens=1, num_splits=splits)
        o_part = torch.zeros(ws["o_part"], device="cuda")  # [S, B, 1, H, 512]
        lse_part = torch.zeros(ws["lse_part"], device="cuda")
        graph = timing.capture_graph(layer_calls(mod, q, kv, indptr, o_part, lse_part, merge=False))
        alone = pdc.summarize(pdc.kernel_spans(graph, replays=args.replays), nbytes=nbytes)
        row["cupti_split_alone_us"] = alone["split_us"]
        del graph
        pcalls = layer_calls(pmod, q, kv, indptr, o_part, lse_part, merge=splits > 1)
        graph = timing.capture_graph(pcalls)
        flush = timing.l2_flusher("dirty")  # as the timelines in NOTES_decode.md were taken
        used = dec.effective_splits(
            ctx, splits, block_n=cfg.block_n, min_split_rows=cfg.min_split_rows
        )
        tiles = -(-ctx // cfg.block_n) // used  # tiles of the shortest used split
        reps = []
        for _ in range(args.replays):
            flush()
            graph.replay()
            torch.cuda.synchronize()
            reps.append(phases(_stamps(o_part), tiles))
        row["probe"] = reps[len(reps) // 2]
        row["probe_span_ns_all"] = [r["span_ns"] for r in reps]
        print(json.dumps(row), flush=True)
        rows.append(row)
        del calls, pcalls, graph, o, lse, q, kv, indptr, o_part, lse_part
        torch.cuda.empty_cache()
    return rows


def _stamps(o_part: torch.Tensor) -> torch.Tensor:
    """The last layer's stamps [CTAs, 12] from the workspace the probe calls share."""
    bits = o_part[:, :, 0, 0, : 4 + 2 * PROBE_TILES].contiguous().view(torch.int32)
    return bits.reshape(-1, bits.shape[-1]).to(torch.int64) % (1 << 32)


if __name__ == "__main__":
    main()
