"""Where a prefill chunk and a decode step spend their time (GPU machine, runtime-only artifact).

GPU time per kernel comes from CUPTI through ``torch.profiler`` (it sees every kernel in the
process, TVM's too); the host side is timed with ``perf_counter``:

- ``step``: one ``Engine.decode`` (inputs uploaded, VM call, logits downloaded) - what tgN sees;
- ``issue``: the VM call alone, returning before the GPU finishes (host cost of the launches);
- ``gpu``: sum of kernel times of one step (what the GPU works).

    python benchmarks/profile_step.py ARTIFACT [--prompt 2048] [--steps 32] [--json FILE]
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import time

import numpy as np


def kernel_table(prof, steps: int) -> list[dict]:
    """Kernel name -> GPU microseconds per step and launches per step, largest first."""
    total = collections.Counter()
    count = collections.Counter()
    for ev in prof.events():
        if ev.device_type.name != "CUDA":
            continue
        name = ev.name.split("(")[0][:80]
        total[name] += ev.device_time_total if hasattr(ev, "device_time_total") else ev.cuda_time
        count[name] += 1
    rows = [
        {"kernel": k, "us_per_step": total[k] / steps, "launches_per_step": count[k] / steps}
        for k in total
    ]
    return sorted(rows, key=lambda r: -r["us_per_step"])


def main() -> None:
    import torch
    from torch.profiler import ProfilerActivity, profile

    from mla_compiler.runtime import Engine

    ap = argparse.ArgumentParser()
    ap.add_argument("artifact")
    ap.add_argument("--prompt", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--json")
    args = ap.parse_args()

    eng = Engine.load(args.artifact, max_context=args.prompt + 4 * args.steps + 8)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, eng.vocab_size, args.prompt).tolist()
    out: dict = {"artifact": args.artifact, "prompt": args.prompt, "steps": args.steps}

    # ---- prefill: one chunk, warm then profiled
    eng.reset()
    eng.prefill(ids)
    eng.reset()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        eng.prefill(ids)
        out["prefill_wall_ms"] = 1e3 * (time.perf_counter() - t0)
    out["prefill_kernels"] = kernel_table(prof, 1)
    out["prefill_gpu_ms"] = sum(r["us_per_step"] for r in out["prefill_kernels"]) / 1e3

    # ---- decode: full steps (host sampling as in tgN)
    tok = 1
    for _ in range(4):
        tok = int(np.argmax(eng.decode(tok)))
    walls = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        tok = int(np.argmax(eng.decode(tok)))
        walls.append(time.perf_counter() - t0)
    out["decode_step_ms"] = 1e3 * statistics.median(walls)

    # ---- decode: host issue time of the VM call alone (same inputs re-used, no download)
    import tvm

    pos = eng.pos
    c = eng.max_context
    inputs = [
        np.array([tok], np.int64),
        np.array([pos], np.int64),
        np.array([pos], np.int32),
        np.array([0, 1], np.int32),
        np.arange(pos + 1, dtype=np.int32) % c,
        np.array([0, pos + 1], np.int32),
        np.array([0], np.int64),
    ]
    dargs = [tvm.runtime.tensor(x, eng.device) for x in inputs]
    fn = eng.vm["decode"]
    fn(*dargs, eng.cache, *eng.params)
    eng.device.sync()
    issue, synced = [], []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        fn(*dargs, eng.cache, *eng.params)
        t1 = time.perf_counter()
        eng.device.sync()
        t2 = time.perf_counter()
        issue.append(t1 - t0)
        synced.append(t2 - t0)
    out["decode_issue_ms"] = 1e3 * statistics.median(issue)
    out["decode_call_synced_ms"] = 1e3 * statistics.median(synced)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        fn(*dargs, eng.cache, *eng.params)
    eng.device.sync()
    out["decode_back_to_back_ms"] = 1e3 * (time.perf_counter() - t0) / args.steps

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(args.steps):
            fn(*dargs, eng.cache, *eng.params)
        eng.device.sync()
    out["decode_kernels"] = kernel_table(prof, args.steps)
    out["decode_gpu_ms"] = sum(r["us_per_step"] for r in out["decode_kernels"]) / 1e3
    out["decode_launches"] = sum(r["launches_per_step"] for r in out["decode_kernels"])
    torch.cuda.synchronize()

    print(
        f"prefill {args.prompt}: wall {out['prefill_wall_ms']:.1f} ms, "
        f"GPU {out['prefill_gpu_ms']:.1f} ms"
    )
    for r in out["prefill_kernels"][:25]:
        print(f"  {r['us_per_step'] / 1e3:8.3f} ms  x{r['launches_per_step']:<5g} {r['kernel']}")
    print(
        f"decode: step {out['decode_step_ms']:.2f} ms, VM call synced "
        f"{out['decode_call_synced_ms']:.2f}, issue {out['decode_issue_ms']:.2f}, back-to-back "
        f"{out['decode_back_to_back_ms']:.2f}, GPU {out['decode_gpu_ms']:.2f} ms in "
        f"{out['decode_launches']:.0f} launches"
    )
    for r in out["decode_kernels"][:40]:
        print(f"  {r['us_per_step']:8.1f} us  x{r['launches_per_step']:<5g} {r['kernel']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
