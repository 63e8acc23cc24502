"""The command line: what users run, and every bad input answered with one line, exit code 2 and nothing written."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from mla_convert.cli import main


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mla_convert", *args], capture_output=True, text=True, timeout=600
    )


def assert_clean_failure(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("mla-convert: error:")]
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def leftovers(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.iterdir() if ".partial-" in path.name or ".old-" in path.name)


def test_convert_eval_generate_end_to_end(tmp_path, pico_folders, wikitext):
    output = tmp_path / "mla"
    result = run_cli(
        "convert", str(pico_folders["qwen2"]), str(output), "--kv-budget", "0.5",
        "--calibration", str(wikitext), "--calibration-tokens", "2048",
    )
    assert result.returncode == 0, result.stderr
    assert "KV cache per token" in result.stdout
    report = json.loads((output / "conversion.json").read_text())
    assert report["calibration"]["kind"] == "text" and "first 80%" in report["calibration"]["description"]
    for name in ("config.json", "model.safetensors", "modeling_mla.py", "configuration_mla.py", "cache_mla.py",
                 "tokenizer.json", "generation_config.json"):
        assert (output / name).exists(), name

    result = run_cli(
        "eval", str(output), "--data", str(wikitext), "--reference", str(pico_folders["qwen2"]),
        "--seq-len", "128", "--max-tokens", "1024", "--json", str(tmp_path / "eval.json"),
    )
    assert result.returncode == 0, result.stderr
    assert "last 20%" in result.stdout
    results = json.loads((tmp_path / "eval.json").read_text())
    assert results["kl"] > 0 and 0 < results["top1_agreement"] <= 1
    assert results["perplexity"] > 1

    result = run_cli("generate", str(output), "Hello", "--max-new-tokens", "5")
    assert result.returncode == 0, result.stderr


def test_help_teaches_the_commands():
    result = run_cli("convert", "--help")
    assert result.returncode == 0
    for flag in ("--kv-budget", "--kv-lora-rank", "--qk-rope-head-dim", "--calibration", "--calibration-tokens",
                 "--gguf-file", "--dtype", "--device", "--overwrite"):
        assert flag in result.stdout


def test_missing_source(tmp_path):
    result = run_cli("convert", str(tmp_path / "nowhere"), str(tmp_path / "out"))
    assert_clean_failure(result, "not found")
    assert not (tmp_path / "out").exists()


def test_corrupt_config(tmp_path, pico_folders):
    broken = tmp_path / "broken"
    broken.mkdir()
    for path in pico_folders["llama-gqa"].iterdir():
        (broken / path.name).write_bytes(path.read_bytes())
    (broken / "config.json").write_text("{ this is not json")
    result = run_cli("convert", str(broken), str(tmp_path / "out"))
    assert_clean_failure(result, "config.json")
    assert not (tmp_path / "out").exists()


def test_corrupt_weights(tmp_path, pico_folders):
    broken = tmp_path / "broken"
    broken.mkdir()
    for path in pico_folders["llama-gqa"].iterdir():
        (broken / path.name).write_bytes(path.read_bytes())
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    result = run_cli("convert", str(broken), str(tmp_path / "out"), "--kv-budget", "1.0")
    assert_clean_failure(result, "weights")
    assert not (tmp_path / "out").exists()
    assert leftovers(tmp_path) == []


def test_unsupported_architecture(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    folder = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100)).save_pretrained(folder)
    result = run_cli("convert", str(folder), str(tmp_path / "out"))
    assert_clean_failure(result, "gpt2", "llama", "mistral", "qwen2")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("budget", ["1.5", "0", "-0.2", "0.001"])
def test_budget_out_of_range_names_the_valid_range(tmp_path, pico_folders, budget):
    result = run_cli("convert", str(pico_folders["llama-gqa"]), str(tmp_path / "out"), "--kv-budget", budget)
    assert_clean_failure(result, "budget")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("rank", "rope", "fragment"),
    [("500", "16", "[1, 48]"), ("0", "16", "--kv-lora-rank"), ("16", "7", "even"), ("16", "66", "[2, 32]")],
)
def test_ranks_out_of_range_name_the_valid_range(tmp_path, pico_folders, rank, rope, fragment):
    result = run_cli(
        "convert", str(pico_folders["llama-gqa"]), str(tmp_path / "out"),
        "--kv-lora-rank", rank, "--qk-rope-head-dim", rope,
    )
    assert_clean_failure(result, fragment)
    assert not (tmp_path / "out").exists()


def test_existing_output_is_left_untouched_without_overwrite(tmp_path, pico_folders):
    output = tmp_path / "out"
    output.mkdir()
    (output / "precious.txt").write_text("keep me")
    result = run_cli("convert", str(pico_folders["llama-gqa"]), str(output), "--kv-budget", "1.0")
    assert_clean_failure(result, "--overwrite")
    assert [path.name for path in output.iterdir()] == ["precious.txt"]
    assert (output / "precious.txt").read_text() == "keep me"


def test_overwrite_replaces_the_output(tmp_path, pico_folders, capsys):
    output = tmp_path / "out"
    output.mkdir()
    (output / "stale.txt").write_text("old")
    assert main(["convert", str(pico_folders["llama-gqa"]), str(output), "--kv-budget", "1.0", "--overwrite"]) == 0
    assert not (output / "stale.txt").exists()
    assert (output / "conversion.json").exists()
    assert leftovers(tmp_path) == []


def test_missing_calibration_file(tmp_path, pico_folders):
    result = run_cli(
        "convert", str(pico_folders["llama-gqa"]), str(tmp_path / "out"), "--calibration", str(tmp_path / "none.txt")
    )
    assert_clean_failure(result, "none.txt")
    assert not (tmp_path / "out").exists()
    assert leftovers(tmp_path) == []


def test_eval_of_a_missing_model(tmp_path, wikitext):
    result = run_cli("eval", str(tmp_path / "nothing"), "--data", str(wikitext))
    assert_clean_failure(result, "not found")


def test_generate_refuses_a_folder_without_a_model(tmp_path):
    (tmp_path / "empty").mkdir()
    result = run_cli("generate", str(tmp_path / "empty"), "hi")
    assert_clean_failure(result)


def test_failure_midway_leaves_no_partial_output(tmp_path, pico_folders, monkeypatch):
    """A crash while saving must leave neither OUTPUT nor a half-written folder."""
    import mla_convert.convert as conversion

    def explode(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(conversion.MLAForCausalLM, "save_pretrained", explode)
    output = tmp_path / "out"
    with pytest.raises(OSError):
        conversion.convert(str(pico_folders["llama-gqa"]), output, conversion.ConversionOptions(kv_budget=1.0))
    assert not output.exists()
    assert leftovers(tmp_path) == []
