"""Absorbed decoding with folded weights: the same results as the unfolded form, refolded when the weights change."""

import copy

import pytest
import torch
from transformers import StaticCache

from mla_modeling import MLAConfig, MLAForCausalLM

from conftest import relative_error, token_ids


VOCAB = 100


def pico_config(**overrides) -> MLAConfig:
    # Latents narrower than the NoPE head, so that both folds pay and are used; biases on every projection.
    values = dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        kv_lora_ranks=[8, 6], qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, head_dim=16,
        rope_frequency_indices=[[0, 1, 2, 3], [7, 5, 3, 1]], attention_bias=True, attention_output_bias=True,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, max_position_embeddings=128,
        initializer_range=0.15,
    )
    values.update(overrides)
    return MLAConfig(**values)


def pico_model(seed: int = 0, implementation: str = "sdpa", **overrides) -> MLAForCausalLM:
    torch.manual_seed(seed)
    model = MLAForCausalLM(pico_config(**overrides)).eval()
    model.set_attn_implementation(implementation)
    with torch.no_grad():
        # Zero biases would test nothing.
        for layer in model.model.layers:
            for projection in (layer.self_attn.q_proj, layer.self_attn.kv_a_proj_with_mqa, layer.self_attn.o_proj):
                projection.bias.normal_(std=0.3)
    return model


def unfolded(model: MLAForCausalLM) -> MLAForCausalLM:
    model = copy.deepcopy(model)
    for layer in model.model.layers:
        layer.self_attn.fold_query = layer.self_attn.fold_output = False
        layer.self_attn._drop_folded()
    return model


def attentions(model: MLAForCausalLM):
    return [layer.self_attn for layer in model.model.layers]


@torch.no_grad()
def decode_logits(model, input_ids: torch.LongTensor, prefill: int = 10, forward=None) -> torch.Tensor:
    """Logits of the last prompt token, then of every token decoded one at a time over the latent cache."""
    forward = forward or model
    outputs = model(input_ids[:, :prefill], use_cache=True)
    cache, logits = outputs.past_key_values, [outputs.logits[:, -1]]
    for position in range(prefill, input_ids.shape[1]):
        outputs = forward(input_ids[:, position : position + 1], past_key_values=cache, use_cache=True)
        logits.append(outputs.logits[:, -1])
    return torch.stack(logits, dim=1)


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_folded_decoding_equals_the_unfolded_and_expanded_forms(implementation):
    model = pico_model(implementation=implementation)
    assert all(attention.fold_query and attention.fold_output for attention in attentions(model))
    input_ids = token_ids(3, 24, vocab=VOCAB)
    folded = decode_logits(model, input_ids)
    assert all(attention.folded_q_weight is not None for attention in attentions(model))
    reference = unfolded(model)
    assert relative_error(folded, decode_logits(reference, input_ids)) < 1e-5
    assert all(attention.folded_q_weight is None for attention in attentions(reference))
    model.config.attention_path = "expanded"
    assert relative_error(folded, decode_logits(model, input_ids)) < 1e-5

    model.config.attention_path = "auto"
    generated = model.generate(input_ids[:, :8], max_new_tokens=16, do_sample=False, eos_token_id=None)
    expected = reference.generate(input_ids[:, :8], max_new_tokens=16, do_sample=False, eos_token_id=None)
    assert torch.equal(generated, expected)


def test_folding_leaves_the_checkpoint_alone(tmp_path):
    model = pico_model()
    keys = set(model.state_dict())
    decode_logits(model, token_ids(1, 16, vocab=VOCAB))
    assert set(model.state_dict()) == keys
    model.save_pretrained(tmp_path)
    loaded = MLAForCausalLM.from_pretrained(tmp_path).eval()
    assert set(loaded.state_dict()) == keys
    assert all(attention.folded_q_weight is None for attention in attentions(loaded))


