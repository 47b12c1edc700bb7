"""Build-time CUDA compilation: an exported library whose device code is a fatbin, never source.

TVM 0.27 on a machine without a CUDA driver keeps the generated CUDA C++ *source* in its CUDA
device module (``fmt == "cuda"``) and compiles it when the library is *loaded*, through a Python
callback that needs the full TVM compiler and NVRTC on the GPU machine. ``build`` / ``export``
instead compile that source with nvcc here, for every requested arch, and pack the cubins (plus
PTX of the lowest arch, for GPUs newer than any cubin) into one fatbin. The exported ``.so``
carries a CUDA device module with ``fmt == "fatbin"``, which ``libtvm_runtime_cuda.so`` loads
with ``cuModuleLoadData`` alone (see ``mla_compiler.runtime.loader``).

How: ``export_library`` serialises the import tree into one blob (``__tvm_ffi__library_bin``).
We pack that blob as TVM does (``runtime.ModulePackImportsToTensor``), replace the payload of
each CUDA device module (``[fmt][fmap][code]``, the format ``CUDAModuleNode::SaveToBytes`` and
the codegen's fallback module share) with ``["fatbin"][fmap][fatbin]``, and hand the result to
``export_library`` through its ``fpack_imports`` hook (LLVM object via ``codegen.codegen_blob``,
as TVM's default path). Nothing else in the library changes.

Artifact layout written to ``output`` (a directory)::

    <name>.so               the library (host code, Relax VM bytecode, fatbin)
    <name>.manifest.json    targets, images in the fatbin, ptxas resources per kernel and arch
    <name>.cuda/            per device module: sm_XX.cubin, compute_XX.ptx, kernels.fatbin,
                            kernels.cu (the source, for reading only; not used to load)

``progress`` (optional, ``progress(msg)``, called from worker threads too) gets a line as each
phase starts and ends, with its time: the Relax pipeline (dlight), TIR lowering, codegen, each
nvcc job (and every ``HEARTBEAT_S`` while nvcc runs), the export.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import json
import os
import struct
import threading
import time
from collections.abc import Callable
from pathlib import Path

import tvm

from mla_compiler import nvcc
from mla_compiler.errors import ArtifactError, TargetError
from mla_compiler.runtime.loader import MANIFEST_FORMAT, MANIFEST_SUFFIX, SMOKE_IO, file_sha256
from mla_compiler.schedules.target import PASS_CONFIG, parse_targets, tvm_target

Progress = Callable[[str], None]
HEARTBEAT_S = 60.0  # a "still running" line while nvcc jobs run longer than this


@dataclasses.dataclass(frozen=True)
class DeviceModule:
    """One CUDA device module of the artifact and the files written for it."""

    directory: Path
    fatbin: Path
    cubins: dict[str, Path]  # arch -> file
    ptx: dict[str, Path]  # "compute_89" -> file
    kernels: dict[str, dict[str, nvcc.KernelResources]]  # arch -> kernel -> ptxas report


@dataclasses.dataclass(frozen=True)
class BuildResult:
    library: Path
    manifest: Path
    targets: tuple[str, ...]  # ("sm_89", "sm_90a") or ("cpu",)
    images: tuple[str, ...]  # what the fatbin holds: ("sm_89", "sm_90a", "compute_89")
    device_modules: tuple[DeviceModule, ...]


@contextlib.contextmanager
def source_only():
    """Make TVM's codegen keep CUDA source in its device modules, even where a driver exists.

    With ``libtvm_runtime_cuda.so`` loaded (a GPU machine), TVM would JIT the source through
    NVRTC while compiling; ``TVM_COMPILE_FORCE_FALLBACK`` (read by the C++ codegen on each build)
    keeps the source so ``export`` compiles it with nvcc like on a GPU-less machine.
    """
    old = os.environ.get("TVM_COMPILE_FORCE_FALLBACK")
    os.environ["TVM_COMPILE_FORCE_FALLBACK"] = "1"
    try:
        yield
    finally:
        if old is None:
            del os.environ["TVM_COMPILE_FORCE_FALLBACK"]
        else:
            os.environ["TVM_COMPILE_FORCE_FALLBACK"] = old


def _arch_key(arch: str) -> tuple[int, str]:
    num = nvcc.arch_number(arch)
    return int(num.rstrip("af")), num[len(num.rstrip("af")) :]


def lowest_arch(archs: list[str] | tuple[str, ...]) -> str:
    return min(archs, key=_arch_key)


def build(
    mod: tvm.IRModule,
    archs: list[str],
    *,
    output: Path,
    name: str = "model",
    relax_pipeline="default",
    tir_pipeline="default",
    codegen_arch: str | None = None,
    ptx: bool = True,
    cuda_graph: bool = False,
    progress: Progress | None = None,
) -> BuildResult:
    """Compile ``mod`` (Relax, or TIR only) for ``archs`` and export it to ``output``.

    ``archs`` are CLI target names: ``["cpu"]`` or GPU archs such as ``["sm_89", "sm_90a"]``.
    TVM generates one CUDA source for ``codegen_arch`` (default: the lowest arch, so the source
    compiles for every arch); nvcc compiles it for each arch. A source that needs arch-specific
    instructions (wgmma: sm_90a) must be built with that arch alone. ``progress``: see the
    module docstring; None is silent.
    """
    targets = parse_targets(",".join(archs))
    gpu = targets != ["cpu"]
    target = tvm_target(codegen_arch or lowest_arch(targets)) if gpu else tvm_target("cpu")
    # cp.async for the kernels that ask for it (software-pipelined shared-memory copies)
    config = dict(PASS_CONFIG) if gpu else {}
    if gpu and cuda_graph:  # RewriteCUDAGraph (in the default finalize passes) does nothing else
        config["relax.backend.use_cuda_graph"] = True
    timer = None if progress is None else _CompileTimer(progress, mod, gpu=gpu)
    # the instrument only watches: the passes and their output are the same without it
    instruments = [] if timer is None else [_PassProgress(timer)]
    with source_only(), tvm.transform.PassContext(config=config, instruments=instruments):
        executable = tvm.compile(
            mod, target=target, relax_pipeline=relax_pipeline, tir_pipeline=tir_pipeline
        )
    if timer is not None:
        timer.finish()
    return export(executable, targets, output=output, name=name, ptx=ptx, progress=progress)


def _functions(mod) -> list:
    return [mod] if isinstance(mod, tvm.tirx.PrimFunc) else [f for _, f in mod.functions_items()]


def _n_kernels(mod, *, unscheduled: bool = False) -> int:
    return sum(
        isinstance(f, tvm.tirx.PrimFunc)
        and not (unscheduled and f.attrs is not None and f.attrs.get("tirx.is_scheduled", 0))
        for f in _functions(mod)
    )


class _CompileTimer:
    """Phases of ``tvm.compile`` for ``progress``: Relax pipeline (dlight inside), TIR lowering
    (from ``tirx.BindTarget`` to the last pass), codegen (after the last pass)."""

    def __init__(self, progress: Progress, mod, *, gpu: bool):
        self.say, self.gpu, self.depth = progress, gpu, 0
        self.dlight_start = self.dlight = self.lowering = None
        self.start = self.last = time.perf_counter()
        relax_funcs = sum(isinstance(f, tvm.relax.Function) for f in _functions(mod))
        self.relax = relax_funcs > 0
        if self.relax:
            self.say(
                f"      build: Relax pipeline ({relax_funcs} functions, {_n_kernels(mod)} "
                "kernels) ..."
            )

    def before(self, mod: tvm.IRModule, name: str) -> None:
        self.depth += 1
        now = time.perf_counter()
        if name == "ApplyDefaultSchedule":
            self.dlight_start = now
            n = _n_kernels(mod, unscheduled=True)
            self.say(f"      build: dlight scheduling {n} of {_n_kernels(mod)} kernels ...")
        elif name == "tirx.BindTarget" and self.depth == 1 and self.lowering is None:
            # tirx.build's first pass (the Relax pipeline may build small TIR modules inside)
            self.lowering = now
            done = ""
            if self.relax:
                dlight = f" (dlight {self.dlight:.1f}s)" if self.dlight is not None else ""
                done = f"Relax pipeline done {now - self.start:.1f}s{dlight}; "
            self.say(f"      build: {done}TIR lowering + codegen of {_n_kernels(mod)} kernels ...")

    def after(self, name: str) -> None:
        self.depth -= 1
        now = time.perf_counter()
        if name == "ApplyDefaultSchedule" and self.dlight_start is not None:
            self.dlight = now - self.dlight_start
        if self.depth == 0:
            self.last = now

    def finish(self) -> None:
        now = time.perf_counter()
        if self.lowering is None:  # nothing was lowered (or no instrument)
            return
        codegen = "CUDA + host" if self.gpu else "host"
        self.say(
            f"      build: TIR lowering {self.last - self.lowering:.1f}s, {codegen} codegen "
            f"{now - self.last:.1f}s"
        )


@tvm.ir.instrument.pass_instrument
class _PassProgress:
    def __init__(self, timer: _CompileTimer):
        self.timer = timer

    def run_before_pass(self, mod, info):
        self.timer.before(mod, info.name)

    def run_after_pass(self, mod, info):
        self.timer.after(info.name)


def export(
    executable,
    archs: list[str],
    *,
    output: Path,
    name: str = "model",
    ptx: bool = True,
    progress: Progress | None = None,
) -> BuildResult:
    """Export a compiled module (``tvm.compile`` output, or a runtime Module) to ``output``.

    Its CUDA device modules must still hold source: compile under ``source_only()``. ``ptx``:
    also carry PTX of the lowest arch (skipped when that arch is arch-specific, e.g. sm_90a,
    whose PTX runs nowhere else). ``progress``: see the module docstring; None is silent.
    """
    say = progress or (lambda _msg: None)
    targets = tuple(parse_targets(",".join(archs)))
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    root = executable.mod if isinstance(executable, tvm.runtime.Executable) else executable
    library = output / f"{name}.so"
    if targets == ("cpu",):
        if _device_payloads(_pack_imports(root)):
            raise TargetError("module has CUDA kernels but was exported for target cpu")
        start = time.perf_counter()
        root.export_library(str(library))
        say(f"      export: {library.name} {time.perf_counter() - start:.1f}s")
        return _write_manifest(output, name, library, targets, images=(), device_modules=())

    blob = _pack_imports(root)
    sources = _device_payloads(blob)
    if not sources:
        raise TargetError(f"no CUDA kernels in the module built for {', '.join(targets)}")
    device_modules, fatbins = [], []
    for index, source in enumerate(sources):
        suffix = "" if index == 0 else f".{index}"
        directory = output / f"{name}.cuda{suffix}"
        label = f"[{index + 1}/{len(sources)}] " if len(sources) > 1 else ""
        dm, fatbin = _compile_device_module(
            source, targets, directory, ptx=ptx, say=say, label=label
        )
        device_modules.append(dm)
        fatbins.append(fatbin)
    start = time.perf_counter()
    new_blob = _rewrite_payloads(blob, fatbins)
    images = tuple(nvcc.fatbin_images(fatbins[0]))

    def fpack_imports(mod, is_system_lib, prefix, workspace_dir):
        return _blob_object(root, new_blob, is_system_lib, prefix, Path(workspace_dir))

    root.export_library(str(library), fpack_imports=fpack_imports)
    say(
        f"      export: fatbin ({', '.join(images)}) + {library.name} "
        f"{time.perf_counter() - start:.1f}s"
    )
    return _write_manifest(output, name, library, targets, images, tuple(device_modules))


def _compile_device_module(
    source: str,
    targets: tuple[str, ...],
    directory: Path,
    *,
    ptx: bool,
    say: Progress = lambda _msg: None,
    label: str = "",
) -> tuple[DeviceModule, bytes]:
    """nvcc: one cubin per arch, PTX of the lowest arch (unless arch-specific), one fatbin."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "kernels.cu").write_text(source)
    low = lowest_arch(targets)
    ptx_archs = [low] if ptx and not nvcc.arch_number(low).endswith(("a", "f")) else []
    flags = nvcc.TVM_NVCC_FLAGS
    workers = max(1, min(len(targets) + len(ptx_archs), os.cpu_count() or 1))
    size = f"{len(source.encode()) // 1024} KB source"
    running: dict[str, float] = {}  # job -> start, while it runs
    lock = threading.Lock()

    def run(what: str, compile_fn, arch: str):
        start = time.perf_counter()
        with lock:
            running[what] = start
        say(f"      nvcc {label}{what} ({size}) ...")
        try:
            result = compile_fn(source, arch, extra_flags=flags)
        finally:
            with lock:
                del running[what]
        extra = ""
        if isinstance(result, tuple):  # cubin: ptxas' report per kernel
            report = result[1]
            spills = sum(r.spill_bytes for r in report.values())
            extra = f" ({len(report)} kernels, {spills} bytes spilled)"
        say(f"      nvcc {label}{what} done {time.perf_counter() - start:.1f}s{extra}")
        return result

    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        cubin_jobs = {a: pool.submit(run, f"{a}: cubin", nvcc.compile_cubin, a) for a in targets}
        ptx_jobs = {
            a: pool.submit(run, f"compute_{nvcc.arch_number(a)}: PTX", nvcc.compile_ptx, a)
            for a in ptx_archs
        }
        pending = set(cubin_jobs.values()) | set(ptx_jobs.values())
        while pending:  # a heartbeat while nvcc runs long
            _, pending = concurrent.futures.wait(pending, timeout=HEARTBEAT_S)
            if pending:
                now = time.perf_counter()
                with lock:
                    jobs = ", ".join(f"{w} {now - t:.0f}s" for w, t in running.items())
                say(f"      nvcc {label}still running: {jobs or 'queued'}")
        cubins = {a: job.result() for a, job in cubin_jobs.items()}
        ptx_text = {a: job.result() for a, job in ptx_jobs.items()}
    fatbin = nvcc.make_fatbin({a: c for a, (c, _) in cubins.items()}, ptx_text)
    cubin_files, ptx_files = {}, {}
    for arch, (cubin, _) in cubins.items():
        cubin_files[arch] = directory / f"{arch}.cubin"
        cubin_files[arch].write_bytes(cubin)
    for arch, text in ptx_text.items():
        virtual = f"compute_{nvcc.arch_number(arch)}"
        ptx_files[virtual] = directory / f"{virtual}.ptx"
        ptx_files[virtual].write_text(text)
    (directory / "kernels.fatbin").write_bytes(fatbin)
    dm = DeviceModule(
        directory=directory,
        fatbin=directory / "kernels.fatbin",
        cubins=cubin_files,
        ptx=ptx_files,
        kernels={arch: report for arch, (_, report) in cubins.items()},
    )
    return dm, fatbin


