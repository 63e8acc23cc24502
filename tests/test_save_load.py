"""Converted folders load through the plugin, and through `trust_remote_code` where the plugin is not installed."""

import pytest
import torch
from huggingface_hub.errors import StrictDataclassError
from transformers import AutoModelForCausalLM

import mla_convert  # noqa: F401
from mla_convert.convert import ConversionOptions, convert
from mla_modeling import MLAConfig, MLAForCausalLM

from conftest import assert_loads_without_plugin, load_causal_lm, token_ids


def test_per_layer_ranks_survive_save_and_load(tmp_path):
    config = MLAConfig(
        vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
        kv_lora_ranks=[24, 8, 16], qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, head_dim=16,
        rope_frequency_indices=[[0, 1, 2, 3], [7, 5, 3, 1], [0, 2, 4, 6]],
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )
    torch.manual_seed(0)
    model = MLAForCausalLM(config).eval()
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.config.kv_lora_ranks == [24, 8, 16]
    assert loaded.config.rope_frequency_indices == [[0, 1, 2, 3], [7, 5, 3, 1], [0, 2, 4, 6]]
    assert [layer.self_attn.kv_b_proj.in_features for layer in loaded.model.layers] == [24, 8, 16]
    input_ids = token_ids(1, 20, vocab=100)
    with torch.no_grad():
        assert torch.allclose(loaded(input_ids).logits, model(input_ids).logits, atol=1e-6)


def test_invalid_config_is_refused():
    with pytest.raises(StrictDataclassError, match="kv_lora_ranks"):
        MLAConfig(num_hidden_layers=2, kv_lora_ranks=[8, 8, 8])
    with pytest.raises(StrictDataclassError, match="attention_path"):
        MLAConfig(num_hidden_layers=2, attention_path="fast")


def test_trust_remote_code_loads_without_the_plugin(tmp_path, pico_folders):
    output = tmp_path / "converted"
    convert(str(pico_folders["llama-gqa"]), output, ConversionOptions(kv_budget=1.0))
    # At full budget the converted model computes what its source computes: greedy decoding picks the same tokens.
    assert_loads_without_plugin(
        output, load_causal_lm(pico_folders["llama-gqa"]), token_ids(1, 24), tmp_path,
        checks="""
        cache = model(data["input_ids"], use_cache=True).past_key_values
        assert type(cache.layers[0]).__name__ == "MLALatentCacheLayer", cache.layers[0]
        """,
    )  # fmt: skip
