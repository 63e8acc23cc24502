"""The converted model keeps transformers' model contract, checked the way transformers' `ModelTesterMixin` does.

Pico MLA models come from converting a pico Llama (2 layers, hidden 64): at full budget the MLA model computes what
Llama computes, so its outputs are compared with the source's; at half budget the latent is narrower than the keys
and values it replaces, and both attention forms (expanded, absorbed) are exercised.

It runs on both transformers versions the project supports: `bash scripts/test_transformers_versions.sh` runs it on
5.23 (5.24 renamed the cache `past_key_values` to `cache`, in arguments and outputs).
"""

import copy
import json
import re
import warnings

import pytest
import torch
from transformers import AttentionInterface, AutoModelForCausalLM, DynamicCache, StaticCache
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.integrations.tensor_parallel import ALL_PARALLEL_STYLES

import mla_convert  # noqa: F401  (registers the MLA model with the Auto classes)
from mla_convert.convert import ConversionOptions, convert
from mla_modeling import MLAForCausalLM, MLALatentCacheLayer
from mla_modeling.modeling_mla import GENERATION_CACHE_ARGUMENT, cache_field

from conftest import load_causal_lm as load, relative_error, run_without_plugin, token_ids


SOURCE = "llama-gqa"
FORMS = ("expanded", "absorbed")


@pytest.fixture(scope="module")
def exact_folder(tmp_path_factory, pico_folders):
    output = tmp_path_factory.mktemp("contract") / "exact"
    convert(str(pico_folders[SOURCE]), output, ConversionOptions(kv_budget=1.0))
    return output


@pytest.fixture(scope="module")
def half_folder(tmp_path_factory, pico_folders, wikitext):
    output = tmp_path_factory.mktemp("contract") / "half"
    options = ConversionOptions(kv_budget=0.5, calibration=str(wikitext), calibration_tokens=2048)
    convert(str(pico_folders[SOURCE]), output, options)
    return output


def with_path(model: MLAForCausalLM, path: str) -> MLAForCausalLM:
    model.config.attention_path = path
    return model


def cache_of(outputs):
    """The cache an output holds: its `cache` field from transformers 5.24, `past_key_values` in 5.23 (this file runs
    on both: scripts/test_transformers_versions.sh)."""
    return getattr(outputs, cache_field(type(outputs)))


def greedy(**overrides) -> dict:
    """`generate()` arguments for greedy decoding to a fixed length; the attention mask is passed, not guessed from a
    pad token that random ids may hold."""
    return dict(do_sample=False, eos_token_id=None, pad_token_id=0, **overrides)


def ones(input_ids: torch.Tensor) -> torch.LongTensor:
    return torch.ones(input_ids.shape[:2], dtype=torch.long)


# ---------------------------------------------------------------------------------------------------- outputs


@pytest.mark.parametrize("path", FORMS)
def test_hidden_states_are_the_sources(pico_folders, exact_folder, path):
    source = load(pico_folders[SOURCE])
    model = with_path(load(exact_folder), path)
    input_ids = token_ids(2, 12)
    with torch.no_grad():
        expected = source(input_ids, output_hidden_states=True)
        outputs = model(input_ids, output_hidden_states=True)
    hidden_states = outputs.hidden_states
    assert len(hidden_states) == model.config.num_hidden_layers + 1
    assert all(state.shape == (2, 12, model.config.hidden_size) for state in hidden_states)
    for actual, reference in zip(hidden_states, expected.hidden_states):
        assert relative_error(actual, reference) < 1e-4
    # The last one is the normed output, as in Llama
    assert torch.equal(hidden_states[-1], model.model(input_ids).last_hidden_state)
    assert model(input_ids, output_hidden_states=False).hidden_states is None


@pytest.mark.parametrize("path", FORMS)
def test_attentions_are_the_sources(pico_folders, exact_folder, path):
    source = load(pico_folders[SOURCE], attn_implementation="eager")
    model = with_path(load(exact_folder, attn_implementation="eager"), path)
    input_ids = token_ids(2, 12)
    with torch.no_grad():
        expected = source(input_ids, output_attentions=True).attentions
        outputs = model(input_ids, output_attentions=True, use_cache=True)
        attentions = outputs.attentions
        # One decoding step over the cache: a row over every cached token
        step = model(token_ids(2, 1, seed=1), cache=cache_of(outputs), output_attentions=True).attentions
    assert len(attentions) == model.config.num_hidden_layers
    for actual, reference in zip(attentions, expected):
        assert actual.shape == (2, model.config.num_attention_heads, 12, 12)
        assert relative_error(actual, reference) < 1e-4
    assert [tuple(weights.shape) for weights in step] == [(2, model.config.num_attention_heads, 1, 13)] * 2
    assert torch.allclose(step[0].sum(-1), torch.ones(()))