def _write_manifest(output, name, library, targets, images, device_modules) -> BuildResult:
    def rel(p: Path) -> str:
        return str(p.relative_to(output))

    manifest = {
        "format": MANIFEST_FORMAT,
        "tvm_version": tvm.__version__,
        "library": rel(library),
        # what the loader checks before mapping the library (a truncated .so is a bus error)
        "library_bytes": library.stat().st_size,
        "library_sha256": file_sha256(library),
        "targets": list(targets),
        "images": list(images),
        "device_modules": [
            {
                "directory": rel(dm.directory),
                "fatbin": rel(dm.fatbin),
                "cubins": {a: rel(p) for a, p in dm.cubins.items()},
                "ptx": {a: rel(p) for a, p in dm.ptx.items()},
                "kernels": {
                    arch: {k: dataclasses.asdict(r) for k, r in sorted(report.items())}
                    for arch, report in dm.kernels.items()
                },
            }
            for dm in device_modules
        ],
    }
    path = output / f"{name}{MANIFEST_SUFFIX}"
    path.write_text(json.dumps(manifest, indent=1) + "\n")
    return BuildResult(library, path, tuple(targets), tuple(images), tuple(device_modules))


# --- the import blob ---------------------------------------------------------------------------
# Layout (dmlc streams, little endian): u64 nbytes | vec<u64> row_ptr | vec<u64> child_indices |
# per module group: str kind, then str payload unless kind == "_lib" (the host DSO itself).
# str / vec = u64 count + items. CUDA payload: str fmt | map<str, FunctionInfo> fmap | str code.


