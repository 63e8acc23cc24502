"""Sliding-window sources: Mistral v0.1's `sliding_window` (every layer local), Qwen2's `use_sliding_window` with
`max_window_layers` (full layers below, local above) and Phi-3's `sliding_window`. The MLA model attends within the
window (mask) and caches only the window on local layers (`MLASlidingLatentCacheLayer`), so it equals the source
past the window too."""

import json
from functools import partial

import pytest
import torch
from transformers import (
    MistralConfig,
    MistralForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

import mla_convert  # noqa: F401  (registers the MLA model with the Auto classes)
from mla_convert.convert import ConversionOptions, convert
from mla_modeling import MLAConfig, MLALatentCacheLayer, MLASlidingLatentCacheLayer

from conftest import (
    assert_loads_without_plugin,
    convert_pico,
    load_causal_lm as load,
    pico_model,
    prefill_and_decode,
    relative_error,
    save_pico_folders,
    token_ids,
)


WINDOW = 16
# Longer than the window, so that the first tokens fall out of it.
LENGTH = 4 * WINDOW
# name -> (config class, model class, window settings, which layers are local)
WINDOWED_ARCHITECTURES = {
    "mistral": (MistralConfig, MistralForCausalLM, {"sliding_window": WINDOW}, [True, True]),
    "qwen2": (
        Qwen2Config,
        Qwen2ForCausalLM,
        {"use_sliding_window": True, "sliding_window": WINDOW, "max_window_layers": 1},
        [False, True],
    ),
    "phi3": (Phi3Config, Phi3ForCausalLM, {"sliding_window": WINDOW, "pad_token_id": None}, [True, True]),
    # QK-norm's cached key scales ride in the sliding cache's rows with the latent
    "qwen3": (
        Qwen3Config,
        Qwen3ForCausalLM,
        {"use_sliding_window": True, "sliding_window": WINDOW, "max_window_layers": 1},
        [False, True],
    ),
}
NAMES = list(WINDOWED_ARCHITECTURES)


def build_windowed(name: str, seed: int = 0, window: bool = True):
    config_class, model_class, extra, _ = WINDOWED_ARCHITECTURES[name]
    if not window:
        # The same weights attending over the whole context: what a model that ignored the window would compute
        extra = {**extra, "sliding_window": None, "use_sliding_window": False} if name in ("qwen2", "qwen3") else {
            **extra, "sliding_window": None
        }
    model = pico_model(config_class, model_class, seed, num_key_value_heads=2, **extra)
    if name == "qwen2":
        with torch.no_grad():
            for layer in model.model.layers:
                for projection in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    projection.bias.normal_(std=0.3, generator=torch.Generator().manual_seed(seed + 1))
    if name == "qwen3":
        with torch.no_grad():
            for layer in model.model.layers:
                for norm in (layer.self_attn.q_norm, layer.self_attn.k_norm):
                    norm.weight.uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(seed + 2))
    return model


@pytest.fixture(scope="module")
def windowed_folders(tmp_path_factory):
    return save_pico_folders(tmp_path_factory, {name: partial(build_windowed, name) for name in NAMES}, "window-")


def converted(tmp_path_factory, source, name: str, budget: float, wikitext=None):
    if budget >= 1.0:
        return convert_pico(tmp_path_factory, source, name, budget)[0]
    # Calibration windows 8 times the sliding window: the conversion calibrates and refines as the source attends
    return convert_pico(tmp_path_factory, source, name, budget, wikitext, calibration_seq_len=8 * WINDOW)[0]


@pytest.fixture(scope="module")
def exact_folders(tmp_path_factory, windowed_folders):
    return {name: converted(tmp_path_factory, windowed_folders[name], name, 1.0) for name in NAMES}


@pytest.fixture(scope="module")
def half_folders(tmp_path_factory, windowed_folders, wikitext):
    return {name: converted(tmp_path_factory, windowed_folders[name], name, 0.5, wikitext) for name in NAMES}


