"""Where a decode attention call's time goes: CUPTI kernel spans of the split / merge kernels.

    python -m benchmarks.profile_decode --out profile_decode.json [--shapes 1x16384,32x4096]

For each (batch, ctx) and each of the first ``--configs`` candidate configs at the split count
the model picks: the graph mode of ``bench_decode.py`` (``--layers`` calls, each over another
cache layer, in one CUDA graph) replayed under ``torch.profiler``; from the trace: per call, the
split kernel's and the merge kernel's mean duration, the mean idle gap before each, and the
span (first kernel start to last kernel end of a replay) / calls. GB/s count the cache rows
read once + Q + O, as ``bench_decode.py`` does.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics

import torch

if __name__ == "__main__":  # run from the checkout (maybe uninstalled): import its package
    from benchmarks import package_shim

    package_shim.use_checkout_package()

try:  # as benchmarks.profile_decode
    from benchmarks import bench_decode as bd
    from benchmarks import timing
except ImportError:  # by file path, benchmarks/ on sys.path (tests/conftest.load_benchmark)
    import bench_decode as bd
    import timing

from mla_compiler.model_export.config import preset  # noqa: E402
from mla_compiler.schedules import attention_decode as dec  # noqa: E402
from mla_compiler.schedules.target import tvm_target  # noqa: E402


def kernel_spans(graph, *, replays: int) -> list[list[tuple[str, float, float]]]:
    """Per replay, its decode kernels as (name, start us, duration us), in start order; the L2
    flushed by writing before each replay, as the spans in NOTES_decode.md were taken."""
    flush = timing.l2_flusher("dirty")
    return timing.kernel_spans(graph.replay, replays=replays, match="decode_", before=flush)


def summarize(replays, *, nbytes: int) -> dict:
    """Mean split / merge duration and idle gap before each, span per call (median replay)."""
    out: dict[str, float] = {}
    for kind in ("split", "merge"):
        durs, gaps = [], []
        for ks in replays:
            for i, (name, ts, dur) in enumerate(ks):
                if f"decode_{kind}" in name:
                    durs.append(dur)
                    if i:
                        gaps.append(ts - (ks[i - 1][1] + ks[i - 1][2]))
        out[f"{kind}_us"] = statistics.mean(durs) if durs else float("nan")
        out[f"gap_before_{kind}_us"] = statistics.mean(gaps) if gaps else float("nan")
    calls = sum(1 for name, _, _ in replays[0] if "decode_split" in name) or len(replays[0])
    spans = [(ks[-1][1] + ks[-1][2] - ks[0][1]) / calls for ks in replays]
    out["span_per_call_us"] = statistics.median(spans)
    out["span_gbps"] = nbytes / out["span_per_call_us"] / 1e3
    out["split_gbps"] = nbytes / out["split_us"] / 1e3
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--shapes", default="1x16384,1x32768,32x4096,128x4096")
    ap.add_argument("--configs", type=int, default=2)
    ap.add_argument("--layers", type=int, default=27)
    ap.add_argument("--replays", type=int, default=5)
    args = ap.parse_args()
    arch = bd.gpu_arch()
    target = tvm_target(arch)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    dims = dataclasses.replace(preset("deepseek-v2-lite").dims, heads=bd.HEADS)
    sm_scale = dims.qk_head_dim**-0.5
    configs = dec.candidate_configs(target, dims, q_tokens=1)[: args.configs]
    mods = {
        cfg: dec.build(
            dec.absorbed_decode(dims, target=target, config=cfg, sm_scale=sm_scale),
            target,
        )
        for cfg in configs
    }
    rows = []
    for batch, ctx in bd.parse_shapes(args.shapes):
        layers = bd.graph_layers(dims, batch=batch, ctx=ctx, min_layers=args.layers, l2_bytes=l2)
        q, kv, indptr = bd.make_inputs(dims, batch, ctx, layers=layers)
        nbytes = bd.call_bytes(dims, batch=batch, ctx=ctx)
        for cfg, mod in mods.items():
            splits = dec.splits_for(
                cfg,
                target,
                dims,
                q_tokens=1,
                batch=batch,
                max_context=ctx,
                sm_count=sms,
            )
            calls, o, lse = bd.ours(mod, dims, q, kv, indptr, splits=splits)
            graph = timing.capture_graph(calls)
            graph.replay()
            torch.cuda.synchronize()
            err = bd.verify(dims, q, kv, indptr, o, lse, layer=layers - 1, sm_scale=sm_scale)
            res = summarize(kernel_spans(graph, replays=args.replays), nbytes=nbytes)
            res.update(
                batch=batch,
                ctx=ctx,
                layers=layers,
                splits=splits,
                max_abs_err=err,
                config=bd.config_name(cfg),
            )
            print(json.dumps(res), flush=True)
            rows.append(res)
            del calls, o, lse, graph
        del q, kv, indptr
        torch.cuda.empty_cache()
    with open(args.out, "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "sms": sms, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
