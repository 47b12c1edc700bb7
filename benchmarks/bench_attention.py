"""Prefill attention throughput on the local GPU: our TVM kernels against the baselines.

    python -m benchmarks.bench_attention --out bench_attention.json [--n 512,2048,8192,16384]

One sequence, T = N = n new tokens, causal, 16 heads, f16. TFLOP/s = 2*H*T*N_eff*(Dk+Dv)/t with
N_eff = N/2 (causal). ``--chunk T``: the model's later prompt chunks instead, T new tokens after
a cached prefix of N - T (N_eff = N - T/2); ours then builds its two-kernel form
(``extend_config`` for T-token chunks), SDPA gets a lower-right causal mask. The default of
ours is built as the model builds it, with its ``short_config`` kernel for short prompts. Kinds:

- ``absorbed``: MLA over the 576-wide latent rows (Dk = 576, Dv = 512, one shared KV head).
- ``decompressed``: per-head K/V (Dk = 192, Dv = 128).

Implementations timed in the same run: ours (``mla_compiler.schedules.attention_prefill``),
PyTorch SDPA with each backend that accepts the shape (math, efficient, flash, cudnn), a naive
matmul-softmax-matmul in PyTorch, and TVM's built-in prefill TIR kernels (paged MLA kernel
``_attention_prefill_mla`` for absorbed, ``_attention_prefill_ragged`` for decompressed). Every
candidate config of ours is built, checked against PyTorch (poisoned outputs, f32 reference on
the first 128 and last 256 query rows) and only then timed, each in its own child process;
``ours`` is the default config, ``ours-best`` the fastest correct one. JSON goes to ``--out``; a
markdown table is printed last.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import subprocess
import sys
import time
import traceback

import torch
import tvm

try:  # as benchmarks.bench_attention
    from benchmarks import timing
except ImportError:  # by file path, benchmarks/ on sys.path (tests/conftest.load_benchmark)
    import timing

from mla_compiler.model_export.config import MLADims, preset
from mla_compiler.schedules import attention_prefill as ap
from mla_compiler.schedules.target import GPUS, tvm_target

HEADS = 16
BASELINES = (
    "sdpa-math",
    "sdpa-efficient",
    "sdpa-flash",
    "sdpa-cudnn",
    "naive-torch",
    "tvm-builtin",
)
SM_SCALE = 1.0 / math.sqrt(192)
CHUNK = 0  # --chunk: queries per call (0: T = N)


def queries(n: int) -> int:
    return min(CHUNK, n) if CHUNK else n


def cuda_arch() -> str:
    major, minor = torch.cuda.get_device_capability()
    arch = f"sm_{major}{minor}" + ("a" if major == 9 else "")
    if arch not in GPUS:
        raise SystemExit(f"no GPU spec for {arch}: known archs are {', '.join(GPUS)}")
    return arch


def flops(kind: str, n: int, dims: MLADims) -> float:
    dk, dv = (
        (dims.latent_dim, dims.kv_lora_rank)
        if kind == "absorbed"
        else (dims.qk_head_dim, dims.v_head_dim)
    )
    t = queries(n)
    return 2.0 * HEADS * t * (n - t / 2) * (dk + dv)


def tvm_args(*tensors):
    return [tvm.runtime.from_dlpack(t) for t in tensors]


class Problem:
    """Inputs of one (kind, n) problem in both our layout and SDPA's [B, H, N, D] layout."""

    def __init__(self, kind: str, n: int, dims: MLADims):
        self.kind, self.n, self.dims = kind, n, dims
        self.t = t = queries(n)
        g = torch.Generator(device="cuda").manual_seed(n)

        def rnd(*shape, scale=1.0):
            return (torch.randn(*shape, generator=g, device="cuda") * scale).half()

        self.qi = torch.tensor([0, t], dtype=torch.int32, device="cuda")
        self.ki = torch.tensor([0, n], dtype=torch.int32, device="cuda")
        self.lse = torch.empty(t, HEADS, dtype=torch.float32, device="cuda")
        if kind == "absorbed":
            self.q = rnd(t, HEADS, dims.latent_dim, scale=0.5)  # [T, H, 576]
            self.kv = rnd(1, n, dims.latent_dim)  # [L=1, C=n, 576]
            self.o = torch.empty(t, HEADS, dims.kv_lora_rank, dtype=torch.float16, device="cuda")
            self.sdpa_q = self.q.transpose(0, 1)[None]  # [1, H, T, 576]
            k = self.kv[0][None, None]  # [1, 1, N, 576]
            # The shared KV head repeated per head (contiguous: not every backend takes stride 0).
            self.sdpa_k = k.expand(1, HEADS, n, dims.latent_dim).contiguous()
            v = k[..., : dims.kv_lora_rank]
            self.sdpa_v = v.expand(1, HEADS, n, dims.kv_lora_rank).contiguous()
        else:
            self.q = rnd(t, HEADS, dims.qk_head_dim)  # [T, H, 192]
            self.k = rnd(n, HEADS, dims.qk_head_dim)  # [N, H, 192]
            self.v = rnd(n, HEADS, dims.v_head_dim)  # [N, H, 128]
            self.o = torch.empty(t, HEADS, dims.v_head_dim, dtype=torch.float16, device="cuda")
            self.sdpa_q = self.q.transpose(0, 1)[None]
            self.sdpa_k = self.k.transpose(0, 1)[None]
            self.sdpa_v = self.v.transpose(0, 1)[None]


