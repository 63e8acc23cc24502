"""Healing (distillation fine-tuning) on a pico Llama converted at half budget: data streaming, the loss, the
training loop with checkpoints and resume, two processes under `accelerate launch`, the healed folder, bad input."""

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

import mla_convert  # noqa: F401
import mla_modeling  # noqa: F401  (registers the MLA model with the Auto classes)
from mla_convert import data
from mla_convert.convert import ConversionOptions, convert
from mla_convert.data import CALIBRATION_PART, open_text_stream
from mla_convert.errors import MLAConvertError
from mla_convert.heal import (
    DataPosition,
    HealOptions,
    SequencePacker,
    add_heal_arguments,
    default_checkpoint_dir,
    distillation_loss,
    heal,
    log_softmax_,
    options_from_args,
)
from mla_convert.heal.__main__ import main as heal_main
from mla_convert.heal.options import DEEPSEEK_LR, DEFAULT_LR, heal_lr

from conftest import build_pico, byte_tokenizer


SEQ_LEN = 64
BATCH = 4
STEPS = 8
ATTENTION = ("q_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Pico matmuls are tiny: a second thread only adds synchronisation, and on a busy machine a lot of it.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def student(pico_folders, wikitext, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("heal-student") / "mla"
    convert(
        str(pico_folders["llama-gqa"]),
        out,
        # The plain closed-form start (no refinement, no K/V balance search, uniform ranks): healing is tested from
        # where it has the most to do.
        ConversionOptions(
            kv_budget=0.25,
            calibration=str(wikitext),
            calibration_tokens=2048,
            calibration_seq_len=128,
            refine_steps=0,
            key_scale=1.0,
            rank_allocation="uniform",
        ),
    )
    return out


def make_options(pico_folders, wikitext, **overrides) -> HealOptions:
    settings = dict(
        teacher=str(pico_folders["llama-gqa"]),
        data=str(wikitext),
        max_tokens=STEPS * BATCH * SEQ_LEN,
        seq_len=SEQ_LEN,
        batch_size=BATCH,
        lr=1e-3,
        kl_weight=1.0,
        eval_every=4,
        eval_tokens=2048,
        save_every=3,
        progress=False,
    )
    settings.update(overrides)
    return HealOptions(**settings)


@pytest.fixture(scope="module")
def healed(student, pico_folders, wikitext, tmp_path_factory) -> tuple[dict, Path]:
    """One uninterrupted run of STEPS optimizer steps (checkpointing every 3), shared by several tests."""
    output = tmp_path_factory.mktemp("heal-full") / "healed"
    report = heal(student, output, make_options(pico_folders, wikitext))
    return report, output


def curve_losses(report: dict) -> list[tuple[float, float]]:
    return [(row["loss"], row["kl"]) for row in report["curve"]]


# ---------------------------------------------------------------------------------------------------- data


def test_packer_resumes_from_its_position(tmp_path):
    """Windows after a saved position (through JSON) are the ones an uninterrupted stream yields, across epochs."""
    lines = [json.dumps({"text": f"document {i}: " + "abc " * (3 * i + 1)}) for i in range(12)]
    (tmp_path / "docs.jsonl").write_text("\n".join(lines) + "\n")
    tokenizer = byte_tokenizer()
    stream = open_text_stream(str(tmp_path / "docs.jsonl"))
    packer = SequencePacker(stream, tokenizer, 16)
    epochs = []
    packer.on_new_epoch = lambda epoch, tokens: epochs.append((epoch, tokens))
    windows = iter(packer)
    first = [next(windows) for _ in range(7)]
    saved = json.loads(json.dumps(asdict(packer.position())))
    rest = [next(windows) for _ in range(40)]
    assert epochs, "the data should have been read more than once"
    resumed = iter(SequencePacker(stream, tokenizer, 16, DataPosition(**saved)))
    assert [next(resumed) for _ in range(40)] == rest
    assert all(len(w) == 16 for w in first + rest)


def test_hub_datasets_are_streamed(monkeypatch):
    import datasets

    texts = ["alpha " * 5, "", "beta " * 3, "gamma", "delta " * 4]
    calls = []

    def fake_load_dataset(name, config=None, split=None, streaming=False):
        calls.append((name, config, split, streaming))
        dataset = datasets.Dataset.from_dict({"text": texts, "other": list(range(len(texts)))}).to_iterable_dataset()
        dataset.info.splits = datasets.SplitDict({split: datasets.SplitInfo(name=split, num_examples=len(texts))})
        return dataset

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    # The stand-in is the hub here: reachable whatever HF_HUB_OFFLINE and the network say.
    monkeypatch.setattr(data, "require_hub", lambda what: None)
    stream = open_text_stream("someone/corpus:clean", CALIBRATION_PART)
    assert calls == [("someone/corpus", "clean", "train", True)]
    assert stream.description == "someone/corpus:clean@train, first 80% (records 0-4 of 5)"
    records = ["".join(r) for r in stream.records(0)]
    assert records == [texts[0], "", texts[2], texts[3]]
    assert ["".join(r) for r in stream.records(2)] == [texts[2], texts[3]]
    missing = open_text_stream("someone/corpus", CALIBRATION_PART, text_column="body")
    with pytest.raises(MLAConvertError, match="no 'body' column; available columns: \\['other', 'text'\\]"):
        list(missing.records(0))


# ---------------------------------------------------------------------------------------------------- loss


def test_distillation_loss_and_gradient_match_autograd():
    torch.manual_seed(0)
    logits = torch.randn(2, 7, 50, requires_grad=True)
    teacher_logits = torch.randn(2, 7, 50) * 2
    targets = torch.randint(0, 50, (2, 7))
    weight = 0.7
    loss, kl, ce = distillation_loss(logits, log_softmax_(teacher_logits.clone()), targets, weight)
    loss.backward()
    grad = logits.grad.clone()

    reference = logits.detach().clone().requires_grad_(True)
    log_q = reference.log_softmax(-1).reshape(-1, 50)
    log_p = teacher_logits.log_softmax(-1).reshape(-1, 50)
    ref_kl = F.kl_div(log_q, log_p, log_target=True, reduction="batchmean")
    ref_ce = F.cross_entropy(reference.reshape(-1, 50), targets.reshape(-1))
    ref_loss = weight * ref_kl + (1 - weight) * ref_ce
    ref_loss.backward()
    torch.testing.assert_close(loss, ref_loss.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(kl.float(), ref_kl.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ce.float(), ref_ce.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, reference.grad, rtol=1e-4, atol=1e-7)


# ---------------------------------------------------------------------------------------------------- healing


def test_healing_lowers_held_out_kl(healed):
    report, _ = healed
    evals = report["eval"]
    assert [e["step"] for e in evals] == [0, 4, 8]
    assert evals[-1]["kl"] < 0.9 * evals[0]["kl"], [e["kl"] for e in evals]
    assert evals[-1]["top1_agreement"] > evals[0]["top1_agreement"]
    assert report["tokens_seen"] == STEPS * BATCH * SEQ_LEN and report["optimizer_steps"] == STEPS
    assert len(report["curve"]) == STEPS
    assert "first 80%" in report["data"]["train"] and "last 20%" in report["data"]["eval"]
    assert report["settings"]["num_processes"] == 1


def test_healed_folder_loads_and_generates(healed, student):
    report, output = healed
    for name in ("modeling_mla.py", "configuration_mla.py", "cache_mla.py", "conversion.json", "healing.json",
                 "healing.png", "tokenizer.json", "config.json", "model.safetensors"):
        assert (output / name).is_file(), name
    assert json.loads((output / "config.json").read_text())["auto_map"]["AutoModelForCausalLM"]
    assert json.loads((output / "healing.json").read_text())["eval"] == report["eval"]
    assert not default_checkpoint_dir(output).exists(), "checkpoints are removed once the model is written"

    healed_weights, student_weights = load_file(output / "model.safetensors"), load_file(student / "model.safetensors")
    assert healed_weights.keys() == student_weights.keys()
    for name, tensor in healed_weights.items():
        changed = not torch.equal(tensor, student_weights[name])
        assert changed == any(f".{p}." in name for p in ATTENTION), name  # --train attention: only the projections

    model = AutoModelForCausalLM.from_pretrained(output).eval()
    assert type(model).__name__ == "MLAForCausalLM"
    input_ids = torch.tensor([[256, 72, 101, 108, 108, 111]])
    out = model.generate(
        input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=5, do_sample=False, eos_token_id=None
    )
    # Greedy decoding over the latent cache picks, at every step, the argmax of a full forward without the cache
    with torch.no_grad():
        logits = model(out[:, :-1], use_cache=False).logits
    assert torch.equal(out[:, :6], input_ids) and torch.equal(out[:, 6:], logits[:, 5:].argmax(-1))


def test_kill_and_resume_ends_where_an_uninterrupted_run_ends(healed, student, pico_folders, wikitext, tmp_path):
    report, output = healed
    resumed_output = tmp_path / "healed"
    # "killed" after step 5: the last checkpoint is at step 3, steps 4 and 5 are lost and redone
    stopped = heal(student, resumed_output, make_options(pico_folders, wikitext, stop_after_steps=5))
    assert stopped["stopped"] and not resumed_output.exists()
    checkpoints = default_checkpoint_dir(resumed_output)
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-00000003"]
    assert curve_losses(stopped) == curve_losses(report)[:5]

    with pytest.raises(MLAConvertError, match="--resume to continue"):
        heal(student, resumed_output, make_options(pico_folders, wikitext))
    with pytest.raises(MLAConvertError, match="other settings: lr"):
        heal(student, resumed_output, make_options(pico_folders, wikitext, resume=True, lr=2e-3))

    final = heal(student, resumed_output, make_options(pico_folders, wikitext, resume=True))
    assert [run["start_step"] for run in final["runs"]] == [0, 3]
    assert final["tokens_seen"] == report["tokens_seen"]
    for (loss, kl), (ref_loss, ref_kl) in zip(curve_losses(final), curve_losses(report), strict=True):
        assert loss == pytest.approx(ref_loss, rel=1e-5) and kl == pytest.approx(ref_kl, rel=1e-5)
    for got, want in zip(final["eval"], report["eval"], strict=True):
        assert got["step"] == want["step"] and got["kl"] == pytest.approx(want["kl"], rel=1e-5)
    resumed_weights, weights = load_file(resumed_output / "model.safetensors"), load_file(output / "model.safetensors")
    for name, tensor in weights.items():
        torch.testing.assert_close(resumed_weights[name], tensor, rtol=1e-5, atol=1e-6)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one(healed, student, pico_folders, wikitext, tmp_path):
    """`accelerate launch` with 2 processes (DDP over gloo), half the batch each: the same global batches."""
    report, _ = healed
    output = tmp_path / "healed-ddp"
    options = make_options(pico_folders, wikitext)
    # `--cpu` makes accelerate 1.x start a single process unless MPI is set up; `--multi_gpu` goes through
    # torchrun, and heal() asks accelerate for CPU processes wherever no accelerator is present.
    launcher = "--multi_gpu" if not torch.accelerator.is_available() else "--cpu"
    command = [
        sys.executable, "-m", "accelerate.commands.launch", launcher, "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(free_port()),
        "-m", "mla_convert.heal", str(student), str(output),
        "--teacher", options.teacher, "--data", options.data,
        "--max-tokens", str(options.max_tokens), "--seq-len", str(SEQ_LEN), "--batch-size", str(BATCH // 2),
        "--lr", str(options.lr), "--kl-weight", str(options.kl_weight), "--eval-every", str(options.eval_every),
        "--eval-tokens", str(options.eval_tokens), "--save-every", "3", "--no-progress",
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    ddp = json.loads((output / "healing.json").read_text())
    assert ddp["settings"]["num_processes"] == 2 and ddp["settings"]["global_batch"] == BATCH
    for (loss, kl), (ref_loss, ref_kl) in zip(curve_losses(ddp), curve_losses(report), strict=True):
        assert loss == pytest.approx(ref_loss, rel=1e-3) and kl == pytest.approx(ref_kl, rel=1e-3)
    for got, want in zip(ddp["eval"], report["eval"], strict=True):
        assert got["kl"] == pytest.approx(want["kl"], rel=1e-3)
        assert got["perplexity"] == pytest.approx(want["perplexity"], rel=1e-3)


# ---------------------------------------------------------------------------------------------------- bad input


def permuted_tokenizer() -> PreTrainedTokenizerFast:
    """The pico tokens with other ids: the same vocabulary size, a different tokenizer."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {token: index for index, token in enumerate(reversed(alphabet))}
    vocab.update({"<s>": 256, "</s>": 257})
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>")


def expect_error(student, output, options, match) -> str:
    with pytest.raises(MLAConvertError, match=match) as error:
        heal(student, output, options)
    message = str(error.value)
    assert "\n" not in message
    assert not output.exists() and not default_checkpoint_dir(output).exists()
    return message


def test_teacher_with_another_vocabulary_is_refused(student, pico_folders, wikitext, tmp_path):
    teacher = build_pico("llama-gqa")
    teacher.resize_token_embeddings(300)
    teacher.save_pretrained(tmp_path / "big-vocab")
    byte_tokenizer().save_pretrained(tmp_path / "big-vocab")
    options = make_options(pico_folders, wikitext, teacher=str(tmp_path / "big-vocab"))
    expect_error(student, tmp_path / "out", options, "vocabulary of 300 tokens and the student .* 258")

    build_pico("llama-gqa").save_pretrained(tmp_path / "other-tokenizer")
    permuted_tokenizer().save_pretrained(tmp_path / "other-tokenizer")
    options = make_options(pico_folders, wikitext, teacher=str(tmp_path / "other-tokenizer"))
    expect_error(student, tmp_path / "out", options, "use different tokenizers")


def test_empty_data_and_missing_column_are_refused(student, pico_folders, wikitext, tmp_path):
    (tmp_path / "empty.txt").write_text("\n  \n")
    options = make_options(pico_folders, wikitext, data=str(tmp_path / "empty.txt"))
    expect_error(student, tmp_path / "out", options, "no text in empty.txt.*the training data is empty")

    (tmp_path / "short.txt").write_text("a few words\n" * 2)
    options = make_options(pico_folders, wikitext, data=str(tmp_path / "short.txt"))
    expect_error(student, tmp_path / "out", options, "fewer than one training sequence of 64")

    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"content": "x " * 50}) + "\n" for _ in range(10)))
    options = make_options(pico_folders, wikitext, data=str(tmp_path / "docs.jsonl"))
    expect_error(student, tmp_path / "out", options, "has no 'text' column; available columns: \\['content'\\]")


def test_resume_without_checkpoint_and_existing_output_are_refused(student, pico_folders, wikitext, tmp_path):
    options = make_options(pico_folders, wikitext, resume=True)
    expect_error(student, tmp_path / "out", options, "--resume: no checkpoint to resume from in .*out.checkpoints")

    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("mine")
    with pytest.raises(MLAConvertError, match="exists and is not empty"):
        heal(student, existing, make_options(pico_folders, wikitext))
    assert (existing / "keep.txt").read_text() == "mine"


def test_default_lr_follows_the_students_latent_norm(student):
    """Without --lr, a plain MLA student heals at 5e-5 and one with DeepSeek's latent norm at the smaller rate that
    keeps it near its source (docs/deepseek.md); --lr always wins."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(student)
    options = HealOptions(teacher="t", data="d")
    assert options.lr is None and not config.kv_latent_norm
    assert heal_lr(options, config) == DEFAULT_LR == 5e-5
    config.kv_latent_norm = True
    assert heal_lr(options, config) == DEEPSEEK_LR < DEFAULT_LR
    assert heal_lr(replace(options, lr=3e-4), config) == 3e-4


def test_cli_arguments_and_errors(student, pico_folders, wikitext, tmp_path, capsys):
    parser = argparse.ArgumentParser()
    add_heal_arguments(parser)
    args = parser.parse_args(
        [str(student), str(tmp_path / "out"), "--teacher", "t", "--data", "d", "--max-tokens", "1000",
         "--seq-len", "128", "--batch-size", "2", "--grad-accum", "3", "--lr", "1e-4", "--train", "all",
         "--kl-weight", "0.5", "--eval-data", "e", "--eval-every", "7", "--save-every", "9", "--resume",
         "--mixed-precision", "bf16", "--no-progress"]
    )  # fmt: skip
    options = options_from_args(args)
    assert (options.teacher, options.data, options.eval_data, options.max_tokens, options.seq_len) == (
        "t", "d", "e", 1000, 128,
    )
    assert (options.batch_size, options.grad_accum, options.lr, options.train, options.kl_weight) == (
        2, 3, 1e-4, "all", 0.5,
    )
    assert (options.eval_every, options.save_every, options.resume, options.mixed_precision) == (7, 9, True, "bf16")
    assert not options.progress

    code = heal_main(
        [str(student), str(tmp_path / "out"), "--teacher", str(pico_folders["llama-gqa"]), "--data", str(wikitext),
         "--resume"]
    )  # fmt: skip
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mla-convert: error: --resume: no checkpoint")
    with pytest.raises(SystemExit):
        parser.parse_args([str(student), "out", "--data", "d"])  # --teacher is required
    with pytest.raises(MLAConvertError, match="--kl-weight must be in \\[0, 1\\]"):
        heal(student, tmp_path / "x", make_options(pico_folders, wikitext, kl_weight=1.5))


def test_bf16_mixed_precision_heals_and_evaluates_in_float32(healed, student, pico_folders, wikitext, tmp_path):
    """The fast CPU setting (bf16 autocast, bf16 teacher) still heals, and its evaluations stay in float32
    against a float32 teacher: the step-0 numbers are those of the float32 run."""
    report, _ = healed
    options = make_options(
        pico_folders, wikitext, mixed_precision="bf16", teacher_dtype="bfloat16", save_every=0, eval_every=0
    )
    fast = heal(student, tmp_path / "healed-bf16", options)
    assert fast["eval"][0]["kl"] == pytest.approx(report["eval"][0]["kl"], rel=1e-6)
    assert fast["eval"][-1]["kl"] < 0.9 * fast["eval"][0]["kl"]
    assert fast["curve"][0]["kl"] == pytest.approx(report["curve"][0]["kl"], rel=0.05)


# ---------------------------------------------------------------------------------------------------- never lose files,
# one line for every failure


def quick(pico_folders, wikitext, **overrides) -> HealOptions:
    """Options that stop before the first step: enough to pass every check and the first evaluation."""
    return make_options(pico_folders, wikitext, **{"stop_after_steps": 0, "eval_tokens": 256, **overrides})


def test_teacher_that_is_not_the_source_is_refused(student, pico_folders, wikitext, tmp_path):
    other = tmp_path / "other-llama"
    build_pico("llama-gqa", seed=1).save_pretrained(other)
    byte_tokenizer().save_pretrained(other)
    message = expect_error(student, tmp_path / "out", quick(pico_folders, wikitext, teacher=str(other)),
                           "is not the source of the student .* it was converted from .*--any-teacher")  # fmt: skip
    assert str(pico_folders["llama-gqa"]) in message
    assert heal(student, tmp_path / "out", quick(pico_folders, wikitext, teacher=str(other), any_teacher=True))["stopped"]

    # The source under another path is still the source: decided by the weights, not by the name.
    copy = tmp_path / "copy-of-source"
    build_pico("llama-gqa").save_pretrained(copy)
    byte_tokenizer().save_pretrained(copy)
    assert heal(student, tmp_path / "out2", quick(pico_folders, wikitext, teacher=str(copy)))["stopped"]


def test_output_and_checkpoints_never_overwrite_an_input(student, pico_folders, wikitext, tmp_path):
    teacher = pico_folders["llama-gqa"]
    before = {p: p.read_bytes() for p in list(teacher.iterdir()) + list(student.iterdir()) if p.is_file()}
    for output in (teacher, student, student / "inside"):
        with pytest.raises(MLAConvertError, match="OUTPUT .* (is|lies inside) the (teacher|student)"):
            heal(student, output, quick(pico_folders, wikitext, overwrite=True))
    with pytest.raises(MLAConvertError, match="--checkpoint-dir .* is the teacher"):
        heal(student, tmp_path / "out", quick(pico_folders, wikitext, checkpoint_dir=str(teacher)))
    assert {p: p.read_bytes() for p in before} == before

    (tmp_path / "a-file").write_text("mine")
    expect_error(student, tmp_path / "out", quick(pico_folders, wikitext, checkpoint_dir=str(tmp_path / "a-file")),
                 "--checkpoint-dir .*a-file is a file, not a folder")  # fmt: skip
    assert (tmp_path / "a-file").read_text() == "mine"


def test_options_are_named_as_heal_spells_them(student, pico_folders, wikitext, tmp_path):
    expect_error(student, tmp_path / "out", quick(pico_folders, wikitext, eval_tokens=100, eval_seq_len=128),
                 r"--eval-tokens \(100\) must be at least --eval-seq-len \(128\)")  # fmt: skip
    expect_error(student, tmp_path / "out", quick(pico_folders, wikitext, eval_tokens=32),
                 r"--eval-tokens \(32\) must be at least --seq-len")  # fmt: skip


def test_sequences_beyond_the_students_positions_warn(student, pico_folders, wikitext, tmp_path, caplog):
    options = quick(pico_folders, wikitext, seq_len=520, eval_tokens=520)
    with caplog.at_level("WARNING"):
        heal(student, tmp_path / "out", options)
    assert "--seq-len 520 is longer than the student's max_position_embeddings (512)" in caplog.text


@pytest.mark.parametrize(
    "damage,name",
    [
        (lambda p: p.write_text("{\"step\": 2, "), "heal_state.json"),
        (lambda p: p.write_bytes(b""), "trainable.safetensors"),
        (lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]), "optimizer.bin"),
        (lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]), "trainable.safetensors"),
    ],
    ids=["bad-json", "empty-file", "truncated-optimizer", "truncated-safetensors"],
)
def test_resume_from_a_damaged_checkpoint_says_which_file(damage, name, stopped_run, student, pico_folders,
                                                         wikitext, tmp_path):  # fmt: skip
    output, options = stopped_run
    checkpoints = tmp_path / "checkpoints"
    shutil.copytree(default_checkpoint_dir(output), checkpoints)
    (checkpoint,) = checkpoints.iterdir()
    damage(checkpoint / name)
    options = replace(options, resume=True, checkpoint_dir=str(checkpoints), stop_after_steps=None)
    message = expect_error(student, tmp_path / "out", options, f"--resume: the checkpoint file .*{name}.* damaged")
    assert "to start over" in message and str(checkpoints) in message


@pytest.fixture(scope="module")
def stopped_run(student, pico_folders, wikitext, tmp_path_factory) -> tuple[Path, HealOptions]:
    """A run killed after step 2, with its checkpoint of step 2 (the teacher and data written as absolute paths)."""
    output = tmp_path_factory.mktemp("heal-stopped") / "healed"
    options = make_options(pico_folders, wikitext, save_every=2, stop_after_steps=2, eval_tokens=256)
    heal(student, output, options)
    return output, options


def test_resume_compares_paths_resolved(stopped_run, student, pico_folders, wikitext, tmp_path, monkeypatch):
    output, options = stopped_run
    shutil.copytree(default_checkpoint_dir(output), tmp_path / "healed.checkpoints")
    monkeypatch.chdir(Path(options.teacher).parent)
    relative = replace(options, resume=True, stop_after_steps=3, teacher=Path(options.teacher).name,
                       data=os.path.relpath(options.data))  # fmt: skip
    resumed = heal(os.path.relpath(student), tmp_path / "healed", relative)
    assert [run["start_step"] for run in resumed["runs"]] == [0, 2] and resumed["optimizer_steps"] == 3
