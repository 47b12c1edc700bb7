"""The ONNX export path: torch.onnx.export -> tvm.relax.frontend.onnx -> llvm, logits equal."""

from __future__ import annotations

import numpy as np
import torch
import tvm
from tvm import relax

from mla_compiler.model_export import ops
from mla_compiler.model_export.config import preset
from mla_compiler.model_export.onnx_export import FullSequence, export_onnx, onnx_to_relax
from mla_compiler.model_export.weights import random_model


def test_onnx_path_matches_pytorch(tmp_path):
    model = random_model(preset("tiny"), seed=5)
    mod = onnx_to_relax(export_onnx(model, tmp_path / "tiny.onnx", tokens=12))
    vm = relax.VirtualMachine(tvm.compile(mod, target="llvm"), tvm.cpu())
    ids = np.random.default_rng(0).integers(0, 512, 12).astype(np.int64)
    got = vm["main"](tvm.runtime.tensor(ids))
    got = (got[0] if not hasattr(got, "numpy") else got).numpy()
    with torch.no_grad(), ops.plain_ops():
        ref = FullSequence(model)(torch.from_numpy(ids)).numpy()
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max())


def test_plain_ops_equal_custom_ops():
    """The traceable plain-op forms compute what the custom ops compute."""
    from mla_compiler.model_export.modeling import single_sequence_inputs

    model = random_model(preset("tiny"), seed=6)
    ids = torch.randint(0, 512, (10,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref, _ = model(
            **single_sequence_inputs(ids, start=0, logits="all"),
            cache=model.new_cache(16, torch.float32),
        )
        with ops.plain_ops():
            plain = FullSequence(model)(ids)
    torch.testing.assert_close(plain, ref, rtol=1e-4, atol=1e-5)
