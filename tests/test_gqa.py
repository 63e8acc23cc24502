"""The GQA baseline on pico checkpoints: mean-pooled KV heads, an ordinary model folder, errors with valid values."""

import copy
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig

from mla_convert.cli import main
from mla_convert.errors import MLAConvertError
from mla_convert.gqa import convert_to_gqa, pool_kv_heads, valid_gqa_budgets

from conftest import PICO_ARCHITECTURES, assert_clean_failure, leftovers, load_causal_lm as load, run_cli, token_ids


ARCHITECTURES = list(PICO_ARCHITECTURES)
HEAD_DIM = 16  # hidden 64 / 4 query heads


def grouped_mean(tensor: torch.Tensor, new_heads: int) -> torch.Tensor:
    """The reference pooling, written independently: heads are consecutive blocks of HEAD_DIM rows."""
    heads = list(tensor.split(HEAD_DIM, dim=0))
    group = len(heads) // new_heads
    return torch.cat([torch.stack(heads[j * group : (j + 1) * group]).mean(0) for j in range(new_heads)], dim=0)


def expand_heads(pooled: torch.Tensor, group: int) -> torch.Tensor:
    """Repeat each pooled head `group` times, back to the source's head count."""
    heads = pooled.split(HEAD_DIM, dim=0)
    return torch.cat([head for head in heads for _ in range(group)], dim=0)


@pytest.fixture(scope="module")
def mha_pooled(tmp_path_factory, pico_folders) -> Path:
    output = tmp_path_factory.mktemp("gqa") / "llama-mha-2"
    convert_to_gqa(str(pico_folders["llama-mha"]), output, num_kv_heads=2)
    return output


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_same_head_count_gives_the_source_logits(tmp_path, pico_folders, name):
    source_heads = PICO_ARCHITECTURES[name][2]
    report = convert_to_gqa(str(pico_folders[name]), tmp_path / "out", kv_budget=1.0)
    assert report["num_kv_heads_before"] == report["num_kv_heads_after"] == source_heads
    assert report["kv_budget"] == 1.0
    source, pooled = load(pico_folders[name]), load(tmp_path / "out")
    assert type(pooled) is type(source)
    input_ids = token_ids(2, 40)
    with torch.no_grad():
        assert torch.equal(pooled(input_ids).logits, source(input_ids).logits)


def test_mha_pooled_weights_are_the_group_means(pico_folders, mha_pooled):
    source, pooled = load(pico_folders["llama-mha"]), load(mha_pooled)
    assert pooled.config.num_key_value_heads == 2
    for source_layer, pooled_layer in zip(source.model.layers, pooled.model.layers, strict=True):
        for projection in ("k_proj", "v_proj"):
            expected = grouped_mean(getattr(source_layer.self_attn, projection).weight, 2)
            torch.testing.assert_close(getattr(pooled_layer.self_attn, projection).weight, expected)
        # Query heads and o_proj untouched.
        for projection in ("q_proj", "o_proj"):
            assert torch.equal(
                getattr(pooled_layer.self_attn, projection).weight, getattr(source_layer.self_attn, projection).weight
            )


def averaged_heads(source: torch.nn.Module, new_heads: int) -> torch.nn.Module:
    """The source with each KV head replaced by its group's mean, keeping every head: what pooling must compute."""
    averaged = copy.deepcopy(source)
    group = source.config.num_key_value_heads // new_heads
    with torch.no_grad():
        for layer in averaged.model.layers:
            for projection in (layer.self_attn.k_proj, layer.self_attn.v_proj):
                projection.weight.copy_(expand_heads(grouped_mean(projection.weight, new_heads), group))
    return averaged


def test_mha_pooled_computes_the_source_with_averaged_heads(pico_folders, mha_pooled):
    """Query head h must read the mean of its own group: the source with each KV head replaced by its group's
    mean (still 4 KV heads) computes exactly what the pooled 2-head model computes."""
    source, pooled = load(pico_folders["llama-mha"]), load(mha_pooled)
    averaged = averaged_heads(source, 2)
    input_ids = token_ids(2, 50)
    with torch.no_grad():
        expected = averaged(input_ids).logits
        actual = pooled(input_ids).logits
        original = source(input_ids).logits
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(actual, original, atol=1e-3)  # pooling did change the model


