"""The tuned kernel families, each behind one protocol (as dlight's rules share one contract).

A family names its problems by a small frozen shape dataclass and answers, for a target:

    candidates(shape, target) -> [config]   worth measuring, best guess first, all kept
    keep(config, shape, target) -> bool     valid: tile shapes, registers, shared memory
    default(shape, target) -> config        what is built without a tuning record
    build(config, shape, target) -> {symbol: PrimFunc}
    shape_key(shape) -> str                 the problem's name in the tuning database
    model_shapes(model) -> [shape]          the problems a model's artifact builds (tuner)
    run_params(config, shape, target)       what the GPU runner reads (``tuning_measure``)

``FAMILIES`` is the registry: kernel choice (``kernel_configs``), the tuner and the tests
iterate over it. Adding a family (a quantized GEMM, a paged decode) is one class here.
"""

from __future__ import annotations

import abc
import dataclasses
import re
from typing import ClassVar

from mla_compiler.model_export.config import MLADims, ModelConfig

from . import attention_decode as ad
from . import attention_prefill as ap
from . import gemm as G
from . import gemm_wgmma as W

DECODE_CONTEXTS = (4096, 16384, 32768)  # decode is tuned for these max contexts
PREFILL_LENGTHS = (2048, 8192)  # and prompt kernels for these chunks
GEMM_TOKENS = (2048,)  # prompt-chunk rows of the dense and grouped GEMMs


@dataclasses.dataclass(frozen=True)
class DecodeShape:
    dims: MLADims
    ctx: int  # the context decode is picked for (splits depend on it)
    sm_scale: float
    batch: int = 1


@dataclasses.dataclass(frozen=True)
class PrefillShape:
    dims: MLADims
    tokens: int  # the prompt chunk
    sm_scale: float


@dataclasses.dataclass(frozen=True)
class GemmShape:
    n: int
    k: int
    epilogue: str | None  # None, "residual", "silu_mul"
    out_dtype: str | None  # None: the activations' dtype
    tokens: int


@dataclasses.dataclass(frozen=True)
class MoeShape:
    num_experts: int
    top_k: int
    hidden: int
    inter: int
    tokens: int


class KernelFamily(abc.ABC):
    """One tuned kernel family (see the module docstring for the contract)."""

    name: ClassVar[str]  # database ``kernel`` field
    group: ClassVar[str]  # ``tune --kernels`` group: attn, gemm, moe
    config_type: ClassVar[type]

    @abc.abstractmethod
    def shape_key(self, shape) -> str: ...

    @abc.abstractmethod
    def keep(self, config, shape, target) -> bool: ...

    @abc.abstractmethod
    def default(self, shape, target): ...

    @abc.abstractmethod
    def build(self, config, shape, target) -> dict: ...

    @abc.abstractmethod
    def model_shapes(self, model: ModelConfig) -> list: ...

    @abc.abstractmethod
    def run_params(self, config, shape, target) -> dict: ...

    def candidates(self, shape, target) -> list:
        return [c for c in self._space(shape, target) if self.keep(c, shape, target)]

    @abc.abstractmethod
    def _space(self, shape, target) -> list:
        """Configs in the order worth trying (``candidates`` prunes them with ``keep``)."""

    def config_from_dict(self, data: dict):
        """The config of a database record (``from_dict`` reads older versions' fields)."""
        read = getattr(self.config_type, "from_dict", None)
        return read(data) if read else self.config_type(**data)


def _latent_prefix(dims: MLADims) -> str:
    return f"h{dims.heads}-r{dims.kv_lora_rank}-p{dims.qk_rope_head_dim}"


