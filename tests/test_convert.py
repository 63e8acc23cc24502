"""Conversion and serving on pico checkpoints: exactness, both attention forms, the latent cache, generation."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import mla_convert  # noqa: F401  (registers the MLA model with the Auto classes)
from mla_convert.convert import ConversionOptions, convert
from mla_modeling import MLALatentCacheLayer

from conftest import (
    PICO_ARCHITECTURES,
    convert_pico,
    load_causal_lm as load,
    prefill_and_decode,
    relative_error,
    token_ids,
)


ARCHITECTURES = list(PICO_ARCHITECTURES)


def converted(tmp_path_factory, pico_folders, wikitext, name: str, budget: float):
    return convert_pico(tmp_path_factory, pico_folders[name], name, budget, wikitext)[0]


@pytest.fixture(scope="session")
def exact_folders(tmp_path_factory, pico_folders, wikitext):
    return {name: converted(tmp_path_factory, pico_folders, wikitext, name, 1.0) for name in ARCHITECTURES}


@pytest.fixture(scope="session")
def half_folders(tmp_path_factory, pico_folders, wikitext):
    return {name: converted(tmp_path_factory, pico_folders, wikitext, name, 0.5) for name in ARCHITECTURES}


TEXT_IDS = torch.tensor([list(b"The quick brown fox jumps over the lazy dog near the river bank.")])
UNIFORM_KL = float(torch.log(torch.tensor(258.0)))  # KL of a model that knew nothing, on the pico vocabulary


def kl_to_source(source, model, input_ids: torch.LongTensor) -> float:
    """Mean KL(source || model) per position, in nats."""
    with torch.no_grad():
        log_p = source(input_ids).logits.log_softmax(-1)
        log_q = model(input_ids).logits.log_softmax(-1)
    return float((log_p.exp() * (log_p - log_q)).sum(-1).mean())


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_full_budget_logits_equal_the_source(pico_folders, exact_folders, name):
    source = load(pico_folders[name])
    model = load(exact_folders[name])
    assert type(model).__name__ == "MLAForCausalLM"
    input_ids = token_ids(2, 200)
    with torch.no_grad():
        expected = source(input_ids).logits
        actual = model(input_ids).logits
    assert relative_error(actual, expected) < 1e-4


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_full_budget_greedy_generation_equals_the_source(pico_folders, exact_folders, name):
    source = load(pico_folders[name])
    model = load(exact_folders[name])
    prompt = token_ids(1, 12, seed=3)
    expected = source.generate(prompt, max_new_tokens=30, do_sample=False, eos_token_id=None)
    actual = model.generate(prompt, max_new_tokens=30, do_sample=False, eos_token_id=None)
    assert torch.equal(actual, expected)


@pytest.mark.parametrize("name", ARCHITECTURES)
@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_absorbed_and_expanded_forms_agree(half_folders, name, implementation):
    model = load(half_folders[name], attn_implementation=implementation)
    input_ids = token_ids(2, 40)
    logits = {}
    for path in ("expanded", "absorbed"):
        model.config.attention_path = path
        # prefill 30 tokens, then decode the rest one at a time over the cache
        logits[path] = prefill_and_decode(model, input_ids, 30)[0]
    assert relative_error(logits["absorbed"], logits["expanded"]) < 1e-5


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_compressed_model_stays_close_to_the_source(pico_folders, half_folders, name):
    """Not exact below full budget, but a working conversion keeps most next-token choices."""
    source = load(pico_folders[name])
    model = load(half_folders[name])
    report = json.loads((half_folders[name] / "conversion.json").read_text())
    assert report["kv_budget"] == pytest.approx(0.5, abs=0.01)
    assert kl_to_source(source, model, TEXT_IDS) < 0.5 * UNIFORM_KL


def test_cache_is_taken_under_either_name(half_folders):
    # transformers 5.24 passes the cache as `cache=`, earlier versions as `past_key_values=`: decoding must read it
    # either way (a forward that ignored one name would attend to the new token alone).
    model = load(half_folders["llama-gqa"])
    input_ids = token_ids(2, 20, seed=5)
    with torch.no_grad():
        expected = model(input_ids).logits[:, -1]
        for name in ("cache", "past_key_values"):
            cache = model(input_ids[:, :-1], use_cache=True).past_key_values
            logits = model(input_ids[:, -1:], use_cache=True, **{name: cache}).logits[:, -1]
            torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)
            assert cache.get_seq_length() == input_ids.shape[1]


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_cache_holds_only_the_latent_and_rope_key(half_folders, name):
    model = load(half_folders[name])
    config = model.config
    input_ids = token_ids(3, 17)
    with torch.no_grad():
        cache = model(input_ids, use_cache=True).past_key_values
    assert len(cache.layers) == config.num_hidden_layers
    for layer_idx, layer in enumerate(cache.layers):
        assert isinstance(layer, MLALatentCacheLayer)
        assert layer.latent.shape == (3, 1, 17, config.kv_lora_ranks[layer_idx])
        assert layer.rope_key.shape == (3, 1, 17, config.qk_rope_head_dim)
    cached_numbers = sum(layer.latent.numel() + layer.rope_key.numel() for layer in cache.layers)
    per_token = sum(rank + config.qk_rope_head_dim for rank in config.kv_lora_ranks)
    assert cached_numbers == 3 * 17 * per_token
    report = json.loads((half_folders[name] / "conversion.json").read_text())
    assert report["cache"]["mla_numbers_per_token"] == per_token
    assert per_token <= 0.5 * report["cache"]["source_numbers_per_token"]


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_greedy_generation_with_cache_equals_recomputation(half_folders, name):
    model = load(half_folders[name])
    prompt = token_ids(2, 9, seed=5)
    with_cache = model.generate(prompt, max_new_tokens=25, do_sample=False, eos_token_id=None)
    without_cache = model.generate(prompt, max_new_tokens=25, do_sample=False, eos_token_id=None, use_cache=False)
    assert torch.equal(with_cache, without_cache)


def test_beam_search_with_cache_equals_recomputation(half_folders):
    model = load(half_folders["llama-gqa"])
    prompt = token_ids(2, 8, seed=6)
    kwargs = dict(max_new_tokens=15, num_beams=3, do_sample=False, eos_token_id=None)
    assert torch.equal(model.generate(prompt, **kwargs), model.generate(prompt, use_cache=False, **kwargs))


def test_seeded_sampling_is_reproducible_and_matches_recomputation(half_folders):
    model = load(half_folders["qwen2"])
    prompt = token_ids(2, 8, seed=7)
    runs = []
    for use_cache in (True, True, False):
        torch.manual_seed(123)
        runs.append(model.generate(prompt, max_new_tokens=20, do_sample=True, top_k=0, eos_token_id=None, use_cache=use_cache))
    assert torch.equal(runs[0], runs[1])
    assert torch.equal(runs[0], runs[2])


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_left_padded_batch_matches_each_prompt_alone(half_folders, implementation):
    model = load(half_folders["llama-gqa"], attn_implementation=implementation)
    pad = 257
    short, long = [72, 101, 108, 108, 111], [84, 104, 101, 32, 113, 117, 105, 99, 107]
    batch = torch.tensor([[pad] * (len(long) - len(short)) + short, long])
    attention_mask = (torch.arange(len(long))[None, :] >= torch.tensor([[len(long) - len(short)], [0]])).long()
    generated = model.generate(
        batch, attention_mask=attention_mask, max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=pad
    )
    for row, prompt in enumerate((short, long)):
        alone = model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=None)
        assert torch.equal(generated[row, -12:], alone[0, -12:])


def test_assisted_decoding_crops_the_cache(half_folders, exact_folders):
    """Assisted generation rolls rejected draft tokens back with `Cache.crop`."""
    model = load(half_folders["llama-mha"])
    assistant = load(exact_folders["llama-mha"])
    prompt = token_ids(1, 10, seed=8)
    plain = model.generate(prompt, max_new_tokens=20, do_sample=False, eos_token_id=None)
    assisted = model.generate(prompt, max_new_tokens=20, do_sample=False, eos_token_id=None, assistant_model=assistant)
    assert torch.equal(assisted, plain)


def test_data_free_calibration_samples_from_the_source(tmp_path, pico_folders):
    """Without text, calibration samples from the source itself, seeded: the same conversion every time, and one
    that stays close to the source."""
    settings = ConversionOptions(kv_budget=0.5, calibration_tokens=1024, calibration_seq_len=64)
    outputs = [tmp_path / "sampled", tmp_path / "again"]
    report = convert(str(pico_folders["llama-gqa"]), outputs[0], settings)
    assert report["calibration"]["kind"] == "sampled"
    assert report["calibration"]["sampler"] == "layer by layer"
    assert report["calibration"]["tokens"] >= 1024
    saved = json.loads((outputs[0] / "conversion.json").read_text())
    assert saved["calibration"]["kind"] == "sampled"
    convert(str(pico_folders["llama-gqa"]), outputs[1], settings)
    model, again = load(outputs[0]), load(outputs[1])
    assert model.config.kv_lora_ranks == report["kv_lora_ranks"]
    expected = again.state_dict()
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, expected[name]), name
    assert kl_to_source(load(pico_folders["llama-gqa"]), model, TEXT_IDS) < 0.5 * UNIFORM_KL


def test_explicit_ranks_are_honoured(tmp_path, pico_folders, wikitext):
    output = tmp_path / "ranks"
    options = ConversionOptions(
        kv_budget=None, kv_lora_rank=20, qk_rope_head_dim=12, calibration=str(wikitext), calibration_tokens=2048
    )
    convert(str(pico_folders["mistral"]), output, options)
    config = load(output).config
    assert config.kv_lora_ranks == [20, 20]
    assert config.qk_rope_head_dim == 12
    assert all(len(indices) == 6 for indices in config.rope_frequency_indices)


def test_bfloat16_conversion_loads_in_bfloat16(tmp_path, pico_folders):
    """In bfloat16 the exact conversion is as close to the float32 source as the source itself in bfloat16."""
    output = tmp_path / "bf16"
    convert(str(pico_folders["llama-gqa"]), output, ConversionOptions(kv_budget=1.0, dtype="bfloat16"))
    model = AutoModelForCausalLM.from_pretrained(output).eval()
    assert model.dtype == torch.bfloat16
    source = load(pico_folders["llama-gqa"])
    source_bf16 = AutoModelForCausalLM.from_pretrained(pico_folders["llama-gqa"], dtype=torch.bfloat16).eval()
    input_ids = token_ids(2, 64)
    with torch.no_grad():
        expected = source(input_ids).logits
        rounding = relative_error(source_bf16(input_ids).logits.float(), expected)
        assert relative_error(model(input_ids).logits.float(), expected) <= 2 * rounding


def test_static_cache_generation_matches_the_dynamic_cache(half_folders):
    model = load(half_folders["qwen2"])
    prompt = token_ids(2, 7, seed=9)
    dynamic = model.generate(prompt, max_new_tokens=12, do_sample=False, eos_token_id=None)
    static = model.generate(prompt, max_new_tokens=12, do_sample=False, eos_token_id=None, cache_implementation="static")
    assert torch.equal(static, dynamic)


def test_cache_grows_amortised_and_stays_close_to_what_it_holds(half_folders):
    """Decoding must not copy the whole cache at every step, nor hold much more memory than the tokens need."""
    model = load(half_folders["llama-gqa"])
    input_ids = token_ids(2, 300, seed=10)
    with torch.no_grad():
        cache = model(input_ids[:, :100], use_cache=True).past_key_values
        reallocations = 0
        for position in range(100, 300):
            before = cache.layers[0].buffer.data_ptr()
            model(input_ids[:, position : position + 1], past_key_values=cache, use_cache=True)
            reallocations += cache.layers[0].buffer.data_ptr() != before
    layer = cache.layers[0]
    assert layer.get_seq_length() == 300
    assert reallocations <= 20
    assert layer.capacity <= 1.1 * 300 + layer.growth_granularity
    model.config.attention_path = "expanded"
    with torch.no_grad():
        expanded_logits = model(input_ids).logits[:, -1]
    model.config.attention_path = "auto"
    with torch.no_grad():
        cache.crop(-1)
        absorbed_logits = model(input_ids[:, -1:], past_key_values=cache, use_cache=True).logits[:, -1]
    assert relative_error(absorbed_logits, expanded_logits) < 1e-5


def module_imports(package) -> dict[str, set[str]]:
    """Every module of `package` and the modules of the package it imports (at any depth of its code)."""
    import ast
    from pathlib import Path

    root = Path(package.__file__).parent
    names = {}
    for path in root.rglob("*.py"):
        parts = path.relative_to(root.parent).with_suffix("").parts
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph = {}
    for name, path in names.items():
        here = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        imported = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = here.split(".")[: len(here.split(".")) - node.level + 1] if node.level else []
                module = ".".join(base + ([node.module] if node.module else []))
                for alias in node.names:
                    imported |= {candidate for candidate in (f"{module}.{alias.name}", module) if candidate in names}
            elif isinstance(node, ast.Import):
                imported |= {alias.name for alias in node.names if alias.name in names}
        graph[name] = imported - {name}
    return graph


def test_the_converter_has_no_import_cycles():
    """One pipeline of plain modules: no module of mla_convert imports, however indirectly, one that imports it."""
    graph = module_imports(mla_convert)
    cycles = []

    def visit(name: str, path: list[str]) -> None:
        for imported in graph[name]:
            if imported in path:
                cycles.append(path[path.index(imported) :] + [imported])
            elif imported not in seen:
                seen.add(imported)
                visit(imported, path + [imported])

    for start in graph:
        seen = {start}
        visit(start, [start])
    assert cycles == []