@pytest.mark.parametrize("name", NAMES)
def test_the_config_lists_the_local_layers_as_the_source_does(exact_folders, name):
    config = load(exact_folders[name]).config
    local = WINDOWED_ARCHITECTURES[name][3]
    assert config.sliding_window == WINDOW
    assert config.attention_layer_types == ["sliding_attention" if is_local else "full_attention" for is_local in local]
    assert config.layer_types == ["mla_latent_sliding" if is_local else "mla_latent" for is_local in local]
    report = json.loads((exact_folders[name] / "conversion.json").read_text())
    assert any(f"sliding window of {WINDOW} tokens" in note for note in report["notes"])


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_full_budget_logits_equal_the_source_beyond_the_window(windowed_folders, exact_folders, name, implementation):
    source = load(windowed_folders[name], attn_implementation=implementation)
    model = load(exact_folders[name], attn_implementation=implementation)
    input_ids = token_ids(2, LENGTH)
    with torch.no_grad():
        expected = source(input_ids).logits
        actual = model(input_ids).logits
        # The window matters on these inputs: the same weights over the whole context give other logits.
        unwindowed = build_windowed(name, window=False).to(torch.float32)(input_ids).logits
    assert relative_error(unwindowed[:, WINDOW:], expected[:, WINDOW:]) > 1e-3
    assert relative_error(actual, expected) < 1e-4


