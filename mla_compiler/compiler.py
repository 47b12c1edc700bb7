"""The Python API behind ``mla-compiler compile``: model source -> artifact directory."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import sys
import time
from pathlib import Path

import torch
import tvm

from mla_compiler import artifact
from mla_compiler.defaults import DEFAULT_DEEP_PREFILL_FROM, DEFAULT_MAX_CONTEXT, DEFAULT_UBATCH
from mla_compiler.errors import ConfigError, WeightError
from mla_compiler.kernel_configs import KernelChoice
from mla_compiler.model_export.config import ModelConfig, load_config, mla_mode, preset
from mla_compiler.model_export.modeling import DeepseekV2
from mla_compiler.model_export.quantize import row_bytes
from mla_compiler.model_export.weights import load_hf_model, random_model, torch_dtype
from mla_compiler.pipeline import DEEP_PREFILL, compile_ir
from mla_compiler.runtime import memory_plan
from mla_compiler.schedules.target import gpu_spec, parse_targets, tvm_target
from mla_compiler.weight_quant import DEVICE_FORMATS, check_quant, quantize_model, weight_types

# Presets whose weights take more than this are not stored: the runtime draws them from the seed.
MAX_STORED_RANDOM_BYTES = 1 << 30


@dataclasses.dataclass(frozen=True)
class CompileOptions:
    target: str = "cpu"
    dtype: str = "float32"
    kv_dtype: str = "float16"
    mla: int = 3
    max_context: int = DEFAULT_MAX_CONTEXT
    ubatch: int = DEFAULT_UBATCH
    decode_threshold: int = 1  # calls with at most this many new tokens per sequence run decode
    seed: int = 0
    dump_ir: str | None = None
    # GPU decode through CUDA graphs (TVM's RewriteCUDAGraph): see build_module
    cuda_graph: bool = True  # GPU targets only
    # every kernel launched as a programmatic dependent of the one before (sm_90+ targets
    # only): see build_module
    pdl: bool = False
    # `mla-compiler tune` database: its fastest configs where recorded (kernel_configs)
    tuning_db: str | None = None
    # weights in GGUF block formats: a mix of model_export.quantize.MIXES, "none", or None (a
    # .gguf keeps its own types, other models stay float): see weight_quant
    quant: str | None = None
    # prompt chunks whose KV length passes this run the mode's deep form (mla 3: absorbed, its
    # workspace stays that of this context); 0: never
    deep_prefill_from: int = DEFAULT_DEEP_PREFILL_FROM


def resolve_model(
    *, model_dir: str | None, preset_name: str | None, dtype: str, seed: int, quant=None, log=None
):
    """(config, model, where the weights come from, weights kept in block formats). Big random
    presets are built on 'meta'; so are the kept weights' parameters."""
    torch_dtype(dtype)  # validates the name
    check_quant(quant)
    if model_dir is not None and str(model_dir).endswith(".gguf"):
        from mla_compiler.model_export.gguf import load_gguf_weights

        if quant not in (None, "none"):
            raise ConfigError(
                f"--quant {quant} re-quantizes weights a GGUF file already holds quantized: "
                "leave --quant out (the file's own types are kept) or pass 'none'"
            )
        keep = () if quant == "none" else DEVICE_FORMATS
        cfg, model, kept = load_gguf_weights(model_dir, dtype=dtype, keep=keep)
        return cfg, model, {"source": "gguf", "path": str(model_dir)}, kept
    cfg, model, weights = _resolve_float(model_dir, preset_name, dtype, seed)
    if quant in (None, "none"):
        return cfg, model, weights, {}
    if not weights.get("stored", True):  # the runtime draws and quantizes them
        return cfg, model, {**weights, "quant": quant}, {}
    kept = quantize_model(model, quant, log=log)
    return cfg, model, {**weights, "quant": quant}, kept


