"""Which weights an artifact keeps in GGUF block formats, and quantizing them at compile time.

``compile --model X.gguf`` keeps each tensor whose type a kernel decodes (``DEVICE_FORMATS``) as
its blocks; ``compile --quant MIX`` quantizes a checkpoint or preset with llama.cpp's tensor mix
(``model_export.quantize.mix_type``), one tensor at a time. Kept weights leave the torch model
(their parameters go to 'meta': the export needs shapes only) for ``QuantTensor`` blocks.
"""

from __future__ import annotations

import time

import torch

from mla_compiler.errors import ConfigError
from mla_compiler.model_export.gguf import gguf_tensor_name
from mla_compiler.model_export.quantize import MIXES, QuantTensor, mix_type, quantize
from mla_compiler.schedules.quant_formats import FORMATS

# block formats with a TIR decoder (the plain float types are not quantization)
DEVICE_FORMATS = tuple(f for f in FORMATS if f not in ("f32", "f16", "bf16"))
QUANT_CHOICES = (*MIXES, "none")  # = compile --quant's choices


def check_quant(quant: str | None) -> None:
    if quant is not None and quant not in QUANT_CHOICES:
        raise ConfigError(f"--quant {quant!r} is not a mix we write: use one of {QUANT_CHOICES}")


def weight_types(model: torch.nn.Module, mix: str) -> dict[str, str]:
    """The block format ``mix`` gives each weight of ``model`` that a kernel decodes."""
    layers = model.cfg.num_hidden_layers
    out = {}
    for name, p in model.named_parameters():
        qtype = mix_type(mix, gguf_tensor_name(name), tuple(p.shape), layers)
        if qtype in DEVICE_FORMATS:
            out[name] = qtype
    return out


def quantize_model(model: torch.nn.Module, mix: str, *, log=None) -> dict[str, QuantTensor]:
    """Quantize ``model``'s weights with ``mix``; returns the kept ones (their parameters moved
    to 'meta', the export needs their shapes only). A preset too large to store never comes
    here: the runtime draws and quantizes it (``runtime.engine.seeded_blocks``)."""
    types = weight_types(model, mix)
    kept: dict[str, QuantTensor] = {}
    t0, last = time.time(), time.time()
    for name, p in list(model.named_parameters()):
        if name not in types:
            continue
        data = quantize(p.detach().float().numpy(), types[name])
        kept[name] = QuantTensor(data, types[name], tuple(p.shape))
        _set(model, name, torch.empty(p.shape, dtype=p.dtype, device="meta"))
        if log and time.time() - last > 30:
            last = time.time()
            log(f"      quantize {mix}: {len(kept)}/{len(types)} tensors ({last - t0:.0f}s)")
    if log:
        mb = sum(q.nbytes for q in kept.values()) / 2**20
        log(f"      quantize {mix}: {len(kept)} tensors -> {mb:.1f} MiB")
    return kept


def _set(model: torch.nn.Module, name: str, value: torch.Tensor) -> None:
    module, _, leaf = name.rpartition(".")
    owner = model.get_submodule(module) if module else model
    owner._parameters[leaf] = torch.nn.Parameter(value, requires_grad=False)
