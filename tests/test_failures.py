"""Every way a user can get a command wrong, in one table: one line on stderr, exit code 2, and the disk as it was.

Each case runs the real command in a fresh process on pico models copied into the test's folder, then checks
what a user would: the exit code, that stderr holds exactly one line (progress bars aside) and no traceback,
that every input is byte-for-byte unchanged, and that no output or staging folder was left behind. A few rows are
runs that must succeed (`code=0`) next to files of the user's that look like ours: they check that everything that
was there before is still there, byte for byte. Add a case by adding a row to `CASES`.
"""

import hashlib
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import leftovers, run_cli


@dataclass
class Case:
    """`args` may name `{src}` (a pico Llama), `{mistral}`, `{out}` (the output, absent), `{data}` (a text file),
    `{work}` (the test's folder) and files made by `setup(work)`; `cwd` is relative to the work folder."""

    name: str
    args: list[str]
    fragment: str
    setup: object = None
    cwd: str = "."
    env: dict = field(default_factory=dict)
    # 0: a run that must succeed without touching anything of the user's (`{out}` is the only new path);
    # `fragment` is then a line its stderr must hold ("" for none), and `check(work)` what else must hold
    code: int = 2
    check: object = None
    # what the error line must not say (advice that does not apply)
    not_in: str | None = None


def poison(work: Path) -> None:
    """`nan/`: the pico source with one NaN in a key projection."""
    shutil.copytree(work / "src", work / "nan")
    state = load_file(work / "nan" / "model.safetensors")
    state["model.layers.1.self_attn.k_proj.weight"][0, 0] = float("nan")
    save_file(state, work / "nan" / "model.safetensors", metadata={"format": "pt"})


def strip_config(work: Path) -> None:
    """`bare/`: a config.json without its sizes, which transformers fills with a 7B Llama's."""
    shutil.copytree(work / "src", work / "bare")
    config = json.loads((work / "bare" / "config.json").read_text())
    for key in ("hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads", "num_key_value_heads"):
        config.pop(key)
    (work / "bare" / "config.json").write_text(json.dumps(config))


def truncate_weights(work: Path) -> None:
    shutil.copytree(work / "src", work / "cut")
    weights = work / "cut" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])


def empty_weights(work: Path) -> None:
    shutil.copytree(work / "src", work / "empty")
    (work / "empty" / "model.safetensors").write_bytes(b"")


def bad_config_json(work: Path) -> None:
    shutil.copytree(work / "src", work / "badjson")
    (work / "badjson" / "config.json").write_text('{"model_type": "llama", ')


def nest_source(work: Path) -> None:
    """`p1/src` beside an unrelated file: the layout where OUTPUT=p1 once deleted both."""
    (work / "p1").mkdir()
    shutil.copytree(work / "src", work / "p1" / "src")
    (work / "p1" / "notes.txt").write_text("a user's file")


def user_folder(work: Path) -> None:
    """`mine/`: a folder of the user's that is not an mla-convert output."""
    (work / "mine").mkdir()
    (work / "mine" / "thesis.tex").write_text("years of work")


def users_report(name: str):
    """`mine/`: a user's folder that happens to hold a file called `name` (their own notes), and their thesis."""

    def setup(work: Path) -> None:
        user_folder(work)
        (work / "mine" / name).write_text(json.dumps({"note": "my own notes on the conversion"}))

    return setup


def users_checkpoints(work: Path) -> None:
    """`ckpts/step-1000/`: a user's own training checkpoint, in the folder they then name as --checkpoint-dir."""
    convert_student(work)
    (work / "ckpts" / "step-1000").mkdir(parents=True)
    (work / "ckpts" / "step-1000" / "model.bin").write_bytes(b"a week of training")


def users_backup(work: Path) -> None:
    """`.out.old-backup-v1/` and `.out.partial-notes/`: a user's backups of an output, named like our staging."""
    convert_student(work)
    for name in (".out.old-backup-v1", ".out.partial-notes"):
        shutil.copytree(work / "student", work / name)
        (work / name / "NOTES.txt").write_text("why this one was kept")


def users_results(work: Path) -> None:
    (work / "results.json").write_text(json.dumps({"experiment": "a week of runs", "scores": [1, 2, 3]}))


