"""GGUF vocabularies as ``tokenizers`` tokenizers: byte-level BPE (gpt2) and SentencePiece
(llama) vocabularies of ``tokenizer.ggml.*``, written next to an artifact."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mla_compiler.model_export.gguf import _open, read_metadata

# llama.cpp token types (tokenizer.ggml.token_type); control, unknown and unused ([PAD{i}])
# tokens become special tokens: never split, and left out of decoded text as llama.cpp does.
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED = 1, 2, 3, 4, 5
_SPECIAL = (_UNKNOWN, _CONTROL, _UNUSED)
# Vocabulary kinds tokenizer_from_gguf converts (tokenizer.ggml.model).
TOKENIZER_MODELS = ("gpt2", "llama")


def tokenizer_from_gguf(meta: dict[str, Any]):
    """A ``tokenizers.Tokenizer`` from a GGUF's ``tokenizer.ggml.*`` arrays, or None for vocab
    kinds other than ``TOKENIZER_MODELS``.

    ``gpt2`` (byte-level BPE, as DeepSeek-V2 files carry): decoding is exact. Encoding splits
    words with GPT-2's regex, not the ``deepseek-llm`` pre-tokenizer llama.cpp selects from
    ``tokenizer.ggml.pre``: prompts of text in other scripts than Latin may split differently;
    put the model's ``tokenizer.json`` next to the .gguf file to get the exact tokenizer
    (``write_tokenizer_files`` prefers it).

    ``llama`` (SentencePiece: tokens, scores, token types, ``<0xNN>`` byte tokens): see
    ``_spm_tokenizer``.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    kind = meta.get("tokenizer.ggml.model")
    if kind not in TOKENIZER_MODELS or "tokenizer.ggml.tokens" not in meta:
        return None
    tokens = meta["tokenizer.ggml.tokens"]
    types = meta.get("tokenizer.ggml.token_type") or [_NORMAL] * len(tokens)
    if len(types) != len(tokens):
        raise ValueError(f"{len(tokens)} tokens but {len(types)} token types")
    if kind == "llama":
        tok = _spm_tokenizer(meta, tokens, types)
    else:
        merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
        vocab = {t: i for i, t in enumerate(tokens)}
        tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(
        [
            AddedToken(t, special=True, normalized=False)
            for t, kind in zip(tokens, types, strict=True)
            if kind in _SPECIAL
        ]
    )
    tok.add_tokens(
        [
            AddedToken(t, special=False, normalized=False)
            for t, kind in zip(tokens, types, strict=True)
            if kind == _USER_DEFINED
        ]
    )
    return tok


def _spm_tokenizer(meta: dict[str, Any], tokens: list[str], types: list[int]):
    """A SentencePiece vocabulary as llama.cpp tokenizes it: spaces become ``▁``, one ``▁`` is
    put before the text and after each special token (``tokenizer.ggml.add_space_prefix``,
    default true), characters no piece covers fall back to ``<0xNN>`` byte tokens, decoding
    undoes all three.

    The model: llama.cpp repeatedly merges the adjacent pair whose concatenation is the
    highest-scoring token, which is SentencePiece's BPE; here a BPE whose merges are every
    two-token split of every normal token, ranked by that token's score. A vocabulary where
    more than 1% of the normal tokens have no such split cannot come from BPE: it is a
    SentencePiece unigram model, given the unigram model (Viterbi over the scores), as
    SentencePiece itself tokenizes it.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers

    n = len(tokens)
    scores = [float(x) for x in meta.get("tokenizer.ggml.scores") or [0.0] * n]
    if len(scores) != n:
        raise ValueError(f"{n} tokens but {len(scores)} scores")
    vocab: dict[str, int] = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)
    unk_id = meta.get("tokenizer.ggml.unknown_token_id")
    if not isinstance(unk_id, int) or not 0 <= unk_id < n:
        unk_id = vocab.get("<unk>")
    normal = [i for i, kind in enumerate(types) if kind == _NORMAL and len(tokens[i]) > 1]
    splits = {
        i: [(t[:j], t[j:]) for j in range(1, len(t)) if t[:j] in vocab and t[j:] in vocab]
        for i in normal
        for t in (tokens[i],)
    }
    unreachable = sum(1 for i in normal if not splits[i])
    if unreachable > 0.01 * len(normal):
        model = models.Unigram(
            [(t, s) for t, s in zip(tokens, scores, strict=True)], unk_id=unk_id, byte_fallback=True
        )
    else:
        ranked = sorted(normal, key=lambda i: (-scores[i], i))
        model = models.BPE(
            vocab=vocab,
            merges=[pair for i in ranked for pair in splits[i]],
            unk_token=None if unk_id is None else tokens[unk_id],
            fuse_unk=True,
            byte_fallback=True,
        )
    tok = Tokenizer(model)
    prefix = meta.get("tokenizer.ggml.add_space_prefix", True) is not False
    # normalizers run on each stretch of text between special tokens: llama.cpp's prefix rule
    tok.normalizer = normalizers.Sequence(
        [normalizers.Prepend("▁")] * prefix + [normalizers.Replace(" ", "▁")]
    )
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
        + [decoders.Strip(" ", 1, 0)] * prefix
    )
    return tok


def write_tokenizer_files(path: str | Path, out_dir: str | Path, *, log=None) -> bool:
    """Put ``tokenizer.json`` (+ ``tokenizer_config.json`` with the chat template) into
    ``out_dir``: the files next to the .gguf when there are any, else built from its vocabulary.
    False when the GGUF carries no vocabulary this can convert; then ``log`` (a callable taking
    one line; default ``print``) is told, with what to do about it."""
    import json
    import shutil

    log = print if log is None else log
    path, out_dir = Path(path), Path(out_dir)
    if (path.parent / "tokenizer.json").exists():
        for name in ("tokenizer.json", "tokenizer_config.json"):
            if (path.parent / name).exists():
                shutil.copy(path.parent / name, out_dir / name)
        return True
    meta = read_metadata(_open(path), arrays=True)
    kind = meta.get("tokenizer.ggml.model")
    fix = (
        "the artifact takes --prompt-ids only; put the model's tokenizer.json next to the "
        ".gguf to get text in/out"
    )
    if kind in (None, "no", "none") or "tokenizer.ggml.tokens" not in meta:
        log(f"note: {path.name}: the file has no vocabulary: {fix}")
        return False
    if kind not in TOKENIZER_MODELS:
        log(f"note: {path.name}: tokenizer model {kind!r} is not supported: {fix}")
        return False
    try:
        tok = tokenizer_from_gguf(meta)
    except Exception as e:  # noqa: BLE001  (a malformed vocabulary must not fail the compile)
        log(f"note: {path.name}: its {kind!r} vocabulary could not be converted ({e}): {fix}")
        return False
    tok.save(str(out_dir / "tokenizer.json"))
    tokens = meta["tokenizer.ggml.tokens"]

    def token(key: str) -> str | None:
        i = meta.get(f"tokenizer.ggml.{key}_token_id")
        return tokens[i] if isinstance(i, int) and 0 <= i < len(tokens) else None

    cfg = {"bos_token": token("bos"), "eos_token": token("eos")}
    if "tokenizer.chat_template" in meta:
        cfg["chat_template"] = meta["tokenizer.chat_template"]
    (out_dir / "tokenizer_config.json").write_text(json.dumps(cfg, ensure_ascii=False, indent=1))
    return True
