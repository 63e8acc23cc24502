"""Phi-3/Phi-4 sources (`phi3`): fused `qkv_proj` and `gate_up_proj`, head size 24 (like Phi-3-mini's 96, not a
power of two), `partial_rotary_factor` (Phi-4-mini's partial RoPE) and `longrope` scaled RoPE, compared with the
source past its original context."""

import json
from functools import partial

import pytest
import torch
from transformers import Phi3Config, Phi3ForCausalLM

import mla_convert  # noqa: F401  (registers the MLA model with the Auto classes)
from mla_convert.convert import ConversionOptions, convert
from mla_convert.errors import MLAConvertError
from mla_convert.families import SUPPORTED_MODEL_TYPES
from mla_convert.gqa import convert_to_gqa

from conftest import (
    assert_loads_without_plugin,
    byte_tokenizer,
    convert_pico,
    load_causal_lm as load,
    pico_model,
    prefill_and_decode,
    relative_error,
    save_pico_folders,
    token_ids,
)


# Positions past this use longrope's long factors (and a source that ignored them would differ from its own
# short-context self, which the first test checks).
ORIGINAL_CONTEXT = 32
LONGROPE = {
    "rope_type": "longrope",
    "rope_theta": 10000.0,
    # one factor per rotated pair: 6 pairs with partial_rotary_factor 0.5 of head_dim 24, 12 with all of it
    "short_factor": [1.0, 1.1, 1.3, 1.6, 2.0, 2.5],
    "long_factor": [1.5, 2.5, 4.0, 6.0, 9.0, 14.0],
    "partial_rotary_factor": 0.5,
}
FULL_LONGROPE = {
    **LONGROPE,
    "short_factor": [1.0 + 0.1 * i for i in range(12)],
    "long_factor": [1.0 + 1.5 * i for i in range(12)],
    "partial_rotary_factor": 1.0,
}
# name -> (kv heads, extra config): hidden 96 over 4 heads is head_dim 24, 12 RoPE pairs
PHI3_ARCHITECTURES = {
    "phi3-mha": (4, {}),
    "phi3-gqa-partial-longrope": (
        2,
        {"rope_parameters": LONGROPE, "original_max_position_embeddings": ORIGINAL_CONTEXT},
    ),
    "phi3-mqa-longrope": (
        1,
        {"rope_parameters": FULL_LONGROPE, "original_max_position_embeddings": ORIGINAL_CONTEXT},
    ),
}
NAMES = list(PHI3_ARCHITECTURES)
KL_NAME = "phi3-gqa-partial-longrope"


def build_phi3(name: str, seed: int = 0) -> Phi3ForCausalLM:
    kv_heads, extra = PHI3_ARCHITECTURES[name]
    return pico_model(Phi3Config, Phi3ForCausalLM, seed, hidden_size=96, num_key_value_heads=kv_heads,
                      max_position_embeddings=256, pad_token_id=None, **extra)  # fmt: skip


@pytest.fixture(scope="module")
def phi3_folders(tmp_path_factory):
    return save_pico_folders(tmp_path_factory, {name: partial(build_phi3, name) for name in NAMES})


def converted(tmp_path_factory, source, name: str, budget: float, wikitext=None):
    return convert_pico(tmp_path_factory, source, name, budget, wikitext if budget < 1.0 else None)[0]


@pytest.fixture(scope="module")
def exact_folders(tmp_path_factory, phi3_folders):
    return {name: converted(tmp_path_factory, phi3_folders[name], name, 1.0) for name in NAMES}


@pytest.fixture(scope="module")
def budget_folders(tmp_path_factory, phi3_folders, wikitext):
    return {
        budget: converted(tmp_path_factory, phi3_folders[KL_NAME], KL_NAME, budget, wikitext)
        for budget in (0.25, 0.5)
    }


def kl_to_source(source, model, input_ids: torch.LongTensor) -> float:
    """Mean KL(source || model) per position, in nats."""
    with torch.no_grad():
        log_p = source(input_ids).logits.log_softmax(-1)
        log_q = model(input_ids).logits.log_softmax(-1)
    return float((log_p.exp() * (log_p - log_q)).sum(-1).mean())


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("length", [20, 120])
def test_full_budget_logits_equal_the_source(phi3_folders, exact_folders, name, length):
    """Within the original context (short factors) and past it (long factors and longrope's attention scaling)."""
    source = load(phi3_folders[name])
    model = load(exact_folders[name])
    assert type(model).__name__ == "MLAForCausalLM"
    input_ids = token_ids(2, length)
    with torch.no_grad():
        expected = source(input_ids).logits
        actual = model(input_ids).logits
    assert relative_error(actual, expected) < 1e-4