def plain_file(work: Path) -> None:
    (work / "afile").write_text("not a folder")


def convert_student(work: Path) -> None:
    """`student/`: the pico source converted at full budget, to heal."""
    from mla_convert.convert import ConversionOptions, convert

    convert(str(work / "src"), work / "student", ConversionOptions(kv_budget=1.0))


def qwen_source(work: Path) -> None:
    """`qwen/`: a pico Qwen2, whose attention has q/k/v biases."""
    from conftest import build_pico, byte_tokenizer

    build_pico("qwen2").save_pretrained(work / "qwen")
    byte_tokenizer().save_pretrained(work / "qwen")


def convert_per_layer_ranks(work: Path) -> None:
    """`spectrum/`: the pico source converted at budget 0.5 with latent sizes per layer (the default allocation)."""
    from mla_convert.convert import ConversionOptions, convert

    options = ConversionOptions(
        kv_budget=0.5, calibration=str(work / "text.txt"), calibration_tokens=1024, refine_steps=0, key_scale=1.0
    )
    report = convert(str(work / "src"), work / "spectrum", options)
    assert len(set(report["kv_lora_ranks"])) > 1, "the case needs a folder with per-layer ranks"


def convert_deepseek_student(work: Path) -> None:
    """`deepseek/`: the pico source converted with --target deepseek, ready to export."""
    from mla_convert.convert import ConversionOptions, convert

    options = ConversionOptions(
        target="deepseek", kv_budget=0.5, calibration=str(work / "text.txt"), calibration_tokens=1024,
        refine_steps=0, key_scale=1.0,
    )  # fmt: skip
    convert(str(work / "src"), work / "deepseek", options)


def other_tokenizer(work: Path) -> None:
    """`other/`: the pico source with another tokenizer of the same size (the same tokens, other ids)."""
    from test_heal import permuted_tokenizer

    shutil.copytree(work / "src", work / "other")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (work / "other" / name).unlink(missing_ok=True)
    permuted_tokenizer().save_pretrained(work / "other")


def cut_gguf(work: Path) -> None:
    """`cut.gguf`: the start of SmolLM2's GGUF file, as a download cut short leaves it."""
    from conftest import missing

    from mla_convert.sources import smollm2_gguf_path

    try:
        path = smollm2_gguf_path()
    except Exception as e:  # the package is a test dependency
        missing(str(e))
    with open(path, "rb") as f:
        (work / "cut.gguf").write_bytes(f.read(30_000))


def garbage_gguf(work: Path) -> None:
    """`junk.gguf`: GGUF's magic and version, then bytes that mean nothing."""
    (work / "junk.gguf").write_bytes(b"GGUF" + (3).to_bytes(4, "little") + bytes(range(7, 256)) * 20)


def little_free_space(work: Path) -> None:
    """`shim/sitecustomize.py`: makes the process see `FAKE_FREE_BYTES` free on every filesystem (with
    `PYTHONPATH={work}/shim`), so that a disk nearly full is tried without filling one."""
    (work / "shim").mkdir()
    (work / "shim" / "sitecustomize.py").write_text(
        "import os, shutil\n"
        "_real = shutil.disk_usage\n"
        "def _disk_usage(path):\n"
        "    usage = _real(path)\n"
        "    return type(usage)(usage.total, usage.used, int(os.environ['FAKE_FREE_BYTES']))\n"
        "shutil.disk_usage = _disk_usage\n"
    )


def records_in(column: str):
    """`records.jsonl`: the short text as one record per line, in field `column`."""

    def setup(work: Path) -> None:
        lines = [line for line in (work / "text.txt").read_text(encoding="utf-8").splitlines() if line.strip()]
        (work / "records.jsonl").write_text("".join(json.dumps({column: line}) + "\n" for line in lines))

    return setup


def bad_jsonl(work: Path) -> None:
    """`bad.jsonl`: a good record, then a line cut short on the file's third line."""
    (work / "bad.jsonl").write_text('{"text": "one"}\n{"text": "two"}\n{"text": "thr\n{"text": "four"}\n')