class _Reader:
    def __init__(self, data: bytes, offset: int = 0):
        self.data, self.offset = data, offset

    def u64(self) -> int:
        (value,) = struct.unpack_from("<Q", self.data, self.offset)
        self.offset += 8
        return value

    def raw(self, n: int) -> bytes:
        if self.offset + n > len(self.data):
            raise ArtifactError("truncated TVM module blob")
        value = self.data[self.offset : self.offset + n]
        self.offset += n
        return value

    def str(self) -> bytes:
        return self.raw(self.u64())

    def u64s(self) -> list[int]:
        return [self.u64() for _ in range(self.u64())]


def _str(b: bytes) -> bytes:
    return struct.pack("<Q", len(b)) + b


def _pack_imports(root) -> bytes:
    if not root.imports:
        return b""
    pack = tvm.get_global_func("runtime.ModulePackImportsToTensor")
    return pack(root).numpy().tobytes()


def _groups(blob: bytes):
    """Yield (kind, payload_start, payload_end) for each module group of a packed blob."""
    r = _Reader(blob)
    if r.u64() != len(blob) - 8:
        raise ArtifactError("TVM module blob has a wrong length header")
    row_ptr = r.u64s()
    r.u64s()  # child indices: unchanged by the rewrite
    for _ in range(len(row_ptr) - 1):
        kind = r.str().decode()
        if kind == "_lib":
            yield kind, r.offset, r.offset
            continue
        n = r.u64()
        start = r.offset
        r.raw(n)
        yield kind, start, r.offset
    if r.offset != len(blob):
        raise ArtifactError("TVM module blob has trailing bytes: unknown layout")


