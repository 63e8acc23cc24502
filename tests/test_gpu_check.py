"""scripts/gpu_check.sh where no GPU is: its arguments, its refusals before anything is written, and the commands
it would run, parsed by mla-convert's own parser (a misspelt flag fails here, not on the GPU machine)."""

import shlex
import subprocess
from pathlib import Path

import pytest
import torch

from mla_convert.cli import build_parser


SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.sh"


def gpu_check(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=120)


def one_error(result: subprocess.CompletedProcess, fragment: str) -> None:
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpu_check: error:") and fragment in lines[0], result.stderr


def test_bad_arguments_and_missing_inputs_stop_before_anything_is_written(pico_folders, wikitext, tmp_path):
    one_error(gpu_check("--bogus"), "unknown argument --bogus")
    one_error(gpu_check("--source"), "--source needs a folder")
    one_error(gpu_check("--source", str(tmp_path / "nowhere"), "--out", str(tmp_path / "out")),
              f"no model folder at {tmp_path / 'nowhere'}")  # fmt: skip
    one_error(gpu_check("--source", str(pico_folders["llama-gqa"]), "--data", str(tmp_path / "none.txt"),
                        "--out", str(tmp_path / "out")), "no text at")  # fmt: skip
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the refusal is for machines without")
def test_without_cuda_it_refuses_in_one_line(pico_folders, wikitext, tmp_path):
    one_error(gpu_check("--source", str(pico_folders["llama-gqa"]), "--data", str(wikitext), "--out",
                        str(tmp_path / "out")), "torch sees no CUDA device")  # fmt: skip
    assert not (tmp_path / "out").exists()


def test_dry_run_lists_commands_that_parse(pico_folders, wikitext, tmp_path):
    result = gpu_check("--source", str(pico_folders["llama-gqa"]), "--data", str(wikitext), "--out",
                       str(tmp_path / "out"), "--dry-run")  # fmt: skip
    assert result.returncode == 0, result.stderr
    commands = {line[1:].split(",")[0]: shlex.split(line.split("] ", 1)[1])
                for line in result.stdout.splitlines() if line.startswith("[")}  # fmt: skip
    assert list(commands) == ["tests", "bench_decode", "convert", "heal_bf16", "heal_fsdp"]
    assert "MLA_TEST_DEVICE=cuda" in commands["tests"] and "tests/test_gpu.py" in commands["tests"]
    bench = commands["bench_decode"]
    assert bench[bench.index("--contexts") + 1] == "2048" and "--long" in bench  # 2k and 8k
    parser = build_parser()
    converted = parser.parse_args(commands["convert"][commands["convert"].index("convert"):])
    assert converted.device == "cuda"
    heal = parser.parse_args(["heal", *commands["heal_bf16"][commands["heal_bf16"].index("heal") + 1:]])
    assert heal.mixed_precision == "bf16" and heal.teacher_dtype == "bfloat16"
    fsdp = commands["heal_fsdp"]
    assert fsdp[fsdp.index("--config_file") + 1] == "configs/accelerate/fsdp.yaml"
    sharded = parser.parse_args(["heal", *fsdp[fsdp.index("mla_convert.heal") + 1:]])
    assert sharded.gradient_checkpointing and sharded.mixed_precision == "bf16"
    assert not (tmp_path / "out").exists() and "dry run, nothing was run" in result.stdout