class DecodeFamily(KernelFamily):
    """Split-KV absorbed decode over the latent cache (one query token)."""

    name, group, config_type = "attn_decode", "attn", ad.DecodeConfig

    def shape_key(self, s: DecodeShape) -> str:
        return f"{_latent_prefix(s.dims)}-b{s.batch}-ctx{s.ctx}"

    def _space(self, s: DecodeShape, target) -> list:
        return ad.candidate_configs(target, s.dims, q_tokens=1)

    def keep(self, config, s: DecodeShape, target) -> bool:
        return ad.keep(config, target, s.dims, q_tokens=1)

    def default(self, s: DecodeShape, target):
        return ad.default_config(target, s.dims, q_tokens=1)

    def build(self, config, s: DecodeShape, target) -> dict:
        k = ad.absorbed_decode(s.dims, target=target, config=config, sm_scale=s.sm_scale)
        return {"decode_split": k.split, "decode_merge": k.merge}

    def model_shapes(self, model: ModelConfig) -> list:
        return [DecodeShape(model.dims, ctx, model.softmax_scale) for ctx in DECODE_CONTEXTS]

    def run_params(self, config, s: DecodeShape, target) -> dict:
        kw = dict(q_tokens=1, batch=s.batch, max_context=s.ctx)
        return {
            "batch": s.batch,
            "ctx": s.ctx,
            "splits": ad.splits_for(config, target, s.dims, **kw),
        }


class PrefillFamily(KernelFamily):
    """Causal flash prefill of a prompt's first chunk, absorbed or decompressed."""

    group, config_type = "attn", ap.PrefillConfig

    def __init__(self, kind: str):
        self.kind = kind
        self.name = f"attn_prefill_{kind}"

    def shape_key(self, s: PrefillShape) -> str:
        d = s.dims
        if self.kind == "absorbed":
            return f"{_latent_prefix(d)}-n{s.tokens}"
        return f"h{d.heads}-k{d.qk_head_dim}-v{d.v_head_dim}-n{s.tokens}"

    def _space(self, s: PrefillShape, target) -> list:
        return ap.candidates(target, kind=self.kind, dims=s.dims)

    def keep(self, config, s: PrefillShape, target) -> bool:
        return ap.keep(config, target, kind=self.kind, dims=s.dims)

    def default(self, s: PrefillShape, target):
        return ap.default_config(target, kind=self.kind, dims=s.dims)

    def build(self, config, s: PrefillShape, target) -> dict:
        factory = ap.absorbed_prefill if self.kind == "absorbed" else ap.decompressed_prefill
        func = factory(s.dims, target=target, config=config, sm_scale=s.sm_scale)
        return {"prefill": func.with_attr("global_symbol", "prefill")}

    def model_shapes(self, model: ModelConfig) -> list:
        return [PrefillShape(model.dims, n, model.softmax_scale) for n in PREFILL_LENGTHS]

    def run_params(self, config, s: PrefillShape, target) -> dict:
        return {"n": s.tokens}


class GemmFamily(KernelFamily):
    """sm_90a wgmma GEMM of a prompt chunk's dense products (weights ``[N, K]``)."""

    name, group, config_type = "gemm_prefill", "gemm", W.WgmmaConfig

    def shape_key(self, s: GemmShape) -> str:
        tag = (s.epilogue or "plain") + ("-f32" if s.out_dtype == "float32" else "")
        return f"n{s.n}-k{s.k}-{tag}-t{s.tokens}"

    def _space(self, s: GemmShape, target) -> list:
        return list(W.CONFIGS)

    def keep(self, config, s: GemmShape, target) -> bool:
        return W.applies(s.n, s.k, target=target, config=config)

    def default(self, s: GemmShape, target):
        # any prompt chunk (rows symbolic): the row count does not pick the tile
        return G.wgmma_default(None, s.n, s.k, target=target, epilogue=s.epilogue, batch=None)

    def build(self, config, s: GemmShape, target) -> dict:
        f = W.wgmma_gemm(
            None, s.n, s.k, target=target, config=config, epilogue=s.epilogue, out_dtype=s.out_dtype
        )
        symbol = self.symbol(s)
        return {symbol: f.with_attr("global_symbol", symbol)}

    def symbol(self, s: GemmShape) -> str:
        return "gemm_" + re.sub(r"\W", "_", self.shape_key(s))

    def model_shapes(self, model: ModelConfig) -> list:
        return [GemmShape(*p, tokens=t) for p in dense_products(model) for t in GEMM_TOKENS]

    def run_params(self, config, s: GemmShape, target) -> dict:
        fields = ("n", "k", "epilogue", "out_dtype", "tokens")
        return {**{f: getattr(s, f) for f in fields}, "symbol": self.symbol(s)}


