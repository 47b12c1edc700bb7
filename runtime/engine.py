"""Engine: runs a compiled artifact with TVM's runtime (no compiler needed).

The engine owns the KV cache ``[layers, slots * max_context, width]`` (f16 latent rows in MLA
modes 2/3); each sequence is a slot of ``max_context`` consecutive rows. Prompts run through the
``prefill`` function in chunks of ``ubatch`` tokens; single tokens through ``decode`` (in mla=3
these are the decompressed and the absorbed attention forms).

Each call's small index inputs travel in one host-to-device copy (``_Staging``). Tokens are
sampled on the device (the artifact's ``sample`` function, ``schedules.sampling``) when the
engine runs on a GPU and the artifact has it: a step then downloads B int32 ids, not B x V
logits. CPU engines and older artifacts sample on the host (``sample`` below).
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from mla_compiler import artifact
from mla_compiler.errors import InputError, NumericsError
from mla_compiler.runtime import memory_plan


@dataclasses.dataclass
class SamplingParams:
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None

    def validate(self) -> SamplingParams:
        if not self.temperature >= 0:
            raise InputError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise InputError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise InputError(f"top_k must be >= 0, got {self.top_k}")
        return self


def sample(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator) -> int:
    """Greedy at temperature 0, else top-k / top-p sampling from softmax(logits / T)."""
    if params.temperature == 0:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / params.temperature
    order = np.argsort(-z, kind="stable")
    if params.top_k:
        order = order[: params.top_k]
    p = np.exp(z[order] - z[order[0]])
    p /= p.sum()
    if params.top_p < 1:
        keep = int(np.searchsorted(np.cumsum(p), params.top_p) + 1)
        order, p = order[:keep], p[:keep] / p[:keep].sum()
    return int(rng.choice(order, p=p))


class Engine:
    def __init__(
        self,
        path: Path,
        meta: dict,
        vm,
        device,
        params: list,
        *,
        max_context: int,
        slots: int = 1,
        sampling: str = "auto",
    ):
        import tvm

        self.path, self.meta, self.vm, self.device = path, meta, vm, device
        self.params = params
        self.max_context = max_context
        cfg = meta["model"]
        self.vocab_size = cfg["vocab_size"]
        self.eos_token_id = cfg.get("eos_token_id")
        layers = cfg["num_hidden_layers"]
        self.ubatch = int(meta.get("ubatch", 2048))
        # prompt chunks with more KV rows than this run prefill_deep (0: no such function)
        self.deep_from = int(meta.get("deep_prefill_from", 0))
        self.decode_threshold = int(meta.get("decode_threshold", 1))
        self.slots = slots
        shape = (layers, slots * max_context, meta["kv_cache_width"])  # [L, slots x ctx, 576]
        self.cache = tvm.runtime.empty(shape, meta["kv_dtype"], device)
        self.cache.copyfrom(np.zeros(shape, dtype=meta["kv_dtype"]))  # no garbage in unused rows
        self.lengths = [0] * slots  # tokens cached per sequence slot
        self.tokenizer = _load_tokenizer(path)
        self.staging = _Staging(device)
        self.sampler = _choose_sampler(sampling, vm, device)
        self._release_pool = tvm.get_global_func("vm.builtin.memory_manager.clear")
        self.step_times: list[dict] | None = None  # set to [] to record each step's host times

    def encode(self, text: str) -> list[int]:
        if self.tokenizer is None:
            raise InputError(
                f"{self.path} has no tokenizer.json: pass --prompt-ids, or compile from a model "
                "directory that has one"
            )
        ids = self.tokenizer.encode(text).ids
        bos = self.meta["model"].get("bos_token_id")
        return ([bos] if bos is not None and (not ids or ids[0] != bos) else []) + ids

    def decode_text(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids)) if self.tokenizer else " ".join(map(str, ids))

    # ---- loading -------------------------------------------------------------------------
    @classmethod
    def load(
        cls,
        path: str | Path,
        device: str | None = None,
        *,
        max_context: int | None = None,
        slots: int = 1,
        log=None,
        sampling: str = "auto",
    ) -> Engine:
        """``slots``: sequences the KV cache holds at once (each ``max_context`` rows).
        ``sampling``: "device", "host" or "auto" (device on a GPU when the artifact has
        ``sample``)."""
        import tvm

        from mla_compiler.runtime import loader

        path = Path(path)
        meta = artifact.read_metadata(path)
        artifact.check_tvm_version(meta)
        kind = device or ("cpu" if meta["target"] == "cpu" else "cuda")
        max_context = max_context or int(meta["max_context"])
        layers = meta["model"]["num_hidden_layers"]
        item = 2 if meta["kv_dtype"] == "float16" else 4
        cache_bytes = slots * layers * max_context * meta["kv_cache_width"] * item
        if log:
            log(
                f"KV cache: {slots} x {max_context} tokens x {meta['kv_cache_bytes_per_token']} B"
                f" = {cache_bytes / 2**20:.1f} MiB"
            )
        needs = memory_plan.plan(meta, max_context=max_context, slots=slots)
        dev = tvm.cpu() if kind == "cpu" else tvm.cuda(0)
        if kind == "cuda":
            if log:
                log(memory_plan.format_plan(needs))
            free = dev.available_global_memory if dev.exist else None
            if free:  # before anything is allocated: one line, not an out-of-memory error
                memory_plan.check_fits(needs, int(free), max_context=max_context)
        vm = loader.load_vm(path, dev)  # checks the device and arch against the fatbin
        raw = _load_weights(path, meta, dev)
        params = list(vm["transform_params"](raw))
        del raw
        if "torch" in sys.modules and kind == "cuda":  # seeded weights were drawn with torch
            sys.modules["torch"].cuda.empty_cache()
        return cls(
            path, meta, vm, dev, params, max_context=max_context, slots=slots, sampling=sampling
        )

    # ---- stepping ------------------------------------------------------------------------
    @property
    def pos(self) -> int:
        """Tokens cached for sequence slot 0."""
        return self.lengths[0]

    def reset(self, seq: int | None = None) -> None:
        """Forget sequence ``seq`` (all when None); its slot is free for a new prompt."""
        for s in range(self.slots) if seq is None else [self._slot(seq)]:
            self.lengths[s] = 0

    def _slot(self, seq: int) -> int:
        if not 0 <= seq < self.slots:
            raise InputError(f"sequence {seq} does not exist: the engine has {self.slots} slots")
        return seq

    def _check_tokens(self, tokens: Sequence[int], seq: int = 0) -> np.ndarray:
        ids = np.asarray(tokens, dtype=np.int64)
        if ids.ndim != 1 or ids.size == 0:
            raise InputError("empty prompt: give at least one token id")
        bad = ids[(ids < 0) | (ids >= self.vocab_size)]
        if bad.size:
            raise InputError(
                f"token id {int(bad[0])} is outside the vocabulary (0..{self.vocab_size - 1})"
            )
        total = self.lengths[self._slot(seq)] + ids.size
        if total > self.max_context:
            raise InputError(
                f"context of {total} tokens exceeds --max-context {self.max_context}: "
                "raise --max-context or shorten the prompt"
            )
        return ids

    def _inputs(self, batch: list[tuple[int, np.ndarray]], *, all_logits: bool = False):
        """(the 7 host input arrays of a call appending ``ids`` to each ``(slot, ids)``, whether
        the ``decode`` function serves it)."""
        c = self.max_context
        ids, pos, slot_rows, kv_rows, logit_rows = [], [], [], [], []
        q_indptr, kv_indptr = [0], [0]
        for slot, toks in batch:
            start, t = self.lengths[slot], toks.size
            ids.append(toks)
            pos.append(np.arange(start, start + t))
            slot_rows.append(slot * c + np.arange(start, start + t))
            kv_rows.append(slot * c + np.arange(start + t))
            q_indptr.append(q_indptr[-1] + t)
            kv_indptr.append(kv_indptr[-1] + start + t)
            first = q_indptr[-2]
            logit_rows.append(np.arange(first, first + t) if all_logits else [first + t - 1])
        single = len(batch) == 1 and batch[0][1].size <= self.decode_threshold and not all_logits
        inputs = [
            np.concatenate(ids).astype(np.int64),
            np.concatenate(pos).astype(np.int64),
            np.concatenate(slot_rows).astype(np.int32),
            np.array(q_indptr, dtype=np.int32),
            np.concatenate(kv_rows).astype(np.int32),
            np.array(kv_indptr, dtype=np.int32),
            np.concatenate(logit_rows).astype(np.int64),
        ]
        return inputs, single

    def _run(self, batch: list[tuple[int, np.ndarray]], *, all_logits: bool = False, extra=()):
        """Append ``ids`` to each ``(slot, ids)`` in one call: the device tensor of logits of
        each sequence's last token ([B, V]) or of every new token ([T, V]), and device views
        of the ``extra`` host arrays (uploaded in the same copy as the inputs)."""
        inputs, single = self._inputs(batch, all_logits=all_logits)
        t0 = time.perf_counter()
        args = self.staging.upload([*inputs, *extra])
        t1 = time.perf_counter()
        kv_len = max(self.lengths[slot] + toks.size for slot, toks in batch)
        fn = "decode" if single else "prefill"
        if not single and 0 < self.deep_from < kv_len:
            fn = "prefill_deep"  # attends over the latent rows: no K/V of the whole context
        out = self.vm[fn](*args[:7], self.cache, *self.params)
        decompressed_past_first = fn == "prefill" and kv_len > self.ubatch
        if decompressed_past_first and self.device.dlpack_device_type() != 1:
            # a chunk past the first decompresses K/V of the whole context: new sizes each
            # time, and TVM's pooled allocator would keep every one (4.9 GiB after a 32K-token
            # prompt on V2-Lite, H100): give them back (short prompts keep their reuse)
            self._release_pool()
        t2 = time.perf_counter()
        if self.step_times is not None:
            self.step_times.append(
                {"upload": t1 - t0, "call": t2 - t1, "decode": single, "function": fn}
            )
        for slot, toks in batch:
            self.lengths[slot] += toks.size
        return out[0], args[7:]

    def _step(self, batch: list[tuple[int, np.ndarray]], *, all_logits: bool = False) -> np.ndarray:
        """``_run``, logits downloaded ([B, V] or [T, V])."""
        return self._run(batch, all_logits=all_logits)[0].numpy()

    def _next_tokens(
        self, batch: list[tuple[int, np.ndarray]], params: SamplingParams, rng
    ) -> list[int]:
        """Run ``batch`` and sample each sequence's next token (device or host, see
        ``sampler``). The device draws with ``u`` from ``rng``, one per sequence and step."""
        if self.sampler == "host":
            t0 = time.perf_counter()
            logits = self._step(batch)
            _check_finite(batch, np.isfinite(logits).all(axis=-1), self.lengths)
            tokens = [sample(row, params, rng) for row in logits]
            if self.step_times is not None:
                self.step_times[-1]["total"] = time.perf_counter() - t0
            return tokens
        b = len(batch)
        knobs = np.empty((b, 4), np.float32)  # schedules.sampling.PARAMS
        knobs[:, 0] = params.temperature
        knobs[:, 1] = params.top_p
        knobs[:, 2] = params.top_k
        knobs[:, 3] = rng.random(b, dtype=np.float32)  # [0, 1)
        t0 = time.perf_counter()
        logits, (knobs_dev,) = self._run(batch, extra=(knobs,))
        t1 = time.perf_counter()
        ids = self.vm["sample"](logits, knobs_dev)
        t2 = time.perf_counter()
        tokens = ids.numpy().tolist()  # waits for the GPU
        _check_finite(batch, [t >= 0 for t in tokens], self.lengths)  # -1: non-finite row
        if self.step_times is not None:
            self.step_times[-1].update(sample=t2 - t1, total=time.perf_counter() - t0)
        return tokens

    def prefill(
        self, tokens: Sequence[int], *, seq: int = 0, all_logits: bool = False
    ) -> np.ndarray:
        """Append tokens to sequence ``seq`` in ``ubatch`` chunks; logits of the last token
        ([V]) or of all of them ([T, V])."""
        ids = self._check_tokens(tokens, seq)
        outs = []
        for i in range(0, ids.size, self.ubatch):
            outs.append(self._step([(seq, ids[i : i + self.ubatch])], all_logits=all_logits))
        return np.concatenate(outs) if all_logits else outs[-1][0]

    def _prefill_next(
        self, tokens: Sequence[int], params: SamplingParams, rng, *, seq: int = 0
    ) -> int:
        """Prefill ``tokens`` into ``seq`` (``ubatch`` chunks); the sampled next token."""
        ids = self._check_tokens(tokens, seq)
        last = (ids.size - 1) // self.ubatch * self.ubatch
        for i in range(0, last, self.ubatch):
            self._run([(seq, ids[i : i + self.ubatch])])
        return self._next_tokens([(seq, ids[last:])], params, rng)[0]

    def decode(self, token: int, *, seq: int = 0) -> np.ndarray:
        """One token of one sequence; its next-token logits [V]."""
        return self._step([(seq, self._check_tokens([token], seq))])[0]

    def decode_batch(self, tokens: dict[int, int]) -> np.ndarray:
        """One new token for each sequence ``{seq: token}`` in one call: logits [B, V] in the
        order given."""
        return self._step([(seq, self._check_tokens([tok], seq)) for seq, tok in tokens.items()])

    def generate_batch(
        self, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, **sampling
    ) -> list[list[int]]:
        """Several prompts at once: each prefilled into its slot, then decoded together."""
        if len(prompts) > self.slots:
            raise InputError(f"{len(prompts)} prompts but the engine has {self.slots} slots")
        params = SamplingParams(**{k: sampling[k] for k in sampling if k != "stop_ids"})
        params.validate()
        rng = np.random.default_rng(params.seed)
        stop = set(sampling.get("stop_ids", ()))
        self.reset()
        outs: list[list[int]] = [[] for _ in prompts]
        nxt = {}
        for s, p in enumerate(prompts):
            self._check_tokens(p, s)
            if len(p) + max_new_tokens > self.max_context:
                raise InputError(f"prompt {s} + max_new_tokens exceeds --max-context")
            nxt[s] = self._prefill_next(p, params, rng, seq=s)
        while nxt:
            for s, tok in nxt.items():
                outs[s].append(tok)
            live = {s: t for s, t in nxt.items() if t not in stop and len(outs[s]) < max_new_tokens}
            if not live:
                break
            batch = [(s, self._check_tokens([t], s)) for s, t in live.items()]
            nxt = dict(zip(live, self._next_tokens(batch, params, rng), strict=True))
        return outs

    def stream(
        self,
        prompt_ids: Sequence[int],
        *,
        max_new_tokens: int,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int | None = None,
        stop_ids: Sequence[int] = (),
    ) -> Iterator[int]:
        params = SamplingParams(temperature, top_p, top_k, seed).validate()
        if max_new_tokens < 0:
            raise InputError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        rng = np.random.default_rng(seed)
        self.reset(0)
        self._check_tokens(prompt_ids)
        if len(prompt_ids) + max_new_tokens > self.max_context:
            raise InputError(
                f"prompt ({len(prompt_ids)}) + max_new_tokens ({max_new_tokens}) exceeds "
                f"--max-context {self.max_context}: raise --max-context or ask for fewer tokens"
            )
        if max_new_tokens == 0:
            return
        tok = self._prefill_next(prompt_ids, params, rng)
        for i in range(max_new_tokens):
            yield tok
            if tok in stop_ids or i + 1 == max_new_tokens:
                return
            tok = self._next_tokens([(0, self._check_tokens([tok]))], params, rng)[0]

    def generate(self, prompt_ids: Sequence[int], **kw) -> list[int]:
        return list(self.stream(prompt_ids, **kw))


def _check_finite(batch: list[tuple[int, np.ndarray]], finite, lengths: list[int]) -> None:
    """Refuse to sample from non-finite logits (a row of NaN would read as token 0 forever)."""
    for (slot, _), ok in zip(batch, finite, strict=True):
        if not ok:
            raise NumericsError(
                f"the model computed non-finite logits (NaN/Inf) for sequence {slot} at "
                f"position {lengths[slot] - 1}: its weights or the artifact are broken "
                "(recompile from finite weights)"
            )


def _load_tokenizer(path: Path):
    file = path / "tokenizer.json"
    if not file.exists():
        return None
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise InputError(
            "this artifact has a tokenizer: `pip install tokenizers` to use it"
        ) from None
    return Tokenizer.from_file(str(file))


def _load_weights(path: Path, meta: dict, dev) -> list:
    """The model's parameters, in export order, as device tensors."""
    import tvm

    names = meta["param_names"]
    file = path / artifact.WEIGHTS
    if file.exists():
        from safetensors.numpy import load_file

        try:
            state = load_file(str(file))
        except Exception as e:
            raise artifact.ArtifactError(
                f"{file} is unreadable ({e}): compile the artifact again"
            ) from None
        missing = [n for n in names if n not in state]
        if missing:
            raise artifact.ArtifactError(f"{file} lacks {missing[0]}: compile the artifact again")
        return [tvm.runtime.tensor(state[n], dev) for n in names]
    if meta["weights"].get("source") != "random" or meta["weights"].get("stored", True):
        # only presets compiled without stored weights are drawn here: anything else would run
        # on weights unrelated to the model's
        raise artifact.ArtifactError(
            f"{file} missing: the artifact's weights came from {_weights_origin(meta)}; copy "
            "the whole artifact directory again or recompile"
        )
    return _random_weights(meta, dev)