def _read_fmap(r: _Reader) -> dict[str, list[str]]:
    """Read a serialised Map<String, FunctionInfo> (validating the layout as it goes): each
    kernel's launch parameter tags."""
    tags = {}
    for _ in range(r.u64()):
        key = r.str().decode()
        r.str()  # FunctionInfo.name
        r.raw(4 * r.u64())  # arg_types: DLDataType
        tags[key] = [r.str().decode() for _ in range(r.u64())]  # launch_param_tags
        r.raw(4 * r.u64())  # arg_extra_tags: int32 enum
    return tags


def launch_tags(module) -> dict[str, list[str]]:
    """Launch parameter tags of every CUDA kernel imported by ``module`` (a built TVM module),
    e.g. ``["blockIdx.x", "threadIdx.x", "tirx.use_dyn_shared_memory"]``: how the runtime
    launches it (grid / block axes, and flags such as programmatic dependent launch)."""
    blob = _pack_imports(module)
    tags = {}
    for kind, start, end in _groups(blob) if blob else ():
        if kind == "cuda":
            r = _Reader(blob[start:end])
            r.str()  # fmt
            tags.update(_read_fmap(r))
    return tags


def _split_cuda_payload(payload: bytes) -> tuple[str, bytes, bytes]:
    """(fmt, serialised fmap, code) of a CUDA device module payload."""
    r = _Reader(payload)
    fmt = r.str().decode()
    start = r.offset
    _read_fmap(r)
    fmap = payload[start : r.offset]
    code = r.str()
    if r.offset != len(payload):
        raise ArtifactError("CUDA module payload has an unknown layout (TVM version changed?)")
    return fmt, fmap, code