def tiny_text(work: Path) -> None:
    (work / "tiny.txt").write_text("A few words, far fewer than a calibration sequence.\n" * 3)


def checkpoint_path_is_a_file(work: Path) -> None:
    convert_student(work)
    (work / "out.checkpoints").write_text("a user's file named like the default checkpoint folder")


def sharded_weights(work: Path) -> None:
    from safetensors import safe_open

    index = json.loads((work / "out" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and not (work / "out" / "model.safetensors").exists()
    for shard in shards:
        assert (work / "out" / shard).stat().st_size <= 100_000 + 20_000  # a tensor larger than the limit aside
        with safe_open(work / "out" / shard, framework="pt") as f:
            assert list(f.keys())


HEAL = ["heal", "student", "{out}", "--teacher", "src", "--data", "{data}", "--max-tokens", "256", "--seq-len", "64"]
EXPORT = ["--format", "deepseek-v3"]
SHIM = {"PYTHONPATH": "{work}/shim"}
DEEPSEEK = ["--target", "deepseek"]


CASES = [
    # 1. data loss
    Case("empty output is not the current folder", ["convert", "src", "", "--overwrite", "--kv-budget", "1.0"],
         "OUTPUT is empty", nest_source, cwd="p1"),
    Case("output is the source", ["convert", "{src}", "{src}", "--overwrite", "--kv-budget", "1.0"], "is the source"),
    Case("output is the source, trailing slash", ["convert", "src", "./src/", "--overwrite", "--kv-budget", "1.0"],
         "is the source"),
    Case("gqa output is the source", ["gqa", "{src}", "{src}", "--num-kv-heads", "1", "--overwrite"], "is the source"),
    Case("output contains the source", ["convert", "{work}/p1/src", "{work}/p1", "--overwrite", "--kv-budget", "1.0"],
         "contains the source", nest_source),
    Case("output inside the source", ["convert", "{src}", "{src}/mla", "--kv-budget", "1.0"], "lies inside the source"),
    Case("output through .. is the source", ["convert", "{src}", "{work}/p1/../src", "--overwrite", "--kv-budget", "1.0"],
         "is the source", nest_source),
    Case("output contains the calibration text",
         ["convert", "{src}", "{work}/p1", "--overwrite", "--kv-budget", "0.5", "--calibration", "{work}/p1/notes.txt"],
         "contains the calibration data", nest_source),
    Case("overwrite leaves a user's folder alone", ["convert", "{src}", "{work}/mine", "--overwrite", "--kv-budget", "1.0"],
         "--force", user_folder),
    Case("gqa overwrite leaves a user's folder alone", ["gqa", "{src}", "{work}/mine", "--num-kv-heads", "1", "--overwrite"],
         "--force", user_folder),
    Case("eval --json over the model's config", ["eval", "{src}", "--data", "{data}", "--json", "{src}/config.json"],
         "--json"),
    Case("eval --json over the data", ["eval", "{src}", "--data", "{data}", "--json", "{data}"], "is the data"),
    Case("overwrite leaves a folder with a user's conversion.json alone",
         ["convert", "{src}", "{work}/mine", "--overwrite", "--kv-budget", "1.0"], "--force",
         users_report("conversion.json")),
    Case("overwrite leaves a folder with a user's healing.json alone",
         ["convert", "{src}", "{work}/mine", "--overwrite", "--kv-budget", "1.0"], "--force",
         users_report("healing.json")),
    Case("gqa overwrite leaves a folder with a user's conversion.json alone",
         ["gqa", "{src}", "{work}/mine", "--num-kv-heads", "1", "--overwrite"], "--force",
         users_report("conversion.json")),
    Case("heal overwrite leaves a folder with a user's healing.json alone", [*HEAL[:2], "{work}/mine", *HEAL[3:],
         "--overwrite"], "--force", lambda work: (convert_student(work), users_report("healing.json")(work))),
    Case("export overwrite leaves a folder with a user's conversion.json alone",
         ["export", "deepseek", "{work}/mine", *EXPORT, "--overwrite"], "--force",
         lambda work: (convert_deepseek_student(work), users_report("conversion.json")(work))),
    Case("eval --json over an existing file", ["eval", "{src}", "--data", "{data}", "--json", "{work}/results.json"],
         "exists", users_results),
    Case("eval --json --overwrite over a user's file",
         ["eval", "{src}", "--data", "{data}", "--json", "{work}/results.json", "--overwrite"], "--force",
         users_results),
    Case("heal keeps a user's step-* folder in --checkpoint-dir",
         [*HEAL, "--checkpoint-dir", "ckpts", "--batch-size", "1", "--save-every", "1", "--eval-tokens", "64"], "",
         users_checkpoints, code=0),
    Case("a run keeps a user's backups named like staging folders", ["convert", "{src}", "{out}", "--kv-budget", "1.0"],
         "", users_backup, code=0),
    Case("heal output is the teacher", [*HEAL[:2], "src", *HEAL[3:], "--overwrite"], "is the teacher",
         convert_student),
    Case("heal output is the student", [*HEAL[:2], "student", *HEAL[3:], "--overwrite"], "is the student",
         convert_student),
    Case("heal output contains its inputs", [*HEAL[:2], "{work}", *HEAL[3:], "--overwrite", "--force"],
         "contains the student", convert_student),
    Case("heal checkpoints into the teacher", [*HEAL, "--checkpoint-dir", "src/ckpt"], "lies inside the teacher",
         convert_student),
    Case("heal checkpoints into a file", [*HEAL, "--checkpoint-dir", "afile"], "is a file",
         lambda work: (convert_student(work), plain_file(work))),
    # 2. a broken result reported as success
    Case("NaN source at full budget", ["convert", "nan", "{out}", "--kv-budget", "1.0"], "NaN", poison),
    Case("NaN source below full budget", ["convert", "nan", "{out}", "--kv-budget", "0.5"], "NaN", poison),
    Case("NaN source pooled", ["gqa", "nan", "{out}", "--num-kv-heads", "1"], "NaN", poison),
    Case("NaN model evaluated", ["eval", "nan", "--data", "{data}"], "NaN", poison),
    Case("eval against a reference with another tokenizer of the same size",
         ["eval", "{src}", "--data", "{data}", "--reference", "other"], "different tokenizers", other_tokenizer),
    Case("a RoPE size at full budget", ["convert", "{src}", "{out}", "--kv-budget", "1.0", "--qk-rope-head-dim", "2"],
         "--qk-rope-head-dim 2 cannot apply"),
    Case("a budget below the smallest that rounds up to it", ["convert", "{src}", "{out}", "--kv-budget", "0.04"],
         "smallest valid budget for this model is 0.0469"),
    Case("--max-shard-size without streaming", ["convert", "{src}", "{out}", "--kv-budget", "1.0", "--streaming", "off",
         "--max-shard-size", "100KB"], "", code=0, check=sharded_weights),
    Case("config without sizes", ["convert", "bare", "{out}", "--kv-budget", "1.0"], "does not match the weights",
         strip_config),
    Case("config without sizes evaluated", ["eval", "bare", "--data", "{data}"], "does not match the weights",
         strip_config),
    # 3. one line where a traceback was
    Case("truncated weights", ["convert", "cut", "{out}"], "truncated", truncate_weights),
    Case("empty weights file", ["convert", "empty", "{out}"], "model.safetensors", empty_weights),
    Case("broken config.json", ["convert", "badjson", "{out}"], "config.json", bad_config_json),
    Case("truncated GGUF", ["convert", "cut.gguf", "{out}", "--kv-budget", "1.0"], "truncated", cut_gguf),
    Case("truncated GGUF pooled", ["gqa", "cut.gguf", "{out}", "--num-kv-heads", "1"], "truncated", cut_gguf),
    Case("truncated GGUF as the reference", ["eval", "{src}", "--data", "{data}", "--reference", "cut.gguf"],
         "truncated", cut_gguf),
    Case("truncated GGUF as the teacher", [*HEAL[:4], "cut.gguf", *HEAL[5:]], "truncated",
         lambda work: (convert_student(work), cut_gguf(work))),
    Case("GGUF magic and garbage", ["convert", "junk.gguf", "{out}", "--kv-budget", "1.0"], "corrupt", garbage_gguf),
    Case("no room for the tokenizer", ["convert", "{src}", "{out}", "--kv-budget", "1.0"], "not enough free space",
         little_free_space, env={**SHIM, "FAKE_FREE_BYTES": "530000"}),
    Case("no room for the tokenizer, streamed", ["convert", "{src}", "{out}", "--kv-budget", "1.0", "--streaming", "on"],
         "not enough free space", little_free_space, env={**SHIM, "FAKE_FREE_BYTES": "530000"}),
    Case("no room for the pooled model", ["gqa", "{src}", "{out}", "--num-kv-heads", "1"], "not enough free space",
         little_free_space, env={**SHIM, "FAKE_FREE_BYTES": "100000"}),
    Case("no room for the healed model's files", HEAL, "not enough free space",
         lambda work: (convert_student(work), little_free_space(work)), env={**SHIM, "FAKE_FREE_BYTES": "500000"}),
    Case("cuda without cuda", ["convert", "{src}", "{out}", "--device", "cuda"], "--device cuda"),
    Case("mps without mps", ["convert", "{src}", "{out}", "--device", "mps"], "--device mps"),
    Case("unknown device", ["convert", "{src}", "{out}", "--device", "tpu7"], "--device"),
    Case("output under a file", ["convert", "{src}", "{work}/afile/out"], "not a folder", plain_file),
    Case("output under a missing folder", ["convert", "{src}", "{work}/no/such/out"], "does not exist"),
    Case("output under a read-only place", ["convert", "{src}", "/proc/mla-out"], "cannot write in /proc"),
    Case("eval --json into a missing folder", ["eval", "{src}", "--data", "{data}", "--json", "{work}/none/r.json"],
         "does not exist"),
    Case("generate an empty prompt", ["generate", "{src}", "  "], "PROMPT is empty"),
    Case("generate no tokens", ["generate", "{src}", "hi", "--max-new-tokens", "0"], "--max-new-tokens"),
    Case("generate negative tokens", ["generate", "{src}", "hi", "--max-new-tokens", "-3"], "--max-new-tokens"),
    # 4. clarity
    Case("a negative number is a value", ["convert", "{src}", "{out}", "--refine-lr", "-1e-4"],
         "--refine-lr must be positive"),
    Case("a RoPE key that takes the whole budget", ["convert", "{src}", "{out}", "--kv-budget", "0.5",
         "--qk-rope-head-dim", "32"], "--qk-rope-head-dim 32 takes them all", not_in="--kv-lora-rank"),
    Case("fewer calibration tokens than a sequence", ["convert", "{src}", "{out}", "--kv-budget", "0.5", "--calibration",
         "{data}", "--calibration-tokens", "1"], "--calibration-tokens must be at least 512"),
    Case("calibration text shorter than a sequence", ["convert", "{src}", "{out}", "--kv-budget", "0.5",
         "--calibration", "tiny.txt"], "use more text", tiny_text, not_in="shorter"),
    Case("calibration records without a text column", ["convert", "{src}", "{out}", "--kv-budget", "0.5",
         "--calibration", "records.jsonl"], "--text-column", records_in("body")),
    Case("evaluation records without a text column", ["eval", "{src}", "--data", "records.jsonl"], "--text-column",
         records_in("body")),
    Case("evaluation records with their column named", ["eval", "{src}", "--data", "records.jsonl", "--seq-len", "64",
         "--text-column", "body"], "", records_in("body"), code=0),
    Case("a bad line in the middle of a jsonl file", ["convert", "{src}", "{out}", "--kv-budget", "0.5",
         "--calibration", "bad.jsonl"], "line 3", bad_jsonl),
    Case("heal --any-teacher with another tokenizer", [*HEAL[:4], "other", *HEAL[5:], "--any-teacher"],
         "even with --any-teacher", lambda work: (convert_student(work), other_tokenizer(work)),
         not_in="converted from"),
    Case("the default checkpoint folder is a file", HEAL, "where checkpoints go by default",
         checkpoint_path_is_a_file, not_in="--checkpoint-dir /"),
    Case("hub id while offline", ["convert", "someone/some-model", "{out}"], "HF_HUB_OFFLINE",
         env={"HF_HUB_OFFLINE": "1"}),
    Case("dataset name while offline", ["convert", "{src}", "{out}", "--calibration", "wikitext:wikitext-2-raw-v1"],
         "HF_HUB_OFFLINE", env={"HF_HUB_OFFLINE": "1"}),
    # 5. --target deepseek and export: what DeepSeek-V3's format cannot hold is refused before any work
    Case("deepseek target with attention biases", ["convert", "qwen", "{out}", *DEEPSEEK, "--kv-budget", "0.5"],
         "its attention has biases", qwen_source),
    Case("deepseek target with frequency folding", ["convert", "{src}", "{out}", *DEEPSEEK, "--rope-strategy", "freqfold"],
         "needs --rope-strategy rorope or partial"),
    Case("deepseek RoPE key that does not divide head_dim",
         ["convert", "{src}", "{out}", *DEEPSEEK, "--kv-lora-rank", "24", "--qk-rope-head-dim", "6"],
         "divides the source's head_dim 16"),
    Case("deepseek budget below one latent dimension", ["convert", "{src}", "{out}", *DEEPSEEK, "--kv-budget", "0.01"],
         "--target deepseek needs one in [1, "),
    Case("export a plain-target folder", ["export", "student", "{out}", *EXPORT], "convert with --target deepseek",
         convert_student),
    Case("export per-layer ranks", ["export", "spectrum", "{out}", *EXPORT], "one kv_lora_rank for all layers",
         convert_per_layer_ranks),
    Case("export a source model", ["export", "{src}", "{out}", *EXPORT], "not a converted MLA one"),
    Case("export onto its input", ["export", "deepseek", "deepseek", *EXPORT, "--overwrite"], "is the MLA folder",
         convert_deepseek_student),
]


def tree_digest(path: Path) -> dict[str, str]:
    """Every file under `path` (or `path` itself) with a hash of its bytes."""
    if path.is_file():
        return {path.name: hashlib.sha256(path.read_bytes()).hexdigest()}
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.rglob("*")) if p.is_file()
    }


