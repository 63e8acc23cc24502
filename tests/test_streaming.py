"""The conversion's one pipeline over each layer source: the source read from its safetensors shards one layer at a
time (`--streaming on`) gives the weights of the source held in memory (`--streaming off`), bit for bit.

Sources: 3-layer pico checkpoints, one float32 in one file, one Qwen2 (biases, tied embeddings) stored in bfloat16,
and one Mistral written in several shards with an index.
"""

import json
import re
import signal
import subprocess
import sys
import weakref
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import mla_convert  # noqa: F401  (registers the MLA model with the Auto classes)
from mla_convert import settings, stream
from mla_convert.convert import ConversionOptions, convert, source_stream
from mla_convert.errors import MLAConvertError
from mla_convert.sampling import sample_from_model, sample_layer_by_layer
from mla_convert.sources import load_source

from conftest import (
    assert_clean_failure, build_pico, byte_tokenizer, leftovers, load_causal_lm, relative_error, run_cli, token_ids,
)  # fmt: skip


@pytest.fixture(scope="session")
def sources(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("stream-sources")
    tokenizer = byte_tokenizer()
    folders = {"float32": root / "float32", "bfloat16": root / "bfloat16", "sharded": root / "sharded"}
    build_pico("llama-gqa", num_layers=3).save_pretrained(folders["float32"])
    build_pico("qwen2", num_layers=3).to(torch.bfloat16).save_pretrained(folders["bfloat16"])
    build_pico("mistral", num_layers=3).save_pretrained(folders["sharded"], max_shard_size="60KB")
    for folder in folders.values():
        tokenizer.save_pretrained(folder)
    assert (folders["sharded"] / "model.safetensors.index.json").is_file()
    return folders


def weights(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a saved model, whether in one file or in shards."""
    tensors = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(path, framework="pt") as f:
            tensors.update({name: f.get_tensor(name) for name in f.keys()})
    return tensors


def options(budget: float, calibration: Path, **overrides) -> ConversionOptions:
    settings = dict(
        kv_budget=budget, calibration=str(calibration), calibration_tokens=1024, calibration_seq_len=128,
        refine_tokens=1024, refine_steps=0,
    )  # fmt: skip
    return ConversionOptions(**{**settings, **overrides})


def convert_both(source: Path, output: Path, conversion: ConversionOptions) -> tuple[dict, dict]:
    whole = convert(str(source), output / "whole", replace(conversion, streaming="off"))
    streamed = convert(str(source), output / "streamed", replace(conversion, streaming="on"))
    assert whole["streaming"] is False and streamed["streaming"] is True
    return whole, streamed


def assert_same_weights(expected_folder: Path, actual_folder: Path) -> None:
    """Bit for bit: every tensor, and the files that describe the model."""
    expected, actual = weights(expected_folder), weights(actual_folder)
    assert set(actual) == set(expected)
    for name, tensor in expected.items():
        assert actual[name].dtype == tensor.dtype, name
        assert torch.equal(actual[name], tensor), name
    for name in ("config.json", "generation_config.json", "tokenizer.json"):
        assert (actual_folder / name).read_text() == (expected_folder / name).read_text(), name


SETTINGS = {
    # at full budget both are exact
    "exact": dict(budget=1.0),
    # below it: calibration text, the K/V balance search, latent sizes by spectrum, refinement
    "compressed": dict(budget=0.5, key_scale="search", rank_allocation="spectrum", refine_steps=10),
    # saved in bfloat16: the shards are written in the saved dtype
    "svd-refined": dict(budget=0.5, init="svd", key_scale=1.0, refine_steps=5, dtype="bfloat16"),
    # sequential refinement: the converted model's own hidden states carried through the layers
    "sequential": dict(budget=0.5, key_scale=1.0, refine_steps=10, refine_inputs="converted"),
}


@pytest.mark.parametrize("setting", list(SETTINGS))
@pytest.mark.parametrize("kind", ["float32", "bfloat16", "sharded"])
def test_streaming_gives_the_whole_model_paths_weights_and_logits(tmp_path, sources, wikitext, kind, setting):
    budget, overrides = SETTINGS[setting]["budget"], {k: v for k, v in SETTINGS[setting].items() if k != "budget"}
    whole, streamed = convert_both(sources[kind], tmp_path, options(budget, wikitext, **overrides))

    assert streamed["kv_lora_ranks"] == whole["kv_lora_ranks"]
    assert [layer.get("key_scale_factor") for layer in streamed["layers"]] == [
        layer.get("key_scale_factor") for layer in whole["layers"]
    ]
    assert_same_weights(tmp_path / "whole", tmp_path / "streamed")
    assert streamed["verification"] == whole["verification"]

    ids = token_ids(2, 48)
    with torch.no_grad():
        logits = load_causal_lm(tmp_path / "streamed")(ids).logits
        assert relative_error(logits, load_causal_lm(tmp_path / "whole")(ids).logits) < 1e-4
        if setting == "exact":
            assert relative_error(logits, load_causal_lm(sources[kind])(ids).logits) < 1e-4
    if setting in ("compressed", "sequential"):
        assert all("refine_error_after" in layer for layer in streamed["layers"])
        assert streamed["settings"]["refine_inputs"] == overrides.get("refine_inputs", "source")


def family_sources(root: Path) -> dict[str, Path]:
    """Qwen2 with a local (16-token window, shorter than the 128-token calibration windows) and a full layer, a
    Phi-3 with fused projections, partial RoPE and longrope, and a Qwen3 (QK-norm, head_dim 24 != hidden / heads)."""
    from test_families_phi3 import build_phi3
    from test_sliding_window import build_windowed

    from test_families import build_qwen3

    folders = {"qwen2-sliding": root / "qwen2-sliding", "phi3": root / "phi3", "qwen3": root / "qwen3"}
    build_windowed("qwen2").save_pretrained(folders["qwen2-sliding"])
    build_phi3("phi3-gqa-partial-longrope").save_pretrained(folders["phi3"])
    build_qwen3("qwen3-gqa").save_pretrained(folders["qwen3"])
    for folder in folders.values():
        byte_tokenizer().save_pretrained(folder)
    return folders


@pytest.mark.parametrize("budget", [1.0, 0.5])
@pytest.mark.parametrize("kind", ["float32", "sharded"])
def test_the_deepseek_target_streams_with_the_in_memory_sources_weights(tmp_path, sources, wikitext, kind, budget):
    """--target deepseek, layer by layer: the anchor and the latent norm's weight are measured per layer on the
    carried activations, the same whichever source the layers come from."""
    conversion = options(budget, wikitext, target="deepseek", key_scale="search", refine_steps=5)
    whole, streamed = convert_both(sources[kind], tmp_path, conversion)
    assert_same_weights(tmp_path / "whole", tmp_path / "streamed")
    assert json.loads((tmp_path / "streamed" / "config.json").read_text())["kv_latent_norm"] is True
    assert len(set(streamed["kv_lora_ranks"])) == 1
    assert all("latent_anchor" in layer and "refine_error_after" in layer for layer in streamed["layers"])
    assert streamed["settings"]["streaming_reason"] == "--streaming on"


def test_a_streamed_deepseek_conversion_exports_and_loads_as_deepseek_v3(tmp_path, sources, wikitext):
    """The road to a serving engine: convert --target deepseek from the shards, export, load in transformers' own
    DeepseekV3ForCausalLM (without the plugin), and compute what the converted folder computes."""
    from test_export import EXPORT_TOLERANCE, run_native

    argv = ["convert", str(sources["sharded"]), str(tmp_path / "mla"), "--target", "deepseek", "--kv-budget", "0.5",
            "--streaming", "on", "--calibration", str(wikitext), "--calibration-tokens", "1024",
            "--refine-tokens", "1024", "--refine-steps", "5",
            # This pico model's latent norm (weight about 84) amplifies float32 rounding about 300x: on the weights
            # that bfloat16 steps reach, the export and the converted folder differ by 1.12e-4 against a tolerance
            # of 1e-4, on float32's by less. What is tested is the export's fidelity, on the float32 steps' weights.
            "--refine-precision", "float32"]  # fmt: skip
    result = run_cli(*argv)
    assert result.returncode == 0, result.stderr
    assert "converted layer by layer (streaming)" in result.stdout
    result = run_cli("export", str(tmp_path / "mla"), str(tmp_path / "deepseek"), "--format", "deepseek-v3")
    assert result.returncode == 0, result.stderr
    ids = token_ids(2, 48, seed=7)
    native = run_native(tmp_path / "deepseek", ids, tmp_path)
    assert native["class"] == "DeepseekV3ForCausalLM"
    with torch.no_grad():
        logits = load_causal_lm(tmp_path / "mla")(input_ids=ids).logits
    assert relative_error(native["logits"], logits) <= EXPORT_TOLERANCE


@pytest.mark.parametrize("budget", [1.0, 0.5])
@pytest.mark.parametrize("kind", ["qwen2-sliding", "phi3", "qwen3"])
def test_streaming_follows_the_families_sliding_windows_fused_projections_and_qk_norm(tmp_path, wikitext, kind, budget):
    source = family_sources(tmp_path / "sources")[kind]
    conversion = options(budget, wikitext, key_scale="search", rank_allocation="spectrum", refine_steps=10)
    whole, streamed = convert_both(source, tmp_path, conversion)
    assert streamed["kv_lora_ranks"] == whole["kv_lora_ranks"]
    assert_same_weights(tmp_path / "whole", tmp_path / "streamed")
    ids = token_ids(1, 96)  # past the window and past Phi-3's original context
    with torch.no_grad():
        logits = load_causal_lm(tmp_path / "streamed")(ids).logits
        assert relative_error(logits, load_causal_lm(tmp_path / "whole")(ids).logits) < 1e-4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_streaming_on_cuda_gives_the_whole_model_paths_weights(tmp_path, sources, wikitext):
    """--device cuda: one layer at a time on the GPU, the same result as the whole model on the GPU."""
    conversion = options(0.5, wikitext, device="cuda", key_scale="search", refine_steps=10)
    whole, streamed = convert_both(sources["bfloat16"], tmp_path, conversion)
    assert streamed["kv_lora_ranks"] == whole["kv_lora_ranks"]
    expected, actual = weights(tmp_path / "whole"), weights(tmp_path / "streamed")
    assert set(actual) == set(expected)
    for name, tensor in expected.items():
        assert relative_error(actual[name].float(), tensor.float()) < 1e-3, name


def test_the_report_records_peak_memory_and_time_per_stage(tmp_path, sources, wikitext):
    report = convert(
        str(sources["float32"]), tmp_path / "out", options(0.5, wikitext, streaming="on", refine_steps=2)
    )
    assert report == json.loads((tmp_path / "out" / "conversion.json").read_text())
    assert report["peak_rss_bytes"] > 0 and report["process_peak_rss_bytes"] > 0
    stages = report["seconds_per_stage"]
    assert {"spectrum pass", "read", "calibrate", "decompose", "key-scale search", "refine", "verify", "write"} <= set(stages)
    whole = convert(str(sources["float32"]), tmp_path / "whole", options(0.5, wikitext, streaming="off", refine_steps=2))
    assert whole["peak_rss_bytes"] > 0 and {"load", "read", "calibrate", "verify"} <= set(whole["seconds_per_stage"])


def test_sharded_output_has_an_index_and_loads(tmp_path, sources, wikitext):
    output = tmp_path / "out"
    report = convert(str(sources["float32"]), output, options(0.5, wikitext, streaming="on", max_shard_size="40KB"))
    shards = sorted(path.name for path in output.glob("*.safetensors"))
    assert len(shards) > 1 and all(re.fullmatch(rf"model-\d{{5}}-of-{len(shards):05d}\.safetensors", s) for s in shards)
    index = json.loads((output / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    tensors = weights(output)
    assert set(index["weight_map"]) == set(tensors)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())

    convert(str(sources["float32"]), tmp_path / "whole", options(0.5, wikitext, streaming="off"))
    ids = token_ids(2, 40)
    with torch.no_grad():
        logits = load_causal_lm(output)(ids).logits
        assert relative_error(logits, load_causal_lm(tmp_path / "whole")(ids).logits) < 1e-5
    assert report["kv_budget"] == pytest.approx(0.5, abs=0.01)


@pytest.mark.parametrize("kind", ["bfloat16", "sharded"])
def test_streaming_holds_one_source_layer_at_a_time_in_its_stored_dtype(tmp_path, sources, wikitext, monkeypatch, kind):
    """Every tensor read from the source is tracked until it is freed: at no read is more than one layer alive."""
    alive: dict[int, int] = {}
    most_alive_layers, dtypes = [0], set()
    read = stream.LazySource.read

    def tracked_read(self, name):
        tensor = read(self, name)
        dtypes.add(tensor.dtype)
        match = re.match(r"model\.layers\.(\d+)\.", name)
        if match:
            layer = int(match.group(1))
            alive[layer] = alive.get(layer, 0) + 1
            weakref.finalize(tensor, lambda: alive.__setitem__(layer, alive[layer] - 1))
            most_alive_layers[0] = max(most_alive_layers[0], sum(1 for count in alive.values() if count > 0))
        return tensor

    monkeypatch.setattr(stream.LazySource, "read", tracked_read)
    convert(str(sources[kind]), tmp_path / "out", options(0.5, wikitext, streaming="on", refine_steps=2))
    assert most_alive_layers[0] == 1
    assert dtypes == {torch.bfloat16 if kind == "bfloat16" else torch.float32}


def test_auto_holds_the_source_in_memory_only_when_its_estimated_peak_fits(tmp_path, sources, wikitext, monkeypatch):
    """auto decides on the conversion's peak estimated with the source in memory (`memory.estimate_peak`: the
    interpreter, the activations and the source), not on the source's weights alone (a few kB here): a source whose
    estimate is above 60% of the available memory is read from its shards, one whose estimate is under it is held
    in memory; conversion.json records both estimates beside the measured peak, and the reason quotes them."""

    class Memory:
        available = 10 * 2**30

    monkeypatch.setattr(settings.psutil, "virtual_memory", lambda: Memory)
    conversion = options(0.5, wikitext)
    roomy = convert(str(sources["float32"]), tmp_path / "roomy", conversion)
    estimate = roomy["estimated_peak_bytes"]
    assert roomy["streaming"] is False and roomy["settings"]["streaming_reason"].startswith("auto: the source fits")
    assert set(estimate) == {"in_memory", "streamed"} and min(estimate.values()) > 0
    assert f"{estimate['in_memory'] / 2**30:.1f} GiB" in roomy["settings"]["streaming_reason"]
    assert roomy["process_peak_rss_bytes"] > 0  # the measured peak beside it

    Memory.available = int(estimate["in_memory"] / settings.AUTO_MEMORY_SHARE * 0.99)  # just too little
    tight = convert(str(sources["float32"]), tmp_path / "tight", conversion)
    assert tight["streaming"] is True and "would not fit" in tight["settings"]["streaming_reason"]
    assert tight["estimated_peak_bytes"] == estimate
    Memory.available = int(estimate["in_memory"] / settings.AUTO_MEMORY_SHARE * 1.01)  # just enough
    enough = convert(str(sources["float32"]), tmp_path / "enough", conversion)
    assert enough["streaming"] is False
    for name in ("roomy", "tight", "enough"):
        assert json.loads((tmp_path / name / "conversion.json").read_text())["estimated_peak_bytes"] == estimate
    # data-free calibration samples layer by layer from either source: auto decides on memory alone
    Memory.available = int(estimate["in_memory"] / settings.AUTO_MEMORY_SHARE * 0.99)
    sampled = convert(str(sources["float32"]), tmp_path / "sampled", replace(options(0.5, wikitext), calibration=None))
    assert sampled["streaming"] is True and "would not fit" in sampled["settings"]["streaming_reason"]
    assert sampled["calibration"]["kind"] == "sampled"


# ------------------------------------------------------------------------- data-free calibration, layer by layer


@pytest.fixture(scope="session")
def family_folders(tmp_path_factory) -> dict[str, Path]:
    return family_sources(tmp_path_factory.mktemp("stream-families"))


# Every kind of source: float32 in one file, bfloat16 on disk, several shards, a sliding-window layer (rows longer
# than its window), Phi-3's longrope (rows longer than its original context: `generate` runs the row again there),
# QK-norm.
SAMPLED_KINDS = ["float32", "bfloat16", "sharded", "qwen2-sliding", "phi3", "qwen3"]


@pytest.mark.parametrize("kind", SAMPLED_KINDS)
def test_sampling_layer_by_layer_gives_generates_rows_token_for_token(sources, family_folders, kind):
    """Data-free calibration text sampled one layer at a time, from the model in memory or from its shards, is
    `generate`'s (`sample_from_model`), token for token, and leaves the caller's random state alone."""
    folder = {**sources, **family_folders}[kind]
    model, tokenizer = load_source(str(folder))
    # 7 rows of 48 tokens in batches of 3 (the last one short)
    expected = sample_from_model(model, tokenizer, num_tokens=300, seq_len=48, seed=3, batch_size=3, progress=False)
    assert expected.shape == (7, 48)
    before = torch.get_rng_state()
    for streaming in ("off", "on"):
        conversion = ConversionOptions(kv_budget=0.5, streaming=streaming)
        stream_, tokenizer = source_stream(str(folder), conversion, progress=False)
        assert isinstance(stream_.reader, stream.LazySource) is (streaming == "on")
        rows = sample_layer_by_layer(stream_, tokenizer, 300, 48, seed=3, batch_size=3, progress=False)
        assert torch.equal(rows, expected), streaming
    assert torch.equal(torch.get_rng_state(), before)
    other = sample_layer_by_layer(stream_, tokenizer, num_tokens=300, seq_len=48, seed=4, batch_size=3, progress=False)
    assert not torch.equal(other, expected)


@pytest.mark.parametrize("kind", ["float32", "bfloat16", "sharded", "phi3"])
def test_data_free_calibration_streams_with_the_in_memory_sources_weights(tmp_path, sources, family_folders, kind):
    """--streaming on without --calibration: the text is sampled layer by layer from the shards, and the conversion
    is the in-memory source's, bit for bit."""
    conversion = ConversionOptions(
        kv_budget=0.5, calibration_tokens=512, calibration_seq_len=64, refine_tokens=512, refine_steps=5,
        key_scale="search", rank_allocation="spectrum",
    )  # fmt: skip
    whole, streamed = convert_both({**sources, **family_folders}[kind], tmp_path, conversion)
    assert_same_weights(tmp_path / "whole", tmp_path / "streamed")
    for report in (whole, streamed):
        assert report["calibration"]["kind"] == "sampled" and report["calibration"]["tokens"] == 512
        assert report["calibration"]["sampler"] == "layer by layer"
    assert streamed["verification"] == whole["verification"]


def test_data_free_streaming_on_the_command_line_shows_its_progress(tmp_path, sources):
    """The sampler's progress bar counts every layer of every generated token, so a long sampling moves."""
    output = tmp_path / "out"
    result = run_cli("convert", str(sources["sharded"]), str(output), "--kv-budget", "0.5", "--streaming", "on",
                     "--calibration-tokens", "256", "--refine-steps", "0")  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "converted layer by layer (streaming)" in result.stdout
    # one row of 256 tokens: 255 generated tokens through 3 layers
    assert "Sampling calibration text (layer by layer)" in result.stderr and "765/765" in result.stderr
    report = json.loads((output / "conversion.json").read_text())
    assert report["calibration"]["sampler"] == "layer by layer" and report["settings"]["streaming"] is True


@pytest.mark.skipif(not Path("/proc/self/maps").is_file(), reason="reads the process's memory map (Linux)")
@pytest.mark.parametrize("kind", ["bfloat16", "sharded"])
def test_sampling_from_the_shards_holds_one_layer_and_maps_no_shard(sources, monkeypatch, kind):
    """Every layer is read again at every generated token: into the same buffers (one layer's), through open files,
    never by mapping a shard into the process's memory."""
    folder = sources[kind]
    storages, mapped = set(), []  # mapped: per layer read, the regions of the source's files mapped then
    read, layer = stream.RepeatedLayers.read, stream.RepeatedLayers.layer

    def tracked_read(self, reader, name, slot):
        tensor = read(self, reader, name, slot)
        storages.add(tensor.untyped_storage().data_ptr())
        return tensor

    def tracked_layer(self, layer_idx):
        module = layer(self, layer_idx)
        mapped.append({line for line in Path("/proc/self/maps").read_text().splitlines() if str(folder) in line})
        return module

    monkeypatch.setattr(stream.RepeatedLayers, "read", tracked_read)
    monkeypatch.setattr(stream.RepeatedLayers, "layer", tracked_layer)
    stream_, tokenizer = source_stream(str(folder), ConversionOptions(kv_budget=0.5, streaming="on"), progress=False)
    # 2 rows of 32 tokens in one batch: 31 steps through 3 layers
    sample_layer_by_layer(stream_, tokenizer, num_tokens=64, seq_len=32, seed=0, batch_size=2, progress=False)
    per_layer = sum(1 for name in stream_.reader.weight_map if name.startswith("model.layers.0."))
    assert len(storages) == per_layer
    # what was mapped before the first layer (the embedding matrix, read whole) stays; no layer maps anything more
    assert len(mapped) == 31 * 3 and all(regions <= mapped[0] for regions in mapped)


def test_a_failed_streaming_conversion_leaves_nothing_behind(tmp_path, sources, wikitext):
    """NaN in the last layer is found only when that layer is read, after the first layers were written."""
    source = tmp_path / "nan"
    build_pico("llama-gqa", num_layers=3).save_pretrained(source, max_shard_size="60KB")
    byte_tokenizer().save_pretrained(source)
    index = json.loads((source / "model.safetensors.index.json").read_text())["weight_map"]
    from safetensors.torch import load_file, save_file

    shard = source / index["model.layers.2.mlp.up_proj.weight"]
    state = load_file(shard)
    state["model.layers.2.mlp.up_proj.weight"][0, 0] = float("nan")
    save_file(state, shard, metadata={"format": "pt"})
    with pytest.raises(MLAConvertError, match="NaN"):
        convert(str(source), tmp_path / "out", options(1.0, wikitext, streaming="on", max_shard_size="30KB"))
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


KILLED = """
import os, signal, sys
from mla_convert import stream
from mla_convert.cli import main

flush = stream.ShardWriter.flush
def flush_then_die(self):
    flush(self)
    if len(self.shards) == 2:  # the first layers are on disk, the rest is not
        os.kill(os.getpid(), signal.SIGKILL)

stream.ShardWriter.flush = flush_then_die
sys.exit(main(sys.argv[1:]))
"""


def test_a_killed_streaming_conversion_leaves_no_output_and_the_next_run_cleans_up(tmp_path, sources, wikitext):
    argv = ["convert", str(sources["sharded"]), str(tmp_path / "out"), "--kv-budget", "1.0", "--streaming", "on",
            "--max-shard-size", "30KB"]  # fmt: skip
    killed = subprocess.run([sys.executable, "-c", KILLED, *argv], capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert not (tmp_path / "out").exists()
    assert leftovers(tmp_path), "the killed run's staging folder should be there for the next run to remove"
    result = run_cli(*argv)
    assert result.returncode == 0, result.stderr
    assert leftovers(tmp_path) == []
    assert (tmp_path / "out" / "model.safetensors.index.json").is_file()
    assert "converted layer by layer (streaming); peak memory" in result.stdout


def test_the_spectrum_passs_layer_files_are_removed_and_a_killed_runs_by_the_next_run(tmp_path, sources, wikitext):
    """The spectrum pass keeps each layer's calibration pass and decomposition on disk for the main pass, beside the
    output: gone after the conversion, and after a kill in the main pass gone with the next run."""
    argv = ["convert", str(sources["sharded"]), str(tmp_path / "out"), "--kv-budget", "0.5", "--streaming", "on",
            "--calibration", str(wikitext), "--calibration-tokens", "1024", "--refine-steps", "2",
            "--max-shard-size", "30KB"]  # fmt: skip
    killed = subprocess.run([sys.executable, "-c", KILLED, *argv], capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    # the files of the layers not yet converted are still there, in a folder the next run knows as its own
    assert list(tmp_path.glob(".out.partial-*/layer-*.pt"))
    result = run_cli(*argv)
    assert result.returncode == 0, result.stderr
    assert leftovers(tmp_path) == [] and sorted(path.name for path in tmp_path.iterdir()) == ["out"]


def test_streaming_refuses_what_it_cannot_do_in_one_line(tmp_path, sources, wikitext):
    result = run_cli("convert", str(sources["float32"]), str(tmp_path / "out"), "--kv-budget", "0.5", "--streaming", "on",
                     "--calibration", str(wikitext), "--max-shard-size", "lots")  # fmt: skip
    assert_clean_failure(result, "--max-shard-size must be a size")
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_streaming_leaves_its_inputs_byte_for_byte(tmp_path, sources, wikitext):
    """The streamed source is read shard by shard, lazily: neither it nor the calibration text may change."""

    def contents(paths: list[Path]) -> dict[Path, bytes]:
        return {path: path.read_bytes() for path in paths}

    inputs = sorted(path for path in sources["sharded"].rglob("*") if path.is_file()) + [Path(wikitext)]
    before = contents(inputs)
    convert(str(sources["sharded"]), tmp_path / "out", options(0.5, wikitext, streaming="on", refine_steps=2))
    after_paths = sorted(path for path in sources["sharded"].rglob("*") if path.is_file()) + [Path(wikitext)]
    assert after_paths == inputs
    assert contents(after_paths) == before
    # data-free: every layer is read again at every sampled token, through files kept open, and written nowhere
    data_free = replace(options(0.5, wikitext, streaming="on", refine_steps=2), calibration=None, calibration_tokens=256)
    convert(str(sources["sharded"]), tmp_path / "free", data_free)
    assert contents(sorted(path for path in sources["sharded"].rglob("*") if path.is_file()) + [Path(wikitext)]) == before
    assert sorted(path.name for path in tmp_path.iterdir()) == ["free", "out"]


def test_the_per_layer_latent_norm_is_the_whole_models_where_both_see_the_same_activations(pico_folders):
    """Layer 0 reads the embeddings in the source and in the MLA model alike: there the anchor and the norm measured
    on one layer's inputs (the pipeline's way) equal those measured through the whole MLA model."""
    from mla_convert.calibrate import collect_input_moments
    from mla_convert.decompose import DecomposeOptions, decompose_all
    from mla_convert.deepseek import check_deepseek_rope, deepseek_closed_form, latent_rms, with_latent_norm
    from mla_convert.deepseek import with_layer_latent_norm
    from mla_convert.plan import RankPlan, SourceShape

    source = load_causal_lm(pico_folders["llama-gqa"])
    shape = SourceShape.from_config(source.config)
    ids = token_ids(8, 64, seed=1)
    rank, rope_dim = 24, 8
    for anchor in (True, False):
        whole = deepseek_closed_form(source, source.config, rank, rope_dim, ids, latent_anchor=anchor)
        whole = with_latent_norm(whole, latent_rms(whole, ids))
        frequencies = check_deepseek_rope(source, shape.head_dim, rope_dim)
        plan = RankPlan([rank] * shape.num_layers, rope_dim, shape.cache_per_layer, False, frequencies)
        moments, _ = collect_input_moments(source, ids)
        options = DecomposeOptions(rope_frequencies=frequencies)
        plain = decompose_all(source, shape, moments, plan, options, progress=False)[0]
        with torch.no_grad():
            inputs = source.model.layers[0].input_layernorm(source.model.embed_tokens(ids))
        layer = with_layer_latent_norm(plain, moments[0], lambda: inputs.split(4), 0, latent_anchor=anchor)
        attention = whole.model.layers[0].self_attn
        assert layer.stats["latent_anchor"] is anchor
        assert relative_error(layer.kv_a_norm_weight.float(), attention.kv_a_layernorm.weight) < 1e-5
        assert relative_error(layer.kv_a_weight.float(), attention.kv_a_proj_with_mqa.weight) < 1e-5
        assert relative_error(layer.kv_b_weight.float(), attention.kv_b_proj.weight) < 1e-5
