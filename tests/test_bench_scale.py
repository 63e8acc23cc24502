"""scripts/bench_scale.py's synthetic sources and its reading of the scale targets (nothing timed here: the bench's
figures come from running it)."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoTokenizer, LlamaForCausalLM


SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_scale.py"
MEASURED = Path(__file__).resolve().parents[1] / "docs" / "bench_scale.json"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_scale", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_synthetic_source_loads_in_bf16_with_its_shards_and_tokenizer(bench, tmp_path):
    folder, _ = bench.build_source(tmp_path, "tiny", 2, seed=0)
    shape = bench.SHAPES["tiny"]
    assert sorted(p.name for p in folder.glob("*.safetensors")) == [
        "embed.safetensors", "head.safetensors", "layer-00000.safetensors", "layer-00001.safetensors"
    ]
    with safe_open(folder / "layer-00001.safetensors", framework="pt") as f:
        assert all(name.startswith("model.layers.1.") for name in f.keys())
    model = LlamaForCausalLM.from_pretrained(folder)
    assert model.dtype == torch.bfloat16 and model.config.num_hidden_layers == 2
    assert model.config.rope_parameters["rope_type"] == "llama3"
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert len(tokenizer) == shape["vocab_size"]
    ids = tokenizer("Streaming conversion, one layer at a time.", return_tensors="pt").input_ids
    assert int(ids.max()) < 256
    std = float(model.model.layers[0].mlp.up_proj.weight.detach().float().std())
    assert abs(std - bench.INIT_STD) < 0.002
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()
    # what the memory estimate of the rows of earlier runs is computed from: the headers' own sizes
    from mla_convert.memory import SourceSizes

    assert bench.synthetic_sizes("tiny", 2) == vars(SourceSizes.of(folder))


def test_fewer_layers_are_the_first_layers_of_the_full_source_hard_linked(bench, tmp_path):
    full, _ = bench.build_source(tmp_path, "tiny", bench.SHAPES["tiny"]["num_hidden_layers"], seed=0)
    half, _ = bench.build_source(tmp_path, "tiny", 1, seed=0)
    for name in ("embed.safetensors", "layer-00000.safetensors", "head.safetensors"):
        assert (half / name).stat().st_ino == (full / name).stat().st_ino
    assert not (half / "layer-00001.safetensors").exists()
    assert bench.build_source(tmp_path, "tiny", 1, seed=0) == (half, 0.0)  # complete: not rebuilt


def row(shape, layers, peak, **extra):
    return {"kind": "synthetic", "shape": shape, "layers": layers, "calibration_tokens": 2048, "peak_rss_gb": peak,
            "hidden": {"8b": 4096, "1b": 2048}[shape], **extra}


def test_targets_are_read_from_the_rows_or_reported_as_not_measured(bench):
    assert all("not measured" in line for line in bench.targets([]))
    lines = bench.targets([row("8b", 32, 5.2), row("8b", 16, 5.0), row("1b", 16, 2.0)])
    assert "met (5.20 GB at most, rows of 16, 32 layers)" in lines[0]
    assert "8b (--target mla), peak RSS against layers (2,048 calibration tokens): flat" in lines[1]
    lines = bench.targets([row("8b", 32, 7.5), row("8b", 16, 4.0)])
    assert "NOT met" in lines[0] and "GROWS" in lines[1]
    smol = [
        {"kind": "smollm2", "streaming_option": option, "perplexity": ppl, "max_weight_difference": 0.0}
        for option, ppl in (("on", 21.1234), ("off", 21.1236))
    ]
    assert "NOT met" in bench.targets(smol)[-1]
    smol[1]["perplexity"] = 21.1231
    assert "met (21.123 vs 21.123" in bench.targets(smol)[-1]


def test_the_memory_estimate_is_within_15_percent_of_every_measured_peak(bench):
    """mla_convert.memory's estimate against the peaks measured by this script (docs/bench_scale.json): 1B- and
    8B-shaped sources at several depths, both targets, SmolLM2 held in memory and streamed."""
    rows = json.loads(MEASURED.read_text())["rows"]
    estimated = [(bench.row_estimate(row), row) for row in rows]
    assert sum(estimate is not None for estimate, _ in estimated) >= 7
    assert {row.get("streaming", True) for estimate, row in estimated if estimate is not None} == {True, False}
    for estimate, row in estimated:
        if estimate is not None:
            label = (row["shape"], row["layers"], row.get("target", "mla"), row.get("streaming_option", "on"))
            assert estimate == pytest.approx(row["peak_rss_gb"], rel=bench.ESTIMATE_TOLERANCE), label