def _weights_origin(meta: dict) -> str:
    w = meta["weights"]
    return w["path"] if "path" in w else f"a seeded {w.get('source', 'unknown')} draw"


def random_weight_tensors(meta: dict, device: str) -> dict:
    """The seeded random weights of a preset artifact as torch tensors ``{name: tensor}``, drawn
    on ``device`` ("cuda" or "cpu") in export order: the engine's weights and any reference's."""
    try:
        import torch
    except ImportError as e:
        raise artifact.ArtifactError("random-weight artifacts need torch to draw weights") from e
    from mla_compiler.model_export.config import ModelConfig
    from mla_compiler.model_export.modeling import DeepseekV2

    cfg = ModelConfig.from_dict(meta["model"])
    with torch.device("meta"):
        shapes = {n: p.shape for n, p in DeepseekV2(cfg).named_parameters()}
    gen = torch.Generator(device).manual_seed(int(meta["weights"].get("seed", 0)))
    dtype = getattr(torch, meta["dtype"])
    out = {}
    for n in meta["param_names"]:
        if "norm" in n:
            t = 1.0 + 0.1 * torch.randn(shapes[n], generator=gen, device=device)
        else:
            t = 0.02 * torch.randn(shapes[n], generator=gen, device=device)
        out[n] = t.to(dtype).contiguous()
        del t
        if device == "cuda":  # else the weights stay in the float32 draws' cached segments
            torch.cuda.empty_cache()  # (12.8 GiB held for V2-Lite's 29.3 GiB of f16)
    return out