@pytest.mark.parametrize("name", [n for n in NAMES if "longrope" in n])
def test_longrope_switches_to_the_long_factors_as_the_source_does(phi3_folders, exact_folders, name):
    source = load(phi3_folders[name])
    model = load(exact_folders[name])
    assert model.config.rope_parameters["rope_type"] == "longrope"
    input_ids = token_ids(1, 3 * ORIGINAL_CONTEXT)
    with torch.no_grad():
        short_source = source(input_ids[:, :ORIGINAL_CONTEXT]).logits
        long_source = source(input_ids).logits
        long_model = model(input_ids).logits
    # The first positions change once the sequence passes the original context: the long factors are in use ...
    assert relative_error(long_source[:, :ORIGINAL_CONTEXT], short_source) > 1e-3
    # ... and the MLA model rotates with them, at the same positions, with the same attention scaling.
    assert relative_error(long_model, long_source) < 1e-4
    source_rotary, rotary = source.model.rotary_emb, model.model.rotary_emb
    assert rotary.attention_scaling == pytest.approx(source_rotary.attention_scaling, rel=1e-12)
    assert rotary.attention_scaling > 1.0
    torch.testing.assert_close(rotary.inv_freq, source_rotary.inv_freq, rtol=0, atol=0)


@pytest.mark.parametrize("name", NAMES)
def test_full_budget_greedy_generation_equals_the_source(phi3_folders, exact_folders, name):
    """40 new tokens after a 12-token prompt: generation crosses the original context of the longrope variants."""
    source = load(phi3_folders[name])
    model = load(exact_folders[name])
    prompt = token_ids(1, 12, seed=3)
    expected = source.generate(prompt, max_new_tokens=40, do_sample=False, eos_token_id=None)
    actual = model.generate(prompt, max_new_tokens=40, do_sample=False, eos_token_id=None)
    assert torch.equal(actual, expected)


def test_mlp_reproduces_the_fused_gate_up_projection(phi3_folders, exact_folders):
    source = load(phi3_folders["phi3-mha"])
    model = load(exact_folders["phi3-mha"])
    hidden = torch.randn(2, 7, 96, generator=torch.Generator().manual_seed(1))
    for source_layer, layer in zip(source.model.layers, model.model.layers):
        with torch.no_grad():
            torch.testing.assert_close(layer.mlp(hidden), source_layer.mlp(hidden), rtol=0, atol=1e-6)


def test_kl_to_the_source_falls_as_the_budget_rises(phi3_folders, exact_folders, budget_folders):
    source = load(phi3_folders[KL_NAME])
    # Past the original context, where the long factors rotate
    input_ids = torch.tensor([list(b"The quick brown fox jumps over the lazy dog near the river bank, twice over.")])
    assert input_ids.shape[1] > ORIGINAL_CONTEXT
    kl = {budget: kl_to_source(source, load(folder), input_ids) for budget, folder in budget_folders.items()}
    kl[1.0] = kl_to_source(source, load(exact_folders[KL_NAME]), input_ids)
    assert kl[0.25] > kl[0.5] > kl[1.0], kl
    assert kl[1.0] < 1e-6, kl


def test_partial_rope_pass_through_dims_lose_rope_first(budget_folders):
    """Below full budget the shared RoPE key is spent on rotated frequencies: the pass-through dims (frequency 0 in
    the converted layout) cost nothing without RoPE."""
    report = json.loads((budget_folders[0.5] / "conversion.json").read_text())
    model = load(budget_folders[0.5])
    rotated_pairs = len(LONGROPE["short_factor"])
    assert model.config.qk_rope_head_dim // 2 <= 2 * rotated_pairs  # room for every kv head's rotated pairs
    for indices in model.config.rope_frequency_indices:
        assert all(index < rotated_pairs for index in indices), indices
    assert report["source_model_type"] == "phi3"


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_absorbed_and_expanded_forms_agree(budget_folders, implementation):
    model = load(budget_folders[0.5], attn_implementation=implementation)
    input_ids = token_ids(2, 60)
    logits = {}
    for path in ("expanded", "absorbed"):
        model.config.attention_path = path
        # prefill 20 tokens, then decode one at a time past the original context
        logits[path] = prefill_and_decode(model, input_ids, 20)[0]
    assert relative_error(logits["absorbed"], logits["expanded"]) < 1e-5