def dense_products(model: ModelConfig) -> list[tuple[int, int, str | None, str | None]]:
    """``(n, k, epilogue, out_dtype)`` of every dense product of a prompt chunk (mla=3): the
    shapes ``LowerDenseGemm`` hands to ``schedules.gemm``."""
    d, m = model.hidden_size, model.dims
    out = [
        (m.heads * m.qk_head_dim, d, None, None),  # q_proj (q_lora_rank None)
        (m.kv_lora_rank + m.qk_rope_head_dim, d, None, None),  # kv_a_proj_with_mqa
        (m.heads * (m.qk_nope_head_dim + m.v_head_dim), m.kv_lora_rank, None, None),  # kv_b
        (d, m.heads * m.v_head_dim, "residual", None),  # o_proj + residual
        (model.n_routed_experts, d, None, "float32"),  # router logits
    ]
    shared = model.n_shared_experts * model.moe_intermediate_size
    if shared:
        out += [(shared, d, "silu_mul", None), (d, shared, "residual", None)]
    if model.first_k_dense_replace:
        out += [(model.intermediate_size, d, "silu_mul", None)]
        out += [(d, model.intermediate_size, "residual", None)]
    if m.q_lora_rank is not None:
        out[0] = (m.heads * m.qk_head_dim, m.q_lora_rank, None, None)
        out.append((m.q_lora_rank, d, None, None))
    return list(dict.fromkeys(out))


class MoeFamily(KernelFamily):
    """sm_90a grouped expert GEMMs of a prompt chunk, gate+up then down, as one problem: both
    take the same row blocks (``moe_align`` groups tokens for one ``block_m``)."""

    name, group, config_type = "moe_grouped", "moe", W.WgmmaConfig

    def shape_key(self, s: MoeShape) -> str:
        return f"e{s.num_experts}-k{s.top_k}-d{s.hidden}-i{s.inter}-t{s.tokens}"

    def _space(self, s: MoeShape, target) -> list:
        return list(W.CONFIGS)

    def keep(self, config, s: MoeShape, target) -> bool:
        return W.moe_fits(config, target, hidden=s.hidden, inter=s.inter)

    def default(self, s: MoeShape, target):
        return W.moe_config(target, hidden=s.hidden, inter=s.inter)

    def build(self, config, s: MoeShape, target) -> dict:
        kw = dict(num_experts=s.num_experts, top_k=s.top_k, target=target, config=config)
        return {
            name: W.moe_grouped(kind, s.hidden, s.inter, **kw).with_attr("global_symbol", name)
            for kind, name in (("gate_up", "moe_gate_up"), ("down", "moe_down"))
        }

    def model_shapes(self, model: ModelConfig) -> list:
        if not model.n_routed_experts:
            return []
        e, k = model.n_routed_experts, model.num_experts_per_tok
        d, i = model.hidden_size, model.moe_intermediate_size
        return [MoeShape(e, k, d, i, t) for t in GEMM_TOKENS]

    def run_params(self, config, s: MoeShape, target) -> dict:
        return {**dataclasses.asdict(s), "block_m": config.block_m}


FAMILIES: dict[str, KernelFamily] = {
    f.name: f
    for f in (
        DecodeFamily(),
        PrefillFamily("absorbed"),
        PrefillFamily("decompressed"),
        GemmFamily(),
        MoeFamily(),
    )
}
GROUPS = ("attn", "gemm", "moe")


def family(name: str) -> KernelFamily:
    """The family registered as ``name``; ``KeyError`` naming the known ones otherwise."""
    try:
        return FAMILIES[name]
    except KeyError:
        raise KeyError(f"unknown kernel family {name!r}: one of {', '.join(FAMILIES)}") from None