def test_sdpa_reports_no_attentions_as_llama_does(pico_folders, exact_folder):
    source = load(pico_folders[SOURCE], attn_implementation="sdpa")
    model = load(exact_folder, attn_implementation="sdpa")
    input_ids = token_ids(1, 8)
    with torch.no_grad():
        attentions = model(input_ids, output_attentions=True).attentions
        assert attentions == source(input_ids, output_attentions=True).attentions


def test_return_dict_false_gives_a_tuple(exact_folder):
    model = load(exact_folder)
    input_ids = token_ids(1, 8)
    with torch.no_grad():
        outputs = model(input_ids, return_dict=False, use_cache=False)
    assert isinstance(outputs, tuple)
    assert torch.equal(outputs[0], model(input_ids).logits)


# ------------------------------------------------------------------------------------------ the cache argument


def test_the_cache_argument_and_its_deprecated_name(half_folder):
    model = load(half_folder)
    input_ids = token_ids(2, 10)
    with torch.no_grad():
        prefill = model(input_ids[:, :-1], use_cache=True)
        cache = cache_of(prefill)
        assert isinstance(cache.layers[0], MLALatentCacheLayer)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            expected = model(input_ids[:, -1:], cache=copy.deepcopy(cache)).logits
        with pytest.warns(FutureWarning, match="past_key_values"):
            actual = model(input_ids[:, -1:], past_key_values=cache).logits
    assert cache.get_seq_length() == 10
    assert torch.equal(actual, expected)


# ---------------------------------------------------------------------------------------------------- generation


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_generation_with_the_cache_equals_generation_without_it(half_folder, implementation):
    model = load(half_folder, attn_implementation=implementation)
    prompt = token_ids(2, 9, seed=2)
    kwargs = dict(max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)
    cached = model.generate(prompt, **kwargs)
    uncached = model.generate(prompt, use_cache=False, **kwargs)
    assert torch.equal(cached, uncached)
    with torch.no_grad():
        # Greedy: every generated token is the argmax of a full forward over what precedes it
        logits = model(cached[:, :-1]).logits
    assert torch.equal(logits[:, prompt.shape[1] - 1 :].argmax(-1), cached[:, prompt.shape[1] :])


@pytest.mark.parametrize("path", ["auto", "expanded"])
def test_generation_continues_from_a_returned_cache(pico_folders, exact_folder, path):
    # The cache argument under the installed transformers' name (`past_key_values` in 5.23, `cache` in 5.24), as
    # its own generation tests pass it
    source = load(pico_folders[SOURCE])
    model = with_path(load(exact_folder), path)
    prompt = token_ids(2, 8, seed=9)
    expected = source.generate(prompt, attention_mask=ones(prompt), **greedy(max_new_tokens=10))
    first = model.generate(
        prompt, attention_mask=ones(prompt), return_dict_in_generate=True, **greedy(max_new_tokens=4)
    )
    cache = cache_of(first)
    # The last token generated is not in the cache yet: the next call reads it first
    assert cache.get_seq_length() == first.sequences.shape[1] - 1
    with warnings.catch_warnings():
        # Nor does any step warn that the cache's name is deprecated (5.23's generate() hands forward its old name)
        warnings.simplefilter("error", FutureWarning)
        continued = model.generate(
            first.sequences,
            attention_mask=ones(first.sequences),
            **{GENERATION_CACHE_ARGUMENT: cache},
            **greedy(max_new_tokens=6),
        )
    assert torch.equal(continued, expected)
    assert torch.equal(model.generate(prompt, attention_mask=ones(prompt), **greedy(max_new_tokens=10)), expected)
    # Continued, the cache still holds only the latent and the RoPE key of every token
    config = model.config
    for layer_idx, layer in enumerate(cache.layers):
        assert isinstance(layer, MLALatentCacheLayer)
        assert layer.joint.shape == (2, 1, 17, config.kv_lora_ranks[layer_idx] + config.qk_rope_head_dim)


