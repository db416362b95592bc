"""The small model: deterministic from its seed, a tokenizer that covers its vocabulary, cached once."""

from __future__ import annotations

import json

import pytest

from servinglab import modelbuild
from servinglab.errors import ModelBuildError


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return modelbuild.ensure_model(tmp_path_factory.mktemp("cache"), "tiny", seed=0)


def test_same_seed_same_bytes_other_seed_other_weights(tmp_path, tiny):
    again = tmp_path / "again"
    modelbuild.write_model_dir(again, "tiny", seed=0, weights=True)
    other = tmp_path / "other"
    modelbuild.write_model_dir(other, "tiny", seed=1, weights=True)
    assert modelbuild.directory_digest(again) == modelbuild.directory_digest(tiny)
    assert (other / "model.safetensors").read_bytes() != (tiny / "model.safetensors").read_bytes()


def test_built_model_is_a_qwen2_vllm_can_run(tiny):
    config = json.loads((tiny / "config.json").read_text())
    assert config["architectures"] == ["Qwen2ForCausalLM"]
    assert config["hidden_size"] // config["num_attention_heads"] == 64  # a head size vLLM's CPU build has kernels for
    facts = modelbuild.model_dir_facts(tiny)
    assert facts.has_weights and facts.has_chat_template
    assert facts.vocabulary_covered and facts.tokenizer_size == facts.vocab_size


def test_weights_cover_every_qwen2_parameter(tiny):
    from safetensors.numpy import load_file

    tensors = load_file(str(tiny / "model.safetensors"))
    config = json.loads((tiny / "config.json").read_text())
    assert tensors["model.embed_tokens.weight"].shape == (config["vocab_size"], config["hidden_size"])
    layers = {name.split(".")[2] for name in tensors if name.startswith("model.layers.")}
    assert layers == {str(i) for i in range(config["num_hidden_layers"])}


def test_chat_template_ends_turns_with_the_models_eos(tiny):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny))
    config = json.loads((tiny / "config.json").read_text())
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hello there"}], add_generation_prompt=True, tokenize=False
    )
    assert prompt == "<|im_start|>user\nHello there<|im_end|>\n<|im_start|>assistant\n"
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") == config["eos_token_id"]
    text = "Time to first token: 27.0 ms at concurrency 32."
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_every_token_id_decodes_to_text(tiny):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny))
    config = json.loads((tiny / "config.json").read_text())
    special = set(tokenizer.all_special_ids)
    empty = [i for i in range(config["vocab_size"]) if i not in special and tokenizer.decode([i]) == ""]
    assert empty == []


def test_config_only_real_shape_pads_the_tokenizer_to_the_vocabulary(tmp_path):
    directory = modelbuild.ensure_model(tmp_path, "qwen2.5-0.5b", seed=0, weights=False)
    facts = modelbuild.model_dir_facts(directory)
    assert not facts.has_weights
    assert facts.vocab_size == 151936 and facts.vocabulary_covered
    tokenizer_json = json.loads((directory / "tokenizer.json").read_text())
    vocab = {v: k for k, v in tokenizer_json["model"]["vocab"].items()}
    # The last id decodes to its own literal text, not to nothing.
    from tokenizers import Tokenizer

    assert Tokenizer.from_file(str(directory / "tokenizer.json")).decode([151935]) == "<pad_151935>"
    assert 151935 in vocab


def test_cached_build_is_reused(tmp_path):
    first = modelbuild.ensure_model(tmp_path, "tiny", seed=3)
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    again = modelbuild.ensure_model(tmp_path, "tiny", seed=3)
    assert again == first and (again / "model.safetensors").stat().st_mtime_ns == stamp
    assert not [p for p in first.parent.iterdir() if p.name.startswith(".")]  # no staging left behind


def test_unknown_shape_and_bad_directories(tmp_path):
    with pytest.raises(ModelBuildError, match="unknown model shape 'huge'"):
        modelbuild.write_model_dir(tmp_path / "x", "huge", seed=0, weights=True)
    with pytest.raises(ModelBuildError, match="no config.json"):
        modelbuild.model_dir_facts(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelBuildError, match="config.json: not valid JSON"):
        modelbuild.model_dir_facts(tmp_path)


def test_tokenizer_smaller_than_vocabulary_is_flagged(tmp_path, tiny):
    import shutil

    copy = tmp_path / "m"
    shutil.copytree(tiny, copy)
    config = json.loads((copy / "config.json").read_text())
    config["vocab_size"] += 100
    (copy / "config.json").write_text(json.dumps(config))
    assert not modelbuild.model_dir_facts(copy).vocabulary_covered