def test_cache_bytes_per_token_at_full_budget(exact_folders):
    """MHA at full budget caches what the source does; MQA's shared key already is one head, so nothing is gained."""
    for name in NAMES:
        cache = json.loads((exact_folders[name] / "conversion.json").read_text())["cache"]
        kv_heads = PHI3_ARCHITECTURES[name][0]
        assert cache["source_numbers_per_token_per_layer"] == 2 * kv_heads * 24
        assert cache["mla_numbers_per_token"] == cache["source_numbers_per_token"]


def test_converted_folder_loads_without_the_plugin(tmp_path, phi3_folders, exact_folders):
    name = "phi3-gqa-partial-longrope"
    assert_loads_without_plugin(
        exact_folders[name], load(phi3_folders[name]), token_ids(1, 3 * ORIGINAL_CONTEXT), tmp_path,
        prompt_length=10, max_new_tokens=20,
    )  # fmt: skip


@pytest.mark.parametrize("model_type", ["gpt2", "gemma2"])
def test_unsupported_family_gets_one_line_naming_the_supported_ones(tmp_path, phi3_folders, model_type):
    source = tmp_path / "source"
    source.mkdir()
    config = json.loads((phi3_folders["phi3-mha"] / "config.json").read_text())
    (source / "config.json").write_text(json.dumps({**config, "model_type": model_type}))
    output = tmp_path / "out"
    with pytest.raises(MLAConvertError) as error:
        convert(str(source), output, ConversionOptions(kv_budget=1.0))
    message = str(error.value)
    assert "\n" not in message
    assert f"{model_type!r} model; supported model types: " + ", ".join(SUPPORTED_MODEL_TYPES) in message
    assert "phi3" in SUPPORTED_MODEL_TYPES
    assert not output.exists()


def test_gqa_pooling_refuses_phi3_in_one_line(tmp_path, phi3_folders):
    output = tmp_path / "out"
    message = r"cannot pool the KV heads of a 'phi3' model; supported model types: llama"
    with pytest.raises(MLAConvertError, match=message):
        convert_to_gqa(str(phi3_folders["phi3-mha"]), output, num_kv_heads=2)
    assert not output.exists()


def test_healing_recognises_a_phi3_teacher_by_its_weights(phi3_folders, exact_folders):
    """heal's teacher check compares the student's MLP with the teacher's fused one, split as the converter does."""
    from mla_convert.heal.models import shares_weights

    student = load(exact_folders["phi3-mha"])
    source = load(phi3_folders["phi3-mha"])
    assert shares_weights(student, source)
    source_parameters = dict(source.named_parameters())
    other = build_phi3("phi3-mha", seed=1)
    with torch.no_grad():
        # the same embeddings, norms and down projection: only the fused gate/up projection tells them apart
        for name, parameter in other.named_parameters():
            if "gate_up_proj" not in name:
                parameter.copy_(source_parameters[name])
    assert not shares_weights(student, other)


def test_deepseek_target_refuses_what_its_rope_cannot_express(tmp_path, phi3_folders):
    partial = tmp_path / "partial"
    config = build_phi3("phi3-mha").config
    config.rope_parameters = {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}
    Phi3ForCausalLM(config).save_pretrained(partial)
    byte_tokenizer().save_pretrained(partial)
    cases = {
        phi3_folders["phi3-mqa-longrope"]: "its RoPE is longrope",
        partial: "it rotates only part of each head",
    }
    for source, reason in cases.items():
        output = tmp_path / "out"
        with pytest.raises(MLAConvertError, match=f"--target deepseek cannot convert this source: {reason}"):
            convert(str(source), output, ConversionOptions(kv_budget=0.5, target="deepseek"))
        assert not output.exists() or not any(output.iterdir())
