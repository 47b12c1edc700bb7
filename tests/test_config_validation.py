"""Every config.json value mla-compiler reads is checked for type and range: a bad one is one
ConfigError (one CLI line, exit 2) naming the key, the value and what it must be."""

from __future__ import annotations

import copy
import json
import shutil

import pytest
from conftest import hf_config_dict, run_cli

from mla_compiler.errors import ConfigError
from mla_compiler.model_export.config import load_config

DROP = object()  # remove the key instead of setting it


def _write(tmp_path, key: str, value) -> str:
    """small-yarn's config.json with ``key`` (``a.b`` for a nested one) set to ``value``."""
    cfg = copy.deepcopy(hf_config_dict("small-yarn"))  # its rope dict is shared
    *outer, last = key.split(".")
    d = cfg
    for k in outer:
        d = d[k]
    if value is DROP:
        d.pop(last)
    else:
        d[last] = value
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(cfg))
    return str(model)


R = "rope_parameters"
# (key, bad value, the message's tail): the message is "config.json: <key> must be <tail>"
BAD = [
    ("num_hidden_layers", "three", "num_hidden_layers must be a positive integer, got 'three'"),
    ("num_hidden_layers", 0, "num_hidden_layers must be a positive integer, got 0"),
    ("num_hidden_layers", 2.5, "num_hidden_layers must be a positive integer, got 2.5"),
    ("num_hidden_layers", True, "num_hidden_layers must be a positive integer, got true"),
    ("num_hidden_layers", None, "num_hidden_layers must be a positive integer, got null"),
    ("kv_lora_rank", -4, "kv_lora_rank must be a positive integer, got -4"),
    ("kv_lora_rank", "32", "kv_lora_rank must be a positive integer, got '32'"),
    ("vocab_size", [256], "vocab_size must be a positive integer, got [256]"),
    ("hidden_size", 0, "hidden_size must be a positive integer, got 0"),
    ("num_attention_heads", False, "num_attention_heads must be a positive integer, got false"),
    ("intermediate_size", None, "intermediate_size must be a positive integer, got null"),
    ("qk_nope_head_dim", -16, "qk_nope_head_dim must be a positive integer, got -16"),
    ("qk_rope_head_dim", 7, "qk_rope_head_dim must be a positive even integer, got 7"),
    ("v_head_dim", 16.5, "v_head_dim must be a positive integer, got 16.5"),
    ("q_lora_rank", 0, "q_lora_rank must be a positive integer or null, got 0"),
    ("q_lora_rank", "48", "q_lora_rank must be a positive integer or null, got '48'"),
    ("num_key_value_heads", 0, "num_key_value_heads must be a positive integer or null, got 0"),
    ("n_routed_experts", -1, "n_routed_experts must be an integer >= 0 or null, got -1"),
    ("n_shared_experts", "one", "n_shared_experts must be an integer >= 0 or null, got 'one'"),
    ("moe_intermediate_size", 0, "moe_intermediate_size must be a positive integer when"),
    ("num_experts_per_tok", 9, "num_experts_per_tok must be an integer in 1..n_routed_experts (8)"),
    ("num_experts_per_tok", 0, "num_experts_per_tok must be an integer in 1..n_routed_experts"),
    (
        "first_k_dense_replace",
        4,
        "first_k_dense_replace must be an integer in 0..num_hidden_layers",
    ),
    ("first_k_dense_replace", -1, "first_k_dense_replace must be an integer >= 0 or null, got -1"),
    ("n_group", 3, "n_group must divide n_routed_experts (8), got 3"),
    ("n_group", 0, "n_group must be a positive integer or null, got 0"),
    ("topk_group", 2, "topk_group must be an integer in 1..n_group (1), got 2"),
    ("topk_method", 5, "topk_method must be a string or null, got 5"),
    ("norm_topk_prob", "yes", "norm_topk_prob must be true or false or null, got 'yes'"),
    ("norm_topk_prob", 1, "norm_topk_prob must be true or false or null, got 1"),
    ("tie_word_embeddings", 0, "tie_word_embeddings must be true or false or null, got 0"),
    ("attention_bias", "no", "attention_bias must be true or false or null, got 'no'"),
    ("hidden_act", None, "hidden_act must be a string, got null"),
    ("rms_norm_eps", 0, "rms_norm_eps must be a number > 0, got 0"),
    ("rms_norm_eps", "1e-6", "rms_norm_eps must be a number > 0, got '1e-6'"),
    ("rms_norm_eps", float("nan"), "rms_norm_eps must be a number > 0, got NaN"),
    ("rms_norm_eps", None, "rms_norm_eps must be a number > 0, got null"),
    ("routed_scaling_factor", -1.5, "routed_scaling_factor must be a number > 0, got -1.5"),
    ("max_position_embeddings", 0, "max_position_embeddings must be a positive integer, got 0"),
    ("bos_token_id", 256, "bos_token_id must be an integer in 0..vocab_size - 1 (255), got 256"),
    ("bos_token_id", "<s>", "bos_token_id must be an integer >= 0 or null, got '<s>'"),
    ("eos_token_id", -1, "eos_token_id must be an integer >= 0, a list of them, or null, got -1"),
    ("eos_token_id", [2, "x"], "eos_token_id[1] must be an integer >= 0, got 'x'"),
    ("eos_token_id", [999], "eos_token_id must be an integer in 0..vocab_size - 1 (255), got 999"),
    ("rope_theta", "1e4", "rope_theta must be a number > 1, got '1e4'"),
    (R, "yarn", "rope_parameters must be an object or null, got 'yarn'"),
    (f"{R}.rope_theta", -1, "rope_parameters.rope_theta must be a number > 1, got -1"),
    (f"{R}.rope_type", 3, "rope_parameters.rope_type must be a string or null, got 3"),
    (f"{R}.factor", 0.5, "rope_parameters.factor must be a number >= 1, got 0.5"),
    (f"{R}.factor", "8", "rope_parameters.factor must be a number >= 1, got '8'"),
    (f"{R}.factor", DROP, "config.json lacks rope_parameters.factor: add it"),
    (
        f"{R}.original_max_position_embeddings",
        "4k",
        "rope_parameters.original_max_position_embeddings must be a positive integer, got '4k'",
    ),
    (f"{R}.beta_fast", -32, "rope_parameters.beta_fast must be a number >= 0 or null, got -32"),
    (f"{R}.mscale_all_dim", "0.8", "rope_parameters.mscale_all_dim must be a number >= 0 or null"),
]