def _resolve_float(model_dir, preset_name, dtype: str, seed: int):
    if model_dir is not None:
        cfg = load_config(model_dir)
        return (
            cfg,
            load_hf_model(cfg, model_dir, dtype=dtype),
            {"source": "hf", "path": str(model_dir)},
        )
    cfg = preset(preset_name or "tiny")
    if param_bytes(cfg, dtype) <= MAX_STORED_RANDOM_BYTES:
        return cfg, random_model(cfg, seed=seed, dtype=dtype), {"source": "random", "seed": seed}
    with torch.device("meta"):
        model = DeepseekV2(cfg).to(torch_dtype(dtype))
    model.inv_freq = model.inv_freq.to("meta")
    return cfg, model.eval(), {"source": "random", "seed": seed, "stored": False}


def check_finite(model: torch.nn.Module) -> None:
    """Refuse weights holding NaN or Inf (they compile, then generate garbage): name the first
    such tensor. Weights on 'meta' (drawn by the runtime) are skipped."""
    for name, p in model.named_parameters():
        if p.device.type == "meta":
            continue
        bad = ~torch.isfinite(p)
        if bad.any():
            first = [int(i) for i in bad.nonzero()[0]]
            raise WeightError(
                f"weight {_checkpoint_name(name, first, p.shape)} holds {int(bad.sum())} "
                f"non-finite value(s) (NaN/Inf) in {str(p.dtype).removeprefix('torch.')}, the "
                f"first at {first} of {name} {list(p.shape)}: the checkpoint is corrupt; "
                "re-download or re-convert it"
            )


def _checkpoint_name(name: str, index: list[int], shape) -> str:
    """The checkpoint's name of the element ``index`` of our parameter ``name``: the routed
    experts are stacked (``experts_down [E, H, I]``, ``experts_gate_up [E, 2I, H]``, gate
    rows first) where checkpoints keep one tensor per expert and projection."""
    prefix, _, leaf = name.rpartition(".")
    if leaf == "experts_down":
        return f"{prefix}.experts.{index[0]}.down_proj.weight"
    if leaf == "experts_gate_up":
        proj = "gate_proj" if index[1] < shape[1] // 2 else "up_proj"
        return f"{prefix}.experts.{index[0]}.{proj}.weight"
    return name