def ours(problem: Problem, lib):
    p = problem
    if p.kind == "absorbed":
        args = tvm_args(p.q, p.kv, p.qi, p.ki, p.o, p.lse)
        return lambda: lib["main"](*args[:4], 0, *args[4:])
    args = tvm_args(p.q, p.k, p.v, p.qi, p.ki, p.o, p.lse)
    return lambda: lib["main"](*args)


def tvm_builtin(problem: Problem, kernel):
    """TVM's own prefill kernels: paged MLA for absorbed (16-row pages), ragged MHA otherwise."""
    p = problem
    if p.t != p.n:
        raise NotImplementedError("timed for T = N only")
    if p.kind == "absorbed":
        page = 16
        n_pages = (p.n + page - 1) // page
        pages = torch.zeros(n_pages * page, p.dims.latent_dim, dtype=torch.float16, device="cuda")
        pages[: p.n] = p.kv[0]
        pages = pages.view(n_pages, page, p.dims.latent_dim)
        page_indptr = torch.tensor([0, n_pages], dtype=torch.int32, device="cuda")
        page_values = torch.arange(n_pages, dtype=torch.int32, device="cuda")
        last_len = torch.tensor([p.n - (n_pages - 1) * page], dtype=torch.int32, device="cuda")
        args = tvm_args(p.q, p.qi, pages, page_indptr, page_values, last_len, p.o, p.lse)
        return lambda: kernel(*args, 1, SM_SCALE)
    zeros_q = torch.zeros(p.n, dtype=torch.int32, device="cuda")
    zeros_b = torch.zeros(1, dtype=torch.int32, device="cuda")
    args = tvm_args(p.q, p.qi, p.k, p.v, p.ki, zeros_q, zeros_b, p.o, p.lse)
    return lambda: kernel(*args, 1, 0, 1.0, 10000.0, SM_SCALE)


def sdpa(problem: Problem, backend):
    from torch.nn.attention import sdpa_kernel
    from torch.nn.attention.bias import causal_lower_right

    p = problem
    mask = None if p.t == p.n else causal_lower_right(p.t, p.n)  # query i sees keys <= i + N - T

    def run():
        with sdpa_kernel(backend):
            return torch.nn.functional.scaled_dot_product_attention(
                p.sdpa_q, p.sdpa_k, p.sdpa_v, attn_mask=mask, is_causal=mask is None, scale=SM_SCALE
            )

    return run


def naive(problem: Problem):
    p = problem
    mask = torch.ones(p.t, p.n, dtype=torch.bool, device="cuda").triu_(1 + p.n - p.t)

    def run():
        s = torch.matmul(p.sdpa_q, p.sdpa_k.transpose(-1, -2)) * SM_SCALE  # [1, H, T, N] f16
        s.masked_fill_(mask, float("-inf"))
        return torch.matmul(torch.softmax(s, dim=-1), p.sdpa_v)

    return run


