"""Measure a tuning plan on the GPU machine with TVM's runtime library only.

    TVM_USE_RUNTIME_LIB=1 python -m mla_compiler.tuning_measure PLAN_DIR --db DB_DIR

For every candidate of ``PLAN_DIR/plan.json`` (``mla_compiler.tuning.build_candidates``) and each
of its shapes not yet in the database: load the candidate's artifact (``runtime.loader``), run it
once on fresh random inputs with NaN-poisoned outputs and compare O and LSE with the float64
``mla_compiler.reference``; only a correct kernel is timed: CUDA events around each call, the
median of ``reps`` calls that rotate over enough input sets to overflow L2. One record per
(candidate, shape) is appended to the database as soon as it is measured (``tuning_db``).

Each candidate runs in its own child process (``--worker``): a kernel that faults or hangs is
recorded as failed and cannot poison the CUDA context of the others.

Nothing here imports the TVM compiler or the schedules; torch and ``tvm`` are imported lazily.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from mla_compiler import tuning_db
from mla_compiler.errors import TuningError

PLAN_FORMAT = "mla-compiler/tuning-plan/1"
PLAN_FILE = "plan.json"
REPS = 30
ROTATE_L2_TIMES = 3  # input sets together span this many times the L2 size (at least 2 sets)

DEVICE = "cuda"  # where runners allocate inputs (tests run the llvm kernels with "cpu")

RUNNERS: dict[str, Callable] = {}


def register_runner(kernel: str):
    """Decorator: ``fn(module, plan, shape_params, reps) -> result dict`` measures ``kernel``
    (a family of ``schedules.families.FAMILIES`` names its runner by its own name)."""

    def wrap(fn):
        RUNNERS[kernel] = fn
        return fn

    return wrap


# --- plan files ---------------------------------------------------------------------------------


def write_json(path: Path, data) -> None:
    """Write ``data`` atomically: temp file, fsync, rename."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_plan(plan_dir: str | Path) -> dict:
    path = Path(plan_dir) / PLAN_FILE
    try:
        plan = json.loads(path.read_text())
    except FileNotFoundError:
        raise TuningError(f"{path}: no tuning plan (build one with `tune --build-only`)") from None
    except (OSError, json.JSONDecodeError) as err:
        raise TuningError(f"{path}: unreadable tuning plan ({err})") from err
    if plan.get("format") != PLAN_FORMAT:
        raise TuningError(f"{path}: not a tuning plan of this version ({plan.get('format')!r})")
    return plan


# --- progress -----------------------------------------------------------------------------------