def progress_bar(line: str) -> bool:
    return "it/s]" in line or "s/it]" in line or "%|" in line


@pytest.fixture
def work(tmp_path, pico_folders, wikitext) -> Path:
    """A folder with copies of the pico sources and a short text, so a test that goes wrong damages only copies."""
    shutil.copytree(pico_folders["llama-gqa"], tmp_path / "src")
    shutil.copytree(pico_folders["mistral"], tmp_path / "mistral")
    (tmp_path / "text.txt").write_text(wikitext.read_text(encoding="utf-8")[:20_000], encoding="utf-8")
    return tmp_path


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_bad_input_is_one_line_and_changes_nothing(work, case):
    if case.setup is not None:
        case.setup(work)
    names = {"src": work / "src", "mistral": work / "mistral", "out": work / "out", "data": work / "text.txt",
             "work": work}
    args = [arg.format(**names) for arg in case.args]
    before = {path.name: tree_digest(path) for path in work.iterdir()}
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **{key: value.format(**names) for key, value in case.env.items()}}

    result = run_cli(*args, cwd=work / case.cwd, env=env)

    assert result.returncode == case.code, result.stderr
    assert "Traceback" not in result.stderr
    if case.code == 0:
        # a success: everything that was there is as it was, the output is the one new thing, nothing is left over
        after = {path.name: tree_digest(path) for path in work.iterdir()}
        assert {name: after.get(name) for name in before} == before
        assert set(after) - set(before) <= {"out"}
        assert case.fragment in result.stderr, result.stderr
        if case.check is not None:
            case.check(work)
        return
    lines = [line for line in result.stderr.replace("\r", "\n").splitlines() if line.strip() and not progress_bar(line)]
    assert len(lines) == 1 and lines[0].startswith("mla-convert"), result.stderr
    assert case.fragment in lines[0], lines[0]
    assert case.not_in is None or case.not_in not in lines[0], lines[0]
    # the disk: inputs and everything else as it was, no output, no staging folder anywhere in the work folder
    assert {path.name: tree_digest(path) for path in work.iterdir()} == before
    assert not [path for path in work.rglob("*") if ".partial-" in path.name or ".old-" in path.name]


