"""How the benchmark scripts take a GPU time: one module, so every table is timed alike.

- ``event_times_us`` / ``median_us``: CUDA events around each call, the median of ``reps``; a
  ``before`` hook (e.g. ``l2_flusher``) runs untimed before each call.
- ``loop_s``: CUDA events around ``iters`` calls back to back, the median of ``rounds`` (wall
  clock with ``cuda=False``, for CPU smoke runs). Includes launch gaps.
- ``do_bench_ms``: triton's ``do_bench`` (median) where triton is installed, else ``median_us``.
- ``kernel_totals`` / ``kernel_events`` / ``kernel_spans``: kernel times as CUPTI records them
  (``torch.profiler``): no launch gaps, every kernel in the process (TVM's too).
- ``l2_flusher``: empties the L2 through a 256 MB buffer, by reading it (clean) or writing it.
- ``capture_graph`` / ``graph_us``: TVM calls captured back to back in one CUDA graph.
- ``copies_for`` / ``rotating``: input rotation, each timed call on another copy of its inputs
  (so weights come from DRAM, as in a decode step).
"""

from __future__ import annotations

import collections
import itertools
import json
import os
import statistics
import tempfile
import time

import torch

L2_FLUSH_BYTES = 256 << 20
ROTATE_BYTES = 256 << 20


def l2_flusher(mode: str = "clean"):
    """A callable that empties the L2 through a 256 MB buffer.

    ``"clean"`` reads the buffer: the L2 is left holding clean lines, as after a model's
    weight-reading kernels. ``"dirty"`` writes it (the usual ``zero_()`` flush): the next call's
    first ~L2-size of misses then also pay for writing those lines back (H200, (1, 16K): 19.3 us
    per call against 17.4 clean, 14.7 against 14.4 us per call in graph mode;
    ``results/bench_decode_h200_flush_{dirty,clean}.json``).
    """
    buf = torch.zeros(L2_FLUSH_BYTES, dtype=torch.int8, device="cuda")
    return buf.zero_ if mode == "dirty" else lambda: buf.sum(dtype=torch.int32)


