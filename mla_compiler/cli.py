"""``mla-compiler``: a thin argparse layer over ``compiler``, ``runtime`` and ``inspect_artifact``.

Every ``MLAError`` becomes one line on stderr and exit code 2; no tracebacks for bad input.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys

from mla_compiler.defaults import (
    DEFAULT_DEEP_PREFILL_FROM,
    DEFAULT_MAX_CONTEXT,
    DEFAULT_MAX_NEW_TOKENS,
    DEFAULT_UBATCH,
)
from mla_compiler.errors import InputError, MLAError
from mla_compiler.model_export.quantize import MIXES  # numpy only: --help stays quick

DESCRIPTION = (
    "Compile DeepSeek-family models (MLA attention + MoE) with Apache TVM into artifacts that "
    "run with TVM's runtime alone; run, serve, benchmark and inspect them."
)


def _add_compile(sub) -> None:
    p = sub.add_parser("compile", help="compile a model into an artifact directory")
    src = p.add_mutually_exclusive_group()
    src.add_argument(
        "--model",
        metavar="HF_DIR",
        help="HF checkpoint directory (config.json + safetensors), or a DeepSeek-V2 .gguf file",
    )
    src.add_argument(
        "--preset",
        metavar="NAME",
        help="built-in config with seeded random weights (tiny, deepseek-v2-lite)",
    )
    p.add_argument("--target", default="cpu", help="cpu, or GPU archs: sm_89, sm_90a, sm_89,sm_90a")
    p.add_argument(
        "--output",
        "-o",
        required=True,
        metavar="DIR",
        help="artifact directory to write: a new path, an empty directory or an earlier "
        "artifact (replaced only once the new one is complete)",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="replace --output even if it is another file or directory (never the input model)",
    )
    p.add_argument(
        "--dtype",
        default=None,
        choices=["float32", "float16", "bfloat16"],
        help="weights/activations (default float32 on cpu, float16 on GPUs)",
    )
    p.add_argument(
        "--quant",
        default=None,
        choices=[*MIXES, "none"],
        help="store the weights in GGUF block formats: llama.cpp's Q4_K_M mix or one type for "
        "all (router and norms stay float); a .gguf keeps its own types unless 'none' (decoded "
        "to --dtype at compile). For now the device decodes them once at load",
    )
    p.add_argument(
        "--kv-dtype",
        default="float16",
        choices=["float16", "float32"],
        help="KV cache element type (default float16: 1152 B per token and layer)",
    )
    p.add_argument(
        "--mla",
        type=int,
        default=3,
        choices=[0, 2, 3],
        help="0 decompressed cache, 2 absorbed, 3 phase-aware (default)",
    )
    p.add_argument(
        "--max-context",
        type=int,
        default=DEFAULT_MAX_CONTEXT,
        metavar="N",
        help=f"tokens of KV cache per sequence the artifact is built for (default "
        f"{DEFAULT_MAX_CONTEXT}; `run --max-context` may change it)",
    )
    p.add_argument(
        "--ubatch",
        type=int,
        default=DEFAULT_UBATCH,
        metavar="N",
        help=f"prompt chunk size: longer prompts run in chunks of N tokens (default "
        f"{DEFAULT_UBATCH})",
    )
    p.add_argument(
        "--deep-prefill-from",
        type=int,
        default=DEFAULT_DEEP_PREFILL_FROM,
        metavar="N",
        help="--mla 3: prompt chunks whose KV length passes N attend over the latent rows "
        "(absorbed) instead of decompressing K/V of the whole context, so the workspace stops "
        f"growing with it (default {DEFAULT_DEEP_PREFILL_FROM}; 0: never)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of preset random weights")
    p.add_argument("--dump-ir", metavar="DIR", help="write the Relax IR after each pipeline phase")
    p.add_argument(
        "--cuda-graph",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="GPU: replay the static kernel runs of each call from CUDA graphs (fewer launches; "
        "default on, same logits as without on the H100)",
    )
    p.add_argument(
        "--pdl",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="sm_90+: launch every kernel as a programmatic dependent of the one before "
        "(griddepcontrol), overlapping each launch with the previous kernel's tail",
    )
    p.add_argument(
        "--tuning-db",
        metavar="DIR",
        default=None,
        help="use the fastest configs recorded by `mla-compiler tune` (default configs "
        "where none is recorded)",
    )
    _add_verbose(p)


def _add_verbose(p) -> None:
    p.add_argument(
        "--verbose", "-v", action="store_true", help="also show TVM's own warnings and notes"
    )


def _add_artifact(p) -> None:
    p.add_argument("artifact", help="artifact directory written by `mla-compiler compile`")


def _add_device(p) -> None:
    p.add_argument(
        "--device",
        choices=["cpu", "cuda"],
        default=None,
        help="where to run (default: the artifact's target: cuda for GPU artifacts)",
    )


def _add_max_context(p, default: str) -> None:
    p.add_argument(
        "--max-context",
        type=int,
        default=None,
        metavar="N",
        help=f"tokens of KV cache per sequence (default: {default})",
    )


def _add_run(sub) -> None:
    p = sub.add_parser("run", help="generate tokens with a compiled artifact")
    _add_artifact(p)
    prompt = p.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt-ids", metavar="1,2,3", help="prompt as token ids")
    prompt.add_argument(
        "--prompt", metavar="TEXT", help="prompt as text (needs the artifact's tokenizer.json)"
    )
    p.add_argument(
        "--max-new-tokens",
        "-n",
        type=int,
        default=None,
        metavar="N",
        help=f"tokens to generate (default {DEFAULT_MAX_NEW_TOKENS}, fewer where the context "
        "ends first); generation also stops at the end-of-sequence token",
    )
    p.add_argument(
        "--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples"
    )
    p.add_argument(
        "--top-p", type=float, default=1.0, help="nucleus sampling mass in (0, 1] (default 1)"
    )
    p.add_argument(
        "--top-k", type=int, default=0, help="sample from the k most likely tokens (0 = all)"
    )
    p.add_argument("--seed", type=int, default=None, help="sampling seed (default: random)")
    _add_max_context(p, "the artifact's --max-context")
    p.add_argument(
        "--ubatch",
        type=int,
        default=None,
        metavar="N",
        help="prompt chunk size (default: the artifact's --ubatch)",
    )
    _add_device(p)
    p.add_argument("--json", action="store_true", help="print a JSON object as the last line")


def _add_inspect(sub) -> None:
    p = sub.add_parser("inspect", help="list the kernels of a GPU artifact with SASS statistics")
    _add_artifact(p)
    p.add_argument("--json", action="store_true", help="print the report as JSON")


def _add_bench(sub) -> None:
    p = sub.add_parser("bench", help="llama-bench-style prompt (pp) and generation (tg) speed")
    _add_artifact(p)
    p.add_argument(
        "-p", "--prompts", default="512", help="prompt lengths, e.g. 512,2048 (default 512)"
    )
    p.add_argument(
        "-n", "--gen", type=int, default=128, help="tokens to generate (tgN; default 128)"
    )
    p.add_argument("-r", "--reps", type=int, default=3, help="repetitions of each test (default 3)")
    _add_max_context(p, "the longest test")
    _add_device(p)
    p.add_argument("--json", metavar="FILE", help="write the results as JSON")
    p.add_argument(
        "--plot",
        metavar="FILE.png",
        help="bar chart of the results (needs matplotlib: pip install 'mla-compiler[bench]')",
    )
    p.add_argument(
        "--baseline",
        choices=["hf"],
        default=None,
        help="also time HF transformers' eager DeepseekV2 (same config) in this process",
    )


def _add_tune(sub) -> None:
    p = sub.add_parser("tune", help="search kernel configs: build candidates, measure on a GPU")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", metavar="HF_DIR", help="HF checkpoint directory (config.json)")
    src.add_argument("--preset", metavar="NAME", help="built-in config (tiny, deepseek-v2-lite)")
    p.add_argument("--target", default="sm_90a", help="one GPU arch, e.g. sm_90a or sm_89")
    p.add_argument("--db", required=True, metavar="DIR", help="tuning database (records.jsonl)")
    p.add_argument(
        "--kernels", default="attn", help="attn, gemm, moe or kernel names, comma-separated"
    )
    p.add_argument(
        "--budget-minutes",
        type=float,
        default=None,
        metavar="N",
        help="stop starting new candidates after N minutes (re-run to resume)",
    )
    p.add_argument(
        "--limit",
        type=int,
        default=None,
        metavar="N",
        help="at most N configs per kernel (best guesses first)",
    )
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--build-only", metavar="OUT", help="build a plan into OUT (no GPU needed)")
    mode.add_argument("--measure", metavar="PLAN_DIR", help="measure a built plan into --db")


def _add_serve(sub) -> None:
    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server (/v1/completions, /v1/chat)")
    _add_artifact(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000)")
    _add_max_context(p, "the artifact's --max-context")
    p.add_argument(
        "--max-tokens",
        type=int,
        default=None,
        metavar="N",
        help="largest max_tokens a request may ask for (default: the context)",
    )
    _add_device(p)


def cmd_serve(args) -> int:
    from mla_compiler.runtime.serve import serve

    serve(
        args.artifact,
        host=args.host,
        port=args.port,
        device=args.device,
        max_context=args.max_context,
        max_tokens=args.max_tokens,
        log=lambda m: print(m, file=sys.stderr, flush=True),
    )
    return 0


def _parse_ids(text: str) -> list[int]:
    try:
        ids = [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise InputError(f"--prompt-ids must be comma-separated integers, got {text!r}") from None
    if not ids:
        raise InputError("empty prompt: --prompt-ids needs at least one id")
    return ids


def cmd_compile(args) -> int:
    from mla_compiler.compiler import CompileOptions, compile_model
    from mla_compiler.tvm_log import quiet_tvm

    dtype = args.dtype or ("float32" if args.target == "cpu" else "float16")
    opts = CompileOptions(
        target=args.target,
        dtype=dtype,
        kv_dtype=args.kv_dtype,
        mla=args.mla,
        max_context=args.max_context,
        ubatch=args.ubatch,
        deep_prefill_from=args.deep_prefill_from,
        seed=args.seed,
        dump_ir=args.dump_ir,
        cuda_graph=args.cuda_graph,
        pdl=args.pdl,
        tuning_db=args.tuning_db,
        quant=args.quant,
    )
    with quiet_tvm(args.verbose) as say:  # TVM's own warnings only with --verbose
        compile_model(
            output=args.output,
            model_dir=args.model,
            preset_name=args.preset,
            options=opts,
            command="mla-compiler " + shlex.join(sys.argv[1:]),
            log=say,
            force=args.force,
        )
    return 0


def cmd_run(args) -> int:
    from mla_compiler.runtime import loader

    loader.use_runtime_only()  # before tvm is imported: keep libtvm_compiler.so out
    from mla_compiler.runtime.engine import Engine

    eng = Engine.load(
        args.artifact,
        args.device,
        max_context=args.max_context,
        log=lambda m: print(m, file=sys.stderr),
    )
    if args.ubatch is not None:
        if args.ubatch < 1:
            raise InputError(f"--ubatch must be positive, got {args.ubatch}")
        eng.ubatch = args.ubatch
    if args.prompt is not None:
        prompt = eng.encode(args.prompt)
    else:
        prompt = _parse_ids(args.prompt_ids)
    max_new = args.max_new_tokens
    if max_new is None:  # the default stops where the context ends; an explicit N never does
        max_new = max(0, min(DEFAULT_MAX_NEW_TOKENS, eng.max_context - len(prompt)))
    tokens = []
    from mla_compiler.runtime.serve import TextStream  # whole-sequence decode: spaces, split UTF-8

    text = TextStream(eng.decode_text)
    for tok in eng.stream(
        prompt,
        max_new_tokens=max_new,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        stop_ids=() if eng.eos_token_id is None else (eng.eos_token_id,),
    ):
        tokens.append(tok)
        if not args.json:
            print(
                text.push(tok) if eng.tokenizer else tok,
                end="" if eng.tokenizer else " ",
                flush=True,
            )
    if args.json:
        out = {"prompt_tokens": len(prompt), "tokens": tokens}
        if eng.tokenizer:
            out["text"] = eng.decode_text(tokens)
        print(json.dumps(out))
    else:
        print(text.flush() if eng.tokenizer else "")
    return 0


def cmd_bench(args) -> int:
    from mla_compiler.runtime import loader

    loader.use_runtime_only()
    from mla_compiler import artifact
    from mla_compiler.runtime.bench import bench_engine, bench_hf, markdown_table, plot
    from mla_compiler.runtime.engine import Engine

    try:
        prompts = [int(x) for x in args.prompts.split(",") if x]
    except ValueError:
        prompts = []
    if not prompts or min(prompts) < 1:
        raise InputError(f"-p takes comma-separated positive lengths, got {args.prompts!r}")
    if args.reps < 1:
        raise InputError(f"-r must be at least 1, got {args.reps}")
    if args.gen < 1:
        raise InputError(f"-n must be at least 1, got {args.gen}")
    if args.plot:  # before minutes of benchmarking, not after
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise InputError(
                "--plot needs matplotlib: pip install 'mla-compiler[bench]' (or matplotlib)"
            ) from None
    need = max(prompts + [8 + args.gen])
    say = lambda m: print(m, file=sys.stderr)  # noqa: E731
    base = None
    if args.baseline == "hf":  # first, so its memory is free again before the engine loads
        meta = artifact.read_metadata(args.artifact)
        device = "cpu" if meta["target"] == "cpu" else "cuda"
        base = bench_hf(
            meta,
            prompts=prompts,
            gen=args.gen,
            reps=args.reps,
            device=device,
            dtype="float32" if device == "cpu" else "bfloat16",
            progress=say,
        )
    eng = Engine.load(
        args.artifact, args.device, max_context=args.max_context or max(need, 16), log=say
    )
    results = bench_engine(eng, prompts=prompts, gen=args.gen, reps=args.reps, progress=say)
    name = eng.meta["model"]["name"]
    base_tps = {b.test: b.tps_mean for b in base} if base else None
    print(markdown_table(results, model=name, mla=eng.meta["mla"], baseline=base_tps))
    if args.json:
        payload = {
            "model": name,
            "mla": eng.meta["mla"],
            "target": eng.meta["target"],
            "cuda_graph": eng.meta.get("cuda_graph", False),
            "sampler": eng.sampler,
            "results": [r.to_dict() for r in results],
        }
        if base:
            payload["baseline"] = {
                "name": "hf-transformers-eager",
                "results": [b.to_dict() for b in base],
            }
            for r in payload["results"]:
                if r["test"] in base_tps:
                    r["speedup"] = r["tps_mean"] / base_tps[r["test"]]
        with open(args.json, "w") as f:
            json.dump(payload, f, indent=2)
    if args.plot:
        plot(
            results,
            args.plot,
            title=f"{name} mla={eng.meta['mla']} {eng.meta['target']}",
            baseline=base,
        )
    return 0


def cmd_tune(args) -> int:
    budget = None if args.budget_minutes is None else 60 * args.budget_minutes
    say = lambda m: print(m, file=sys.stderr)  # noqa: E731
    if args.measure:
        from mla_compiler.runtime import loader

        loader.use_runtime_only()  # measuring needs TVM's runtime only
        from mla_compiler import tuning_db, tuning_measure

        counts = tuning_measure.measure(args.measure, args.db, budget_s=budget, log=say)
        print(json.dumps(counts))
        print(tuning_db.format_summary(tuning_db.summary(args.db)))
        return 0
    from mla_compiler import tuning

    model = tuning.resolve_model(model_dir=args.model, preset_name=args.preset)
    if args.build_only:
        for group in tuning.skipped_groups(args.kernels):
            say(f"tune: no tunable {group} kernel registered on this build: skipped")
        out = tuning.build_candidates(
            model, args.target, args.kernels, args.build_only, limit=args.limit, budget_s=budget
        )
        plan = tuning.read_plan(out)
        bad = sum(1 for c in plan["candidates"] if c["build_error"])
        print(f"plan: {out} ({len(plan['candidates'])} candidates, {bad} failed to build)")
        return 0
    counts = tuning.tune(
        model=model,
        target=args.target,
        db_dir=args.db,
        kernels=args.kernels,
        budget_s=budget,
        limit=args.limit,
        log=say,
    )
    print(json.dumps(counts))
    print(tuning.format_summary(tuning.summary(args.db, target=args.target)))
    return 0


def cmd_inspect(args) -> int:
    from mla_compiler import inspect_artifact

    report = inspect_artifact.inspect(args.artifact)
    if args.json:
        print(json.dumps(report))
    else:
        print(inspect_artifact.format_table(report))
    return 0


def version_string() -> str:
    """``mla-compiler 0.1.0 (TVM 0.27.0.post1, git 634e160)``; the commit where the package runs
    from a git checkout. Imports neither TVM nor torch."""
    import importlib.metadata as md
    import subprocess
    from pathlib import Path

    def version(dist: str) -> str:
        try:
            return md.version(dist)
        except md.PackageNotFoundError:
            return "not installed"

    parts = [f"TVM {version('apache-tvm')}"]
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    if commit:
        parts.append(f"git {commit}")
    return f"mla-compiler {version('mla-compiler')} ({', '.join(parts)})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mla-compiler", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=version_string())
    sub = parser.add_subparsers(dest="cmd", required=True)
    _add_compile(sub)
    _add_run(sub)
    _add_inspect(sub)
    _add_bench(sub)
    _add_tune(sub)
    _add_serve(sub)
    args = parser.parse_args(argv)
    try:
        return {
            "compile": cmd_compile,
            "run": cmd_run,
            "inspect": cmd_inspect,
            "bench": cmd_bench,
            "tune": cmd_tune,
            "serve": cmd_serve,
        }[args.cmd](args)
    except MLAError as e:
        print(f"mla-compiler {args.cmd}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # output piped into `head`
        return 0


if __name__ == "__main__":
    sys.exit(main())