def test_argparse_errors_are_the_usage_line_and_the_error():
    result = run_cli("convert", "a", "b", "--no-such-option")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("usage:") and "--no-such-option" in lines[1], result.stderr


@pytest.mark.parametrize("command", ["convert", "gqa", "eval", "heal", "generate", "export"])
def test_help_says_each_default_once_and_no_raw_format_codes(command):
    result = run_cli(command, "--help")
    assert result.returncode == 0, result.stderr
    assert "%%" not in result.stdout and "%(" not in result.stdout
    assert "(default: None)" not in result.stdout
    # "(default: x) (default: y)" once argparse wraps it: no help entry may say its default twice
    entries = result.stdout.split("\n  -")
    assert not [entry for entry in entries if entry.count("(default") > 1], result.stdout


def test_more_calibration_tokens_than_the_text_holds_says_how_many_were_used(work):
    result = run_cli(
        "convert", str(work / "src"), str(work / "out"), "--kv-budget", "0.5", "--calibration", str(work / "text.txt"),
        "--calibration-tokens", "1000000", "--refine-steps", "0", "--key-scale", "1",
    )
    assert result.returncode == 0, result.stderr
    used = json.loads((work / "out" / "conversion.json").read_text())["calibration"]["tokens"]
    assert 0 < used < 1_000_000
    assert f"calibrating on the {used} tokens" in result.stderr


