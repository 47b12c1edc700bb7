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
QUANT_CHOICES = (*MIXES, "none")


def check_quant(quant: str | None) -> None:
    if quant is not None and quant not in QUANT_CHOICES:
        raise ConfigError(f"--quant {quant!r} is not a mix we write: use one of {QUANT_CHOICES}")


def quantize_model(
    model: torch.nn.Module, mix: str, *, seed: int | None = None, log=None
) -> dict[str, QuantTensor]:
    """Quantize ``model``'s weights with ``mix``; returns the kept ones (their parameters moved
    to 'meta'). A model on 'meta' (a preset too large to store) is drawn here, one tensor at a
    time, from ``seed`` (norms 1 + 0.1 N(0, 1), the rest 0.02 N(0, 1), as the runtime draws)."""
    layers = model.cfg.num_hidden_layers
    kept: dict[str, QuantTensor] = {}
    gen = torch.Generator().manual_seed(seed or 0)
    params = list(model.named_parameters())
    t0, done = time.time(), 0
    for i, (name, p) in enumerate(params):
        shape = tuple(p.shape)
        qtype = mix_type(mix, gguf_tensor_name(name), shape, layers)
        drawn = p.device.type == "meta"
        if drawn:
            values = torch.randn(shape, generator=gen)
            values = 1.0 + 0.1 * values if "norm" in name else 0.02 * values
        if qtype not in DEVICE_FORMATS:
            if drawn:
                _set(model, name, values.to(p.dtype))
            continue
        data = quantize((values if drawn else p.detach()).float().numpy(), qtype)
        kept[name] = QuantTensor(data, qtype, shape)
        if not drawn:
            _set(model, name, torch.empty(shape, dtype=p.dtype, device="meta"))
        done += p.numel()
        if log and time.time() - t0 > 10 * (1 + len(kept) // 50):
            log(f"      quantize {mix}: {i + 1}/{len(params)} tensors ({time.time() - t0:.0f}s)")
    if log:
        mb = sum(q.nbytes for q in kept.values()) / 2**20
        log(f"      quantize {mix}: {len(kept)} tensors, {done / 1e6:.1f}M weights -> {mb:.1f} MiB")
    return kept


def _set(model: torch.nn.Module, name: str, value: torch.Tensor) -> None:
    module, _, leaf = name.rpartition(".")
    owner = model.get_submodule(module) if module else model
    owner._parameters[leaf] = torch.nn.Parameter(value, requires_grad=False)