def _id(case) -> str:
    key, value, _ = case
    shown = "missing" if value is DROP else type(value).__name__ + "-" + str(value)
    return f"{key}={shown}"[:60]


@pytest.mark.parametrize("key,value,message", BAD, ids=[_id(c) for c in BAD])
def test_bad_value_is_one_config_error(tmp_path, key, value, message):
    model = _write(tmp_path, key, value)
    with pytest.raises(ConfigError) as err:
        load_config(model)
    text = str(err.value)
    assert message in text, text
    if not message.startswith("config.json"):
        assert text.startswith("config.json: "), text
    assert "\n" not in text


def test_old_style_rope_scaling_keys_are_checked(tmp_path):
    cfg = copy.deepcopy(hf_config_dict("small-yarn"))
    rope = cfg.pop("rope_parameters")
    cfg["rope_theta"] = rope.pop("rope_theta")
    cfg["rope_scaling"] = dict(rope, type=rope.pop("rope_type"))
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(cfg))
    assert load_config(model).rope.factor == 8.0
    cfg["rope_scaling"]["factor"] = "8"
    (model / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="rope_scaling.factor must be a number >= 1, got '8'"):
        load_config(model)


# Values that are odd but meaningful: they load (with the value the model code uses).
GOOD = [
    ("num_hidden_layers", 3.0, "num_hidden_layers", 3),
    ("eos_token_id", [2, 1], "eos_token_id", 2),
    ("eos_token_id", None, "eos_token_id", None),
    ("q_lora_rank", 48, "dims.q_lora_rank", 48),
    ("n_group", None, "n_group", 1),
    ("topk_group", None, "topk_group", 1),
    ("n_shared_experts", 0, "n_shared_experts", 0),
    ("n_routed_experts", 0, "n_routed_experts", 0),  # dense model
    ("first_k_dense_replace", 3, "first_k_dense_replace", 3),  # every layer dense
    ("rms_norm_eps", 1, "rms_norm_eps", 1.0),
    (f"{R}.beta_fast", None, "rope.beta_fast", 32.0),
    (f"{R}.factor", 1, "rope.factor", 1.0),
]


@pytest.mark.parametrize(
    "key,value,field,expected", GOOD, ids=[f"{k}={v!r}" for k, v, _, _ in GOOD]
)
def test_meaningful_values_load(tmp_path, key, value, field, expected):
    cfg = load_config(_write(tmp_path, key, value))
    got = cfg
    for part in field.split("."):
        got = getattr(got, part)
    assert got == expected and type(got) is type(expected)


def test_config_must_be_an_object(tmp_path):
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match="config.json must hold a JSON object, got list"):
        load_config(tmp_path)


CLI = [
    ("num_hidden_layers", "three", "num_hidden_layers must be a positive integer, got 'three'"),
    ("kv_lora_rank", -4, "kv_lora_rank must be a positive integer, got -4"),
    (f"{R}.factor", DROP, "lacks rope_parameters.factor"),
]


@pytest.mark.parametrize("key,value,message", CLI, ids=[_id(c) for c in CLI])
def test_cli_bad_config_is_one_line(hf_checkpoint, tmp_path, key, value, message):
    """compile --model with a bad config.json (real weights next to it): exit 2, one line."""
    model = _write(tmp_path, key, value)
    shutil.copy(hf_checkpoint("small-yarn") / "model.safetensors", model)
    out = tmp_path / "o"
    proc = run_cli("compile", "--model", model, "--output", str(out), check=False)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1, proc.stderr
    assert errors[0].startswith("mla-compiler compile: error: config.json"), errors[0]
    assert message in errors[0], errors[0]
    assert not out.exists()