def test_mha_pooled_has_the_smaller_cache_and_generates(pico_folders, mha_pooled):
    pooled = load(mha_pooled)
    input_ids = token_ids(3, 20)
    with torch.no_grad():
        cache = pooled(input_ids, use_cache=True).past_key_values
    assert len(cache.layers) == 2
    for layer in cache.layers:
        assert layer.keys.shape == (3, 2, 20, HEAD_DIM)
        assert layer.values.shape == (3, 2, 20, HEAD_DIM)
    # generation over that smaller cache is the averaged source's
    kwargs = dict(attention_mask=torch.ones_like(input_ids[:1]), max_new_tokens=12, do_sample=False, eos_token_id=None)
    expected = averaged_heads(load(pico_folders["llama-mha"]), 2).generate(input_ids[:1], **kwargs)
    assert torch.equal(pooled.generate(input_ids[:1], **kwargs), expected)
    report = json.loads((mha_pooled / "conversion.json").read_text())
    assert report["method"] == "gqa-mean-pool"
    assert (report["num_kv_heads_before"], report["num_kv_heads_after"], report["kv_budget"]) == (4, 2, 0.5)
    # 2 (K and V) x kv heads x head_dim x 2 layers
    assert report["cache"]["source_numbers_per_token"] == 2 * 4 * HEAD_DIM * 2
    assert report["cache"]["gqa_numbers_per_token"] == 2 * 2 * HEAD_DIM * 2
    assert report["cache"]["gqa_bytes_per_token"] == 4 * report["cache"]["gqa_numbers_per_token"]
    for name in ("config.json", "model.safetensors", "tokenizer.json", "generation_config.json"):
        assert (mha_pooled / name).exists(), name


def test_pooled_folder_loads_without_mla_convert(mha_pooled):
    config = json.loads((mha_pooled / "config.json").read_text())
    assert config["model_type"] == "llama" and config["num_key_value_heads"] == 2 and "auto_map" not in config
    assert not list(mha_pooled.glob("*.py"))
    script = (
        "import sys, torch\n"
        "from transformers import AutoModelForCausalLM\n"
        f"model = AutoModelForCausalLM.from_pretrained({str(mha_pooled)!r}).eval()\n"
        "assert type(model).__name__ == 'LlamaForCausalLM'\n"
        "assert model.model.layers[0].self_attn.k_proj.weight.shape == (32, 64)\n"
        "model(torch.tensor([[1, 2, 3]]))\n"
        "assert not any(name.startswith(('mla_convert', 'mla_modeling')) for name in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600,
                            cwd=mha_pooled)
    assert result.returncode == 0, result.stderr


def test_in_place_pooling_matches_the_saved_model(pico_folders, tmp_path):
    """qwen2 (biased k/v, tied embeddings), pooled to one KV head: biases are pooled too, and the model pooled in
    memory computes what its saved and reloaded copy computes."""
    source = load(pico_folders["qwen2"])
    model = load(pico_folders["qwen2"])
    assert pool_kv_heads(model, 1) is model
    assert model.config.num_key_value_heads == 1
    for source_layer, layer in zip(source.model.layers, model.model.layers, strict=True):
        for projection in ("k_proj", "v_proj"):
            for part in ("weight", "bias"):
                expected = grouped_mean(getattr(getattr(source_layer.self_attn, projection), part), 1)
                torch.testing.assert_close(getattr(getattr(layer.self_attn, projection), part), expected)
    convert_to_gqa(str(pico_folders["qwen2"]), tmp_path / "out", kv_budget=0.5)
    reloaded = load(tmp_path / "out")
    assert reloaded.config.num_key_value_heads == 1
    input_ids = token_ids(2, 30)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids).logits, reloaded(input_ids).logits, rtol=0, atol=0)


def test_valid_budgets(pico_folders):
    assert valid_gqa_budgets(AutoConfig.from_pretrained(pico_folders["llama-mha"])) == [0.25, 0.5, 1.0]
    assert valid_gqa_budgets(AutoConfig.from_pretrained(pico_folders["llama-gqa"])) == [0.5, 1.0]


@pytest.mark.parametrize("count", [3, 0, -2, 8])
def test_invalid_head_count_lists_the_valid_ones(tmp_path, pico_folders, count):
    with pytest.raises(MLAConvertError, match=r"valid counts: 1, 2, 4$") as error:
        convert_to_gqa(str(pico_folders["llama-mha"]), tmp_path / "out", num_kv_heads=count)
    assert "\n" not in str(error.value)
    assert not (tmp_path / "out").exists()
    model = load(pico_folders["llama-gqa"])
    with pytest.raises(MLAConvertError, match=r"valid counts: 1, 2$"):
        pool_kv_heads(model, 4 if count == 8 else count)
    assert model.config.num_key_value_heads == 2  # a refused pooling changes nothing


