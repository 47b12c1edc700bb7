"""``mla-compiler tune``: search kernel schedule configs; build here, measure there.

A ``TunableKernel`` names a kernel factory, its config space on a target (already pruned by the
schedule's ``keep``), the shapes worth tuning for a model and the runner that checks and times
it on a GPU (``tuning_measure.RUNNERS``). Tuning runs in two halves:

- ``build_candidates`` (the build machine: full TVM + nvcc, no GPU needed) compiles every
  candidate config into its own artifact directory ``<plan>/<id>/kernel.so`` with
  ``cuda_build`` (device code as a fatbin) and writes ``<plan>/plan.json``;
- ``tuning_measure.measure`` (the GPU machine: TVM's runtime library only, torch for inputs and
  the float64 references) loads each artifact, checks it on fresh random inputs and appends one
  record per (candidate, shape) to the database (``tuning_db``).

``kernel_configs`` reads the database back for the compiler (``compile --tuning-db``).
Kernels of other modules (GEMM, MoE) join with ``register`` plus
``tuning_measure.register_runner``.

Plan format (``plan.json``, ``PLAN_FORMAT``)::

    {"format": "mla-compiler/tuning-plan/1", "tvm_version": "...", "target": "sm_90a",
     "model": {"name": "deepseek-v2-lite", "dims": {MLADims fields}, "sm_scale": 0.0721},
     "candidates": [{"id": "attn_decode-000", "kernel": "attn_decode", "config": {...},
                     "artifact": "attn_decode-000" | null, "build_error": null | "...",
                     "build_s": 3.1, "resources": {kernel: {registers, spill_bytes, ...}},
                     "shapes": [{"key": "h16-r512-p64-b1-ctx4096",
                                 "params": {"batch": 1, "ctx": 4096, "splits": 38}}]}]}
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import multiprocessing
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import tvm

from mla_compiler import tuning_db
from mla_compiler.errors import TuningError
from mla_compiler.kernel_configs import (
    best_config,
    config_for,
    config_from_dict,
    decode_shape_key,
    gemm_shape_key,
    moe_shape_key,
    prefill_shape_key,
    target_name,
)
from mla_compiler.model_export.config import MLADims, ModelConfig, load_config, preset
from mla_compiler.tuning_db import format_summary, summary
from mla_compiler.tuning_measure import (
    PLAN_FILE,
    PLAN_FORMAT,
    Progress,
    measure,
    read_plan,
    write_json,
)

DECODE_CONTEXTS = (4096, 16384, 32768)
PREFILL_LENGTHS = (2048, 8192)
LIBRARY = "kernel"  # <plan>/<candidate>/kernel.so


@dataclasses.dataclass(frozen=True)
class Shape:
    """One problem size to measure: ``key`` names it in the database, ``params`` feed the runner."""

    key: str
    params: dict


@dataclasses.dataclass(frozen=True)
class TunableKernel:
    """What tuning needs to know of one kernel.

    ``space(target, dims)``: configs worth measuring, best guess first, pruned by ``keep``.
    ``shapes(model, target, config)``: the problems to measure (per config where a run-time
    parameter such as the decode split count depends on it).
    ``build(config, target, model)``: an IRModule of PrimFuncs the runner calls by name.
    ``group``: the ``--kernels`` name that selects it (attn, gemm, moe).
    """

    name: str
    group: str
    space: Callable[[tvm.target.Target, MLADims], list]
    shapes: Callable[[ModelConfig, tvm.target.Target, object], list[Shape]]
    build: Callable[[object, tvm.target.Target, ModelConfig], tvm.IRModule]


KERNELS: dict[str, TunableKernel] = {}
GROUPS = ("attn", "gemm", "moe")


def register(kernel: TunableKernel) -> TunableKernel:
    """Add a kernel to the registry (the hook for schedules/gemm.py, schedules/moe.py: register
    a ``TunableKernel`` of group "gemm"/"moe" here and its runner with
    ``tuning_measure.register_runner``)."""
    if kernel.group not in GROUPS:
        raise ValueError(f"unknown kernel group {kernel.group!r}: use one of {GROUPS}")
    KERNELS[kernel.name] = kernel
    return kernel


# --- attention kernels --------------------------------------------------------------------------


def _decode_space(target, dims: MLADims) -> list:
    from mla_compiler.schedules import attention_decode as ad

    return ad.candidate_configs(target, dims, q_tokens=1)


def _decode_shapes(model: ModelConfig, target, config) -> list[Shape]:
    from mla_compiler.schedules import attention_decode as ad

    dims = model.dims
    out = []
    for ctx in DECODE_CONTEXTS:
        splits = ad.splits_for(config, target, dims, q_tokens=1, batch=1, max_context=ctx)
        params = {"batch": 1, "ctx": ctx, "splits": splits}
        out.append(Shape(decode_shape_key(dims, ctx), params))
    return out


def _decode_build(config, target, model: ModelConfig) -> tvm.IRModule:
    from mla_compiler.schedules import attention_decode as ad

    dims = model.dims
    k = ad.absorbed_decode(dims, target=target, config=config, sm_scale=model.softmax_scale)
    return tvm.IRModule({"decode_split": k.split, "decode_merge": k.merge})


def _prefill_kernel(kind: str) -> TunableKernel:
    from mla_compiler.schedules import attention_prefill as ap

    def space(target, dims):
        return ap.candidates(target, kind=kind, dims=dims)

    def shapes(model, target, config):
        return [Shape(prefill_shape_key(kind, model.dims, n), {"n": n}) for n in PREFILL_LENGTHS]

    def build(config, target, model):
        factory = ap.absorbed_prefill if kind == "absorbed" else ap.decompressed_prefill
        func = factory(
            model.dims,
            target=target,
            config=config,
            sm_scale=model.softmax_scale,
        )
        return tvm.IRModule({"prefill": func.with_attr("global_symbol", "prefill")})

    return TunableKernel(f"attn_prefill_{kind}", "attn", space, shapes, build)


def _register_attention() -> None:

    register(TunableKernel("attn_decode", "attn", _decode_space, _decode_shapes, _decode_build))
    register(_prefill_kernel("absorbed"))
    register(_prefill_kernel("decompressed"))


_register_attention()


# --- dense GEMMs (sm_90a wgmma kernel) -----------------------------------------------------------

GEMM_TOKENS = (2048,)  # prompt-chunk rows the dense GEMMs are tuned for


def dense_products(model: ModelConfig) -> list[tuple[int, int, str | None, str | None]]:
    """``(n, k, epilogue, out_dtype)`` of every dense product of a prompt chunk (mla=3): the
    shapes ``LowerDenseGemm`` hands to ``schedules.gemm``."""
    d, m = model.hidden_size, model.dims
    out = [
        (m.heads * m.qk_head_dim, d, None, None),  # q_proj (q_lora_rank None)
        (m.kv_lora_rank + m.qk_rope_head_dim, d, None, None),  # kv_a_proj_with_mqa
        (m.heads * (m.qk_nope_head_dim + m.v_head_dim), m.kv_lora_rank, None, None),  # kv_b
        (d, m.heads * m.v_head_dim, "residual", None),  # o_proj + residual
        (model.n_routed_experts, d, None, "float32"),  # router logits
    ]
    shared = model.n_shared_experts * model.moe_intermediate_size
    if shared:
        out += [(shared, d, "silu_mul", None), (d, shared, "residual", None)]
    if model.first_k_dense_replace:
        out += [(model.intermediate_size, d, "silu_mul", None)]
        out += [(d, model.intermediate_size, "residual", None)]
    if m.q_lora_rank is not None:
        out[0] = (m.heads * m.qk_head_dim, m.q_lora_rank, None, None)
        out.append((m.q_lora_rank, d, None, None))
    return list(dict.fromkeys(out))


def _gemm_kernel() -> TunableKernel:
    from mla_compiler.schedules import gemm_wgmma as W

    def space(target, dims):
        return [c for c in W.CONFIGS if W.keep(c, target)]

    def shapes(model, target, config):
        out = []
        for n, k, epi, odt in dense_products(model):
            if not W.keep(config, target, k=k) or (epi == "silu_mul" and config.block_n % 64):
                continue
            for t in GEMM_TOKENS:
                key = gemm_shape_key(n, k, epi, odt, t)
                params = {"n": n, "k": k, "epilogue": epi, "out_dtype": odt, "tokens": t}
                out.append(Shape(key, {**params, "symbol": _symbol(key)}))
        return out

    def build(config, target, model):
        funcs = {}
        for shape in shapes(model, target, config):
            p = shape.params
            f = W.wgmma_gemm(
                None,
                p["n"],
                p["k"],
                target=target,
                config=config,
                epilogue=p["epilogue"],
                out_dtype=p["out_dtype"],
            )
            funcs[p["symbol"]] = f.with_attr("global_symbol", p["symbol"])
        return tvm.IRModule(funcs)

    return TunableKernel("gemm_prefill", "gemm", space, shapes, build)


def _symbol(key: str) -> str:
    return "gemm_" + re.sub(r"\W", "_", key)


register(_gemm_kernel())


# --- grouped MoE expert GEMMs (sm_90a wgmma) ------------------------------------------------------


def _moe_key(model: ModelConfig, tokens: int) -> str:
    e, k = model.n_routed_experts, model.num_experts_per_tok
    d, i = model.hidden_size, model.moe_intermediate_size
    return moe_shape_key(num_experts=e, top_k=k, hidden=d, inter=i, tokens=tokens)


def _moe_kernel() -> TunableKernel:
    """gate+up then down for one prompt chunk, as one measurement: both take the same row
    blocks (``moe_align`` groups tokens for one ``block_m``), so one config serves both."""
    from mla_compiler.schedules import gemm_wgmma as W

    def space(target, dims):
        return [c for c in W.CONFIGS if W.keep(c, target)]

    def shapes(model, target, config):
        if not model.n_routed_experts:
            return []
        d, i = model.hidden_size, model.moe_intermediate_size
        if not (W.keep(config, target, k=d) and W.keep(config, target, k=i)):
            return []
        params = {
            "num_experts": model.n_routed_experts,
            "top_k": model.num_experts_per_tok,
            "hidden": d,
            "inter": i,
            "block_m": config.block_m,
        }
        return [Shape(_moe_key(model, t), {**params, "tokens": t}) for t in GEMM_TOKENS]

    def build(config, target, model):
        kw = dict(num_experts=model.n_routed_experts, top_k=model.num_experts_per_tok)
        d, i = model.hidden_size, model.moe_intermediate_size
        funcs = {
            name: W.moe_grouped(kind, d, i, target=target, config=config, **kw).with_attr(
                "global_symbol", name
            )
            for kind, name in (("gate_up", "moe_gate_up"), ("down", "moe_down"))
        }
        return tvm.IRModule(funcs)

    return TunableKernel("moe_grouped", "moe", space, shapes, build)


register(_moe_kernel())


def select_kernels(spec: str | list[str]) -> list[TunableKernel]:
    """Kernels named by ``--kernels``: groups (attn, gemm, moe) or kernel names.

    A group with nothing registered on this build raises ``TuningError`` when it is the only
    thing asked for; otherwise it is skipped (``skipped_groups`` says which).
    """
    names = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
    out: list[TunableKernel] = []
    for name in names:
        if name in KERNELS:
            found = [KERNELS[name]]
        elif name in GROUPS:
            found = [k for k in KERNELS.values() if k.group == name]
        else:
            raise TuningError(
                f"unknown kernel {name!r}: use {', '.join(GROUPS)} or one of {', '.join(KERNELS)}"
            )
        out += [k for k in found if k not in out]
    if not out:
        raise TuningError(
            f"no tunable kernel registered for {', '.join(names)} on this build "
            f"(registered: {', '.join(KERNELS)})"
        )
    return out


def skipped_groups(spec: str) -> list[str]:
    """Groups named in ``spec`` that have no registered kernel (reported, not tuned)."""
    have = {k.group for k in KERNELS.values()}
    return [g for g in spec.split(",") if g in GROUPS and g not in have]


# --- configs <-> JSON ---------------------------------------------------------------------------


def config_to_dict(config) -> dict:
    return dataclasses.asdict(config)


# --- building -----------------------------------------------------------------------------------


def _target(target) -> tvm.target.Target:
    from mla_compiler.schedules.target import tvm_target

    return tvm_target(target) if isinstance(target, str) else target


def resolve_model(*, model_dir: str | None = None, preset_name: str | None = None) -> ModelConfig:
    if model_dir is not None:
        return load_config(model_dir)
    return preset(preset_name or "tiny")


def plan_candidates(
    model: ModelConfig, target, kernels: list[TunableKernel], *, limit: int | None = None
) -> list[dict]:
    """Candidate entries (no artifacts yet): every config of every kernel with its shapes.

    ``limit``: at most this many configs per kernel (the first ones: best guesses).
    """
    tgt = _target(target)
    out = []
    for kernel in kernels:
        configs = kernel.space(tgt, model.dims)[:limit]
        for index, config in enumerate(configs):
            cid = f"{kernel.name}-{index:03d}"
            shapes = kernel.shapes(model, tgt, config)
            out.append(
                {
                    "id": cid,
                    "kernel": kernel.name,
                    "config": config_to_dict(config),
                    "artifact": None,
                    "build_error": None,
                    "shapes": [{"key": s.key, "params": s.params} for s in shapes],
                }
            )
    return out


def _build_one(job: dict) -> dict:
    """Worker: build one candidate into ``job["out"]/<id>/`` (runs in a child process)."""
    from mla_compiler import cuda_build

    cand, target = dict(job["candidate"]), job["target"]
    model = ModelConfig.from_dict(job["model"])
    out = Path(job["out"]) / cand["id"]
    t0 = time.time()
    try:
        kernel = KERNELS[cand["kernel"]]
        config = config_from_dict(cand["kernel"], cand["config"])
        mod = kernel.build(config, _target(target), model)
        result = cuda_build.build(mod, [target], output=out, name=LIBRARY, ptx=False)
        cand["resources"] = {
            k: dataclasses.asdict(r) for k, r in result.device_modules[0].kernels[target].items()
        }
        for dm in result.device_modules:  # the fatbin is inside kernel.so: drop the copies
            shutil.rmtree(dm.directory, ignore_errors=True)
        cand["artifact"] = cand["id"]
    except Exception as err:  # noqa: BLE001  (a config that does not build is a result)
        shutil.rmtree(out, ignore_errors=True)
        cand["build_error"] = f"{type(err).__name__}: {str(err).strip()[:400]}"
    cand["build_s"] = round(time.time() - t0, 2)
    return cand


def build_candidates(
    model: ModelConfig | str,
    target,
    kernels: str | list = "attn",
    out_dir: str | Path = "tuning-plan",
    *,
    workers: int = 2,
    limit: int | None = None,
    budget_s: float | None = None,
    progress: bool = True,
) -> Path:
    """Build every candidate of ``kernels`` for ``model`` (ModelConfig or preset name) on
    ``target`` into ``out_dir`` (one artifact directory per candidate + ``plan.json``), in
    ``workers`` processes. A config that fails to build is kept in the plan with its error
    (measure records it as failed). Candidates not started when ``budget_s`` runs out are left
    out. Returns ``out_dir``."""
    model = preset(model) if isinstance(model, str) else model
    tname = target_name(target)
    if tname == "cpu":
        raise TuningError("tuning needs a GPU target (e.g. --target sm_90a): cpu has no configs")
    chosen = kernels if isinstance(kernels, list) else select_kernels(kernels)
    chosen = [KERNELS[k] if isinstance(k, str) else k for k in chosen]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cands = plan_candidates(model, tname, chosen, limit=limit)
    plan = {
        "format": PLAN_FORMAT,
        "tvm_version": tvm.__version__,
        "target": tname,
        "model": {
            "name": model.name,
            "dims": dataclasses.asdict(model.dims),
            "sm_scale": model.softmax_scale,
        },
        "candidates": [],
    }
    done = _reusable(out, plan, cands)
    jobs = [
        {"candidate": c, "target": tname, "model": model.to_dict(), "out": str(out)}
        for c in cands
        if c["id"] not in done
    ]
    t0 = time.time()
    bar = Progress(len(jobs), f"build {tname}", enabled=progress)
    if done:
        bar.write(f"{len(done)} candidates already built in {out}: reused")
    ctx = multiprocessing.get_context("spawn")  # TVM's state does not survive fork
    with concurrent.futures.ProcessPoolExecutor(max(1, workers), mp_context=ctx) as pool:
        pending = {}
        queue = list(jobs)
        while queue or pending:
            while queue and len(pending) < max(1, workers):
                if budget_s is not None and time.time() - t0 > budget_s:
                    bar.write(f"build budget reached: {len(queue)} candidates left out")
                    queue.clear()
                    break
                job = queue.pop(0)
                pending[pool.submit(_build_one, job)] = job
            if not pending:
                break
            finished, _ = concurrent.futures.wait(
                pending, return_when=concurrent.futures.FIRST_COMPLETED
            )
            for fut in finished:
                job = pending.pop(fut)
                try:
                    cand = fut.result()
                except Exception as err:  # noqa: BLE001  (a worker that died)
                    cand = {**job["candidate"], "build_error": f"worker: {err!r}"[:400]}
                done[cand["id"]] = cand
                if cand["build_error"]:
                    bar.write(f"{cand['id']}: build failed: {cand['build_error'][:160]}")
                bar.update(1)
                plan["candidates"] = [done[c["id"]] for c in cands if c["id"] in done]
                write_json(out / PLAN_FILE, plan)
    bar.close()
    plan["candidates"] = [done[c["id"]] for c in cands if c["id"] in done]
    write_json(out / PLAN_FILE, plan)
    return out


def _reusable(out: Path, plan: dict, cands: list[dict]) -> dict[str, dict]:
    """Candidates an earlier build of the same plan (same TVM, target, model) left built."""
    try:
        old = read_plan(out)
    except TuningError:
        return {}
    same = ("tvm_version", "target", "model")
    if any(old.get(k) != plan[k] for k in same):
        return {}
    wanted = {(c["id"], tuning_db.config_json(c["config"])): c for c in cands}
    reuse = {}
    for c in old["candidates"]:
        new = wanted.get((c["id"], tuning_db.config_json(c["config"])))
        artifact = c.get("artifact")
        if new is not None and artifact and (out / artifact / f"{LIBRARY}.so").is_file():
            reuse[c["id"]] = {**c, "shapes": new["shapes"]}
    return reuse


def gpu_present() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except ImportError:
        return False


def tune(
    *,
    model: ModelConfig,
    target: str,
    db_dir,
    kernels: str = "attn",
    budget_s: float | None = None,
    plan_dir=None,
    workers: int = 2,
    limit: int | None = None,
    log=print,
) -> dict:
    """Build every candidate, then (with a GPU here) measure them into ``db_dir``."""
    tuning_db.open_db(db_dir)
    for group in skipped_groups(kernels):
        log(f"tune: no tunable {group} kernel registered on this build: skipped")
    chosen = select_kernels(kernels)
    plan_dir = Path(plan_dir or Path(db_dir) / "plans" / f"{model.name}-{target}")
    t0 = time.time()
    build_candidates(
        model, target, chosen, plan_dir, workers=workers, limit=limit, budget_s=budget_s
    )
    if not gpu_present():
        raise TuningError(
            f"no GPU here: the plan is built in {plan_dir}; measure it on the GPU machine with "
            f"`mla-compiler tune --measure {plan_dir} --db DIR`"
        )
    left = None if budget_s is None else max(0.0, budget_s - (time.time() - t0))
    return measure(plan_dir, db_dir, budget_s=left, log=log)


__all__ = [
    "KERNELS",
    "Shape",
    "TunableKernel",
    "best_config",
    "build_candidates",
    "config_for",
    "format_summary",
    "measure",
    "read_plan",
    "register",
    "select_kernels",
    "summary",
    "tune",
]