@pytest.mark.parametrize("name", NAMES)
def test_full_budget_greedy_generation_equals_the_source(windowed_folders, exact_folders, name):
    """A 12-token prompt and 40 new tokens: generation runs well past the window."""
    source = load(windowed_folders[name])
    model = load(exact_folders[name])
    prompt = token_ids(1, 12, seed=3)
    expected = source.generate(prompt, max_new_tokens=40, do_sample=False, eos_token_id=None)
    actual = model.generate(prompt, max_new_tokens=40, do_sample=False, eos_token_id=None)
    assert torch.equal(actual, expected)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("prefill", [WINDOW // 2, 2 * WINDOW])
def test_decoding_over_the_sliding_cache_equals_the_source(windowed_folders, exact_folders, name, prefill):
    """Token by token past the window, after a prefill shorter and one longer than the window; both forms."""
    source = load(windowed_folders[name])
    model = load(exact_folders[name])
    input_ids = token_ids(2, LENGTH, seed=7)
    with torch.no_grad():
        expected = source(input_ids).logits
    for path in ("expanded", "absorbed"):
        model.config.attention_path = path
        logits, _ = prefill_and_decode(model, input_ids, prefill)
        assert relative_error(logits, expected) < 1e-4, path


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_absorbed_and_expanded_forms_agree_past_the_window(half_folders, name, implementation):
    model = load(half_folders[name], attn_implementation=implementation)
    input_ids = token_ids(2, LENGTH)
    logits = {}
    for path in ("expanded", "absorbed"):
        model.config.attention_path = path
        logits[path], _ = prefill_and_decode(model, input_ids, WINDOW // 2)
    assert relative_error(logits["absorbed"], logits["expanded"]) < 1e-5


@pytest.mark.parametrize("name", NAMES)
def test_local_layers_cache_at_most_the_window(half_folders, name):
    model = load(half_folders[name])
    config = model.config
    batch = 3
    _, cache = prefill_and_decode(model, token_ids(batch, LENGTH), WINDOW + 5)
    assert cache.get_seq_length() == LENGTH
    for layer_idx, (layer, is_local) in enumerate(zip(cache.layers, WINDOWED_ARCHITECTURES[name][3])):
        # a row per token: the latent, the RoPE key, and a QK-norm source's key scales
        width = config.kv_lora_ranks[layer_idx] + config.qk_rope_head_dim + config.qk_norm_heads
        if is_local:
            assert isinstance(layer, MLASlidingLatentCacheLayer)
            # The window less the next token, as transformers' DynamicSlidingWindowLayer keeps it
            assert tuple(layer.buffer.shape) == (batch, 1, WINDOW - 1, width)
            assert layer.buffer.untyped_storage().nbytes() <= batch * WINDOW * width * layer.buffer.element_size()
            assert layer.latent.shape[-2] == layer.rope_key.shape[-2] == WINDOW - 1
        else:
            assert type(layer) is MLALatentCacheLayer
            assert layer.latent.shape[-2] == LENGTH


def test_a_long_prefill_keeps_only_the_window(exact_folders):
    model = load(exact_folders["mistral"])
    with torch.no_grad():
        cache = model(token_ids(1, 8 * WINDOW), use_cache=True).cache
    for layer in cache.layers:
        # A copy, not a view of the whole prompt's latents
        assert layer.buffer.shape[-2] == WINDOW - 1
        assert layer.buffer.untyped_storage().nbytes() == layer.buffer.numel() * layer.buffer.element_size()


@pytest.mark.parametrize("name", NAMES)
def test_below_full_budget_with_calibration_longer_than_the_window(windowed_folders, half_folders, name):
    """Calibration and refinement on windows 8 times the sliding window, once refused, now convert faithfully."""
    source = load(windowed_folders[name])
    model = load(half_folders[name])
    report = json.loads((half_folders[name] / "conversion.json").read_text())
    assert report["calibration"]["seq_len"] == 8 * WINDOW
    input_ids = torch.tensor([list(b"The quick brown fox jumps over the lazy dog near the river bank, twice over.")])
    with torch.no_grad():
        log_p = source(input_ids).logits.log_softmax(-1)
        log_q = model(input_ids).logits.log_softmax(-1)
    kl = float((log_p.exp() * (log_p - log_q)).sum(-1).mean())
    assert kl < 0.5 * float(torch.log(torch.tensor(258.0))), kl


def test_static_cache_generation_equals_the_dynamic_one(exact_folders):
    model = load(exact_folders["qwen2"])
    prompt = token_ids(1, 12, seed=3)
    kwargs = {"max_new_tokens": 30, "do_sample": False, "eos_token_id": None}
    dynamic = model.generate(prompt, **kwargs)
    static = model.generate(prompt, cache_implementation="static", **kwargs)
    assert torch.equal(static, dynamic)


def test_folders_without_windows_load_as_before():
    config = MLAConfig(num_hidden_layers=3, kv_lora_rank=8, qk_rope_head_dim=8, head_dim=8)
    assert config.sliding_window is None and config.attention_layer_types is None
    assert config.layer_types == ["mla_latent"] * 3
    assert "layer_types" not in config.to_dict()


def test_a_window_without_a_size_is_refused():
    with pytest.raises(Exception, match="sliding_window"):
        MLAConfig(num_hidden_layers=2, attention_layer_types=["sliding_attention", "full_attention"])


def test_windowed_folder_loads_without_the_plugin(tmp_path, windowed_folders, exact_folders):
    assert_loads_without_plugin(
        exact_folders["qwen2"], load(windowed_folders["qwen2"]), token_ids(1, LENGTH), tmp_path,
        prompt_length=10, max_new_tokens=2 * WINDOW,
        checks=f"""
        cache = model(data["input_ids"], use_cache=True).cache
        assert [type(layer).__name__ for layer in cache.layers] == ["MLALatentCacheLayer", "MLASlidingLatentCacheLayer"]
        assert cache.layers[1].buffer.shape[-2] == {WINDOW - 1}
        """,
    )  # fmt: skip


def test_deepseek_target_refuses_a_sliding_window_in_one_line(tmp_path, windowed_folders):
    from mla_convert.errors import MLAConvertError

    output = tmp_path / "out"
    options = ConversionOptions(kv_budget=0.5, target="deepseek")
    with pytest.raises(MLAConvertError, match=f"sliding window of {WINDOW} tokens, and DeepSeek-V3 over the whole"):
        convert(str(windowed_folders["mistral"]), output, options)
    assert not output.exists() or not any(output.iterdir())


@pytest.mark.parametrize("name", ["mistral", "qwen2"])
def test_padded_batch_and_beam_search_generate_as_the_source(windowed_folders, exact_folders, name):
    """Left padding (the 2-D mask sliced to the window) and beam reordering of the sliding cache."""
    source = load(windowed_folders[name])
    model = load(exact_folders[name])
    prompts = token_ids(2, 12, seed=11)
    attention_mask = torch.ones_like(prompts)
    attention_mask[0, :5] = 0
    prompts = prompts.masked_fill(attention_mask == 0, 257)
    kwargs = {"max_new_tokens": 2 * WINDOW, "do_sample": False, "eos_token_id": None, "pad_token_id": 257}
    expected = source.generate(prompts, attention_mask=attention_mask, **kwargs)
    assert torch.equal(model.generate(prompts, attention_mask=attention_mask, **kwargs), expected)
    beams = {**kwargs, "num_beams": 3}
    assert torch.equal(model.generate(prompts[1:], **beams), source.generate(prompts[1:], **beams))
