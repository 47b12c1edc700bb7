"""The compile pipeline, flat and phased (each phase can dump its IR with ``--dump-ir``):

1. export     torch.export -> Relax ``main`` with ``mla.*`` pseudo-calls; FuseRMSNorm (one
              kernel per norm)
2. phases     ``main`` becomes ``prefill`` and ``decode`` (same signature)
3. mla        RewriteMLAAttention: the MLA form of each phase for the chosen mode
3b. dequant   DequantizeWeights: weights stored in GGUF block formats enter as their bytes,
              seen by the function as decoded views of them; LowerQuantizedTake: embedding
              lookups decode only the rows they read
4. moe        LowerMoE
5. kernels    LowerMLAKernels: call_tir to the target's attention / cache kernels
5b. gemm      LowerDenseGemm: dense products with weights -> ``gemm_*`` kernels (GPU f16/bf16);
              products of quantized views read the blocks (``quant_gemv``, quantized ``gemm``)
6. params     LiftTransformParams: weight transforms (views no kernel reads quantized, W_UK /
              W_UV absorption) into ``transform_params``, run once at load time;
              LiftPhaseWeightTransforms moves the transforms only one phase needs there too
7. build      TVM's default pipeline for the target (dlight schedules for unscheduled GPU ops)

``log`` (optional, ``log(msg)``) gets one line per phase that took a second or more (quicker
phases are named in the next line), with the number of TIR kernels so far.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import tvm
from tvm import relax

from mla_compiler.kernel_configs import KernelChoice
from mla_compiler.model_export.config import ModelConfig, mla_mode
from mla_compiler.model_export.export import INPUT_NAMES, export_relax
from mla_compiler.model_export.modeling import DeepseekV2
from mla_compiler.passes import pseudo
from mla_compiler.passes.dequantize_weights import DequantizeWeights
from mla_compiler.passes.fuse_rms_norm import FuseRMSNorm
from mla_compiler.passes.lift_phase_weight_transforms import LiftPhaseWeightTransforms
from mla_compiler.passes.lower_dense_gemm import LowerDenseGemm
from mla_compiler.passes.lower_mla_kernels import LowerMLAKernels
from mla_compiler.passes.lower_moe import LowerMoE
from mla_compiler.passes.lower_quantized_take import LowerQuantizedTake
from mla_compiler.passes.rewrite_mla_attention import RewriteMLAAttention
from mla_compiler.schedules.target import is_gpu

PHASES = ("prefill", "decode")
DEEP_PREFILL = "prefill_deep"  # prompt chunks deep into the context (MLAMode.deep_prefill_form)


# File names of frames no module has: TVMScript's own evaluation, the import machinery.
NO_MODULE_FILES = (
    "<ast>",
    "<frozen importlib._bootstrap>",
    "<frozen importlib._bootstrap_external>",
)


@contextlib.contextmanager
def quick_frame_lookups() -> Iterator[None]:
    """Make ``inspect.getmodule`` answer at once for frames of ``NO_MODULE_FILES``.

    Every ``T.prim_func`` calls ``inspect.stack()``, which looks up the module of each frame;
    for a file no module has, ``getmodule`` scans all of ``sys.modules`` (~2,000 with torch)
    before answering None. Importing TVM's CUDA tensor intrinsics (~500 such calls, each
    under import frames) took 50-70 s of a 90 s tiny sm_89 compile, our kernels' ``<ast>``
    frames a few more. Recording those names as "no module" in inspect's cache gives the same
    answer (None) without the scan; the entries are removed afterwards.
    """
    cache = inspect.modulesbyfile
    added = [
        path
        for path in (os.path.normcase(os.path.abspath(name)) for name in NO_MODULE_FILES)
        if path not in cache
    ]
    for path in added:
        cache[path] = "<no module>"  # sys.modules has no such name: getmodule returns None
    try:
        yield
    finally:
        for path in added:
            cache.pop(path, None)


def n_kernels(mod: tvm.IRModule) -> int:
    return sum(isinstance(f, tvm.tirx.PrimFunc) for _, f in mod.functions_items())


class _PhaseLog:
    """``log`` a line per phase of a second or more; quicker phases are named in the next."""

    def __init__(self, log: Callable[[str], None] | None):
        self.log, self.names, self.start = log, [], time.perf_counter()

    def done(self, name: str, mod: tvm.IRModule | None = None, *, last: bool = False) -> None:
        if self.log is None:
            return
        self.names.append(name)
        elapsed = time.perf_counter() - self.start
        if elapsed < 1.0 and not last:
            return
        kernels = f" ({n_kernels(mod)} kernels)" if mod is not None else ""
        self.log(f"      ir: {' + '.join(self.names)} {elapsed:.1f}s{kernels}")
        self.names, self.start = [], time.perf_counter()


@dataclasses.dataclass(frozen=True)
class CompiledIR:
    mod: tvm.IRModule  # prefill, decode, transform_params, kernels
    param_names: tuple[str, ...]


def split_phases(mod: tvm.IRModule, phases: tuple[str, ...] = PHASES) -> tvm.IRModule:
    """``main`` becomes ``prefill`` and ``decode`` (and ``prefill_deep``, a prompt-chunk copy
    for chunks deep into the context, when ``phases`` has it); decode is specialised to one
    sequence and one new token (T = 1, B = 1, one logits row), so its kernels see static
    shapes."""
    main = mod["main"]
    funcs = {gv: f for gv, f in mod.functions_items() if gv.name_hint != "main"}
    out = tvm.IRModule(funcs, attrs=mod.attrs)
    for phase in phases:
        out[phase] = main.with_attr("global_symbol", phase)
    shape = {p.name: p.ty.shape for p in main.params}
    one_token = {
        shape["input_ids"][0]: 1,  # T
        shape["q_indptr"][0]: 2,  # B + 1
        shape["logit_rows"][0]: 1,  # R
    }
    return relax.transform.BindSymbolicVars(one_token, func_name="decode")(out)


def lower_to_kernels(
    mod: tvm.IRModule,
    cfg: ModelConfig,
    *,
    mla: int,
    target: tvm.target.Target,
    choice: KernelChoice,
    param_names: tuple[str, ...] = (),
    weight_formats: dict[str, str] | None = None,
    deep_prefill: bool = False,
    dump: Callable[[str, tvm.IRModule], None] | None = None,
    log: Callable[[str], None] | None = None,
) -> tvm.IRModule:
    """``weight_formats``: weight name -> GGUF block format it is stored in (``param_names``
    orders the weight parameters). ``deep_prefill``: also ``prefill_deep`` (the mode's
    ``deep_prefill_form``) where the mode has one."""
    mode = mla_mode(mla)
    dump = dump or (lambda _name, _mod: None)
    phases = _PhaseLog(log)
    deep = deep_prefill and mode.deep_prefill_form is not None
    mod = FuseRMSNorm()(mod)
    mod = split_phases(mod, PHASES + (DEEP_PREFILL,) * deep)
    dump("phases", mod)
    phases.done("prefill/decode split")
    forms = {"prefill": mode.prefill_form, "decode": mode.decode_form}
    if deep:
        forms[DEEP_PREFILL] = mode.deep_prefill_form
    mod = RewriteMLAAttention(dims=cfg.dims, forms=forms)(mod)
    dump("mla", mod)
    phases.done(f"MLA rewrite (mla={mla})")
    if is_gpu(target):
        with quick_frame_lookups():
            import tvm.s_tir.tensor_intrin  # noqa: F401  (mma / ldmatrix intrinsics)
        phases.done("TVM tensor intrinsics")
    if weight_formats:  # views of the blocks; the lowerings below read them quantized
        mod = DequantizeWeights(weight_formats, param_names, target=target)(mod)
        mod = LowerQuantizedTake(target=target)(mod)
        dump("dequantize", mod)
        phases.done(f"{len(weight_formats)} quantized weights", mod)
    mod = LowerMoE(target=target, choice=choice)(mod)
    dump("moe", mod)
    phases.done("MoE lowering", mod)
    mod = LowerMLAKernels(dims=cfg.dims, target=target, choice=choice)(mod)
    pseudo.check_lowered(mod)
    dump("kernels", mod)
    phases.done("MLA kernels", mod)
    mod = LowerDenseGemm(target=target, choice=choice)(mod)
    # per-layer copies of the same pure values (the decode cache row bounds read from
    # kv_indptr / kv_rows) are computed once per call
    mod = relax.transform.EliminateCommonSubexpr()(mod)
    dump("gemm", mod)
    phases.done("dense GEMMs", mod)
    mod = relax.transform.LiftTransformParams(shared_transform=True)(mod)
    mod = LiftPhaseWeightTransforms()(mod)
    dump("params", mod)
    phases.done("weight transforms", mod, last=True)
    return mod


def compile_ir(
    model: DeepseekV2,
    *,
    mla: int,
    target: tvm.target.Target,
    dump_dir: str | Path | None = None,
    kv_dtype: str = "float16",
    choice: KernelChoice,
    weight_formats: dict[str, str] | None = None,
    deep_prefill: bool = False,
    log: Callable[[str], None] | None = None,
) -> CompiledIR:
    """The model as Relax ``prefill`` / ``decode`` / ``transform_params`` with their kernels,
    configured as ``choice`` says (``KernelChoice.from_options``). ``log``: progress lines (see
    the module docstring); None is silent."""
    names: list[str] = []
    if dump_dir is not None:
        Path(dump_dir).mkdir(parents=True, exist_ok=True)
        for old in Path(dump_dir).glob("[0-9][0-9]_*.py"):
            old.unlink()

    def dump(name: str, mod: tvm.IRModule) -> None:
        if dump_dir is not None:
            names.append(name)
            path = Path(dump_dir) / f"{len(names) - 1:02d}_{name}.py"
            path.write_text(mod.script(show_meta=False))

    with quick_frame_lookups():
        start = time.perf_counter()
        exported = export_relax(model, kv_dtype=getattr(torch, kv_dtype))
        dump("export", exported.mod)
        if log is not None:
            layers = model.cfg.num_hidden_layers
            log(
                f"      ir: torch.export -> Relax ({layers} layers) "
                f"{time.perf_counter() - start:.1f}s"
            )
        mod = lower_to_kernels(
            exported.mod,
            model.cfg,
            mla=mla,
            target=target,
            choice=choice,
            param_names=exported.param_names,
            weight_formats=weight_formats,
            deep_prefill=deep_prefill,
            dump=dump,
            log=log,
        )
    return CompiledIR(mod=mod, param_names=exported.param_names)


def user_input_names() -> tuple[str, ...]:
    return INPUT_NAMES