def verify(problem: Problem, run_ours) -> float:
    """Max |ours - torch| over O: torch in f32 on the first 128 and the last 256 query rows."""
    p = problem
    p.o.fill_(float("nan"))  # poisoned: rows the kernel leaves unwritten fail the check
    p.lse.fill_(float("nan"))
    run_ours()
    torch.cuda.synchronize()
    err = lse_err = 0.0
    for rows in (slice(0, min(128, p.t)), slice(max(0, p.t - 256), p.t)):
        q = p.sdpa_q[:, :, rows].float()
        s = torch.matmul(q, p.sdpa_k.float().transpose(-1, -2)) * SM_SCALE  # [1, H, rows, N]
        i = torch.arange(rows.start, rows.stop, device="cuda")[:, None] + (p.n - p.t)
        s.masked_fill_(torch.arange(p.n, device="cuda")[None, :] > i, float("-inf"))
        expected = torch.matmul(torch.softmax(s, dim=-1), p.sdpa_v.float())[0].transpose(0, 1)
        lse_expected = torch.logsumexp(s, dim=-1)[0].transpose(0, 1)
        d_o = (p.o[rows].float() - expected).abs().nan_to_num(nan=math.inf).max().item()
        d_lse = (p.lse[rows] - lse_expected).abs().nan_to_num(nan=math.inf).max().item()
        err, lse_err = max(err, d_o), max(lse_err, d_lse)
    if not (err < 2e-2 and lse_err < 1e-2):
        raise AssertionError(f"ours differs from torch: |dO| = {err:.3g}, |dLSE| = {lse_err:.3g}")
    return err


def config_label(config) -> str:
    """A config as its field values, comma-separated (booleans as 0 / 1)."""
    return ",".join(v if isinstance(v, str) else str(int(v)) for v in config.__dict__.values())


def config_of_label(label: str):
    """``config_label`` read back into a ``PrefillConfig``."""
    fields = dataclasses.fields(ap.PrefillConfig)
    parse = {"int": int, "bool": lambda v: bool(int(v)), "str": str}
    return ap.PrefillConfig(
        *(parse[f.type](v) for f, v in zip(fields, label.split(","), strict=True))
    )


def build(kind: str, arch: str, dims: MLADims, config=None):
    """(library, build seconds, label of the kernels besides ``config``'s: the default's
    extend and short kernels, as the model builds it; empty for a given config)."""
    target = tvm_target(arch)
    factory = ap.absorbed_prefill if kind == "absorbed" else ap.decompressed_prefill
    extend = short = None
    if CHUNK and config is None:
        extend = ap.extend_config(arch, kind=kind, dims=dims, tokens=CHUNK)
    if config is None:
        short = ap.short_config(arch, kind=kind, dims=dims)
    extras = ""
    if extend is not None:
        extras += " extend " + config_label(extend)
    if short is not None:
        upto = ap.short_tokens(
            ap.default_config(arch, kind=kind, dims=dims), arch, kind=kind, dims=dims
        )
        extras += f" short (T <= {upto}) " + config_label(short)
    t0 = time.time()
    func = factory(
        dims,
        dtype="float16",
        target=arch,
        config=config,
        extend_config=extend,
        short_config=short,
        sm_scale=SM_SCALE,
    )
    lib = tvm.compile(tvm.IRModule({"main": func}), target=target)
    return lib, time.time() - t0, extras


def build_builtin(kind: str, arch: str, dims: MLADims):
    from tvm.relax.frontend.nn.llm import _prefill_kernels as pk

    target = tvm_target(arch)
    if kind == "absorbed":
        func = pk._attention_prefill_mla(
            HEADS, dims.kv_lora_rank, dims.qk_rope_head_dim, "float16", False, target
        )
    else:
        func = pk._attention_prefill_ragged(
            HEADS, HEADS, dims.qk_head_dim, dims.v_head_dim, "float16", {}, target
        )
    lib = tvm.compile(tvm.IRModule({"main": func}), target=target)
    # the paged MLA kernel names itself (global_symbol); the ragged one is exported as "main"
    symbol = func.attrs.get("global_symbol", "main") if func.attrs else "main"
    return lib[str(symbol)]