def _random_weights(meta: dict, dev) -> list:
    """Seeded random weights drawn on the device (presets too large to store); those of a
    quantized preset drawn on the CPU and quantized (``seeded_blocks``)."""
    import tvm

    if meta.get("weight_formats"):
        return [tvm.runtime.tensor(a, dev) for a in seeded_blocks(meta)]
    tdev = "cuda" if dev.dlpack_device_type() == 2 else "cpu"
    return [
        tvm.runtime.from_dlpack(t) if tdev == "cuda" else tvm.runtime.tensor(t.numpy(), dev)
        for t in random_weight_tensors(meta, tdev).values()
    ]


def seeded_blocks(meta: dict, *, workers: int | None = None) -> list[np.ndarray]:
    """The weights of a quantized preset compiled without them, in export order: each drawn
    alone (``model_export.weights.seeded_weight``), the ``weight_formats`` ones as their GGUF
    blocks (uint8), the others in the artifact's dtype. Tensors are spread over ``workers``
    processes (default: the CPU count when the model is large, else this process)."""
    import os
    from concurrent.futures import ProcessPoolExecutor

    from mla_compiler.model_export.config import ModelConfig
    from mla_compiler.model_export.weights import expected_shapes

    shapes = expected_shapes(ModelConfig.from_dict(meta["model"]))
    seed = int(meta["weights"].get("seed", 0))
    jobs = [
        (n, shapes[n], seed, meta["weight_formats"].get(n), meta["dtype"])
        for n in meta["param_names"]
    ]
    if workers is None:  # processes pay off for big models only
        big = sum(int(np.prod(s)) for s in shapes.values()) > 1 << 28
        workers = (os.cpu_count() or 1) if big else 1
    if workers == 1:
        return [_seeded_block(*job) for job in jobs]
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")  # no CUDA context or TVM state in the children
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_one_thread) as pool:
        return list(pool.map(_seeded_block, *zip(*jobs, strict=True)))


