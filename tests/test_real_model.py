"""The real SmolLM2-135M-Instruct (GQA: 9 query heads, 3 kv heads), converted and checked against itself.

Run alone with `python -m pytest -m real_model`.
"""

from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer

import mla_convert  # noqa: F401
from mla_convert.convert import ConversionOptions, convert
from mla_convert.data import EVALUATION_PART, load_text, tokenize_into_sequences
from mla_convert.evaluate import evaluate

from conftest import load_causal_lm, relative_error, smollm2_gguf


pytestmark = pytest.mark.real_model

QUESTION = "What is the capital of France?"


@pytest.fixture(scope="module")
def source(smollm2_folder):
    return load_causal_lm(smollm2_folder)


@pytest.fixture(scope="module")
def tokenizer(smollm2_folder):
    return AutoTokenizer.from_pretrained(smollm2_folder)


@pytest.fixture(scope="module")
def held_out(tokenizer, wikitext):
    text, _ = load_text(str(wikitext), EVALUATION_PART)
    return tokenize_into_sequences(tokenizer, text, seq_len=512, max_tokens=16384)


def chat(tokenizer, model, question: str, max_new_tokens: int = 24) -> torch.LongTensor:
    inputs = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return output[0, inputs["input_ids"].shape[1] :]


def test_full_budget_smollm2_equals_the_source(tmp_path, smollm2_folder, source, tokenizer, held_out):
    output = tmp_path / "exact"
    report = convert(str(smollm2_folder), output, ConversionOptions(kv_budget=1.0))
    assert report["exact"] and report["cache"]["mla_numbers_per_token"] == report["cache"]["source_numbers_per_token"]
    model = load_causal_lm(output)
    with torch.no_grad():
        expected = source(held_out[:1, :256]).logits
        actual = model(held_out[:1, :256]).logits
    assert relative_error(actual, expected) < 1e-4
    assert torch.equal(chat(tokenizer, model, QUESTION), chat(tokenizer, source, QUESTION))


def test_half_budget_smollm2_keeps_quality(tmp_path, smollm2_folder, source, tokenizer, held_out, wikitext):
    output = tmp_path / "half"
    report = convert(str(smollm2_folder), output, ConversionOptions(kv_budget=0.5, calibration=str(wikitext)))
    assert report["cache"]["mla_numbers_per_token"] * 2 == report["cache"]["source_numbers_per_token"]
    model = load_causal_lm(output)

    answer = tokenizer.decode(chat(tokenizer, model, QUESTION), skip_special_tokens=True)
    assert "Paris" in answer, answer

    # Calibrated on the first 80% of the text, evaluated on the last 20%, with the default options (refinement
    # included): perplexity within 1.3x of the source's (the promised quality at half the cache).
    results = evaluate(model, held_out, reference=source, progress=False)
    assert results["perplexity"] <= 1.3 * results["reference_perplexity"], results
    assert results["top1_agreement"] > 0.7, results
    before = sum(layer["refine_error_before"] for layer in report["layers"])
    assert sum(layer["refine_error_after"] for layer in report["layers"]) < 0.9 * before


@pytest.mark.parametrize("target, budget", [("mla", 1.0), ("deepseek", 0.5)])
def test_the_gguf_file_and_its_float_folder_convert_to_the_same_weights(tmp_path, smollm2_folder, wikitext, target, budget):
    """One pipeline whatever the layer source: the shipped GGUF file (held in memory) and the float folder dequantized
    from it (read layer by layer from its shards) give the same weights, bit for bit."""
    options = ConversionOptions(
        kv_budget=budget, target=target, calibration=str(wikitext), calibration_tokens=1024, refine_tokens=1024,
        refine_steps=2,
    )  # fmt: skip
    from_gguf = convert(str(smollm2_gguf()), tmp_path / "gguf", replace(options, streaming="auto"))
    from_shards = convert(str(smollm2_folder), tmp_path / "shards", replace(options, streaming="on"))
    assert from_gguf["streaming"] is False and from_shards["streaming"] is True
    expected, actual = load_file(tmp_path / "gguf" / "model.safetensors"), load_file(tmp_path / "shards" / "model.safetensors")
    assert set(actual) == set(expected)
    for name, tensor in expected.items():
        assert torch.equal(actual[name], tensor), name
    assert from_gguf["verification"] == from_shards["verification"]