def measure_ours(kind: str, config, ns: list[int], *, default: bool) -> list[dict]:
    """Build one config of ours, check it against torch and time it at each n (in this process)."""
    arch, dims = cuda_arch(), dataclasses.replace(preset("deepseek-v2-lite").dims, heads=HEADS)
    lib, build_s, extras = build(kind, arch, dims, None if default else config)
    impl = "ours" if default else "ours-config"
    label = config_label(config) + extras
    rows = []
    for n in ns:
        row = {"kind": kind, "n": n, "impl": impl, "config": label, "build_s": round(build_s, 2)}
        p = Problem(kind, n, dims)
        run_ours = ours(p, lib)
        try:
            row["max_abs_err"] = verify(p, run_ours)
            ms = timing.do_bench_ms(run_ours)
            row.update(ms=ms, tflops=flops(kind, n, dims) / ms / 1e9)
        except AssertionError as e:  # never time a wrong kernel
            row.update(ms=None, tflops=None, error=f"WRONG: {e}")
        rows.append(row)
        del p
        torch.cuda.empty_cache()
    return rows


def measure_ours_isolated(kind: str, config, ns: list[int], *, default: bool) -> list[dict]:
    """``measure_ours`` in a child process: a kernel that faults cannot poison the baselines."""
    label = config_label(config)
    cmd = [sys.executable, "-m", "benchmarks.bench_attention", "--worker", kind, "--config", label]
    cmd += ["--n", ",".join(map(str, ns)), "--chunk", str(CHUNK)]
    cmd += ["--default"] if default else []
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("[") or line.startswith("{"):
            return json.loads(line)
    err = (proc.stderr.strip().splitlines() or ["no output"])[-1][:200]
    impl = "ours" if default else "ours-config"
    return [
        {"kind": kind, "n": n, "impl": impl, "config": label, "ms": None, "tflops": None,
         "error": f"worker failed (rc {proc.returncode}): {err}"}
        for n in ns
    ]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="JSON file to write")
    parser.add_argument("--n", default="512,2048,8192,16384", help="sequence lengths")
    parser.add_argument("--kinds", default="absorbed,decompressed")
    parser.add_argument(
        "--chunk", type=int, default=0, help="T queries after a prefix of N - T (0: T = N)"
    )
    parser.add_argument("--naive-max-n", type=int, default=16384, help="skip naive above this n")
    parser.add_argument(
        "--baselines",
        default=",".join(BASELINES),
        help="comma list of baselines to time (TVM's built-in kernels take minutes at n = 16K)",
    )
    parser.add_argument(
        "--all-configs",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also time every candidate config of ours (ours-best = the fastest)",
    )
    parser.add_argument(
        "--configs",
        help="with --all-configs: only these candidates, by index in ap.candidates (e.g. 0,1,2)",
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # kind: measure one config, print JSON
    parser.add_argument("--config", help=argparse.SUPPRESS)
    parser.add_argument("--default", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_attention needs a CUDA GPU visible to torch")
    ns = [int(x) for x in args.n.split(",")]
    global CHUNK
    CHUNK = args.chunk
    if args.worker:
        config = config_of_label(args.config)
        print(json.dumps(measure_ours(args.worker, config, ns, default=args.default)))
        return
    if not args.out:
        parser.error("--out is required")
    from torch.nn.attention import SDPBackend

    arch = cuda_arch()
    dims = dataclasses.replace(preset("deepseek-v2-lite").dims, heads=HEADS)
    results = []
    meta = {"device": torch.cuda.get_device_name(), "arch": arch, "heads": HEADS, "configs": {}}

    def record(kind, n, impl, fn, **extra):
        row = {"kind": kind, "n": n, "impl": impl, **extra}
        try:
            fn()
            torch.cuda.synchronize()
            ms = timing.do_bench_ms(fn)
            row.update(ms=ms, tflops=flops(kind, n, dims) / ms / 1e9)
        except Exception as e:  # a backend that rejects the shape, OOM, ...
            row.update(ms=None, tflops=None, error=f"{type(e).__name__}: {str(e)[:160]}")
            torch.cuda.empty_cache()
        results.append(row)
        report(row)

    def report(row):
        tf = f"{row['tflops']:.1f} TFLOP/s" if row.get("tflops") else row.get("error")
        cfg = f" [{row['config']}]" if row.get("config") else ""
        print(f"{row['kind']:13s} n={row['n']:6d} {row['impl']}{cfg}: {tf}", flush=True)

    for kind in args.kinds.split(","):
        default = ap.default_config(arch, kind=kind, dims=dims)
        configs = ap.candidates(arch, kind=kind, dims=dims) if args.all_configs else [default]
        if args.all_configs and args.configs:
            configs = [configs[int(i)] for i in args.configs.split(",")]
        meta["configs"][kind] = [{**c.__dict__, "default": c == default} for c in configs]
        for cfg in configs:
            for row in measure_ours_isolated(kind, cfg, ns, default=cfg == default):
                results.append(row)
                report(row)
        for n in ns:
            timed = [
                r for r in results
                if (r["kind"], r["n"]) == (kind, n) and r["impl"].startswith("ours") and r["tflops"]
            ]  # fmt: skip
            if timed:
                results.append({**max(timed, key=lambda r: r["tflops"]), "impl": "ours-best"})
        wanted = set(args.baselines.split(",")) - {""}
        if wanted - set(BASELINES):
            raise SystemExit(f"unknown baselines {wanted - set(BASELINES)}: use {BASELINES}")
        builtin = None
        if "tvm-builtin" in wanted:
            try:
                builtin = build_builtin(kind, arch, dims)
            except Exception:
                traceback.print_exc()
        for n in ns:
            p = Problem(kind, n, dims)
            for name, backend in (
                ("sdpa-math", SDPBackend.MATH),
                ("sdpa-efficient", SDPBackend.EFFICIENT_ATTENTION),
                ("sdpa-flash", SDPBackend.FLASH_ATTENTION),
                ("sdpa-cudnn", SDPBackend.CUDNN_ATTENTION),
            ):
                if name not in wanted or (name == "sdpa-math" and n > args.naive_max_n):
                    continue
                record(kind, n, name, sdpa(p, backend))
            if n <= args.naive_max_n and "naive-torch" in wanted:
                record(kind, n, "naive-torch", naive(p))
            if builtin is not None:
                record(kind, n, "tvm-builtin", tvm_builtin(p, builtin))
            del p
            torch.cuda.empty_cache()

    with open(args.out, "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=1)
    print_table(results)


def print_table(results) -> None:
    """Markdown table of TFLOP/s per (kind, n) and implementation, with the best of ours over
    the fastest baseline measured in the same run (the issue's target is >= 1 against cuDNN)."""
    impls = [i for i in dict.fromkeys(r["impl"] for r in results) if i != "ours-config"]
    keys = list(dict.fromkeys((r["kind"], r["n"]) for r in results))
    cell = {(r["kind"], r["n"], r["impl"]): r for r in results}
    print("\nTFLOP/s (causal, N_eff = N - T/2; '-': wrong, rejected or out of memory: see JSON)")
    print()
    print("| kind | n | " + " | ".join(impls) + " | best ours / best baseline |")
    print("|---|---:|" + "---:|" * (len(impls) + 1))
    for kind, n in keys:
        vals = []
        for impl in impls:
            r = cell.get((kind, n, impl))
            vals.append(f"{r['tflops']:.1f}" if r and r.get("tflops") else "-")
        print(f"| {kind} | {n} | " + " | ".join(vals) + f" | {_ratio(results, kind, n)} |")
    best = [r for r in results if r["impl"] == "ours-best"]
    if best:
        print("\nours-best config (tile_q, tile_kv, warps, stages, split_s):")
        for r in best:
            print(f"- {r['kind']} n={r['n']}: {r['config']}")


def _ratio(results, kind: str, n: int) -> str:
    """``1.02x sdpa-cudnn``: the fastest of ours over the fastest baseline, or ``-``."""
    rows = [r for r in results if r["kind"] == kind and r["n"] == n and r.get("tflops")]
    ours = [r["tflops"] for r in rows if r["impl"].startswith("ours")]
    base = [r for r in rows if not r["impl"].startswith("ours")]
    if not ours or not base:
        return "-"
    top = max(base, key=lambda r: r["tflops"])
    return f"{max(ours) / top['tflops']:.2f}x {top['impl']}"


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