def _one_thread() -> None:
    """A worker of ``seeded_blocks``: one torch thread each (the processes are the parallelism)."""
    import torch

    torch.set_num_threads(1)


def _seeded_block(name: str, shape, seed: int, qtype: str | None, dtype: str) -> np.ndarray:
    import torch

    from mla_compiler.model_export.quantize import quantize
    from mla_compiler.model_export.weights import seeded_weight

    values = seeded_weight(name, tuple(shape), seed)
    if qtype is not None:
        return quantize(values.numpy(), qtype)
    if dtype == "bfloat16":  # numpy has no bf16 of its own
        import ml_dtypes

        return values.numpy().astype(ml_dtypes.bfloat16)
    return values.to(getattr(torch, dtype)).numpy()


def _choose_sampler(sampling: str, vm, device) -> str:
    """ "device" or "host" (see ``Engine.load``)."""
    if sampling not in ("auto", "device", "host"):
        raise InputError(f"sampling must be auto, device or host, not {sampling!r}")
    has = vm.module.implements_function("sample")
    if sampling == "device" and not has:
        raise InputError("this artifact has no `sample` function: compile it again")
    if sampling == "auto":
        gpu = int(device.dlpack_device_type()) != 1  # kDLCPU
        return "device" if has and gpu else "host"
    return sampling


