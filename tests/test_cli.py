"""The command line: what users run, and every bad input answered with one line, exit code 2 and nothing written."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

import mla_convert  # noqa: F401  (registers the MLA model with the Auto classes)
from mla_convert.cli import main
from mla_convert.data import EVALUATION_PART, load_text

from conftest import assert_clean_failure, leftovers, load_causal_lm as load, run_cli


QUICKSTART = Path(__file__).resolve().parents[1] / "scripts" / "quickstart.sh"


def lines(text: str) -> str:
    """Printed text as a test compares it: newlines normalised, as subprocess's text mode reads them."""
    return text.replace("\r\n", "\n").replace("\r", "\n").strip()


def test_convert_eval_generate_end_to_end(tmp_path, pico_folders, wikitext):
    source_folder, output = pico_folders["qwen2"], tmp_path / "mla"
    result = run_cli(
        "convert", str(source_folder), str(output), "--kv-budget", "0.5",
        "--calibration", str(wikitext), "--calibration-tokens", "2048",
    )
    assert result.returncode == 0, result.stderr
    assert "KV cache per token" in result.stdout
    report = json.loads((output / "conversion.json").read_text())
    assert report["calibration"]["kind"] == "text" and "first 80%" in report["calibration"]["description"]
    for name in ("config.json", "model.safetensors", "modeling_mla.py", "attention_mla.py", "configuration_mla.py", "cache_mla.py",
                 "tokenizer.json", "generation_config.json"):
        assert (output / name).exists(), name

    result = run_cli(
        "eval", str(output), "--data", str(wikitext), "--reference", str(source_folder),
        "--seq-len", "128", "--max-tokens", "1024", "--json", str(tmp_path / "eval.json"),
    )
    assert result.returncode == 0, result.stderr
    assert "last 20%" in result.stdout
    results = json.loads((tmp_path / "eval.json").read_text())
    # The numbers, computed here from both models on the same tokens: the first 1024 of the text's last 20%, in
    # windows of 128 (the pico tokenizer has one token per byte and no merges, so no chunking changes them).
    source, model = load(source_folder), load(output)
    tokenizer = AutoTokenizer.from_pretrained(output)
    text, _ = load_text(str(wikitext), EVALUATION_PART)
    ids = torch.tensor(tokenizer(text[:4096], add_special_tokens=False)["input_ids"][:1024]).view(8, 128)
    with torch.no_grad():
        log_q = model(ids).logits[:, :-1].log_softmax(-1)
        log_p = source(ids).logits[:, :-1].log_softmax(-1)
    targets = ids[:, 1:, None]
    assert results["tokens"] == targets.numel()
    assert results["perplexity"] == pytest.approx(float((-log_q.gather(-1, targets).mean()).exp()), rel=1e-4)
    assert results["reference_perplexity"] == pytest.approx(float((-log_p.gather(-1, targets).mean()).exp()), rel=1e-4)
    assert results["kl"] == pytest.approx(float((log_p.exp() * (log_p - log_q)).sum(-1).mean()), rel=1e-3)
    agreement = float((log_p.argmax(-1) == log_q.argmax(-1)).float().mean())
    assert results["top1_agreement"] == pytest.approx(agreement, abs=1e-6)

    result = run_cli("generate", str(output), "Hello", "--max-new-tokens", "5")
    assert result.returncode == 0, result.stderr
    prompt = tokenizer("Hello", return_tensors="pt").input_ids
    greedy = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=5, do_sample=False,
                            pad_token_id=tokenizer.eos_token_id)
    assert lines(result.stdout).endswith(lines(tokenizer.decode(greedy[0, prompt.shape[1]:], skip_special_tokens=True)))


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
    broken = shutil.copytree(pico_folders["llama-gqa"], tmp_path / "broken")
    (broken / "config.json").write_text("{ this is not json")
    result = run_cli("convert", str(broken), str(tmp_path / "out"))
    assert_clean_failure(result, "config.json")
    assert not (tmp_path / "out").exists()


def test_corrupt_weights(tmp_path, pico_folders):
    broken = shutil.copytree(pico_folders["llama-gqa"], tmp_path / "broken")
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


def test_overwrite_replaces_a_previous_output(tmp_path, pico_folders):
    output = tmp_path / "out"
    assert main(["convert", str(pico_folders["llama-gqa"]), str(output), "--kv-budget", "1.0"]) == 0
    (output / "stale.txt").write_text("old")
    assert main(["convert", str(pico_folders["llama-gqa"]), str(output), "--kv-budget", "0.5"]) == 2
    assert (output / "stale.txt").exists()
    assert main(["convert", str(pico_folders["llama-gqa"]), str(output), "--kv-budget", "0.5", "--overwrite"]) == 0
    assert not (output / "stale.txt").exists()
    assert json.loads((output / "conversion.json").read_text())["kv_budget"] == pytest.approx(0.5, abs=0.01)
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

    monkeypatch.setattr(conversion.ShardWriter, "finish", explode)
    output = tmp_path / "out"
    with pytest.raises(OSError):
        conversion.convert(str(pico_folders["llama-gqa"]), output, conversion.ConversionOptions(kv_budget=1.0))
    assert not output.exists()
    assert leftovers(tmp_path) == []


# ---------------------------------------------------------------------------------------------------- quickstart


def run_quickstart(tmp_path: Path, pico_folder: Path, shared_text: Path | None) -> tuple[subprocess.CompletedProcess, Path]:
    """The README's first command in a clone of this repository alone (`shared_text`: what stands beside it as
    `../shared/data/wikitext2_valid.txt`, or nothing), with a pico model where the script fetches SmolLM2."""
    clone = tmp_path / "clone"
    (clone / "scripts").mkdir(parents=True)
    shutil.copy(QUICKSTART, clone / "scripts" / "quickstart.sh")
    if shared_text is not None:
        (tmp_path / "shared" / "data").mkdir(parents=True)
        (tmp_path / "shared" / "data" / "wikitext2_valid.txt").symlink_to(shared_text)
    work = clone / "runs" / "quickstart"
    shutil.copytree(pico_folder, work / "smollm2")
    env = {key: value for key, value in os.environ.items() if key != "MLA_DATA"}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # mla-convert of this Python
    result = subprocess.run(["bash", str(clone / "scripts" / "quickstart.sh")], capture_output=True, text=True,
                            env=env, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    return result, work


def test_quickstart_without_the_shared_text_calibrates_data_free(tmp_path, pico_folders):
    result, work = run_quickstart(tmp_path, pico_folders["llama-gqa"], None)
    assert "calibrating data-free" in result.stdout and "evaluation skipped" in result.stdout
    report = json.loads((work / "smollm2-mla50" / "conversion.json").read_text())
    assert report["calibration"]["kind"] == "sampled"
    assert report["kv_budget"] == pytest.approx(0.5, abs=0.01)
    assert not (work / "eval-mla50.json").exists()
    # (exit code 0 under `set -e`: generation, the last step, ran too)


def test_quickstart_with_the_shared_text_calibrates_and_evaluates_on_it(tmp_path, pico_folders, wikitext):
    result, work = run_quickstart(tmp_path, pico_folders["llama-gqa"], wikitext)
    assert "calibrating on the first 80% of ../shared/data/wikitext2_valid.txt" in result.stdout
    report = json.loads((work / "smollm2-mla50" / "conversion.json").read_text())
    assert report["calibration"]["kind"] == "text" and "first 80%" in report["calibration"]["description"]
    results = json.loads((work / "eval-mla50.json").read_text())
    assert "last 20%" in results["data"] and results["kl"] > 0