def test_force_replaces_a_users_folder_only_when_asked(work):
    user_folder(work)
    result = run_cli("convert", str(work / "src"), str(work / "mine"), "--kv-budget", "1.0", "--overwrite", "--force")
    assert result.returncode == 0, result.stderr
    assert (work / "mine" / "conversion.json").is_file() and not (work / "mine" / "thesis.tex").exists()
    assert leftovers(work) == []


def test_stale_staging_of_a_killed_run_is_removed_by_the_next_run(work):
    """Only folders with our exact staging names and our marker for this OUTPUT go: a user's folder that merely
    looks like staging stays, even with a marker file of that name."""
    import tempfile

    from mla_convert.folders import STAGING_MARKER, _mark_staging

    ours = Path(tempfile.mkdtemp(prefix=".out.partial-", dir=work))
    _mark_staging(ours, work / "out")
    (ours / "model.safetensors").write_bytes(b"half")
    theirs = [work / ".out.partial-mine", work / ".out.partial-abcd1234", Path(tempfile.mkdtemp(prefix=".out.old-",
              dir=work))]  # fmt: skip
    for folder in theirs:
        folder.mkdir(exist_ok=True)
        (folder / STAGING_MARKER).touch()
        (folder / "keep.txt").write_text("not ours")
    result = run_cli("convert", str(work / "src"), str(work / "out"), "--kv-budget", "1.0")
    assert result.returncode == 0, result.stderr
    assert not ours.exists()
    assert all((folder / "keep.txt").read_text() == "not ours" for folder in theirs)


