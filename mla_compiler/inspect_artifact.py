"""What an artifact's GPU kernels compiled to: registers, shared memory, spills, SASS opcodes;
and the device memory it plans (``runtime.memory_plan``).

Reads the per-arch cubins and the ptxas report that ``mla_compiler.cuda_build`` saved beside
the library; SASS comes from ``cuobjdump`` (``mla_compiler.nvcc.sass_opcodes``). No GPU needed.
"""

from __future__ import annotations

import json
from pathlib import Path

from mla_compiler import nvcc
from mla_compiler.errors import ArtifactError
from mla_compiler.runtime import memory_plan
from mla_compiler.runtime.loader import read_manifest

# Opcodes worth a column of their own: tensor cores, async copies, shared-memory matrix loads.
NOTABLE_OPCODES = ("HMMA", "HGMMA", "LDSM", "LDGSTS", "UTMALDG", "MUFU")


def inspect(path: str | Path) -> dict:
    """``{"kernels": [{"name", "arch", "registers", "shared_bytes", "spill_bytes", "sass"}]}``
    for an artifact (its directory, library or manifest), sorted by kernel then arch."""
    directory, manifest = read_manifest(Path(path))
    kernels = []
    for dm in manifest["device_modules"]:
        for arch, rel in sorted(dm["cubins"].items()):
            cubin_path = directory / rel
            if not cubin_path.is_file():
                raise ArtifactError(f"{cubin_path}: cubin missing from the artifact")
            sass = nvcc.sass_opcodes(cubin_path.read_bytes())
            report = dm["kernels"].get(arch, {})
            for name in sorted(set(sass) | set(report)):
                res = report.get(name, {})
                kernels.append(
                    {
                        "name": name,
                        "arch": arch,
                        "registers": res.get("registers"),
                        "shared_bytes": res.get("shared_bytes"),
                        "spill_bytes": res.get("spill_bytes"),
                        "sass": dict(sorted(sass.get(name, {}).items())),
                    }
                )
    kernels.sort(key=lambda k: (k["name"], k["arch"]))
    report = {"kernels": kernels}
    meta_path = directory / "metadata.json"
    if meta_path.is_file():  # the device memory plan at the artifact's max context
        meta = json.loads(meta_path.read_text())
        report["memory"] = memory_plan.plan(meta, max_context=int(meta["max_context"]))
    return report


def format_table(report: dict, *, top: int = 4) -> str:
    """A fixed-width table: one row per kernel and arch, notable opcodes, then the ``top``
    most frequent other opcodes."""
    header = ["kernel", "arch", "regs", "smem", "spill", "insns", *NOTABLE_OPCODES, "top opcodes"]
    rows = []
    for k in report["kernels"]:
        sass = k["sass"]
        others = sorted(
            ((n, op) for op, n in sass.items() if op not in NOTABLE_OPCODES), reverse=True
        )
        rows.append(
            [
                k["name"],
                k["arch"],
                _cell(k["registers"]),
                _cell(k["shared_bytes"]),
                _cell(k["spill_bytes"]),
                str(sum(sass.values())),
                *(str(sass.get(op, 0)) for op in NOTABLE_OPCODES),
                " ".join(f"{op}:{n}" for n, op in others[:top]),
            ]
        )
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    numeric = set(range(2, len(header) - 1))

    def line(cells):
        return "  ".join(
            c.rjust(w) if i in numeric else c.ljust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    rule = "  ".join("-" * w for w in widths)
    table = "\n".join([line(header), rule, *(line(r) for r in rows)])
    if "memory" in report:
        table += "\n\n" + memory_plan.format_plan(report["memory"])
    return table


def _cell(value) -> str:
    return "?" if value is None else str(value)