@pytest.mark.parametrize("assistant", ["same", "smaller", "prompt lookup"])
def test_assisted_decoding_equals_greedy_decoding(pico_folders, exact_folder, half_folder, assistant):
    # Assisted decoding drafts several tokens, checks them in one forward over the cache and crops the cache back
    # to the ones kept; the result is greedy decoding's, token for token. The smaller assistant (the half-budget
    # conversion) drafts tokens the model rejects, so the crop is exercised; the same model's drafts all pass.
    source = load(pico_folders[SOURCE])
    model = load(exact_folder)
    prompt = token_ids(1, 8, seed=10)
    # Repeated, so that prompt lookup finds n-grams to draft from
    prompt = torch.cat((prompt, prompt), dim=1)
    expected = source.generate(prompt, attention_mask=ones(prompt), **greedy(max_new_tokens=12))
    drafting = {
        "same": dict(assistant_model=model),
        "smaller": dict(assistant_model=load(half_folder)),
        "prompt lookup": dict(prompt_lookup_num_tokens=4),
    }[assistant]
    if assistant == "smaller":
        alone = drafting["assistant_model"].generate(prompt, attention_mask=ones(prompt), **greedy(max_new_tokens=12))
        assert not torch.equal(alone, expected)
    assisted = model.generate(prompt, attention_mask=ones(prompt), **drafting, **greedy(max_new_tokens=12))
    assert torch.equal(assisted, expected)


@pytest.mark.parametrize("cache_implementation", ["dynamic", "static"])
def test_generation_from_inputs_embeds_equals_the_sources(pico_folders, exact_folder, cache_implementation):
    # Embeddings no token has (a soft prompt): the MLA model continues them as Llama does
    source = load(pico_folders[SOURCE])
    model = load(exact_folder)
    prompt = token_ids(2, 8, seed=11)
    kwargs = greedy(max_new_tokens=8, cache_implementation=cache_implementation)
    with torch.no_grad():
        embeds = model.get_input_embeddings()(prompt)
        assert torch.equal(embeds, source.get_input_embeddings()(prompt))
        soft_prompt = embeds + 0.5 * torch.randn(embeds.shape, generator=torch.Generator().manual_seed(12))
    expected = source.generate(inputs_embeds=soft_prompt, attention_mask=ones(prompt), **kwargs)
    generated = model.generate(inputs_embeds=soft_prompt, attention_mask=ones(prompt), **kwargs)
    # Only the new tokens come back: no ids stand for the prompt
    assert generated.shape == (2, 8)
    assert torch.equal(generated, expected)
    # A token's own embeddings generate what its id does
    from_ids = model.generate(prompt, attention_mask=ones(prompt), **kwargs)
    from_embeds = model.generate(inputs_embeds=embeds, attention_mask=ones(prompt), **kwargs)
    assert torch.equal(from_embeds, from_ids[:, prompt.shape[1] :])
    assert not torch.equal(generated, from_embeds)


def test_generation_continues_from_inputs_embeds_and_a_returned_cache(pico_folders, exact_folder):
    # The second call gets the embeddings of the whole sequence and a cache of all but the last token: it reads
    # only the embeddings the cache lacks
    results = {}
    for name, folder in (("llama", pico_folders[SOURCE]), ("mla", exact_folder)):
        model = load(folder)
        with torch.no_grad():
            embeds = model.get_input_embeddings()(token_ids(2, 8, seed=13))
        first = model.generate(
            inputs_embeds=embeds, attention_mask=ones(embeds), return_dict_in_generate=True, **greedy(max_new_tokens=3)
        )
        with torch.no_grad():
            whole = torch.cat((embeds, model.get_input_embeddings()(first.sequences)), dim=1)
        continued = model.generate(
            inputs_embeds=whole,
            attention_mask=ones(whole),
            **{GENERATION_CACHE_ARGUMENT: cache_of(first)},
            **greedy(max_new_tokens=4),
        )
        uninterrupted = model.generate(inputs_embeds=embeds, attention_mask=ones(embeds), **greedy(max_new_tokens=7))
        assert torch.equal(torch.cat((first.sequences, continued), dim=1), uninterrupted), name
        results[name] = uninterrupted
    assert torch.equal(results["mla"], results["llama"])


def test_static_cache_generation_equals_the_dynamic_cache(half_folder):
    model = load(half_folder)
    prompt = token_ids(2, 9, seed=4)
    kwargs = dict(max_new_tokens=10, do_sample=False, eos_token_id=None, pad_token_id=0)
    static = model.generate(prompt, cache_implementation="static", **kwargs)
    assert torch.equal(static, model.generate(prompt, **kwargs))


