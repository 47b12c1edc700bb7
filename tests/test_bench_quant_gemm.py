"""``benchmarks/bench_quant_gemm.py --cpu-smoke``: the prompt-GEMM benchmark over quantized
weights runs end to end on the CPU (llvm kernels, small dense and MoE shapes), checks every
output against float32 over the dequantized weights, skips shapes whose K is no whole number of
the format's blocks, and writes one JSON record per case."""

from __future__ import annotations

import json

from conftest import load_benchmark


def test_bench_quant_gemm_cpu_smoke(tmp_path):
    bench = load_benchmark("bench_quant_gemm")
    out = tmp_path / "quant_gemm.json"
    shapes = "mlp_gate_up,mlp_down,moe_gate_up,moe_down"
    argv = ["--out", str(out), "--cpu-smoke", "--formats", "q4_k,q8_0", "--shapes", shapes]
    assert bench.main([*argv, "--tokens", "37,5", "--jobs", "2"]) == 0
    data = json.loads(out.read_text())
    assert data["device"] == "cpu" and data["ceiling"]["gemm_f16_tflops"] > 0
    results = data["results"]
    assert not [r for r in results if "error" in r], results
    skipped = {(r["shape"], r["format"]) for r in results if "skipped" in r}
    # K = 288 (dense down) and K = 64 (expert down) hold no 256-value q4_k blocks
    assert skipped == {("mlp_down", "q4_k"), ("moe_down", "q4_k")}
    timed = [r for r in results if "skipped" not in r]
    assert {(r["shape"], r["format"], r["tokens"]) for r in timed} == {
        (s, f, t)
        for s in shapes.split(",")
        for f in ("q4_k", "q8_0")
        for t in (37, 5)
        if (s, f) not in skipped
    }
    for r in timed:
        assert r["ok"] and r["quant_max_rel_err"] < 1e-4 and r["f16_max_rel_err"] < 1e-4, r
        assert min(r["quant_us"], r["f16_us"], r["cublas_us"]) > 0, r
        assert abs(r["ratio"] - r["f16_us"] / r["quant_us"]) < 1e-9
        assert r["meets_target"] == (r["ratio"] >= bench.TARGET_RATIO)
        assert r["quant_tflops"] > 0 and r["of_ceiling"] > 0 and r["quant_bytes"] > 0