def test_overwrite_replaces_our_outputs_old_and_new(work):
    """The marker makes an output replaceable; one written before the marker is recognised by its report."""
    output = work / "out"
    assert run_cli("convert", str(work / "src"), str(output), "--kv-budget", "1.0").returncode == 0
    assert run_cli("convert", str(work / "src"), str(output), "--kv-budget", "1.0", "--overwrite").returncode == 0
    (output / ".mla-convert-output").unlink()  # as an earlier version wrote it
    result = run_cli("gqa", str(work / "src"), str(output), "--num-kv-heads", "1", "--overwrite")
    assert result.returncode == 0, result.stderr
    assert json.loads((output / "conversion.json").read_text())["method"] == "gqa-mean-pool"


KILLED_SAVE = """
import os, signal, sys
import mla_convert.folders as folders
from mla_convert.cli import main

where = sys.argv[1]
exchange, replace = folders._exchange, os.replace

def die():
    os.kill(os.getpid(), signal.SIGKILL)

def exchange_then_die(first, second):
    if where == "before-swap":
        die()
    swapped = exchange(first, second)
    die()

calls = []
def replace_then_die(src, dst):
    replace(src, dst)
    calls.append(dst)
    if len(calls) == 1:  # between moving the old folder aside and moving the new one in
        die()

if where == "between-renames":
    folders._exchange = lambda first, second: False  # a filesystem without atomic exchange
    os.replace = replace_then_die
else:
    folders._exchange = exchange_then_die
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.parametrize("where", ["before-swap", "after-swap", "between-renames"])
def test_a_kill_at_the_final_rename_keeps_the_old_output_or_the_new_one(work, where):
    output = work / "out"
    assert run_cli("convert", str(work / "src"), str(output), "--kv-budget", "1.0").returncode == 0
    old = tree_digest(output)

    argv = ["convert", str(work / "src"), str(output), "--kv-budget", "0.5", "--refine-steps", "0", "--key-scale", "1",
            "--calibration", str(work / "text.txt"), "--calibration-tokens", "1024", "--overwrite"]
    killed = subprocess.run([sys.executable, "-c", KILLED_SAVE, where, *argv], capture_output=True, text=True,
                            timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stderr

    if where == "between-renames":
        # the one window without an atomic exchange: the old folder waits beside OUTPUT and the next run restores it
        assert not output.exists() and leftovers(work)
        assert run_cli("eval", str(output), "--data", str(work / "text.txt")).returncode == 2
        from mla_convert.folders import recover_staging

        recover_staging(output)
    after = tree_digest(output)
    kv_budget = json.loads((output / "conversion.json").read_text())["kv_budget"]
    if where == "after-swap":
        assert kv_budget == 0.5 and after != old
        assert {"config.json", "model.safetensors", "conversion.json", "tokenizer.json"} <= set(after)
    else:
        assert after == old and kv_budget == 1.0

    # the next run to the same OUTPUT leaves nothing of the killed one behind
    assert run_cli("convert", str(work / "src"), str(output), "--kv-budget", "1.0", "--overwrite").returncode == 0
    assert leftovers(work) == []
    assert ".mla-convert-staging" not in tree_digest(output)
    assert torch.isfinite(load_file(output / "model.safetensors")["model.embed_tokens.weight"]).all()


TERMINATED_SAVE = """
import os, signal, sys
import mla_convert.folders as folders
from mla_convert.cli import main