def test_static_cache_offload_and_prefetch_keep_one_buffer(half_folder):
    model = load(half_folder)
    cache = StaticCache(config=model.config, max_cache_len=16)
    with torch.no_grad():
        model(token_ids(1, 6), cache=cache)
    layer = cache.layers[0]

    def views_of_the_buffer() -> bool:
        parts = (layer.keys, layer.values)
        return all(part._base is layer.buffer and part.device == layer.buffer.device for part in parts)

    layer.offload()
    assert views_of_the_buffer()
    # Prefetch brings the data back to the layer's device; the meta device stands in for an accelerator here.
    layer.device = torch.device("meta")
    layer.prefetch()
    assert layer.buffer.device.type == "meta" and views_of_the_buffer()


# ---------------------------------------------------------------------------------------------------- backends


@pytest.mark.parametrize("path", FORMS)
def test_eager_and_sdpa_agree(half_folder, path):
    input_ids = token_ids(2, 16, seed=5)
    results = {}
    for implementation in ("eager", "sdpa"):
        model = with_path(load(half_folder, attn_implementation=implementation), path)
        with torch.no_grad():
            prefill = model(input_ids[:, :12], use_cache=True)
            steps = [prefill.logits]
            for position in range(12, 16):
                steps.append(model(input_ids[:, position : position + 1], cache=cache_of(prefill)).logits)
        results[implementation] = torch.cat(steps, dim=1)
    assert relative_error(results["sdpa"], results["eager"]) < 1e-5


def test_a_registered_attention_function_is_the_one_called(half_folder):
    calls = []

    def counting_sdpa(module, query, key, value, attention_mask, **kwargs):
        calls.append(query.shape)
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register("counting_sdpa", counting_sdpa)
    expected_model = load(half_folder, attn_implementation="sdpa")
    model = load(half_folder, attn_implementation="counting_sdpa")
    input_ids = token_ids(1, 10)
    with torch.no_grad():
        prefill = model(input_ids[:, :-1], use_cache=True)
        logits = model(input_ids[:, -1:], cache=cache_of(prefill)).logits
        expected = expected_model(input_ids).logits[:, -1:]
    # Every layer at every step, in the expanded form: the absorbed form is not forced on an unknown backend
    assert len(calls) == 2 * model.config.num_hidden_layers
    assert all(shape[1] == model.config.num_attention_heads for shape in calls)
    assert relative_error(logits, expected) < 1e-5
    model.config.attention_path = "absorbed"
    with pytest.raises(ValueError, match="attention_path='absorbed'"), torch.no_grad():
        model(input_ids)


# ---------------------------------------------------------------------------------------------------- padding


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_a_left_padded_batch_equals_its_rows_alone(half_folder, implementation):
    model = load(half_folder, attn_implementation=implementation)
    rows = [token_ids(1, 11, seed=6), token_ids(1, 6, seed=7)]
    # left padding to the longest row
    input_ids = torch.zeros(2, 11, dtype=torch.long)
    attention_mask = torch.zeros(2, 11, dtype=torch.long)
    for index, row in enumerate(rows):
        input_ids[index, -row.shape[1] :] = row
        attention_mask[index, -row.shape[1] :] = 1
    kwargs = dict(max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0)
    with torch.no_grad():
        logits = model(input_ids, attention_mask=attention_mask).logits
        for index, row in enumerate(rows):
            alone = model(row).logits[0]
            assert relative_error(logits[index, -row.shape[1] :], alone) < 1e-5
    generated = model.generate(input_ids, attention_mask=attention_mask, **kwargs)
    for index, row in enumerate(rows):
        assert torch.equal(generated[index, 11:], model.generate(row, **kwargs)[0, row.shape[1] :])


# ---------------------------------------------------------------------------------------------------- training


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(half_folder):
    input_ids = token_ids(2, 12, seed=8)
    gradients = {}
    for checkpointing in (False, True):
        model = load(half_folder).train()
        if checkpointing:
            model.activation_checkpointing_enable()
        assert all(layer.gradient_checkpointing == checkpointing for layer in model.model.layers)
        loss = model(input_ids, labels=input_ids).loss
        loss.backward()
        gradients[checkpointing] = (loss.detach(), {name: p.grad for name, p in model.named_parameters()})
    assert torch.equal(gradients[True][0], gradients[False][0])
    for name, grad in gradients[False][1].items():
        assert grad is not None, name
        assert torch.allclose(gradients[True][1][name], grad, rtol=1e-5, atol=1e-7), name