class Progress:
    """A tqdm bar on a terminal when tqdm is installed, else one plain line per step (logs)."""

    def __init__(self, total: int, desc: str, *, enabled: bool = True):
        self.total, self.desc, self.n, self.bar = total, desc, 0, None
        self.enabled = enabled
        if enabled and sys.stderr.isatty():
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, desc=desc, file=sys.stderr, dynamic_ncols=True)
            except ImportError:
                pass

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.enabled:
            print(f"{self.desc}: {self.n}/{self.total}", file=sys.stderr, flush=True)

    def write(self, msg: str) -> None:
        if self.bar is not None:
            self.bar.write(msg, file=sys.stderr)
        elif self.enabled:
            print(msg, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# --- timing -------------------------------------------------------------------------------------


def input_sets(set_bytes: int, *, most: int = 512) -> int:
    """Input sets to rotate through so that together they overflow L2 (and fit in memory)."""
    import torch

    l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 << 20) or 50 << 20
    free, _ = torch.cuda.mem_get_info()
    want = max(2, math.ceil(ROTATE_L2_TIMES * l2 / max(set_bytes, 1)))
    fit = max(1, int(0.5 * free // max(set_bytes, 1)))
    return max(1, min(want, most, fit))


def time_calls(calls: list[Callable[[], None]], *, reps: int, warmup: int = 3) -> float:
    """Median microseconds of one call, CUDA events around each; call ``i`` uses set
    ``i % len(calls)`` so consecutive calls never find their inputs in L2."""
    import torch

    for i in range(warmup):
        calls[i % len(calls)]()
    torch.cuda.synchronize()
    events = []
    for i in range(reps):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        calls[i % len(calls)]()
        end.record()
        events.append((start, end))
    torch.cuda.synchronize()
    times = sorted(s.elapsed_time(e) * 1e3 for s, e in events)
    return times[len(times) // 2]


def _sync() -> None:
    import torch

    if DEVICE == "cuda":
        torch.cuda.synchronize()


def _t(x):
    import tvm

    return tvm.runtime.from_dlpack(x)


def _max_err(got, ref) -> float:
    """Max |got - ref| in float64; NaN/inf anywhere (a poisoned, unwritten output) is inf."""
    d = (got.double() - ref).abs()
    return math.inf if not bool(d.isfinite().all()) else float(d.max())


class CheckError(AssertionError):
    """A kernel whose output differs from the float64 reference (never timed)."""


def _check(name: str, got, ref, *, atol: float, rtol: float) -> float:
    err = _max_err(got, ref)
    bound = atol + rtol * float(ref.abs().max())
    if not err <= bound:
        raise CheckError(f"{name} differs from the reference: max |d| = {err:.3g} > {bound:.3g}")
    return err


# --- runners ------------------------------------------------------------------------------------


@register_runner("attn_decode")
def run_decode(module, plan: dict, params: dict, reps: int) -> dict:
    """split + merge over ``batch`` sequences of ``ctx`` rows, ``splits`` from the plan."""
    import torch

    from mla_compiler import reference

    dims, scale = plan["model"]["dims"], plan["model"]["sm_scale"]
    heads, rank = dims["heads"], dims["kv_lora_rank"]
    width = rank + dims["qk_rope_head_dim"]
    batch, ctx, splits = params["batch"], params["ctx"], params["splits"]
    dev = DEVICE
    o_part = torch.empty(splits, batch, 1, heads, rank, device=dev)  # f32 workspace
    lse_part = torch.empty(splits, batch, 1, heads, device=dev)
    o = torch.empty(batch, 1, heads, rank, device=dev, dtype=torch.float16)  # [B, Q, H, 512]
    lse = torch.empty(batch, 1, heads, device=dev)  # [B, Q, H]
    indptr = torch.arange(0, batch * ctx + 1, ctx, dtype=torch.int32, device=dev)  # [B+1]
    split, merge = module["decode_split"], module["decode_merge"]
    set_bytes = batch * ctx * width * 2
    calls, first = [], None
    for _ in range(input_sets(set_bytes)):
        q = torch.randn(batch, 1, heads, width, device=dev).half()  # [B, Q, H, 576]
        kv = torch.randn(1, batch * ctx, width, device=dev).half()  # [L, C, 576]
        a_split = [_t(q), _t(kv), _t(indptr), 0, _t(o_part), _t(lse_part), _t(o), _t(lse)]
        a_merge = [_t(o_part), _t(lse_part), _t(indptr), _t(o), _t(lse)]

        def call(a_split=a_split, a_merge=a_merge):
            split(*a_split)
            if splits > 1:  # one split per sequence: the split kernel wrote O and LSE
                merge(*a_merge)

        calls.append(call)
        first = first or (q, kv)
    for t in (o_part, lse_part, o, lse):
        t.fill_(float("nan"))
    calls[0]()
    _sync()
    q, kv = first
    err = 0.0
    for b in sorted({0, batch - 1}):
        ref_o, ref_lse = reference.absorbed_attention(
            q[b], kv[0, b * ctx : (b + 1) * ctx], v_dim=rank, sm_scale=scale
        )
        err = max(err, _check("O", o[b], ref_o, atol=4e-3, rtol=1e-2))
        _check("LSE", lse[b], ref_lse, atol=2e-3, rtol=1e-4)
    return {"median_us": time_calls(calls, reps=reps), "max_abs_err": err}


def _prefill_runner(kind: str):
    def run(module, plan: dict, params: dict, reps: int) -> dict:
        """One causal sequence of ``n`` new tokens (T = N = n)."""
        import torch

        from mla_compiler import reference

        dims, scale = plan["model"]["dims"], plan["model"]["sm_scale"]
        heads, n, dev = dims["heads"], params["n"], DEVICE
        rank, rope = dims["kv_lora_rank"], dims["qk_rope_head_dim"]
        dk = rank + rope if kind == "absorbed" else dims["qk_nope_head_dim"] + rope
        dv = rank if kind == "absorbed" else dims["v_head_dim"]
        indptr = torch.tensor([0, n], dtype=torch.int32, device=dev)  # [B+1]
        o = torch.empty(n, heads, dv, device=dev, dtype=torch.float16)  # [T, H, Dv]
        lse = torch.empty(n, heads, device=dev)  # [T, H]
        fn = module["prefill"]
        if kind == "absorbed":
            set_bytes = n * (heads + 1) * dk * 2
        else:
            set_bytes = n * heads * (2 * dk + dv) * 2
        calls, first = [], None
        for _ in range(input_sets(set_bytes)):
            q = (0.5 * torch.randn(n, heads, dk, device=dev)).half()  # [T, H, Dk]
            if kind == "absorbed":
                kv = (torch.randn(1, n, dk, device=dev)).half()  # [L, C, 576]
                args = [_t(q), _t(kv), _t(indptr), _t(indptr), 0, _t(o), _t(lse)]
                refs = (kv[0], kv[0, :, :dv])
            else:
                k = torch.randn(n, heads, dk, device=dev).half()  # [N, H, 192]
                v = torch.randn(n, heads, dv, device=dev).half()  # [N, H, 128]
                args = [_t(q), _t(k), _t(v), _t(indptr), _t(indptr), _t(o), _t(lse)]
                refs = (k, v)
            calls.append(lambda args=args: fn(*args))
            first = first or (q, refs)
        o.fill_(float("nan"))
        lse.fill_(float("nan"))
        calls[0]()
        _sync()
        q, (k, v) = first
        err = 0.0
        for a, b in sorted({(0, min(64, n)), (max(0, n - 128), n)}):
            # rows a..b-1 see KV rows j <= i: the reference's causal offset N - T = a
            ref_o, ref_lse = reference.attention(q[a:b], k[:b], v[:b], sm_scale=scale)
            err = max(err, _check("O", o[a:b], ref_o, atol=2e-2, rtol=0.0))
            _check("LSE", lse[a:b], ref_lse, atol=1e-2, rtol=0.0)
        return {"median_us": time_calls(calls, reps=reps), "max_abs_err": err}

    return run


register_runner("attn_prefill_absorbed")(_prefill_runner("absorbed"))
register_runner("attn_prefill_decompressed")(_prefill_runner("decompressed"))


@register_runner("gemm_prefill")
def run_gemm(module, plan: dict, params: dict, reps: int) -> dict:
    """``Y = epilogue(X W^T)`` for a prompt chunk of ``tokens`` rows (f16), checked against the
    float64 product (SiLU·up over 32-row interleaved gate/up groups, residual add)."""
    import torch

    from mla_compiler import reference

    n, k, m, epi = params["n"], params["k"], params["tokens"], params["epilogue"]
    out_dtype = getattr(torch, params["out_dtype"] or "float16")
    nw = 2 * n if epi == "silu_mul" else n
    fn = module[params["symbol"]]
    y = torch.empty(m, n, device=DEVICE, dtype=out_dtype)
    calls, first = [], None
    for _ in range(input_sets((m * k + nw * k + m * n) * 2)):
        x = torch.randn(m, k, device=DEVICE).half()
        w = (torch.randn(nw, k, device=DEVICE) / k**0.5).half()
        r = torch.randn(m, n, device=DEVICE).half()
        args = [_t(x), _t(w)] + ([_t(r)] if epi == "residual" else []) + [_t(y)]
        calls.append(lambda args=args: fn(*args))
        first = first or (x, w, r)
    y.fill_(float("nan"))
    calls[0]()
    _sync()
    x, w, r = first
    rows = slice(0, min(m, 256))
    h = x[rows].double() @ w.double().T
    if epi == "silu_mul":
        h = reference.silu_mul_interleaved(h)
    ref = h + r[rows].double() if epi == "residual" else h
    err = _check("Y", y[rows], ref, atol=1e-2, rtol=1e-2)
    return {"median_us": time_calls(calls, reps=reps), "max_abs_err": err}


@register_runner("moe_grouped")
def run_moe(module, plan: dict, params: dict, reps: int) -> dict:
    """Grouped gate+up (SiLU·up) then down (× routing weight) over ``tokens`` routed to
    ``top_k`` of ``num_experts`` experts at random, checked per row block in float64."""
    import torch

    from mla_compiler import reference

    e, k_top, d, inter = params["num_experts"], params["top_k"], params["hidden"], params["inter"]
    t, bm = params["tokens"], params["block_m"]
    gen = torch.Generator(DEVICE).manual_seed(0)
    x = torch.randn(t, d, device=DEVICE, generator=gen).half()
    wgu = (torch.randn(e, 2 * inter, d, device=DEVICE, generator=gen) / d**0.5).half()
    wd = (torch.randn(e, d, inter, device=DEVICE, generator=gen) / inter**0.5).half()
    ids = torch.rand(t, e, device=DEVICE, generator=gen).topk(k_top, dim=-1).indices.int()
    weights = torch.rand(t, k_top, device=DEVICE, generator=gen)
    sr, be, used = reference.moe_grouping(ids, e, bm)
    h = torch.empty(sr.numel(), inter, device=DEVICE).half()
    y = torch.full((sr.numel(), d), float("nan"), device=DEVICE).half()
    gate_up, down = module["moe_gate_up"], module["moe_down"]
    args_gu = [_t(x), _t(sr), _t(be), _t(wgu), _t(h)]
    args_d = [_t(h), _t(sr), _t(be), _t(wd), _t(weights), _t(y)]

    def call():
        gate_up(*args_gu)
        down(*args_d)

    call()
    _sync()
    err = 0.0
    src = sr.clamp(min=0).long()
    for b in sorted({0, used // 2, used - 1}):  # a few row blocks, fp64 per block
        rows, ex = slice(b * bm, (b + 1) * bm), int(be[b])
        ref_h = reference.silu_mul_interleaved(x[src[rows] // k_top].double() @ wgu[ex].double().T)
        real = sr[rows] >= 0
        err = max(err, _check("H", h[rows][real], ref_h[real], atol=1e-2, rtol=1e-2))
        # padding rows of h and y are not written (moe_grouped skip_padding): routed rows only
        scale = weights[src[rows] // k_top, src[rows] % k_top][real].double()
        ref_y = (h[rows][real].double() @ wd[ex].double().T) * scale[:, None]
        err = max(err, _check("Y", y[rows][real], ref_y, atol=1e-2, rtol=1e-2))
    return {"median_us": time_calls([call], reps=reps), "max_abs_err": err}


# --- measuring a plan ---------------------------------------------------------------------------


def device_info() -> dict:
    import torch

    major, minor = torch.cuda.get_device_capability()
    arch = f"sm_{major}{minor}" + ("a" if major == 9 else "")
    return {"arch": arch, "device": torch.cuda.get_device_name()}


def tvm_version() -> str:
    import tvm

    return str(tvm.__version__)


def _record(plan: dict, cand: dict, shape: dict, result: dict, info: dict) -> dict:
    return {
        "kernel": cand["kernel"],
        "target": plan["target"],
        "arch": info.get("arch", ""),
        "device": info.get("device", ""),
        "shape_key": shape["key"],
        "shape": shape["params"],
        "config": cand["config"],
        "candidate": cand["id"],
        "model": plan["model"]["name"],
        "median_us": result.get("median_us"),
        "ok": bool(result.get("ok", "err" not in result)) and result.get("median_us") is not None,
        "err": result.get("err"),
        "max_abs_err": result.get("max_abs_err"),
        "reps": result.get("reps"),
        "tvm_version": info.get("tvm_version", plan.get("tvm_version", "")),
    }


def run_candidate(plan_dir: Path, plan: dict, cand: dict, shapes: list[dict], db, *, reps: int):
    """Measure ``shapes`` of one candidate in this process, appending a record after each."""
    from mla_compiler.runtime import loader

    info = {**device_info(), "tvm_version": tvm_version()}
    try:
        module = loader.load_module(Path(plan_dir) / cand["artifact"], "cuda")
    except Exception as err:  # noqa: BLE001  (recorded, the next candidate goes on)
        for shape in shapes:
            res = {"err": f"load: {type(err).__name__}: {str(err)[:300]}"}
            tuning_db.append(db, _record(plan, cand, shape, res, info))
        return
    runner = RUNNERS[cand["kernel"]]
    for shape in shapes:
        try:
            res = {**runner(module, plan, shape["params"], reps), "reps": reps}
        except CheckError as err:
            res = {"err": f"check: {err}"}
        except Exception as err:  # noqa: BLE001
            res = {"err": f"run: {type(err).__name__}: {str(err)[:300]}"}
        tuning_db.append(db, _record(plan, cand, shape, res, info))


def _run_isolated(plan_dir: Path, cand: dict, shapes: list[dict], db, *, reps: int) -> str | None:
    """``run_candidate`` in a child process; the reason it died, or None."""
    cmd = [sys.executable, "-m", "mla_compiler.tuning_measure", str(plan_dir), "--db", str(db)]
    cmd += ["--worker", cand["id"], "--reps", str(reps)]
    env = dict(os.environ, TVM_USE_RUNTIME_LIB="1")
    try:
        proc = subprocess.run(
            cmd, capture_output=True, text=True, env=env, timeout=120 + 60 * len(shapes)
        )
    except subprocess.TimeoutExpired:
        return "run: worker timed out (hung kernel?)"
    if proc.returncode == 0:
        return None
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1][:300]
    return f"run: worker exited with {proc.returncode}: {tail}"


def measure(
    plan_dir,
    db,
    *,
    runner: Callable | None = None,
    isolate: bool = True,
    reps: int = REPS,
    budget_s: float | None = None,
    log=print,
    progress: bool = True,
) -> dict:
    """Measure every (candidate, shape) of a plan that ``db`` does not hold yet.

    ``runner(plan, candidate, shape) -> {"median_us", ...} | {"err": ...}`` replaces loading
    and running the artifacts (tests); by default each candidate runs in a child process
    (``isolate``). Stops starting candidates once ``budget_s`` is spent (re-run to resume).
    Returns counts: measured, skipped (already recorded), failed, left (budget).
    """
    plan_dir = Path(plan_dir)
    plan = read_plan(plan_dir)
    tuning_db.open_db(db)
    done = tuning_db.recorded_keys(db)
    todo = []
    skipped = 0
    for cand in plan["candidates"]:
        shapes = []
        for shape in cand["shapes"]:
            key = tuning_db.record_key(cand["kernel"], plan["target"], shape["key"], cand["config"])
            if key in done:
                skipped += 1
            else:
                shapes.append(shape)
        if shapes:
            todo.append((cand, shapes))
    total = sum(len(s) for _, s in todo)
    bar = Progress(total, f"measure {plan['target']}", enabled=progress)
    if skipped:
        bar.write(f"{skipped} measurements already in {db}: skipped")
    t0, left = time.time(), 0
    for index, (cand, shapes) in enumerate(todo):
        if budget_s is not None and time.time() - t0 > budget_s:
            left = sum(len(s) for _, s in todo[index:])
            bar.write(f"budget reached: {left} measurements left (re-run to resume)")
            break
        if cand.get("build_error") or not cand.get("artifact"):
            for shape in shapes:
                res = {"err": f"build: {cand.get('build_error') or 'not built'}"}
                tuning_db.append(db, _record(plan, cand, shape, res, {}))
        elif runner is not None:
            info = {"tvm_version": plan.get("tvm_version", "")}
            for shape in shapes:
                tuning_db.append(db, _record(plan, cand, shape, runner(plan, cand, shape), info))
        elif isolate:
            why = _run_isolated(plan_dir, cand, shapes, db, reps=reps)
            if why is not None:  # what the worker did not record fails with its reason
                have = tuning_db.recorded_keys(db)
                for shape in shapes:
                    key = tuning_db.record_key(
                        cand["kernel"], plan["target"], shape["key"], cand["config"]
                    )
                    if key not in have:
                        tuning_db.append(db, _record(plan, cand, shape, {"err": why}, {}))
                bar.write(f"{cand['id']}: {why}")
        else:
            run_candidate(plan_dir, plan, cand, shapes, db, reps=reps)
        bar.update(len(shapes))
    bar.close()
    wanted = {
        tuning_db.record_key(cand["kernel"], plan["target"], shape["key"], cand["config"])
        for cand, shapes in todo
        for shape in shapes
    }
    failed = sum(
        1 for r in tuning_db.read(db) if not r["ok"] and tuning_db.record_key(
            r["kernel"], r["target"], r["shape_key"], r["config"]) in wanted
    )  # fmt: skip
    return {"measured": total - left, "skipped": skipped, "failed": failed, "left": left}


def main(argv: list[str] | None = None) -> int:
    import argparse

    from mla_compiler.runtime import loader

    loader.use_runtime_only()
    parser = argparse.ArgumentParser(prog="python -m mla_compiler.tuning_measure")
    parser.add_argument("plan_dir")
    parser.add_argument("--db", required=True)
    parser.add_argument("--reps", type=int, default=REPS)
    parser.add_argument("--budget-minutes", type=float, default=None)
    parser.add_argument("--no-isolate", action="store_true", help="all candidates in this process")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # candidate id: measure it here
    args = parser.parse_args(argv)
    if args.worker:
        plan = read_plan(args.plan_dir)
        cand = next(c for c in plan["candidates"] if c["id"] == args.worker)
        done = tuning_db.recorded_keys(args.db)
        shapes = [
            s
            for s in cand["shapes"]
            if tuning_db.record_key(cand["kernel"], plan["target"], s["key"], cand["config"])
            not in done
        ]
        run_candidate(Path(args.plan_dir), plan, cand, shapes, args.db, reps=args.reps)
        return 0
    budget = None if args.budget_minutes is None else 60 * args.budget_minutes
    counts = measure(
        args.plan_dir, args.db, isolate=not args.no_isolate, reps=args.reps, budget_s=budget
    )
    counts["compiler_loaded"] = loader.compiler_loaded()
    print(json.dumps(counts))
    target = read_plan(args.plan_dir)["target"]
    print("\n" + tuning_db.format_summary(tuning_db.summary(args.db, target=target)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