replace = folders._replace

def terminate_then_replace(staging, output):
    os.kill(os.getpid(), signal.SIGTERM)  # as `kill PID` or a scheduler ending the job, while the result is saved
    replace(staging, output)

folders._replace = terminate_then_replace
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("existing", [False, True], ids=["new output", "over an earlier output"])
def test_sigterm_during_the_final_save_cleans_up_as_ctrl_c_does(work, existing):
    output = work / "out"
    if existing:
        assert run_cli("convert", str(work / "src"), str(output), "--kv-budget", "1.0").returncode == 0
    old = tree_digest(output) if existing else None
    argv = ["convert", str(work / "src"), str(output), "--kv-budget", "1.0", "--overwrite"]
    result = subprocess.run([sys.executable, "-c", TERMINATED_SAVE, *argv], capture_output=True, text=True, timeout=600)
    assert result.returncode == 128 + signal.SIGTERM, result.stderr
    assert "Traceback" not in result.stderr and "mla-convert: terminated" in result.stderr
    assert leftovers(work) == []  # the staging folder went with the process, not at the next run
    assert (tree_digest(output) if existing else output.exists()) == (old if existing else False)


@pytest.mark.parametrize("streaming", ["off", "on"])
def test_written_files_follow_the_users_umask(work, streaming):
    """Whole-model and streamed outputs alike: what the user's umask allows, as for any file they write."""
    output = work / "out"
    result = run_cli("convert", str(work / "src"), str(output), "--kv-budget", "1.0", "--streaming", streaming,
                     preexec_fn=lambda: os.umask(0o002))  # fmt: skip
    assert result.returncode == 0, result.stderr
    modes = {path.name: stat.S_IMODE(path.stat().st_mode) for path in output.iterdir()}
    assert modes and set(modes.values()) == {0o664}, {name: oct(mode) for name, mode in modes.items()}
    assert stat.S_IMODE(output.stat().st_mode) == 0o775