def test_decoding_follows_an_optimizer_step_and_load_state_dict():
    model = pico_model()
    input_ids = token_ids(2, 20, vocab=VOCAB)
    before = decode_logits(model, input_ids)

    # A training step in eval mode: the forward with gradients takes the unfolded path, the step changes the
    # parameters in place, and the next decoding must fold them again.
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loss = model(input_ids, labels=input_ids).loss
    loss.backward()
    optimizer.step()
    after_step = decode_logits(model, input_ids)
    reference = pico_model()
    reference.load_state_dict(model.state_dict())
    assert relative_error(after_step, decode_logits(reference, input_ids)) < 1e-6
    assert relative_error(after_step, before) > 1e-3

    other = pico_model(seed=1)
    model.load_state_dict(other.state_dict())
    assert relative_error(decode_logits(model, input_ids), decode_logits(other, input_ids)) < 1e-6


def test_gradients_reach_the_parameters_through_absorbed_decoding():
    model = pico_model(attention_path="absorbed")
    input_ids = token_ids(2, 12, vocab=VOCAB)
    with torch.no_grad():
        # This folds (a cache means decoding follows); the step with gradients below must not use the folds.
        cache = model(input_ids[:, :-1], use_cache=True).past_key_values
        expected = model(input_ids[:, -1:], past_key_values=copy.deepcopy(cache), use_cache=True).logits
    assert all(attention.folded_q_weight is not None for attention in attentions(model))
    logits = model(input_ids[:, -1:], past_key_values=cache, use_cache=True).logits
    assert relative_error(logits, expected) < 1e-5
    logits.square().mean().backward()
    for attention in attentions(model):
        for projection in (attention.q_proj, attention.kv_a_proj_with_mqa, attention.kv_b_proj, attention.o_proj):
            assert projection.weight.grad is not None and projection.weight.grad.abs().sum() > 0


def test_folded_weights_follow_the_dtype():
    model = pico_model()
    input_ids = token_ids(2, 16, vocab=VOCAB)
    expected = decode_logits(model, input_ids)
    model.to(torch.bfloat16)
    assert all(attention.folded_q_weight is None for attention in attentions(model))
    actual = decode_logits(model, input_ids)
    assert all(attention.folded_q_weight.dtype == torch.bfloat16 for attention in attentions(model))
    assert relative_error(actual.float(), expected) < 0.05


def test_compiled_static_cache_decoding_equals_the_eager_one():
    model = pico_model()
    other = pico_model(seed=1)
    input_ids = token_ids(2, 16, vocab=VOCAB)
    compiled = torch.compile(model.forward, backend="aot_eager", fullgraph=True)

    @torch.no_grad()
    def static_decode(forward):
        cache = StaticCache(config=model.config, max_cache_len=24)
        outputs = model(input_ids[:, :10], past_key_values=cache, use_cache=True)
        logits = [outputs.logits[:, -1]]
        for position in range(10, input_ids.shape[1]):
            outputs = forward(input_ids[:, position : position + 1], past_key_values=cache, use_cache=True)
            logits.append(outputs.logits[:, -1])
        return torch.stack(logits, dim=1)

    expected = decode_logits(unfolded(model), input_ids)
    assert relative_error(static_decode(model), expected) < 1e-5
    assert relative_error(static_decode(compiled), expected) < 1e-5
    # New weights: the eager prefill folds them again before the compiled steps read them.
    model.load_state_dict(other.state_dict())
    expected = decode_logits(unfolded(other), input_ids)
    assert relative_error(static_decode(compiled), expected) < 1e-5


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_padded_batch_absorbed_prefill_and_decoding_equal_the_expanded_form(implementation):
    model = pico_model(implementation=implementation)
    input_ids = token_ids(2, 14, seed=3, vocab=VOCAB)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, :5] = 0  # left padding
    results = {}
    for path in ("expanded", "absorbed"):
        model.config.attention_path = path
        with torch.no_grad():
            logits = model(input_ids, attention_mask=attention_mask).logits
        generated = model.generate(
            input_ids, attention_mask=attention_mask, max_new_tokens=8, do_sample=False, eos_token_id=None
        )
        results[path] = logits[attention_mask.bool()], generated
    assert relative_error(results["absorbed"][0], results["expanded"][0]) < 1e-5
    assert torch.equal(results["absorbed"][1], results["expanded"][1])