def event_times_us(fn, *, reps: int, warmup: int = 3, before=None) -> list[float]:
    """Microseconds of each of ``reps`` calls of ``fn`` (CUDA events on the current stream),
    after ``warmup`` untimed calls; ``before()`` runs untimed before each timed call."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        if before is not None:
            before()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    return times


def median_us(fn, *, reps: int, warmup: int = 3, before=None) -> float:
    """Median microseconds of ``fn`` (``event_times_us``)."""
    return statistics.median(event_times_us(fn, reps=reps, warmup=warmup, before=before))


def loop_s(fn, *, iters: int = 50, warmup: int = 5, rounds: int = 3, cuda: bool = True) -> float:
    """Seconds per call of ``iters`` calls back to back, the median of ``rounds`` rounds timed
    with CUDA events (``cuda=False``: one wall-clock round)."""
    for _ in range(warmup):
        fn()
    if not cuda:
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        return (time.perf_counter() - t0) / iters
    torch.cuda.synchronize()
    runs = []
    for _ in range(rounds):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        end.synchronize()
        runs.append(start.elapsed_time(end) / 1e3 / iters)
    return statistics.median(runs)


def do_bench_ms(fn) -> float:
    """Median milliseconds of ``fn``: triton's ``do_bench`` (25 ms warm-up, 200 ms of reps)
    when triton is installed, else 30 calls after 5 (``median_us``)."""
    try:
        from triton.testing import do_bench
    except ImportError:
        return median_us(fn, reps=30, warmup=5) / 1e3
    return float(do_bench(fn, warmup=25, rep=200, return_mode="median"))


def kernel_events(prof):
    """(kernel name, GPU microseconds) of every CUDA kernel or copy a ``torch.profiler`` run
    recorded."""
    for ev in prof.events():
        if ev.device_type.name == "CUDA":
            yield (
                ev.name,
                ev.device_time_total if hasattr(ev, "device_time_total") else ev.cuda_time,
            )


def cupti():
    """A ``torch.profiler`` context recording CUDA activity (CUPTI)."""
    from torch.profiler import ProfilerActivity, profile

    return profile(activities=[ProfilerActivity.CUDA])


def kernel_totals(calls, *, reps: int) -> tuple[dict[str, float], dict[str, int]]:
    """Each of ``calls`` once untimed, then ``reps`` times under CUPTI: per kernel name, the
    total GPU microseconds and the number of launches."""
    for fn in calls:
        fn()
    torch.cuda.synchronize()
    with cupti() as prof:
        for fn in calls:
            for _ in range(reps):
                fn()
        torch.cuda.synchronize()
    total, count = collections.Counter(), collections.Counter()
    for name, us in kernel_events(prof):
        total[name] += us
        count[name] += 1
    return dict(total), dict(count)


def kernel_spans(run, *, replays: int, match: str, before=None) -> list[list[tuple]]:
    """Per call of ``run`` (after one untimed call; ``before()`` untimed before each), the
    kernels whose name contains ``match`` as (name, start us, duration us) in start order, from
    CUPTI's trace."""
    run()
    torch.cuda.synchronize()
    with cupti() as prof:
        for _ in range(replays):
            if before is not None:
                before()
            run()
            torch.cuda.synchronize()
    with tempfile.TemporaryDirectory() as tmp:  # one trace per call: not left in /tmp
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f)["traceEvents"]
    kernels = sorted(
        (e["ts"], e["dur"], e["name"])
        for e in events
        if e.get("cat") == "kernel" and match in e.get("name", "")
    )
    per = len(kernels) // replays
    return [
        [(name, ts, dur) for ts, dur, name in kernels[i * per : (i + 1) * per]]
        for i in range(replays)
    ]


def capture_graph(calls) -> torch.cuda.CUDAGraph:
    """``calls`` (TVM calls) captured back to back into one CUDA graph (returned).

    TVM launches on the stream tvm_ffi holds for the device: ``use_torch_stream`` points it at
    torch's stream (the capture stream inside ``torch.cuda.graph``). The calls run once first
    (module load, smem attributes: nothing of that may happen during capture).
    """
    import tvm_ffi

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())  # the inputs were made on the current stream
    with tvm_ffi.use_torch_stream(torch.cuda.stream(side)):
        for call in calls:
            call()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with tvm_ffi.use_torch_stream(torch.cuda.graph(graph)):
        for call in calls:
            call()
    return graph


def graph_us(calls, *, reps: int, before=None) -> float:
    """Median microseconds per call of ``calls`` captured back to back in one CUDA graph."""
    return median_us(capture_graph(calls).replay, reps=reps, before=before) / len(calls)


def copies_for(nbytes: int, total: int = ROTATE_BYTES) -> int:
    """Copies of an ``nbytes`` input that rotating calls cycle through: ``total`` bytes in all,
    far more than the L2 holds."""
    return max(1, -(-total // nbytes))


def rotating(call):
    """A callable that runs ``call(i)`` with i = 1, 2, 3, ... on successive calls (``i % copies``
    picks the copy of the inputs)."""
    turn = itertools.count(1)
    return lambda: call(next(turn))


def device_arch() -> str:
    """The arch to build for on this GPU: ``sm_90a`` on Hopper (its wgmma / TMA kernels), else
    ``sm_XY``."""
    major, minor = torch.cuda.get_device_capability()
    return "sm_90a" if (major, minor) >= (9, 0) else f"sm_{major}{minor}"


def build_kernel(func, target):
    """A PrimFunc or IRModule built for ``target`` with the model build's pass config."""
    import tvm

    from mla_compiler.schedules.target import PASS_CONFIG

    with tvm.transform.PassContext(config=PASS_CONFIG):
        return tvm.compile(func, target=target)
