"""Qwen3 (per-head QK-norm) on pico checkpoints: exact at full budget, KL falling with the budget, the absorbed
form with the cached key scales, the cache's contents, remote-code loading, refinement and healing.

The design is in docs/qk_norm.md: the converted model caches each token's per-kv-head key scale `s_g = 1/rms(k_g)`
beside the latent and the RoPE key, and scales every head's NoPE scores by it.
"""

import json
from functools import partial

import pytest
import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

import mla_convert  # noqa: F401  (registers the MLA model with the Auto classes)
from mla_convert.convert import ConversionOptions, convert
from mla_convert.errors import MLAConvertError
from mla_convert.heal import HealOptions, heal
from mla_modeling import MLALatentCacheLayer

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


# name -> (kv heads, head_dim, attention_bias): MHA with Qwen3's optional biases, GQA with a head size that is not
# hidden / heads (as in Qwen3-0.6B: 1024 / 16 = 64, head_dim 128), MQA
QWEN3_SHAPES = {
    "qwen3-mha": (4, 16, True),
    "qwen3-gqa": (2, 24, False),
    "qwen3-mqa": (1, 16, False),
}
SHAPES = list(QWEN3_SHAPES)


def build_qwen3(name: str, seed: int = 0) -> Qwen3ForCausalLM:
    kv_heads, head_dim, bias = QWEN3_SHAPES[name]
    model = pico_model(Qwen3Config, Qwen3ForCausalLM, seed, num_key_value_heads=kv_heads, head_dim=head_dim,
                       attention_bias=bias)  # fmt: skip
    with torch.no_grad():
        for layer in model.model.layers:
            attention = layer.self_attn
            # Norm weights of ones (the initialisation) would leave their folding into W_uk and the RoPE rows untested.
            attention.q_norm.weight.normal_(1.0, 0.3)
            attention.k_norm.weight.normal_(1.0, 0.3)
            if bias:
                for projection in (attention.q_proj, attention.k_proj, attention.v_proj, attention.o_proj):
                    projection.bias.normal_(std=0.3)
    return model


@pytest.fixture(scope="module")
def qwen3_folders(tmp_path_factory) -> dict:
    return save_pico_folders(tmp_path_factory, {name: partial(build_qwen3, name) for name in SHAPES})


def conversion(tmp_path_factory, source, wikitext, budget: float, **overrides):
    return convert_pico(tmp_path_factory, source, source.name, budget, wikitext, **overrides)


@pytest.fixture(scope="module")
def exact_folders(tmp_path_factory, qwen3_folders, wikitext) -> dict:
    return {name: conversion(tmp_path_factory, qwen3_folders[name], wikitext, 1.0)[0] for name in SHAPES}


@pytest.fixture(scope="module")
def budget_folders(tmp_path_factory, qwen3_folders, wikitext) -> dict:
    """The GQA model at budgets 0.25, 0.5 and 1.0."""
    source = qwen3_folders["qwen3-gqa"]
    return {budget: conversion(tmp_path_factory, source, wikitext, budget)[0] for budget in (0.25, 0.5, 1.0)}


def held_out_text(wikitext, length: int = 512) -> torch.LongTensor:
    """Bytes from the last part of the text (calibration reads the first 80%): `[1, length]`."""
    data = wikitext.read_bytes()
    return torch.tensor([list(data[-4 * length : -3 * length])])


def kl_to_source(source, model, input_ids: torch.LongTensor) -> float:
    """Mean KL(source || model) per position, in nats."""
    with torch.no_grad():
        log_p = source(input_ids).logits.log_softmax(-1)
        log_q = model(input_ids).logits.log_softmax(-1)
    return float((log_p.exp() * (log_p - log_q)).sum(-1).mean())


# ---------------------------------------------------------------------------------------------------- full budget


@pytest.mark.parametrize("name", SHAPES)
def test_full_budget_logits_and_greedy_generation_equal_the_source(qwen3_folders, exact_folders, name):
    source = load(qwen3_folders[name])
    model = load(exact_folders[name])
    assert type(model).__name__ == "MLAForCausalLM" and model.config.qk_norm
    input_ids = token_ids(2, 200)
    with torch.no_grad():
        assert relative_error(model(input_ids).logits, source(input_ids).logits) < 1e-4
    prompt = token_ids(1, 12, seed=3)
    kwargs = dict(max_new_tokens=30, do_sample=False, eos_token_id=None)
    assert torch.equal(model.generate(prompt, **kwargs), source.generate(prompt, **kwargs))