def _device_payloads(blob: bytes) -> list[str]:
    """CUDA sources of the device modules in a packed blob, in blob order."""
    if not blob:
        return []
    sources = []
    for kind, start, end in _groups(blob):
        if kind != "cuda":
            continue
        fmt, _, code = _split_cuda_payload(blob[start:end])
        if fmt != "cuda":
            raise TargetError(
                f"CUDA device module already compiled (fmt {fmt!r}): build it under "
                "mla_compiler.cuda_build.source_only() so nvcc compiles it for every arch"
            )
        sources.append(code.decode())
    return sources


def _rewrite_payloads(blob: bytes, fatbins: list[bytes]) -> bytes:
    """The blob with the i-th CUDA module's code replaced by ``fatbins[i]`` (fmt "fatbin")."""
    out, pos, index = [], 8, 0
    for kind, start, end in _groups(blob):
        if kind != "cuda":
            continue
        _, fmap, _ = _split_cuda_payload(blob[start:end])
        payload = _str(b"fatbin") + fmap + _str(fatbins[index])
        out += [blob[pos : start - 8], _str(payload)]
        pos, index = end, index + 1
    body = b"".join([*out, blob[pos:]])
    return struct.pack("<Q", len(body)) + body


def _blob_object(root, blob: bytes, is_system_lib: bool, prefix: str, workspace: Path) -> str:
    """An object (LLVM) or C file defining ``__tvm_ffi__library_bin`` = ``blob``."""
    llvm = root._collect_from_import_tree(lambda m: m.kind == "llvm")
    codegen_blob = tvm.get_global_func("codegen.codegen_blob", allow_missing=True)
    if llvm and codegen_blob is not None:
        triple = llvm[0].get_function("_get_target_string")()
        path = workspace / f"{prefix}devc.o"
        codegen_blob(blob, is_system_lib, triple, prefix).write_to_file(str(path))
        return str(path)
    symbol = prefix + tvm.get_global_func("runtime.ModuleImportsBlobName")()
    path = workspace / f"{prefix}devc.c"
    rows = (",".join(str(b) for b in blob[i : i + 32]) for i in range(0, len(blob), 32))
    path.write_text(
        f"extern const unsigned char {symbol}[];\n"
        f"const unsigned char {symbol}[{len(blob)}] = {{\n" + ",\n".join(rows) + "\n};\n"
    )
    return str(path)