def weight_bytes(model: torch.nn.Module, formats: dict, mod: tvm.IRModule) -> dict:
    """``{"stored": {format: bytes}, "device": bytes}``: the weights uploaded at load, by format
    (blocks, or the float dtype), and the outputs of ``transform_params`` the kernels read."""
    stored: dict[str, int] = {}
    for name, p in model.named_parameters():
        fmt, size = (
            (formats[name], p.numel() // p.shape[-1] * row_bytes(p.shape[-1], formats[name]))
            if name in formats
            else (str(p.dtype).removeprefix("torch."), p.numel() * p.element_size())
        )
        stored[fmt] = stored.get(fmt, 0) + int(size)  # fmt: skip
    func = mod["transform_params"]
    outs = func.ret_ty.fields
    sizes = [
        math.prod(int(s) for s in t.shape) * tvm.runtime.DataType(str(t.dtype)).bits // 8
        for t in outs
    ]
    passed = _passthrough(func)
    new = sum(b for i, b in enumerate(sizes) if i not in passed)
    return {"stored": stored, "device": int(sum(sizes)), "device_new": int(new)}


def _passthrough(func) -> set[int]:
    """Indices of ``transform_params``' outputs that are its inputs unchanged (no new memory)."""
    from tvm import relax

    body = func.body.body
    values = relax.analysis.get_var2val(func)
    if body.same_as(func.params[0]):  # every weight as it is
        return set(range(len(func.ret_ty.fields)))
    result = values.get(body, body)
    fields = result.fields if isinstance(result, relax.Tuple) else []
    out = set()
    for i, f in enumerate(fields):
        v = values.get(f, f)
        if isinstance(v, relax.TupleGetItem) and v.tuple_value.same_as(func.params[0]):
            out.add(i)
    return out


def param_bytes(cfg: ModelConfig, dtype: str) -> int:
    with torch.device("meta"):
        model = DeepseekV2(cfg)
    n = sum(p.numel() for p in model.parameters())
    return n * torch.tensor([], dtype=torch_dtype(dtype)).element_size()


def add_sampling(mod: tvm.IRModule, target: tvm.target.Target) -> tvm.IRModule:
    """Add the Relax function ``sample(logits [B, V], params [B, 4] f32) -> ids [B] int32``
    (``schedules.sampling``) for the logits the model returns."""
    from tvm import relax

    from mla_compiler.kernels import mark_scheduled
    from mla_compiler.schedules import sampling

    logits_ty = mod["decode"].ret_ty.fields[0]
    vocab, dtype = int(logits_ty.shape[1]), logits_ty.dtype
    kernel = mark_scheduled(sampling.sample(vocab, dtype=dtype, target=target))
    bb = relax.BlockBuilder(mod)
    b = tvm.tirx.Var("b", "int64")
    logits = relax.Var("logits", relax.TensorType((b, vocab), dtype))
    params = relax.Var("params", relax.TensorType((b, len(sampling.PARAMS)), "float32"))
    with bb.function("sample", [logits, params]):
        gv = bb.add_func(kernel, "sample_tokens")
        ids = bb.emit(relax.call_tir(gv, [logits, params], out_ty=relax.TensorType((b,), "int32")))
        bb.emit_func_output(ids)
    return bb.get()


def build_module(
    mod,
    target_names: list[str],
    output_dir: Path,
    *,
    cuda_graph: bool = False,
    pdl: bool = False,
    progress=None,
) -> dict:
    """Build into ``output_dir/model.so`` (device code as a fatbin compiled by nvcc here, so the
    GPU box needs only TVM's runtime); return the facts metadata.json records.

    ``cuda_graph`` (GPU): TVM's RewriteCUDAGraph lifts every run of kernels that touch only
    weights and statically planned intermediates into a function captured once per VM
    (``vm.builtin.cuda_graph.run_or_capture``) and replayed on later calls. The function inputs
    (token ids, positions, row indices, the KV cache) are not static, so kernels that read them
    (embedding, cache append, the attention split, the logits gather) still launch one by one.
    No captured region depends on a symbolic shape (the decode attention reads the context
    length from ``kv_indptr`` on the device; ``kv_rows [N]`` feeds only an uncaptured gather),
    so the cache key is the region index alone: captured on the first call, never again.

    ``pdl`` (every target sm_90+): every kernel waits for its predecessor at its first
    instruction and then lets the next one launch (``schedules/grid_dependency.py``), so each
    launch overlaps the tail of the kernel before it. Kernels that wait later (the decode
    attention's) keep their own placement. Returns whether it was applied."""
    import contextlib

    from mla_compiler import cuda_build
    from mla_compiler.passes.name_kernels import build_pipeline
    from mla_compiler.schedules import grid_dependency

    codegen = "cpu" if target_names == ["cpu"] else cuda_build.lowest_arch(target_names)
    # dlight reads "sm_90a" as no version and drops to SIMT matmuls: schedule the generic ops for
    # sm_90 (same instructions; nvcc still builds sm_90a machine code). Our kernels are chosen
    # for the real arch before this point.
    schedule_arch = "sm_90" if codegen == "sm_90a" else codegen
    pdl = pdl and codegen != "cpu" and all(gpu_spec(tvm_target(t)).has_pdl for t in target_names)
    every = grid_dependency.every_kernel() if pdl else contextlib.nullcontext()
    with every:
        res = cuda_build.build(
            mod,
            target_names,
            output=output_dir,
            name=Path(artifact.MODULE).stem,
            relax_pipeline=build_pipeline(tvm_target(schedule_arch)),
            codegen_arch=None if schedule_arch == codegen else schedule_arch,
            cuda_graph=cuda_graph,
            progress=progress,
        )
    archs = [t for t in res.targets if t != "cpu"]
    return {"archs": archs, "images": list(res.images), "pdl": pdl}


def attention_workspace_bytes(
    cfg: ModelConfig, *, mla: int, context: int, ubatch: int, itemsize: int = 2, deep_from=0
) -> dict[str, int]:
    """Estimated peak bytes of attention intermediates of one layer at a KV length ``context``
    (the Relax VM frees them between layers), for a prompt chunk (``ubatch`` tokens) and for a
    decode step. Absorbed attention streams KV tiles: its workspace does not grow with the
    context; decompressing (mla 3 prompts, mla 0) materialises K/V of the whole context, up to
    ``deep_from`` rows where deeper chunks take the mode's deep (absorbed) form."""
    mode = mla_mode(mla)
    if deep_from and mode.deep_prefill_form and context > deep_from:
        deep = dataclasses.replace(mode, prefill_form=mode.deep_prefill_form)
        shallow = attention_workspace_bytes(
            cfg, mla=mla, context=deep_from, ubatch=ubatch, itemsize=itemsize
        )
        absorbed = _attention_workspace(cfg, deep, context, ubatch, itemsize)
        return {k: max(shallow[k], absorbed[k]) for k in shallow}
    return _attention_workspace(cfg, mode, context, ubatch, itemsize)


def _attention_workspace(cfg, mode, context: int, ubatch: int, itemsize: int) -> dict[str, int]:
    d = cfg.dims
    t, n = min(ubatch, context), context
    q_absorbed = t * d.heads * (d.latent_dim + d.kv_lora_rank) * itemsize + t * d.heads * 4
    decompressed = n * d.heads * (d.qk_head_dim + d.v_head_dim) * itemsize  # K, V
    latent_k_v = n * (d.latent_dim * 2 + d.heads * (d.qk_nope_head_dim + d.v_head_dim))
    prefill = {  # by the form of prompt attention
        "absorbed": q_absorbed,
        "decompress": decompressed + latent_k_v * itemsize,
        "decompressed_cache": 2 * decompressed,
    }[mode.prefill_form]
    splits = 132 * 2  # upper bound of the split-KV partials (H x 512 f32 each)
    gathered = 0 if mode.latent_cache else 2 * decompressed
    decode = splits * d.heads * (d.kv_lora_rank + 1) * 4 + gathered
    return {"prefill": int(prefill), "decode": int(decode)}


def compile_model(
    *,
    output: str | Path,
    model_dir: str | None = None,
    preset_name: str | None = None,
    options: CompileOptions = CompileOptions(),
    command: str | None = None,
    log=print,
    force: bool = False,
) -> Path:
    """Compile a checkpoint (``model_dir``: HF directory or .gguf) or a preset into the artifact
    directory ``output``. ``output`` may be new, an empty directory or an earlier artifact; any
    other existing path only with ``force``, and never the input model (``artifact.check_output``).
    """
    targets = parse_targets(options.target)
    mla_mode(options.mla)  # validates it
    if options.max_context < 1:
        raise ConfigError(f"--max-context must be positive, got {options.max_context}")
    if options.ubatch < 1:
        raise ConfigError(f"--ubatch must be positive, got {options.ubatch}")
    if options.deep_prefill_from < 0:
        raise ConfigError(
            f"--deep-prefill-from must be >= 0 (0: never), got {options.deep_prefill_from}"
        )
    choice = KernelChoice.from_options(options, log=log)  # reads the tuning database once
    inputs = [model_dir] if model_dir is not None else []
    artifact.check_output(output, force=force, inputs=inputs)  # before minutes of work
    t0 = time.time()
    cfg, model, weights, kept = resolve_model(
        model_dir=model_dir,
        preset_name=preset_name,
        dtype=options.dtype,
        seed=options.seed,
        quant=options.quant,
        log=log,
    )
    check_finite(model)
    formats = {name: q.qtype for name, q in kept.items()}
    if weights.get("quant") and not weights.get("stored", True):  # drawn by the runtime
        formats = weight_types(model, weights["quant"])
    # the values to store; with blocks the export sees shapes only (one device: 'meta')
    values = {n: p.detach() for n, p in model.named_parameters() if p.device.type != "meta"}
    if formats:
        model = model.to("meta")
    log(
        f"[1/3] model {cfg.name}: {cfg.num_hidden_layers} layers, mla={options.mla}, "
        f"{options.dtype}"
    )
    from mla_compiler.cuda_build import lowest_arch

    # kernels are chosen for the lowest arch: its CUDA source is compiled for every arch
    codegen = targets[0] if targets == ["cpu"] else lowest_arch(targets)
    if len(targets) > 1:
        newer = ",".join(t for t in targets if t != codegen)
        log(
            f"      note: one CUDA source for {','.join(targets)}: kernels chosen for {codegen} "
            f"(mma.sync, cp.async); for {newer}'s own kernels (wgmma, TMA) compile an artifact "
            f"with --target {newer.split(',')[-1]} alone"
        )
    ir = compile_ir(
        model,
        mla=options.mla,
        target=tvm_target(codegen),
        dump_dir=options.dump_ir,
        kv_dtype=options.kv_dtype,
        choice=choice,
        weight_formats=formats,
        deep_prefill=options.deep_prefill_from > 0,
        log=log,
    )
    mod = add_sampling(ir.mod, tvm_target(codegen))
    phases = [gv.name_hint for gv in ir.mod.get_global_vars()]
    deep_from = options.deep_prefill_from if DEEP_PREFILL in phases else 0
    cuda_graph = options.cuda_graph and targets != ["cpu"]
    log(f"[2/3] Relax pipeline done ({time.time() - t0:.1f}s); building for {','.join(targets)}")
    kv_item = torch.tensor([], dtype=torch_dtype(options.kv_dtype)).element_size()
    per_token = cfg.dims.cache_bytes_per_token(
        cfg.num_hidden_layers, mla=options.mla, itemsize=kv_item
    )

    def write(tmp: Path) -> None:
        facts = build_module(
            mod, targets, tmp, cuda_graph=cuda_graph, pdl=options.pdl, progress=log
        )
        if weights["source"] == "gguf":
            from mla_compiler.model_export.gguf_tokenizer import write_tokenizer_files

            write_tokenizer_files(model_dir, tmp, log=log)
        elif model_dir is not None:
            for name in ("tokenizer.json", "tokenizer_config.json"):
                if (Path(model_dir) / name).exists():
                    shutil.copy(Path(model_dir) / name, tmp / name)
        if weights.get("stored", True):
            from safetensors.torch import save_file

            state = {
                n: torch.from_numpy(kept[n].data) if n in kept else values[n].contiguous()
                for n, _ in model.named_parameters()
            }
            save_file(state, str(tmp / artifact.WEIGHTS))
        meta = {
            "format_version": artifact.FORMAT_VERSION,
            "model": cfg.to_dict(),
            "target": options.target,
            **facts,
            "dtype": options.dtype,
            "kv_dtype": options.kv_dtype,
            "tvm_version": artifact.tvm_version(),
            "mla": options.mla,
            "max_context": options.max_context,
            "ubatch": options.ubatch,
            "decode_threshold": options.decode_threshold,
            "cuda_graph": cuda_graph,
            "functions": ["prefill", "decode", "sample", "transform_params"]
            + [DEEP_PREFILL] * (deep_from > 0),
            "deep_prefill_from": deep_from,
            "kv_cache_bytes_per_token": per_token,
            "attention_workspace_bytes": {
                str(ctx): attention_workspace_bytes(
                    cfg,
                    mla=options.mla,
                    context=ctx,
                    ubatch=options.ubatch,
                    itemsize=kv_item,
                    deep_from=deep_from,
                )  # fmt: skip
                for ctx in (4096, 32768, 131072)
            },
            "kv_cache_width": int(ir.mod["prefill"].params[7].ty.shape[2]),
            "param_names": list(ir.param_names),
            "weight_formats": formats,
            "weight_bytes": weight_bytes(model, formats, ir.mod),
            "weights": weights,
            "created_by": command or " ".join(sys.argv),
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        (tmp / artifact.METADATA).write_text(json.dumps(meta, indent=2))

    out = artifact.write_atomic(output, write, force=force, inputs=inputs)
    meta = json.loads((out / artifact.METADATA).read_text())
    log(memory_plan.format_plan(memory_plan.plan(meta, max_context=options.max_context)))
    log(f"[3/3] wrote {out} ({time.time() - t0:.1f}s)")
    return out