# ---------------------------------------------------------------------------------------------------- below full budget


def test_kl_to_the_source_falls_as_the_budget_rises(qwen3_folders, budget_folders, wikitext):
    source = load(qwen3_folders["qwen3-gqa"])
    text = held_out_text(wikitext)
    kl = {budget: kl_to_source(source, load(folder), text) for budget, folder in budget_folders.items()}
    assert kl[0.25] > kl[0.5] > kl[1.0], kl
    assert kl[1.0] < 1e-6, kl


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_absorbed_decoding_equals_the_expanded_form(budget_folders, implementation):
    model = load(budget_folders[0.5], attn_implementation=implementation)
    input_ids = token_ids(2, 40, seed=1)
    logits = {}
    for path in ("expanded", "absorbed"):
        model.config.attention_path = path
        # prefill 30 tokens, then decode the rest one at a time over the cache (latent, k_pe and key scales)
        logits[path] = prefill_and_decode(model, input_ids, 30)[0]
    model.config.attention_path = "auto"
    with torch.no_grad():
        recomputed = model(input_ids).logits
    assert relative_error(logits["absorbed"], logits["expanded"]) < 1e-5
    assert relative_error(logits["absorbed"], recomputed) < 1e-5


def test_cache_holds_the_latent_the_rope_key_and_the_key_scales_only(qwen3_folders, budget_folders):
    folder = budget_folders[0.5]
    model = load(folder)
    config = model.config
    kv_heads = config.qk_norm_heads
    assert kv_heads == 2
    input_ids = token_ids(3, 17)
    with torch.no_grad():
        cache = model(input_ids, use_cache=True).past_key_values
    for layer_idx, layer in enumerate(cache.layers):
        assert isinstance(layer, MLALatentCacheLayer)
        assert layer.latent.shape == (3, 1, 17, config.kv_lora_ranks[layer_idx])
        # the second part is [k_pe ; key scales]
        assert layer.rope_key.shape == (3, 1, 17, config.qk_rope_head_dim + kv_heads)
        assert layer.joint.shape[-1] == config.kv_lora_ranks[layer_idx] + config.qk_rope_head_dim + kv_heads
    per_token = sum(rank + config.qk_rope_head_dim + kv_heads for rank in config.kv_lora_ranks)
    assert sum(layer.joint.numel() for layer in cache.layers) == 3 * 17 * per_token
    report = json.loads((folder / "conversion.json").read_text())
    assert report["cache"]["mla_numbers_per_token"] == per_token
    assert report["cache"]["key_scales_per_token_per_layer"] == kv_heads
    # the key scales count in the budget
    assert per_token <= 0.5 * report["cache"]["source_numbers_per_token"]

    # At full budget (no refinement moves the key rows) the first layer's input is the same in source and
    # conversion: its cached scales are 1 / rms of the source's own pre-norm keys, per token and kv head.
    exact = load(budget_folders[1.0])
    with torch.no_grad():
        cache = exact(input_ids, use_cache=True).past_key_values
    source = load(qwen3_folders["qwen3-gqa"])
    attention = source.model.layers[0].self_attn
    recorded = {}
    handle = attention.register_forward_pre_hook(
        lambda module, args, kwargs: recorded.update(x=kwargs["hidden_states"]), with_kwargs=True
    )
    with torch.no_grad():
        source(input_ids)
    handle.remove()
    # keys: [batch, seq, kv_heads, head_dim]
    keys = attention.k_proj(recorded["x"]).view(3, 17, kv_heads, -1)
    expected = torch.rsqrt(keys.pow(2).mean(-1) + attention.k_norm.variance_epsilon)
    cached = cache.layers[0].rope_key[:, 0, :, exact.config.qk_rope_head_dim :]
    torch.testing.assert_close(cached, expected, rtol=1e-5, atol=1e-6)