# --- deployment self-test ----------------------------------------------------------------------


def smoke_module(*, m: int = 64, n: int = 96, k: int = 128, dtype: str = "float16"):
    """Relax ``main(x [m, k], w [n, k], b [n]) = x @ w.T + b``: a small GEMM + bias."""
    from tvm import relax

    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((m, k), dtype))
    w = relax.Var("w", relax.TensorType((n, k), dtype))
    b = relax.Var("b", relax.TensorType((n,), dtype))
    with bb.function("main", [x, w, b]):
        with bb.dataflow():
            y = bb.emit(relax.op.matmul(x, relax.op.permute_dims(w)))  # [m, n]
            out = bb.emit_output(relax.op.add(y, b))
        bb.emit_func_output(out)
    return bb.get()


def write_smoke_artifact(output: Path, archs: list[str], *, ptx: bool = True) -> BuildResult:
    """Build ``smoke_module`` for ``archs`` into ``output`` with random inputs and the float64
    reference output (``smoke_io.npz``) that ``runtime.loader.run_smoke`` checks against."""
    import numpy as np
    import torch

    from mla_compiler import reference

    result = build(smoke_module(), archs, output=output, name="smoke", ptx=ptx)
    rng = np.random.default_rng()
    x = rng.standard_normal((64, 128)).astype("float16")
    w = (rng.standard_normal((96, 128)) / 8).astype("float16")
    b = rng.standard_normal(96).astype("float16")
    expected = reference.gemm(torch.from_numpy(x), torch.from_numpy(w)) + torch.from_numpy(b)
    np.savez(Path(output) / SMOKE_IO, x=x, w=w, b=b, expected=expected.numpy())
    return result


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m mla_compiler.cuda_build",
        description="Build the deployment self-test artifact (GEMM + bias) for GPU archs.",
    )
    parser.add_argument("output", type=Path)
    parser.add_argument("--target", default="sm_89,sm_90a")
    parser.add_argument("--no-ptx", action="store_true")
    args = parser.parse_args(argv)
    result = write_smoke_artifact(args.output, args.target.split(","), ptx=not args.no_ptx)
    print(f"{result.library}: images {', '.join(result.images) or '(cpu)'}")


if __name__ == "__main__":
    main()