@pytest.mark.parametrize("budget", [0.3, 0.75, 1.5, 0.0, -0.5, math.nan])
def test_invalid_budget_lists_the_valid_ones(tmp_path, pico_folders, budget):
    with pytest.raises(MLAConvertError, match=r"valid budgets: 0.25, 0.5, 1$") as error:
        convert_to_gqa(str(pico_folders["llama-mha"]), tmp_path / "out", kv_budget=budget)
    assert "\n" not in str(error.value)
    assert not (tmp_path / "out").exists()


def test_count_and_budget_are_exclusive(tmp_path, pico_folders):
    for kwargs in ({}, {"num_kv_heads": 2, "kv_budget": 0.5}):
        with pytest.raises(MLAConvertError, match="either --num-kv-heads or --kv-budget"):
            convert_to_gqa(str(pico_folders["llama-mha"]), tmp_path / "out", **kwargs)


def test_existing_output_needs_overwrite(tmp_path, pico_folders):
    output = tmp_path / "out"
    output.mkdir()
    (output / "precious.txt").write_text("keep me")
    with pytest.raises(MLAConvertError, match="--overwrite"):
        convert_to_gqa(str(pico_folders["mistral"]), output, num_kv_heads=1)
    assert [path.name for path in output.iterdir()] == ["precious.txt"]
    assert (output / "precious.txt").read_text() == "keep me"

    # a previous result is replaced with --overwrite, and only with it
    previous = tmp_path / "previous"
    convert_to_gqa(str(pico_folders["llama-mha"]), previous, num_kv_heads=2)
    (previous / "stale.txt").write_text("old")
    with pytest.raises(MLAConvertError, match="--overwrite"):
        convert_to_gqa(str(pico_folders["llama-mha"]), previous, num_kv_heads=1)
    assert load(previous).config.num_key_value_heads == 2
    convert_to_gqa(str(pico_folders["llama-mha"]), previous, num_kv_heads=1, overwrite=True)
    assert not (previous / "stale.txt").exists()
    assert load(previous).config.num_key_value_heads == 1
    assert leftovers(tmp_path) == []


def test_cli_round_trip(tmp_path, pico_folders, wikitext, capsys):
    source, output = str(pico_folders["llama-gqa"]), tmp_path / "gqa"
    assert main(["gqa", source, str(output), "--kv-budget", "0.5"]) == 0
    printed = capsys.readouterr().out
    assert "KV heads: 2 -> 1" in printed and "budget 0.500" in printed
    report = json.loads((output / "conversion.json").read_text())
    assert report["requested"] == {"num_kv_heads": None, "kv_budget": 0.5}
    assert report["num_kv_heads_after"] == 1

    # The baseline goes through the same evaluation as an MLA conversion.
    results_file = tmp_path / "eval.json"
    assert main(["eval", str(output), "--data", str(wikitext), "--reference", source, "--seq-len", "64",
                 "--max-tokens", "256", "--json", str(results_file)]) == 0
    results = json.loads(results_file.read_text())
    # pooling to one KV head changed the model, and eval sees it against the source; the source against itself
    # scores no difference
    assert results["kl"] > 0.01 and results["top1_agreement"] < 1
    assert results["perplexity"] != pytest.approx(results["reference_perplexity"], rel=1e-3)
    # an existing results file is replaced only when asked (it is one eval wrote)
    assert main(["eval", source, "--data", str(wikitext), "--reference", source, "--seq-len", "64",
                 "--max-tokens", "256", "--json", str(results_file), "--overwrite"]) == 0
    itself = json.loads(results_file.read_text())
    assert itself["kl"] == pytest.approx(0, abs=1e-6) and itself["top1_agreement"] == 1
    assert itself["perplexity"] == pytest.approx(results["reference_perplexity"], rel=1e-6)
    capsys.readouterr()
    assert main(["generate", str(output), "Hello", "--max-new-tokens", "3"]) == 0
    assert capsys.readouterr().out.strip()

    # Bad input: one line, exit code 2, the output left as it was.
    capsys.readouterr()
    assert main(["gqa", source, str(tmp_path / "bad"), "--num-kv-heads", "3"]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and error.startswith("mla-convert: error:") and "valid counts: 1, 2" in error
    assert main(["gqa", source, str(output), "--num-kv-heads", "1"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_cli_exit_code_and_help(tmp_path, pico_folders):
    result = run_cli("gqa", str(pico_folders["qwen2"]), str(tmp_path / "out"), "--kv-budget", "0.3")
    assert_clean_failure(result, "valid budgets: 0.5, 1")
    assert not (tmp_path / "out").exists()

    result = run_cli("gqa", "--help")
    assert result.returncode == 0
    for fragment in ("--num-kv-heads", "--kv-budget", "--gguf-file", "--overwrite", "baseline", "mean"):
        assert fragment in result.stdout
