"""llama-bench-style throughput: ``ppN`` (prompt of N tokens, one sequence) and ``tgN`` (N
generated tokens after a short prompt), tokens per second as mean ± std over repeats."""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable, Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class BenchResult:
    test: str
    tps_mean: float
    tps_std: float
    seconds: tuple[float, ...]
    host: dict | None = None  # tgN: host time per decode step (``decode_host_times``)

    def to_dict(self) -> dict:
        out = {
            "test": self.test,
            "tps_mean": self.tps_mean,
            "tps_std": self.tps_std,
            "seconds": list(self.seconds),
        }
        if self.host:
            out["decode_host"] = self.host
        return out


def _stats(test: str, tokens: int, seconds: list[float], host: dict | None = None) -> BenchResult:
    tps = [tokens / s for s in seconds]
    return BenchResult(test, statistics.fmean(tps), statistics.pstdev(tps), tuple(seconds), host)


def decode_host_times(step_times: list[dict]) -> dict:
    """Median milliseconds per decode step from ``Engine.step_times``: ``upload`` (the one
    input copy), ``issue`` (the VM decode call: returns once its launches are queued, so on a
    GPU this is the host cost of issuing them), ``sample`` (issuing device sampling), ``host``
    (their sum: the host's work per token before it waits for the GPU), ``step`` (the whole
    step: the wait for the GPU and the token download included)."""
    steps = [t for t in step_times if t.get("decode") and "total" in t]
    if not steps:
        return {}

    def med(f) -> float:
        return 1e3 * statistics.median(f(t) for t in steps)

    return {
        "steps": len(steps),
        "upload_ms": med(lambda t: t["upload"]),
        "issue_ms": med(lambda t: t["call"]),
        "sample_ms": med(lambda t: t.get("sample", 0.0)),
        "host_ms": med(lambda t: t["upload"] + t["call"] + t.get("sample", 0.0)),
        "step_ms": med(lambda t: t["total"]),
    }


def bench_engine(
    engine,
    *,
    prompts: Sequence[int],
    gen: int,
    reps: int = 3,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> list[BenchResult]:
    """Time prompt processing at each length in ``prompts`` and ``gen`` decode steps."""
    rng = np.random.default_rng(seed)
    vocab = engine.vocab_size
    results = []
    for n in prompts:
        if n > engine.max_context:
            raise ValueError(f"pp{n} exceeds the engine's max context {engine.max_context}")
        times = []
        for r in range(reps + 1):  # first run warms up (module load, allocations)
            ids = rng.integers(0, vocab, n).tolist()
            engine.reset()
            t0 = time.perf_counter()
            engine.prefill(ids)
            if r:
                times.append(time.perf_counter() - t0)
        results.append(_stats(f"pp{n}", n, times))
        if progress:
            progress(f"pp{n}: {results[-1].tps_mean:,.1f} t/s")
    if gen:
        from mla_compiler.runtime.engine import SamplingParams

        greedy = SamplingParams()
        times, steps = [], []
        for r in range(reps + 1):
            engine.reset()
            engine.prefill(rng.integers(0, vocab, 8).tolist())
            tok = 1
            engine.step_times = [] if r else None
            t0 = time.perf_counter()
            for _ in range(gen):  # what generation does: a step, the token sampled (greedy)
                tok = engine._next_tokens([(0, np.array([tok]))], greedy, rng)[0]
            if r:
                times.append(time.perf_counter() - t0)
                steps += engine.step_times
        engine.step_times = None
        host = {"sampler": engine.sampler, **decode_host_times(steps)}
        results.append(_stats(f"tg{gen}", gen, times, host))
        if progress:
            progress(
                f"tg{gen}: {results[-1].tps_mean:,.1f} t/s (host per step "
                f"{host.get('host_ms', 0):.2f} ms of {host.get('step_ms', 0):.2f}, "
                f"{engine.sampler} sampling)"
            )
    return results


def markdown_table(
    results: list[BenchResult], *, model: str, mla: int, baseline: dict[str, float] | None = None
) -> str:
    head = "| model | mla | test | t/s |" + (" baseline t/s | speedup |" if baseline else "")
    sep = "| --- | --- | --- | ---: |" + (" ---: | ---: |" if baseline else "")
    rows = [head, sep]
    for r in results:
        row = f"| {model} | {mla} | {r.test} | {r.tps_mean:,.2f} ± {r.tps_std:,.2f} |"
        if baseline:
            b = baseline.get(r.test)
            row += f" {b:,.2f} | {r.tps_mean / b:.2f}x |" if b else " - | - |"
        rows.append(row)
    return "\n".join(rows)


def bench_hf(
    meta: dict,
    *,
    prompts: Sequence[int],
    gen: int,
    reps: int = 3,
    seed: int = 0,
    device: str = "cuda",
    dtype: str = "bfloat16",
    progress: Callable[[str], None] | None = None,
) -> list[BenchResult]:
    """HF transformers' eager DeepseekV2ForCausalLM of the artifact's config (random weights:
    speed does not depend on their values), timed like ``bench_engine``."""
    import torch
    from transformers import DeepseekV2Config, DeepseekV2ForCausalLM

    from mla_compiler.model_export.config import ModelConfig, to_hf_dict

    cfg = ModelConfig.from_dict(meta["model"])
    hf_cfg = DeepseekV2Config(**to_hf_dict(cfg))
    hf_cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    with torch.device(device):
        model = DeepseekV2ForCausalLM(hf_cfg).to(getattr(torch, dtype)).eval()
    rng = np.random.default_rng(seed)

    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    results = []
    with torch.no_grad():
        for n in prompts:
            times = []
            for r in range(reps + 1):
                ids = torch.as_tensor(rng.integers(0, cfg.vocab_size, (1, n)), device=device)
                sync()
                t0 = time.perf_counter()
                model(ids, logits_to_keep=1)
                sync()
                if r:
                    times.append(time.perf_counter() - t0)
            results.append(_stats(f"pp{n}", n, times))
            if progress:
                progress(f"hf pp{n}: {results[-1].tps_mean:,.1f} t/s")
        if gen:
            times = []
            for r in range(reps + 1):
                ids = torch.as_tensor(rng.integers(0, cfg.vocab_size, (1, 8)), device=device)
                sync()
                t0 = time.perf_counter()
                model.generate(ids, max_new_tokens=gen, min_new_tokens=gen, do_sample=False)
                sync()
                if r:
                    times.append(time.perf_counter() - t0)
            results.append(_stats(f"tg{gen}", gen, times))
            if progress:
                progress(f"hf tg{gen}: {results[-1].tps_mean:,.1f} t/s")
    del model
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return results


def plot(
    results: list[BenchResult], path: str, *, title: str, baseline: list[BenchResult] | None = None
) -> None:
    """Bar chart of t/s per test (ours and, if given, the baseline) into a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tests = [r.test for r in results]
    x = np.arange(len(tests))
    width = 0.4 if baseline else 0.6
    fig, ax = plt.subplots(figsize=(1.4 * len(tests) + 3, 4))
    ax.bar(
        x - (width / 2 if baseline else 0),
        [r.tps_mean for r in results],
        width,
        yerr=[r.tps_std for r in results],
        label="mla-compiler",
    )
    if baseline:
        by = {b.test: b for b in baseline}
        ax.bar(
            x + width / 2,
            [by[t].tps_mean if t in by else 0 for t in tests],
            width,
            yerr=[by[t].tps_std if t in by else 0 for t in tests],
            label="HF transformers (eager)",
        )
    ax.set_xticks(x, tests)
    ax.set_ylabel("tokens / s")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
