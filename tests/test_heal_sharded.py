"""Healing sharded across processes: FSDP with 2 CPU processes (through tests/fsdp_on_cpu.py, since accelerate
selects FSDP only on GPUs), its sharded checkpoints and resume, the single healed folder gathered from the shards,
gradient checkpointing, and the shipped accelerate configs."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import mla_modeling
from mla_convert.errors import MLAConvertError
from mla_convert.heal import default_checkpoint_dir, heal

from test_heal import BATCH, SEQ_LEN, curve_losses, free_port, make_options, one_thread, student  # noqa: F401


ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs" / "accelerate"
FSDP_ON_CPU = Path(__file__).resolve().parent / "fsdp_on_cpu.py"


@pytest.fixture(scope="module")
def reference(student, pico_folders, wikitext, tmp_path_factory) -> tuple[dict, Path]:
    """One process, no sharding: what the sharded runs must reproduce."""
    output = tmp_path_factory.mktemp("heal-reference") / "healed"
    return heal(student, output, make_options(pico_folders, wikitext)), output


def launch_fsdp(student: Path, output: Path, options, *extra: str, succeed: bool = True) -> subprocess.CompletedProcess:
    """`accelerate launch --config_file configs/accelerate/fsdp.yaml` with 2 CPU processes, half the batch each."""
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / "fsdp.yaml"),
        "--num_processes", "2", "--mixed_precision", "no", "--main_process_port", str(free_port()),
        str(FSDP_ON_CPU), *extra, str(student), str(output),
        "--teacher", options.teacher, "--data", options.data,
        "--max-tokens", str(options.max_tokens), "--seq-len", str(SEQ_LEN), "--batch-size", str(BATCH // 2),
        "--lr", str(options.lr), "--kl-weight", str(options.kl_weight), "--eval-every", str(options.eval_every),
        "--eval-tokens", str(options.eval_tokens), "--save-every", "3", "--no-progress",
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    if succeed:
        assert result.returncode == 0, result.stderr[-4000:]
    return result


@pytest.fixture(scope="module")
def fsdp_run(student, pico_folders, wikitext, tmp_path_factory) -> dict:
    """FSDP, 2 processes, "killed" after step 5 (last checkpoint at step 3), then resumed to the end."""
    output = tmp_path_factory.mktemp("heal-fsdp") / "healed"
    options = make_options(pico_folders, wikitext)
    launch_fsdp(student, output, options, "--stop-after-steps", "5")
    saved = tmp_path_factory.mktemp("fsdp-checkpoints") / "checkpoints"
    shutil.copytree(default_checkpoint_dir(output), saved)
    launch_fsdp(student, output, options, "--resume")
    return {"output": output, "checkpoints": saved, "report": json.loads((output / "healing.json").read_text())}


def test_fsdp_checkpoints_are_sharded(fsdp_run):
    (checkpoint,) = fsdp_run["checkpoints"].iterdir()
    assert checkpoint.name == "step-00000003"
    # accelerate's sharded state dict: one file per process for the model and the optimizer state, no full copy
    for part in ("pytorch_model_fsdp_0", "optimizer_0"):
        assert sorted(p.name for p in (checkpoint / part).glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"], part
    assert not list(checkpoint.glob("*.safetensors")) and not list(checkpoint.glob("*.bin"))
    assert json.loads((checkpoint / "heal_state.json").read_text())["settings"]["checkpoint_format"] == "fsdp"


def test_fsdp_resumed_run_matches_one_process(fsdp_run, reference):
    report, _ = reference
    sharded = fsdp_run["report"]
    assert sharded["settings"]["num_processes"] == 2 and sharded["settings"]["checkpoint_format"] == "fsdp"
    assert [run["start_step"] for run in sharded["runs"]] == [0, 3]
    for (loss, kl), (ref_loss, ref_kl) in zip(curve_losses(sharded), curve_losses(report), strict=True):
        assert loss == pytest.approx(ref_loss, rel=1e-4) and kl == pytest.approx(ref_kl, rel=1e-4)
    for got, want in zip(sharded["eval"], report["eval"], strict=True):
        assert got["step"] == want["step"] and got["kl"] == pytest.approx(want["kl"], rel=1e-4)


def test_fsdp_healed_folder_is_one_ordinary_model(fsdp_run, reference, student):
    _, reference_output = reference
    output = fsdp_run["output"]
    assert not default_checkpoint_dir(output).exists()
    # The MLA modeling files and auto_map, not torch's FSDP classes (FSDP2 gives sharded modules a subclass)
    assert sorted(p.name for p in output.glob("*.py")) == sorted(p.name for p in student.glob("*.py"))
    config = json.loads((output / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_mla.MLAForCausalLM"
    assert sorted(p.name for p in output.glob("*.safetensors")) == ["model.safetensors"]

    weights, reference_weights = load_file(output / "model.safetensors"), load_file(reference_output / "model.safetensors")
    assert weights.keys() == reference_weights.keys()
    for name, tensor in weights.items():
        torch.testing.assert_close(tensor, reference_weights[name], rtol=1e-4, atol=1e-6, msg=name)

    model = AutoModelForCausalLM.from_pretrained(output, dtype=torch.float32).eval()
    assert type(model).__name__ == "MLAForCausalLM"
    loaded = model.state_dict()
    for name, tensor in weights.items():
        assert torch.equal(loaded[name], tensor), name


def test_a_sharded_checkpoint_does_not_resume_unsharded(fsdp_run, student, pico_folders, wikitext, tmp_path):
    checkpoints = tmp_path / "checkpoints"
    shutil.copytree(fsdp_run["checkpoints"], checkpoints)
    # one process with the whole global batch of the 2-process run: only the format differs
    options = make_options(pico_folders, wikitext, resume=True, checkpoint_dir=str(checkpoints))
    with pytest.raises(MLAConvertError, match="holds FSDP's sharded state and this run is set up for the trained "
                                              "parameters of a data-parallel run") as error:  # fmt: skip
        heal(student, tmp_path / "out", options)
    assert "\n" not in str(error.value) and not (tmp_path / "out").exists()


def test_a_damaged_shard_is_named_in_one_line(fsdp_run, student, pico_folders, wikitext, tmp_path):
    checkpoints = tmp_path / "checkpoints"
    shutil.copytree(fsdp_run["checkpoints"], checkpoints)
    (shard,) = checkpoints.glob("step-*/pytorch_model_fsdp_0/__1_0.distcp")
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    options = make_options(pico_folders, wikitext)
    result = launch_fsdp(student, tmp_path / "out", options, "--resume", "--checkpoint-dir", str(checkpoints),
                         succeed=False)  # fmt: skip
    # (the launcher reports its failed children with a traceback of its own; the children print none)
    assert result.returncode != 0 and "MLAConvertError" not in result.stderr and "[rank" not in result.stderr
    errors = {line for line in result.stderr.splitlines() if line.startswith("mla-convert: error:")}
    assert len(errors) == 1, result.stderr[-3000:]  # the same line from both processes
    (error,) = errors
    assert f"the sharded checkpoint {checkpoints}" in error and "process 1: RuntimeError" in error
    assert "to start over" in error and not (tmp_path / "out").exists()


def test_an_fsdp_config_on_cpu_warns_that_nothing_is_sharded(student, pico_folders, wikitext, tmp_path, monkeypatch,
                                                            caplog):  # fmt: skip
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    options = make_options(pico_folders, wikitext, stop_after_steps=0, eval_tokens=256)
    with caplog.at_level("WARNING"):
        heal(student, tmp_path / "out", options)
    assert "asks for FSDP, but accelerate runs these cpu processes" in caplog.text


# ---------------------------------------------------------------------------------------------------- memory


def test_gradient_checkpointing_gives_the_same_steps(student, pico_folders, wikitext, tmp_path, monkeypatch):
    """Same losses and gradient norms, and every decoder layer really runs twice per micro-step (recomputed)."""
    calls = []
    # Counted inside the layer: the layer's own forward is transformers' checkpointing wrapper, left as it is.
    forward = mla_modeling.modeling_mla.MLAMLP.forward

    def counted(self, *args, **kwargs):
        calls.append(torch.is_grad_enabled())
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(mla_modeling.modeling_mla.MLAMLP, "forward", counted)
    runs = {}
    for checkpointing in (False, True):
        calls.clear()
        options = make_options(pico_folders, wikitext, stop_after_steps=3, save_every=0, eval_tokens=256,
                               gradient_checkpointing=checkpointing)  # fmt: skip
        runs[checkpointing] = (heal(student, tmp_path / f"out-{checkpointing}", options), len(calls))
    (plain, plain_calls), (checkpointed, checkpointed_calls) = runs[False], runs[True]
    layers = 2
    assert plain_calls > 0 and checkpointed_calls - plain_calls == 3 * layers  # 3 micro-steps, once more per layer
    for row, ref in zip(checkpointed["curve"], plain["curve"], strict=True):
        assert row["loss"] == pytest.approx(ref["loss"], rel=1e-6)
        assert row["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-5)
    assert checkpointed["settings"]["gradient_checkpointing"] is True


# ---------------------------------------------------------------------------------------------------- configs


def read_config(name: str) -> dict:
    from accelerate.commands.config.config_args import load_config_from_file

    load_config_from_file(str(CONFIGS / name))  # accelerate's own reader accepts it
    return yaml.safe_load((CONFIGS / name).read_text())


def test_fsdp_config_shards_fully_by_mla_decoder_layer():
    config = read_config("fsdp.yaml")
    assert config["distributed_type"] == "FSDP"
    fsdp = config["fsdp_config"]
    assert fsdp["fsdp_version"] == 2 and fsdp["fsdp_reshard_after_forward"] is True
    assert fsdp["fsdp_state_dict_type"] == "SHARDED_STATE_DICT"
    wrapped = fsdp["fsdp_transformer_layer_cls_to_wrap"]
    assert wrapped in mla_modeling.modeling_mla.MLAPreTrainedModel._no_split_modules
    assert hasattr(mla_modeling.modeling_mla, wrapped)


@pytest.mark.parametrize("name,stage", [("deepspeed_zero2.yaml", 2), ("deepspeed_zero3.yaml", 3)])
def test_deepspeed_configs(name, stage):
    config = read_config(name)
    assert config["distributed_type"] == "DEEPSPEED"
    deepspeed = config["deepspeed_config"]
    assert deepspeed["zero_stage"] == stage
    # zero.Init at load time would partition the teacher too, which no engine then gathers
    assert deepspeed["zero3_init_flag"] is False
    if stage == 3:
        assert deepspeed["zero3_save_16bit_model"] is True  # else the healed folder cannot be gathered


@pytest.mark.parametrize("name,kind", [("single_gpu.yaml", "NO"), ("ddp.yaml", "MULTI_GPU")])
def test_unsharded_configs(name, kind):
    assert read_config(name)["distributed_type"] == kind
