"""Where a prefill chunk and a decode step spend their time (GPU machine, runtime-only artifact).

GPU time per kernel comes from CUPTI through ``torch.profiler`` (it sees every kernel in the
process, TVM's too); the host side is timed with ``perf_counter``:

- ``step``: one generation step (inputs uploaded in one copy, VM call, sampling on the device
  when the artifact has ``sample``, token ids downloaded) - what tgN sees; also with host
  sampling (logits downloaded);
- ``decode_host``: the host's own time per step (``upload`` + ``issue`` of the decode call +
  ``sample`` issue), from ``Engine.step_times``;
- ``issue``: the VM call alone, returning before the GPU finishes (host cost of the launches);
- ``gpu``: sum of kernel times of one step (what the GPU works), and the launch / copy API
  calls per step; ``decode_host_overhead_ms`` = step - gpu.

    python -m benchmarks.profile_step ARTIFACT [--prompt 2048] [--steps 32] [--json FILE]
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import time

import numpy as np

from benchmarks import timing


def kernel_table(prof, steps: int) -> list[dict]:
    """Kernel name -> GPU microseconds per step and launches per step, largest first."""
    total = collections.Counter()
    count = collections.Counter()
    for name, us in timing.kernel_events(prof):
        name = name.split("(")[0][:80]
        total[name] += us
        count[name] += 1
    rows = [
        {"kernel": k, "us_per_step": total[k] / steps, "launches_per_step": count[k] / steps}
        for k in total
    ]
    return sorted(rows, key=lambda r: -r["us_per_step"])


def api_calls(prof, steps: int) -> dict:
    """CUDA runtime/driver launch and copy calls per step (kernel launches, graph launches,
    memcpy), as CUPTI recorded them."""
    count = collections.Counter()
    for ev in prof.events():
        name = ev.name
        if name.startswith("cu") and ("Launch" in name or "Memcpy" in name):
            count[name] += 1
    return {k: v / steps for k, v in sorted(count.items())}


def main() -> None:
    import torch

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
    with timing.cupti() as prof:
        t0 = time.perf_counter()
        eng.prefill(ids)
        out["prefill_wall_ms"] = 1e3 * (time.perf_counter() - t0)
    out["prefill_kernels"] = kernel_table(prof, 1)
    out["prefill_gpu_ms"] = sum(r["us_per_step"] for r in out["prefill_kernels"]) / 1e3

    # ---- decode: full steps as generation runs them (greedy), device then host sampling
    from mla_compiler.runtime.bench import decode_host_times
    from mla_compiler.runtime.engine import SamplingParams

    greedy = SamplingParams()
    gen = np.random.default_rng(0)

    def steps(n: int, tok: int) -> tuple[int, list[float]]:
        walls = []
        for _ in range(n):
            t0 = time.perf_counter()
            tok = eng._next_tokens([(0, np.array([tok]))], greedy, gen)[0]
            walls.append(time.perf_counter() - t0)
        return tok, walls

    out["sampler"] = eng.sampler
    out["cuda_graph"] = bool(eng.meta.get("cuda_graph", False))
    tok, _ = steps(4, 1)  # warm: module load, CUDA graph capture
    eng.step_times = []
    tok, walls = steps(args.steps, tok)
    out["decode_step_ms"] = 1e3 * statistics.median(walls)
    out["decode_host"] = decode_host_times(eng.step_times)
    sampler = eng.sampler
    eng.sampler = "host"  # the same steps with the logits downloaded and sampled by numpy
    eng.step_times = []
    tok, walls = steps(args.steps, tok)
    out["decode_step_host_sampling_ms"] = 1e3 * statistics.median(walls)
    out["decode_host_host_sampling"] = decode_host_times(eng.step_times)
    eng.sampler = sampler
    eng.step_times = None

    # ---- decode: host issue time of the VM call alone (same inputs re-used, no download)
    inputs, _ = eng._inputs([(0, np.array([tok]))])
    dargs = eng.staging.upload(inputs)
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

    # ---- GPU time of whole steps (decode + sampling) and the launch API calls the host makes
    with timing.cupti() as prof:
        tok, _ = steps(args.steps, tok)
        eng.device.sync()
    out["decode_kernels"] = kernel_table(prof, args.steps)
    out["decode_gpu_ms"] = sum(r["us_per_step"] for r in out["decode_kernels"]) / 1e3
    out["decode_launches"] = sum(r["launches_per_step"] for r in out["decode_kernels"])
    out["decode_api_calls"] = api_calls(prof, args.steps)
    out["decode_host_overhead_ms"] = out["decode_step_ms"] - out["decode_gpu_ms"]
    torch.cuda.synchronize()

    print(
        f"prefill {args.prompt}: wall {out['prefill_wall_ms']:.1f} ms, "
        f"GPU {out['prefill_gpu_ms']:.1f} ms"
    )
    for r in out["prefill_kernels"][:25]:
        print(f"  {r['us_per_step'] / 1e3:8.3f} ms  x{r['launches_per_step']:<5g} {r['kernel']}")
    h = out["decode_host"]
    print(
        f"decode ({out['sampler']} sampling, cuda_graph={out['cuda_graph']}): step "
        f"{out['decode_step_ms']:.2f} ms (host sampling {out['decode_step_host_sampling_ms']:.2f}),"
        f" host per step {h.get('host_ms', 0):.2f} ms (upload {h.get('upload_ms', 0):.3f}, "
        f"issue {h.get('issue_ms', 0):.2f}, sample {h.get('sample_ms', 0):.3f}); VM call synced "
        f"{out['decode_call_synced_ms']:.2f}, issue {out['decode_issue_ms']:.2f}, back-to-back "
        f"{out['decode_back_to_back_ms']:.2f}; GPU {out['decode_gpu_ms']:.2f} ms in "
        f"{out['decode_launches']:.0f} kernels; API calls/step {out['decode_api_calls']}"
    )
    for r in out["decode_kernels"][:40]:
        print(f"  {r['us_per_step']:8.1f} us  x{r['launches_per_step']:<5g} {r['kernel']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