def test_resize_token_embeddings(half_folder):
    model = load(half_folder)
    input_ids = token_ids(1, 10)
    with torch.no_grad():
        expected = model(input_ids).logits
    vocab = model.config.vocab_size
    model.resize_token_embeddings(vocab + 14)
    assert model.config.vocab_size == vocab + 14
    assert model.get_input_embeddings().weight.shape[0] == vocab + 14
    assert model.get_output_embeddings().weight.shape[0] == vocab + 14
    with torch.no_grad():
        logits = model(torch.cat((input_ids, torch.tensor([[vocab + 13]])), dim=1)).logits
    # The old tokens keep their logits; the new token is read
    assert relative_error(logits[:, :10, :vocab], expected) < 1e-6
    assert logits.shape[-1] == vocab + 14
    model.resize_token_embeddings(vocab)
    with torch.no_grad():
        assert relative_error(model(input_ids).logits, expected) < 1e-6


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_dtype_casts(half_folder, dtype):
    reference = load(half_folder)
    input_ids = token_ids(2, 10)
    with torch.no_grad():
        expected = reference(input_ids).logits
    for model in (copy.deepcopy(reference).to(dtype), AutoModelForCausalLM.from_pretrained(half_folder, dtype=dtype)):
        assert all(p.dtype == dtype for p in model.parameters())
        with torch.no_grad():
            logits = model(input_ids).logits
        assert logits.dtype == dtype
        assert relative_error(logits.float(), expected) < 0.05
        # Greedy decoding over the cache in this dtype picks, at every step, the argmax of a full forward (no cache)
        # over what precedes it: up to the dtype's rounding, since the two paths round differently and a near-tie
        # may go either way in half precision
        generated = model.generate(input_ids[:, :6], max_new_tokens=4, do_sample=False, eos_token_id=None)
        with torch.no_grad():
            # full: [batch, 9, vocab] float32
            full = model(generated[:, :-1], use_cache=False).logits.float()
        assert torch.equal(generated[:, :6], input_ids[:, :6])
        # picked, best: [batch, 4]
        picked = full[:, 5:].gather(-1, generated[:, 6:, None]).squeeze(-1)
        best = full[:, 5:].max(-1).values
        assert (best - picked <= 8 * torch.finfo(dtype).eps * best.abs().clamp_min(1)).all(), (best, picked)


# ---------------------------------------------------------------------------------------------------- save and load


def test_save_load_round_trip(half_folder, tmp_path):
    model = load(half_folder)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    # Rebuilt from `num_hidden_layers` on load; left out so that the folder's config also loads as a plain one
    assert "layer_types" not in saved
    loaded = load(tmp_path)
    assert loaded.config.layer_types == model.config.layer_types
    assert loaded.config.kv_lora_ranks == model.config.kv_lora_ranks
    assert set(loaded.state_dict()) == set(model.state_dict())
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    input_ids = token_ids(2, 12)
    kwargs = dict(max_new_tokens=6, do_sample=False, eos_token_id=None)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids).logits, model(input_ids).logits)
    assert torch.equal(loaded.generate(input_ids, **kwargs), model.generate(input_ids, **kwargs))


