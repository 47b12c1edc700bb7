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

    def to_dict(self) -> dict:
        return {"test": self.test, "tps_mean": self.tps_mean, "tps_std": self.tps_std,
                "seconds": list(self.seconds)}


def _stats(test: str, tokens: int, seconds: list[float]) -> BenchResult:
    tps = [tokens / s for s in seconds]
    return BenchResult(test, statistics.fmean(tps), statistics.pstdev(tps), tuple(seconds))


def bench_engine(
    engine, *, prompts: Sequence[int], gen: int, reps: int = 3, seed: int = 0,
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
        times = []
        for r in range(reps + 1):
            engine.reset()
            engine.prefill(rng.integers(0, vocab, 8).tolist())
            tok = 1
            t0 = time.perf_counter()
            for _ in range(gen):
                tok = int(np.argmax(engine.decode(tok)))
            if r:
                times.append(time.perf_counter() - t0)
        results.append(_stats(f"tg{gen}", gen, times))
        if progress:
            progress(f"tg{gen}: {results[-1].tps_mean:,.1f} t/s")
    return results


def markdown_table(results: list[BenchResult], *, model: str, mla: int,
                   baseline: dict[str, float] | None = None) -> str:
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