def test_cache_operations_keep_the_key_scales_with_their_tokens(budget_folders):
    """Greedy, beam search (reorder), a static cache and a crop all give what recomputation gives."""
    model = load(budget_folders[0.5])
    prompt = token_ids(2, 9, seed=5)
    greedy = dict(max_new_tokens=15, do_sample=False, eos_token_id=None)
    expected = model.generate(prompt, use_cache=False, **greedy)
    assert torch.equal(model.generate(prompt, **greedy), expected)
    assert torch.equal(model.generate(prompt, cache_implementation="static", **greedy), expected)
    beams = dict(greedy, num_beams=3)
    assert torch.equal(model.generate(prompt, **beams), model.generate(prompt, use_cache=False, **beams))
    input_ids = token_ids(2, 30, seed=6)
    with torch.no_grad():
        full = model(input_ids).logits[:, -1]
        cache = model(input_ids, use_cache=True).past_key_values
        cache.crop(-1)
        again = model(input_ids[:, -1:], cache=cache, use_cache=True).logits[:, -1]
    assert relative_error(again, full) < 1e-5


# ---------------------------------------------------------------------------------------------------- loading


def test_converted_folder_loads_with_transformers_alone(qwen3_folders, exact_folders, tmp_path):
    assert_loads_without_plugin(
        exact_folders["qwen3-gqa"], load(qwen3_folders["qwen3-gqa"]), token_ids(1, 24), tmp_path,
        checks="assert model.config.qk_norm",
    )  # fmt: skip


@pytest.mark.parametrize(
    "overrides, fragment",
    [({"target": "deepseek"}, "QK-norm"), ({"rope_strategy": "freqfold"}, "freqfold")],
)
def test_options_a_qk_norm_source_cannot_take_are_refused(qwen3_folders, tmp_path, overrides, fragment):
    output = tmp_path / "out"
    with pytest.raises(MLAConvertError, match=fragment):
        convert(str(qwen3_folders["qwen3-gqa"]), output, ConversionOptions(kv_budget=0.5, **overrides))
    assert not output.exists()


# ---------------------------------------------------------------------------------------------------- refinement, healing


def test_refinement_trains_with_the_norm_in_place_and_does_not_raise_kl(qwen3_folders, wikitext, tmp_path_factory):
    source_folder = qwen3_folders["qwen3-gqa"]
    plain = dict(key_scale=1.0, rank_allocation="uniform", calibration_tokens=2048)
    closed_form, _ = conversion(tmp_path_factory, source_folder, wikitext, 0.25, refine_steps=0, **plain)
    refined, report = conversion(tmp_path_factory, source_folder, wikitext, 0.25, refine_steps=40, **plain)
    layers = report["layers"]
    assert any(layer["refine_kept"] and layer["refine_error_after"] < layer["refine_error_before"] for layer in layers)
    before, after = load(closed_form), load(refined)
    kept = [i for i, layer in enumerate(layers) if layer["refine_kept"]]
    # What sets the key scales was trained too
    assert any(
        not torch.equal(after.model.layers[i].self_attn.k_proj.weight, before.model.layers[i].self_attn.k_proj.weight)
        for i in kept
    )
    source, text = load(source_folder), held_out_text(wikitext)
    assert kl_to_source(source, after, text) <= kl_to_source(source, before, text)


def test_short_heal_lowers_kl(qwen3_folders, wikitext, tmp_path_factory, tmp_path):
    source_folder = qwen3_folders["qwen3-gqa"]
    student, _ = conversion(
        tmp_path_factory, source_folder, wikitext, 0.25,
        refine_steps=0, key_scale=1.0, rank_allocation="uniform", calibration_tokens=2048,
    )  # fmt: skip
    options = HealOptions(
        teacher=str(source_folder), data=str(wikitext), max_tokens=8 * 4 * 64, seq_len=64, batch_size=4, lr=1e-3,
        kl_weight=1.0, eval_every=4, eval_tokens=2048, save_every=100, progress=False,
    )  # fmt: skip
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        report = heal(student, tmp_path / "healed", options)
    finally:
        torch.set_num_threads(threads)
    evals = [e["kl"] for e in report["eval"]]
    assert evals[-1] < evals[0], evals
    healed = load(tmp_path / "healed")
    assert healed.config.qk_norm
    start = load(student)
    assert not torch.equal(healed.model.layers[0].self_attn.q_norm.weight, start.model.layers[0].self_attn.q_norm.weight)


def test_deepseek_export_refuses_a_qk_norm_folder(exact_folders, tmp_path):
    from mla_convert.export import export_deepseek_v3

    output = tmp_path / "deepseek"
    with pytest.raises(MLAConvertError, match="QK-norm"):
        export_deepseek_v3(exact_folders["qwen3-gqa"], output)
    assert not output.exists()