def test_the_tokenizer_loads_without_the_plugin_or_remote_code(exact_folder, pico_folders, tmp_path):
    # No answer to transformers' question whether to run the folder's code (stdin is empty): the tokenizer must
    # load without it.
    result = run_without_plugin(
        f"""
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained({str(exact_folder)!r})
        source = AutoTokenizer.from_pretrained({str(pico_folders[SOURCE])!r})
        text = "The quick brown fox"
        assert tokenizer(text).input_ids == source(text).input_ids, (tokenizer(text), source(text))
        assert not any(name.startswith("transformers_modules") for name in sys.modules)
        print("tokenizer OK", type(tokenizer).__name__)
        """,
        hf_home=tmp_path / "hf-home",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "tokenizer OK" in result.stdout


# ------------------------------------------------------------------------------------------ tensor parallelism


def test_the_tensor_parallel_plan_matches_the_modules(half_folder):
    model = load(half_folder)
    config = model.config
    modules = dict(model.model.named_modules())
    for pattern, style in config.base_model_tp_plan.items():
        regex = pattern.replace(".", r"\.").replace("*", r"\d+")
        matched = [module for name, module in modules.items() if re.fullmatch(regex, name)]
        assert len(matched) == config.num_hidden_layers, pattern
        for module in matched:
            if style == "colwise":
                assert module.out_features % 2 == 0, pattern
            elif style == "rowwise":
                assert module.in_features % 2 == 0, pattern
    heads = config.num_attention_heads
    for layer in model.model.layers:
        attention = layer.self_attn
        # A split of the heads' rows (q_proj, kv_b_proj) and of o_proj's columns into 2 or 4 equal parts keeps
        # whole heads together, and the same heads on every projection.
        assert attention.q_proj.out_features == heads * config.qk_head_dim
        assert attention.kv_b_proj.out_features == heads * (config.qk_nope_head_dim + config.v_head_dim)
        assert attention.o_proj.in_features == heads * config.v_head_dim
    # What `shard` below does to a layer is what the plan asks: the heads' rows of q_proj and kv_b_proj, their
    # columns of o_proj
    styles = {pattern.split(".")[-1]: style for pattern, style in config.base_model_tp_plan.items()}
    assert (styles["q_proj"], styles["kv_b_proj"], styles["o_proj"]) == ("colwise", "colwise", "rowwise")
    # and every style is one transformers knows how to apply
    assert set(config.base_model_tp_plan.values()) <= set(ALL_PARALLEL_STYLES), config.base_model_tp_plan
    assert set(config.base_model_pp_plan) == {"embed_tokens", "layers", "norm"}
    assert set(MLAForCausalLM._tp_plan) == set(MLAForCausalLM._pp_plan) == {"lm_head"}


def shard(attention, rank: int, world_size: int):
    """What tensor parallelism leaves on `rank`: its heads' rows of q_proj and kv_b_proj, their columns of o_proj
    (bias on one rank: the sum over ranks adds it once), and a forward replaced on each sharded projection."""
    attention = copy.deepcopy(attention)
    heads = attention.num_heads // world_size
    picked = slice(rank * heads, (rank + 1) * heads)
    widths = {"q_proj": attention.qk_head_dim, "kv_b_proj": attention.qk_nope_head_dim + attention.v_head_dim}
    for name, width in widths.items():
        full = getattr(attention, name)
        local = torch.nn.Linear(full.in_features, heads * width, bias=full.bias is not None)
        local.weight.data = full.weight.data.view(attention.num_heads, width, -1)[picked].reshape(heads * width, -1)
        if full.bias is not None:
            local.bias.data = full.bias.data.view(attention.num_heads, width)[picked].reshape(-1)
        setattr(attention, name, local)
    full = attention.o_proj
    local = torch.nn.Linear(heads * attention.v_head_dim, full.out_features, bias=full.bias is not None)
    local.weight.data = full.weight.data.view(full.out_features, attention.num_heads, -1)[:, picked].reshape(
        full.out_features, -1
    )
    if full.bias is not None:
        local.bias.data = full.bias.data if rank == 0 else torch.zeros_like(full.bias.data)
    attention.o_proj = local
    for name in ("q_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"):
        projection = getattr(attention, name)
        projection.forward = projection.forward  # as tensor-parallel styles do: an instance-level forward
    attention._drop_folded()
    return attention


@pytest.mark.parametrize("path", FORMS)
def test_attention_with_its_heads_split_sums_to_the_whole(half_folder, path):
    model = with_path(load(half_folder), path)
    attention = model.model.layers[1].self_attn
    hidden_states = torch.randn(2, 9, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    position_ids = torch.arange(9)[None]
    rope = model.model.rotary_emb(hidden_states, position_ids)
    causal = torch.full((9, 9), torch.finfo(torch.float32).min).triu(1)[None, None]
    with torch.no_grad():
        expected = attention(hidden_states, rope, attention_mask=causal)[0]
        ranks = [shard(attention, rank, 2) for rank in range(2)]
        assert all(rank._fold_sources() is None for rank in ranks)
        actual = sum(rank(hidden_states, rope, attention_mask=causal)[0] for rank in ranks)
        # And decoding over a cache each rank keeps whole (the latent is not split)
        caches = [DynamicCache(config=model.config) for _ in ranks]
        for rank, cache in zip(ranks, caches):
            rank(hidden_states[:, :-1], rope_slice(rope, slice(0, 8)), attention_mask=causal[..., :8, :8], cache=cache)
        step = sum(
            rank(hidden_states[:, -1:], rope_slice(rope, slice(8, 9)), attention_mask=None, cache=cache)[0]
            for rank, cache in zip(ranks, caches)
        )
    assert relative_error(actual, expected) < 1e-5
    assert relative_error(step, expected[:, -1:]) < 1e-5


def rope_slice(rope, positions: slice):
    return tuple(table[:, positions] for table in rope)
