"""Load a compiled artifact with TVM's runtime library only (no compiler, no nvcc, no NVRTC).

An artifact built by ``mla_compiler.cuda_build`` carries its kernels as a fatbin (cubins + PTX),
so loading needs ``libtvm_runtime.so``, ``libtvm_runtime_cuda.so`` and the NVIDIA driver. Call
``use_runtime_only()`` before anything imports ``tvm`` to keep ``libtvm_compiler.so`` out of the
process (it sets ``TVM_USE_RUNTIME_LIB=1``); the loader also works in a full TVM process.

Nothing here imports ``tvm`` at module import time, nor any compiler-side module of the package.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
from pathlib import Path

from mla_compiler.errors import ArtifactError, TargetError

MANIFEST_FORMAT = "mla-compiler/cuda-artifact/1"
MANIFEST_SUFFIX = ".manifest.json"
SMOKE_IO = "smoke_io.npz"  # inputs + float64 expected output of the self-test artifact

_KDL_CUDA = 2  # DLPack device type of CUDA
_IMAGE = re.compile(r"(sm|compute)_(\d)(\d{1,2})([af]?)")


def use_runtime_only() -> bool:
    """Ask for TVM's runtime library only; True when the process will run (or runs) without
    the compiler. Has effect only before the first ``import tvm``."""
    if "tvm" not in sys.modules:
        os.environ["TVM_USE_RUNTIME_LIB"] = "1"
        return True
    import tvm

    return bool(tvm.base._RUNTIME_ONLY)


def compiler_loaded() -> bool:
    """Whether ``libtvm_compiler.so`` is mapped into this process (Linux)."""
    try:
        return "libtvm_compiler" in Path("/proc/self/maps").read_text()
    except OSError:
        return False


def read_manifest(path: str | Path) -> tuple[Path, dict]:
    """(artifact directory, manifest) from a library, manifest or artifact directory path."""
    path = Path(path)
    if path.is_dir():
        found = sorted(path.glob(f"*{MANIFEST_SUFFIX}"))
        if len(found) != 1:
            raise ArtifactError(f"{path}: expected one *{MANIFEST_SUFFIX}, found {len(found)}")
        path = found[0]
    elif path.suffix == ".so":
        path = path.with_name(path.stem + MANIFEST_SUFFIX)
    if not path.is_file():
        raise ArtifactError(f"{path}: artifact manifest missing (rebuild the artifact)")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ArtifactError(f"{path}: corrupt manifest ({err})") from err
    if manifest.get("format") != MANIFEST_FORMAT:
        raise ArtifactError(f"{path}: not an mla-compiler artifact manifest")
    return path.parent, manifest


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_library(library: Path, manifest: dict) -> None:
    """Refuse a library whose size or hash differs from what the build recorded (a truncated
    or overwritten ``.so`` would crash the process when mapped). Older manifests lack both."""
    if not library.is_file():
        raise ArtifactError(f"{library}: library missing from the artifact: compile it again")
    size, want = library.stat().st_size, manifest.get("library_bytes")
    if want is not None and size != want:
        raise ArtifactError(
            f"{library} has {size} bytes, the build wrote {want} (truncated or replaced?): "
            "copy the artifact again or recompile it"
        )
    digest = manifest.get("library_sha256")
    if digest is not None and file_sha256(library) != digest:
        raise ArtifactError(
            f"{library} differs from the library the build wrote (sha256 mismatch): copy the "
            "artifact again or recompile it"
        )


def device_capability(device) -> tuple[int, int]:
    """(major, minor) of a GPU: a TVM device, anything with ``compute_version`` ("9.0"),
    a "9.0" string or a (9, 0) tuple."""
    if isinstance(device, tuple):
        return int(device[0]), int(device[1])
    version = device if isinstance(device, str) else device.compute_version
    major, minor = str(version).split(".")
    return int(major), int(minor)


def _runs_on(image: str, cap: tuple[int, int]) -> bool:
    """CUDA's compatibility rules: cubin sm_Xy runs on X.z (z >= y) of the same major; PTX
    compute_Xy is JIT-compiled for any X'.z >= X.y; the ``a`` variants only on exactly X.y;
    ``f`` (family) variants on X.z, z >= y."""
    m = _IMAGE.fullmatch(image)
    if not m:
        raise ArtifactError(f"unknown image {image!r} in artifact (expected sm_XX or compute_XX)")
    kind, major, minor, suffix = m.group(1), int(m.group(2)), int(m.group(3)), m.group(4)
    if suffix == "a":
        return (major, minor) == cap
    if kind == "sm" or suffix == "f":
        return major == cap[0] and minor <= cap[1]
    return (major, minor) <= cap


def check_arch(artifact_archs, device) -> str:
    """The image of the artifact a GPU will run: its best cubin, else PTX (JIT by the driver).

    ``artifact_archs``: what the fatbin holds, nvcc style (``["sm_89", "compute_89"]``); a
    ``compute_*`` entry is PTX. Raises ``TargetError`` naming the arch to compile for.
    """
    cap = device_capability(device)
    images = list(artifact_archs)
    cubins = [a for a in images if a.startswith("sm_") and _runs_on(a, cap)]
    if cubins:  # exact arch-specific first, then the newest compatible
        return max(cubins, key=lambda a: (_IMAGE.fullmatch(a).group(4) == "a", a))
    ptx = [a for a in images if a.startswith("compute_") and _runs_on(a, cap)]
    if ptx:
        return max(
            ptx, key=lambda a: int(_IMAGE.fullmatch(a).group(2) + _IMAGE.fullmatch(a).group(3))
        )
    want = f"sm_{cap[0]}{cap[1]}" + ("a" if cap[0] >= 9 else "")
    has_ptx = any(a.startswith("compute_") for a in images)
    held = ", ".join(images) if images else "no CUDA code"
    raise TargetError(
        f"artifact built for {held}{'' if has_ptx else ' (no PTX)'} cannot run on this GPU "
        f"(compute capability {cap[0]}.{cap[1]}): recompile with --target {want}"
    )


def _device(device):
    import tvm

    if isinstance(device, str):
        kind, _, index = device.partition(":")
        return tvm.runtime.device(kind, int(index or 0))
    return device


def ensure_cuda_runtime() -> None:
    """Load ``libtvm_runtime_cuda.so`` (CUDA device API and fatbin loader) if not loaded:
    ``import tvm`` skips it in runtime-only mode."""
    import tvm

    if tvm.get_global_func("ffi.Module.load_from_bytes.cuda", allow_missing=True) is not None:
        return
    from tvm.base import _LOADED_LIBS
    from tvm_ffi.libinfo import load_lib_ctypes

    runtime_dir = Path(_LOADED_LIBS["tvm_runtime"]._name).resolve().parent
    try:
        _LOADED_LIBS["tvm_runtime_cuda"] = load_lib_ctypes(
            "tvm", "tvm_runtime_cuda", "RTLD_LOCAL", extra_lib_paths=[runtime_dir]
        )
    except (OSError, RuntimeError) as err:
        raise TargetError(
            f"cannot load TVM's CUDA runtime (libtvm_runtime_cuda.so: {err}): run it on a "
            "machine with an NVIDIA GPU and its driver (libcuda.so.1), or compile it again "
            "with --target cpu"
        ) from err


def _is_cuda(dev) -> bool:
    return int(dev.dlpack_device_type()) == _KDL_CUDA


def select_image(targets, images, dev) -> str:
    """What ``dev`` will run of an artifact built for ``targets`` holding ``images``: "cpu",
    or the fatbin image (``check_arch``). Loads TVM's CUDA runtime for a GPU. Raises
    ``TargetError`` when the artifact cannot run there."""
    cuda = _is_cuda(dev)
    built = ", ".join(targets)
    if cuda and list(targets) == ["cpu"]:
        raise TargetError(
            "artifact built for cpu cannot run on a GPU: run it with --device cpu, or "
            "compile it again with --target sm_89 / sm_90a"
        )
    if not cuda and list(targets) != ["cpu"]:
        raise TargetError(
            f"artifact built for GPU ({built}) cannot run on the CPU: run it on a machine "
            f"with an NVIDIA GPU, or compile it again with --target cpu"
        )
    if not cuda:
        return "cpu"
    try:
        ensure_cuda_runtime()
    except TargetError as err:
        raise TargetError(f"artifact built for GPU ({built}): {err}") from None
    if not dev.exist:
        raise TargetError(
            f"artifact built for GPU ({built}) but this machine has no CUDA device {dev.index}: "
            "run it on a machine with an NVIDIA GPU, or compile it again with --target cpu"
        )
    return check_arch(images, dev)


def load_module(path: str | Path, device):
    """Load an artifact's library (directory, ``.so`` or manifest path) for ``device``
    (a TVM device, or "cuda", "cuda:1", "cpu") with the runtime library only.

    Returns the runtime Module: the Relax VM executable for a Relax build (see ``load_vm``),
    or the kernel library for a TIR-only build.
    """
    import tvm

    path = Path(path)
    plain_library = (
        path.suffix == ".so" and not path.with_name(path.stem + MANIFEST_SUFFIX).exists()
    )
    if plain_library:  # a library not built by mla_compiler: nothing to check
        library, targets, images = path, None, []
        if not library.is_file():
            raise ArtifactError(f"{library}: library missing from the artifact")
    else:
        directory, manifest = read_manifest(path)
        library = directory / manifest["library"]
        targets, images = manifest["targets"], manifest["images"]
        check_library(library, manifest)
        library = _fresh_path(library, manifest.get("library_sha256"))
    dev = _device(device)
    if targets is not None:
        select_image(targets, images, dev)
    elif _is_cuda(dev):
        ensure_cuda_runtime()
    return tvm.runtime.load_module(str(library))


# library path -> sha256 of the library this process mapped from it
_MAPPED: dict[str, str] = {}


def _fresh_path(library: Path, digest: str | None) -> Path:
    """``library``, or a private copy of it where this process already mapped another library
    from the same path (an artifact recompiled in place): dlopen would hand back the old one."""
    if digest is None:
        return library
    key = str(library.resolve())
    if _MAPPED.setdefault(key, digest) == digest:
        return library
    import atexit
    import shutil
    import tempfile

    copy = Path(tempfile.mkdtemp(prefix="mla-lib-")) / f"{digest[:16]}.so"
    shutil.copyfile(library, copy)
    atexit.register(shutil.rmtree, copy.parent, True)
    return copy


def load_vm(path: str | Path, device):
    """A Relax VM over an artifact built from a Relax module."""
    from tvm.runtime import vm

    dev = _device(device)
    return vm.VirtualMachine(load_module(path, dev), dev)


def run_smoke(directory: str | Path, device="cuda") -> dict:
    """Run a self-test artifact (``python -m mla_compiler.cuda_build``) and compare it with the
    float64 output saved at build time. An artifact the GPU cannot run (arch, or CPU build) is
    reported as "refused", not raised."""
    import numpy as np
    import tvm

    directory = Path(directory)
    _, manifest = read_manifest(directory)
    row = {"artifact": directory.name, "images": manifest["images"] or ["cpu"]}
    dev = _device(device)
    if _is_cuda(dev):
        ensure_cuda_runtime()  # a missing driver is an error here, not a refusal
        row["gpu"] = "sm_{}{}".format(*device_capability(dev))
    try:
        row["image"] = select_image(manifest["targets"], manifest["images"], dev)
    except TargetError as err:
        return {**row, "status": "refused", "message": str(err)}
    vm = load_vm(directory, dev)
    io = np.load(directory / SMOKE_IO)
    args = [tvm.runtime.tensor(io[k], dev) for k in ("x", "w", "b")]
    out = vm["main"](*args).numpy().astype(np.float64)  # [64, 96]
    expected = io["expected"]
    err = float(np.abs(out - expected).max())
    scale = float(np.abs(expected).max())
    ok = bool(np.all(np.abs(out - expected) <= 1e-2 * scale + 1e-2 * np.abs(expected)))
    return {
        **row,
        "status": "ok" if ok else "WRONG",
        "max_abs_err": err,
        "max_abs_expected": scale,
        "compiler_loaded": compiler_loaded(),
    }


def main(argv: list[str] | None = None) -> int:
    """``python -m mla_compiler.runtime.loader DIR[=refused]... [--device cuda]``: run
    self-test artifacts with the runtime library only. Each is expected to run correctly, or
    (``=refused``) to be refused for its arch; exit 1 when one does otherwise."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m mla_compiler.runtime.loader")
    parser.add_argument("artifacts", nargs="+", help="artifact directory, optionally =refused")
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args(argv)
    use_runtime_only()
    rows = []
    for spec in args.artifacts:
        path, _, expect = spec.partition("=")
        try:
            row = run_smoke(Path(path), args.device)
        except Exception as err:  # report every artifact, then fail
            row = {"artifact": Path(path).name, "status": "error", "message": repr(err)[:400]}
        row["expected"] = expect or "ok"
        row["pass"] = row["status"] == row["expected"] and not row.get("compiler_loaded")
        rows.append(row)
        print(json.dumps(row), flush=True)
    cols = ["artifact", "images", "gpu", "image", "status", "expected", "max_abs_err", "pass"]
    print("\n| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for row in rows:
        print("| " + " | ".join(str(row.get(c, "")) for c in cols) + " |")
    for row in rows:
        if "message" in row:
            print(f"- {row['artifact']}: {row['message']}")
    return 0 if all(r["pass"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
