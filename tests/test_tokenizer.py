"""Text in and out: a tokenizer.json built with `tokenizers` travels from the HF checkpoint into
the artifact; `run --prompt` streams text; chat templates render with jinja2 or the fallback."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import run_cli

tokenizers = pytest.importorskip("tokenizers")

from mla_compiler.runtime.serve import ChatTemplate, TextStream, deepseek_chat_prompt  # noqa: E402

BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
CORPUS = [
    "the latent cache keeps one row per token and layer",
    "attention over the compressed rows is fast on tensor cores",
    "experts are routed by a softmax gate and the shared expert always runs",
    "hello world, this is a tiny tokenizer for a tiny model",
    "User: what is a latent cache?\n\nAssistant: one row per token.",
]
# DeepSeek-V2-Chat's template (tokenizer_config.json of the release), line breaks added.
DEEPSEEK_TEMPLATE = (
    "{% if not add_generation_prompt is defined %}"
    "{% set add_generation_prompt = false %}{% endif %}"
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ 'User: ' + message['content'] + '\n\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ 'Assistant: ' + message['content'] + eos_token }}"
    "{% elif message['role'] == 'system' %}{{ message['content'] + '\n\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)
MESSAGES = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "what is a latent cache?"},
    {"role": "assistant", "content": "one row per token"},
    {"role": "user", "content": "and the experts?"},
]


def build_tokenizer(vocab_size: int):
    """A BPE (SentencePiece-style spaces) trained on CORPUS, ids 0/1/2 = unk/bos/eos as in the
    test checkpoints, padded with added tokens to exactly ``vocab_size`` ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - 8, special_tokens=["<unk>", BOS, EOS])
    tok.train_from_iterator(CORPUS, trainer)
    n = tok.get_vocab_size()
    tok.add_tokens([f"<x{i}>" for i in range(vocab_size - n)])
    assert tok.get_vocab_size() == vocab_size
    assert tok.token_to_id(BOS) == 1 and tok.token_to_id(EOS) == 2
    return tok


def write_tokenizer(model_dir: Path, vocab_size: int) -> None:
    build_tokenizer(vocab_size).save(str(model_dir / "tokenizer.json"))
    cfg = {"bos_token": {"content": BOS}, "eos_token": EOS, "chat_template": DEEPSEEK_TEMPLATE}
    (model_dir / "tokenizer_config.json").write_text(json.dumps(cfg))


_ARTIFACTS: dict[str, Path] = {}


def text_artifact(hf_checkpoint, tmp_path_factory) -> Path:
    """small-yarn (sharp logits) + tokenizer, compiled for the CPU once per session."""
    if "small-yarn" not in _ARTIFACTS:
        src = hf_checkpoint("small-yarn", scale=8.0)
        model = tmp_path_factory.mktemp("hf-text")
        for f in ("config.json", "model.safetensors"):
            shutil.copy(src / f, model / f)
        write_tokenizer(model, json.loads((src / "config.json").read_text())["vocab_size"])
        out = tmp_path_factory.mktemp("text-art") / "art"
        run_cli(
            "compile",
            "--model",
            str(model),
            "--target",
            "cpu",
            "--output",
            str(out),
            "--max-context",
            "256",
        )
        _ARTIFACTS["small-yarn"] = out
    return _ARTIFACTS["small-yarn"]


@pytest.fixture(scope="module")
def artifact(hf_checkpoint, tmp_path_factory) -> Path:
    return text_artifact(hf_checkpoint, tmp_path_factory)


def test_compile_copies_tokenizer(artifact):
    assert (artifact / "tokenizer.json").exists() and (artifact / "tokenizer_config.json").exists()


def test_run_prompt_streams_text(artifact):
    prompt = "hello world, the latent cache"
    proc = run_cli("run", str(artifact), "--prompt", prompt, "--max-new-tokens", "12", "--json")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    tok = tokenizers.Tokenizer.from_file(str(artifact / "tokenizer.json"))
    assert result["prompt_tokens"] == len(tok.encode(prompt).ids) + 1  # + BOS
    assert result["text"] == tok.decode(result["tokens"]) and result["tokens"]
    streamed = run_cli("run", str(artifact), "--prompt", prompt, "--max-new-tokens", "12")
    assert streamed.stdout == result["text"] + "\n"


def test_text_stream_holds_split_utf8():
    pieces = {1: b"a ", 2: "é".encode()[:1], 3: "é".encode()[1:] + b"!"}

    def decode(ids):
        return b"".join(pieces[i] for i in ids).decode("utf-8", errors="replace")

    s = TextStream(decode)
    out = [s.push(1), s.push(2), s.push(3), s.flush()]
    assert out == ["a ", "", "é!", ""]


def test_chat_template_jinja_matches_fallback(tmp_path):
    write_tokenizer(tmp_path, 256)
    chat = ChatTemplate.from_dir(tmp_path)
    assert chat.template == DEEPSEEK_TEMPLATE and chat.bos_token == BOS and chat.eos_token == EOS
    rendered = chat.render(MESSAGES)
    assert rendered == (
        f"{BOS}be brief\n\nUser: what is a latent cache?\n\nAssistant: one row per token{EOS}"
        "User: and the experts?\n\nAssistant:"
    )
    assert rendered == deepseek_chat_prompt(MESSAGES, bos=BOS, eos=EOS)
    assert not chat.render(MESSAGES, add_generation_prompt=False).endswith("Assistant:")
    ids = build_tokenizer(256).encode(rendered).ids
    assert ids[0] == 1 and 2 in ids  # BOS and EOS are single special tokens


def test_chat_template_without_jinja_or_config(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_jinja(name, *args, **kw):
        if name.startswith("jinja2"):
            raise ImportError(name)
        return real_import(name, *args, **kw)

    write_tokenizer(tmp_path, 256)
    monkeypatch.setattr(builtins, "__import__", no_jinja)
    chat = ChatTemplate.from_dir(tmp_path)
    assert chat.render(MESSAGES) == deepseek_chat_prompt(MESSAGES, bos=BOS, eos=EOS)
    assert ChatTemplate.from_dir(tmp_path / "none").render(MESSAGES[1:2]) == (
        "User: what is a latent cache?\n\nAssistant:"
    )