class _Staging:
    """One device buffer for the small inputs of a call: packed on the host (64-byte aligned),
    sent in one copy, handed out as zero-offset views (kernels reject a nonzero byte_offset).
    Views of a shape and place are made once and kept."""

    ALIGN = 64

    def __init__(self, device):
        self.device = device
        self.buffer = None
        self.views: dict[tuple, object] = {}

    def upload(self, arrays: Sequence[np.ndarray]) -> list:
        import tvm

        offsets, total = [], 0
        for a in arrays:
            offsets.append(total)
            total += -(-a.nbytes // self.ALIGN) * self.ALIGN
        if self.buffer is None or total > self.buffer.shape[0]:
            size = max(total, 2 * (self.buffer.shape[0] if self.buffer is not None else 4096))
            self.buffer = tvm.runtime.empty((size,), "uint8", self.device)
            self.views.clear()
        host = np.zeros(total, np.uint8)
        for a, o in zip(arrays, offsets, strict=True):
            host[o : o + a.nbytes] = np.ascontiguousarray(a).view(np.uint8).ravel()
        self._view(0, (total,), "uint8").copyfrom(host)
        return [self._view(o, a.shape, str(a.dtype)) for a, o in zip(arrays, offsets, strict=True)]

    def _view(self, offset: int, shape: tuple, dtype: str):
        key = (offset, tuple(shape), dtype)
        view = self.views.get(key)
        if view is None:
            import tvm

            if len(self.views) > 256:  # growing kv_rows: one new shape per step
                self.views.clear()
            view = self.buffer._create_view(shape, dtype, offset)
            if offset:
                view = tvm.get_global_func("vm.builtin.ensure_zero_offset")(view)
            self.views[key] = view
        return view
