"""The ONNX path: ``torch.onnx.export`` -> ``tvm.relax.frontend.onnx``.

ONNX cannot carry the MLA custom ops, so this path traces the model with plain torch ops
(``ops.plain_ops``): one whole sequence, no cache, logits for every token. It is the
cross-check of the importer, not the deployment path (which is torch.export + the MLA passes).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from mla_compiler.model_export import ops
from mla_compiler.model_export.modeling import DeepseekV2, single_sequence_inputs


class FullSequence(nn.Module):
    """input_ids [T] -> logits [T, vocab] of one sequence starting at position 0."""

    def __init__(self, model: DeepseekV2):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        t = input_ids.shape[0]
        inp = single_sequence_inputs(torch.zeros(1, dtype=torch.int64), start=0, logits="all")
        pos = torch.arange(t, dtype=torch.int64)
        inp.update(input_ids=input_ids, positions=pos, logit_rows=pos)
        logits, _ = self.model(**inp, cache=torch.zeros(1))
        return logits


def export_onnx(model: DeepseekV2, path: str | Path, *, tokens: int = 8) -> Path:
    path = Path(path)
    ids = torch.arange(1, tokens + 1, dtype=torch.int64) % model.cfg.vocab_size
    with ops.plain_ops(), torch.no_grad():
        torch.onnx.export(
            FullSequence(model).eval(),
            (ids,),
            str(path),
            input_names=["input_ids"],
            output_names=["logits"],
            dynamo=False,
            opset_version=17,
        )
    return path


def onnx_to_relax(path: str | Path):
    import onnx
    from tvm.relax.frontend.onnx import from_onnx

    return from_onnx(onnx.load(str(path)), keep_params_in_input=False)
