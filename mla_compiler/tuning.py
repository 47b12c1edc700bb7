"""``mla-compiler tune``: search kernel schedule configs; build here, measure there.

The kernel families (``schedules.families.FAMILIES``) give each config space on a target
(already pruned by the schedule's ``keep``), the shapes worth tuning for a model and how to
build a config; ``tuning_measure.RUNNERS`` checks and times a family's kernels on a GPU. Tuning
runs in two halves:

- ``build_candidates`` (the build machine: full TVM + nvcc, no GPU needed) compiles every
  candidate config into its own artifact directory ``<plan>/<id>/kernel.so`` with
  ``cuda_build`` (device code as a fatbin) and writes ``<plan>/plan.json``;
- ``tuning_measure.measure`` (the GPU machine: TVM's runtime library only, torch for inputs and
  the float64 references) loads each artifact, checks it on fresh random inputs and appends one
  record per (candidate, shape) to the database (``tuning_db``).

``kernel_configs`` reads the database back for the compiler (``compile --tuning-db``).

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
import shutil
import time
from pathlib import Path

import tvm

from mla_compiler import tuning_db
from mla_compiler.errors import TuningError
from mla_compiler.kernel_configs import best_config, config_for, config_from_dict, target_name
from mla_compiler.model_export.config import ModelConfig, load_config, preset
from mla_compiler.schedules.families import FAMILIES, GROUPS, KernelFamily
from mla_compiler.tuning_db import format_summary, summary
from mla_compiler.tuning_measure import (
    PLAN_FILE,
    PLAN_FORMAT,
    Progress,
    measure,
    read_plan,
    write_json,
)

LIBRARY = "kernel"  # <plan>/<candidate>/kernel.so


def tuning_space(family: KernelFamily, model: ModelConfig, target) -> list[tuple[object, list]]:
    """``[(config, shapes it serves)]`` of ``family`` for ``model``: every candidate of any of
    the model's shapes (first seen first), with the shapes that keep it."""
    shapes = family.model_shapes(model)
    configs = list(dict.fromkeys(c for s in shapes for c in family.candidates(s, target)))
    return [(c, [s for s in shapes if family.keep(c, s, target)]) for c in configs]


def build_module(family: KernelFamily, config, shapes: list, target) -> tvm.IRModule:
    """One IRModule of ``config``'s kernels for all its shapes (a symbol built once)."""
    funcs = {}
    for shape in shapes:
        for symbol, func in family.build(config, shape, target).items():
            funcs.setdefault(symbol, func)
    return tvm.IRModule(funcs)


def select_kernels(spec: str | list[str]) -> list[KernelFamily]:
    """Kernels named by ``--kernels``: groups (attn, gemm, moe) or kernel names.

    A group with nothing registered on this build raises ``TuningError`` when it is the only
    thing asked for; otherwise it is skipped (``skipped_groups`` says which).
    """
    names = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
    out: list[KernelFamily] = []
    for name in names:
        if name in FAMILIES:
            found = [FAMILIES[name]]
        elif name in GROUPS:
            found = [k for k in FAMILIES.values() if k.group == name]
        else:
            raise TuningError(
                f"unknown kernel {name!r}: use {', '.join(GROUPS)} or one of {', '.join(FAMILIES)}"
            )
        out += [k for k in found if k not in out]
    if not out:
        raise TuningError(
            f"no tunable kernel registered for {', '.join(names)} on this build "
            f"(registered: {', '.join(FAMILIES)})"
        )
    return out


def skipped_groups(spec: str) -> list[str]:
    """Groups named in ``spec`` that have no registered kernel (reported, not tuned)."""
    have = {k.group for k in FAMILIES.values()}
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
    model: ModelConfig, target, kernels: list[KernelFamily], *, limit: int | None = None
) -> list[dict]:
    """Candidate entries (no artifacts yet): every config of every family with its shapes.

    ``limit``: at most this many configs per family (the first ones: best guesses).
    """
    tgt = _target(target)
    out = []
    for family in kernels:
        for index, (config, shapes) in enumerate(tuning_space(family, model, tgt)[:limit]):
            out.append(
                {
                    "id": f"{family.name}-{index:03d}",
                    "kernel": family.name,
                    "config": config_to_dict(config),
                    "artifact": None,
                    "build_error": None,
                    "shapes": [
                        {"key": family.shape_key(s), "params": family.run_params(config, s, tgt)}
                        for s in shapes
                    ],
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
        family, tgt = FAMILIES[cand["kernel"]], _target(target)
        config = config_from_dict(cand["kernel"], cand["config"])
        keys = {s["key"] for s in cand["shapes"]}
        shapes = [s for s in family.model_shapes(model) if family.shape_key(s) in keys]
        mod = build_module(family, config, shapes, tgt)
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
    chosen = [FAMILIES[k] if isinstance(k, str) else k for k in chosen]
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
    "best_config",
    "build_candidates",
    "config_for",
    "format_summary",
    "measure",
    "read_plan",
    "select_kernels",
    "summary",
    "tune",
]
