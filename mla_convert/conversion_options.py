"""What to convert to: `ConversionOptions`, whose fields carry the `convert` verb's flags (help, choices, group,
checks; see `mla_convert.options`), and their check."""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import MLAConvertError
from .options import check_fields, option
from .refine import RefineOptions


INIT_METHODS = ("pca", "svd")
# Which key components keep RoPE in the shared key (`decompose.rope_placement`)
ROPE_STRATEGIES = ("rorope", "freqfold", "partial")
RANK_ALLOCATIONS = ("uniform", "spectrum")
# What the folder is for: "mla", our own MLA model (any ranks and RoPE tables); "deepseek", a model that
# `mla-convert export --format deepseek-v3` can turn into a DeepSeek-V3 checkpoint for the engines
TARGETS = ("mla", "deepseek")
# The RoPE strategies that can keep exactly one component per DeepSeek frequency (freqfold rotates pairs of them)
DEEPSEEK_ROPE_STRATEGIES = ("rorope", "partial")
# Refinement's learning rate under DeepSeek's latent norm: at the plain target's 3e-4 it made 17 of SmolLM2-135M's 30
# layers worse on held-out windows at budget 0.5; 1e-4 and 3e-5 improve every layer tried (docs/deepseek.md).
DEEPSEEK_REFINE_LR = 5e-5
# Refinement's steps per layer under that smaller rate: 100 leave SmolLM2-135M at 0.5 at 1.182x the source's
# perplexity, 300 at 1.115x (docs/deepseek.md). The plain target's default is the same 300, measured on its own.
DEEPSEEK_REFINE_STEPS = 300
SAVED_DTYPES = ("float32", "bfloat16", "float16")
# Multipliers of the K/V energy balance tried per layer by `key_scale="search"`
KEY_SCALE_GRID = (0.5, 1.0, 2.0, 4.0)
STREAMING_MODES = ("auto", "on", "off")
NOPE_SHRINK_MODES = ("off", "on")
# Whose hidden states a layer is refined on (`stream.convert_layers`): the source's, or the converted model's own
REFINE_INPUTS = ("source", "converted", "residual")
# The arithmetic of refinement's training steps (`settings.refine_precision` resolves auto)
REFINE_PRECISIONS = ("auto", "bfloat16", "float32")
SOLVE_OUTPUT_MODES = ("on", "off")
SIZE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_key_scale(value: str) -> str | float:
    """`--key-scale`: 'search' or a number (checked by `check_options`)."""
    if value == "search":
        return value
    try:
        return float(value)
    except ValueError:
        raise MLAConvertError(f"--key-scale must be 'search' or a positive number, got {value!r}") from None


def _grid_text() -> str:
    factors = [f"{factor:g}" for factor in KEY_SCALE_GRID]
    return ", ".join(factors[:-1]) + " and " + factors[-1]


# Data-free calibration: rows of at most this many sampled tokens, sampled this many rows at a time (sampling.py)
SAMPLED_SEQ_LEN = 256
SAMPLING_BATCH = 64


@dataclass(frozen=True)
class ConversionOptions:
    """What to convert to. Give `kv_budget`, or `kv_lora_rank` (with optional `qk_rope_head_dim`); an explicit
    `kv_lora_rank` wins over `kv_budget`. Field groups: "size" and "budget" (the cache size; `--kv-budget` and
    `--kv-lora-rank` exclude each other on the command line), "method", and the command's own options."""

    target: str = option(
        "mla", choices=TARGETS,
        help="mla: the plugin's MLA model (per-layer latent sizes, free RoPE placement); deepseek: a model under "
        "DeepSeek-V3's constraints (a latent RMSNorm before the cache, one kv_lora_rank for every layer, so "
        "--rank-allocation is uniform, and DeepSeek's RoPE table: --qk-rope-head-dim must divide the source's "
        "head_dim, --rope-strategy rorope or partial; no attention biases), which `mla-convert export --format deepseek-v3` turns into a checkpoint that transformers' own "
        "DeepseekV3 and vLLM/SGLang load. Never exact, not even at --kv-budget 1.0",
    )  # fmt: skip
    kv_budget: float | None = option(
        0.5, group="budget", metavar="F",
        help="fraction of the source's KV cache that remains, in (0, 1]; 1.0 is exact",
    )  # fmt: skip
    kv_lora_rank: int | None = option(None, group="budget", metavar="R", help="latent size per token and layer")
    qk_rope_head_dim: int | None = option(
        None, group="size", metavar="D",
        help="size of the shared RoPE key (even); default with --kv-budget: a third of the budget, at most the "
        "source's head_dim; with --kv-lora-rank: the source's head_dim",
    )  # fmt: skip
    rank_allocation: str = option(
        "spectrum", group="size", choices=RANK_ALLOCATIONS,
        help="uniform: the same latent size in every layer; spectrum: with --kv-budget, latent sizes per layer where "
        "the calibration spectra need them (the total cache stays exactly the same; the config carries the "
        "per-layer sizes); an explicit --kv-lora-rank is used in every layer as given. With --target deepseek "
        "always uniform (DeepSeek-V3 has one kv_lora_rank)",
    )  # fmt: skip
    calibration: str | None = option(
        None, metavar="DATA",
        help="calibration text: a .txt/.jsonl/.parquet file or folder (its first 80% is used), or a datasets name "
        "NAME[:CONFIG]. Without it, calibration text is sampled from the source model itself (data-free)",
    )  # fmt: skip
    text_column: str = option(
        "text", metavar="NAME", help="column of --calibration's records (.jsonl/.json/.parquet, datasets) that holds the text"
    )  # fmt: skip
    calibration_tokens: int = option(32768, metavar="N", help="calibration tokens", at_least=1)
    calibration_seq_len: int = option(512, at_least=1)
    init: str = option(
        "pca", group="method", choices=INIT_METHODS,
        help="pca: joint PCA of [K_nope ; V] on calibration activations, in the metric the layer's output feels; "
        "svd: weight-only SVD",
    )  # fmt: skip
    rope_strategy: str = option(
        "rorope", group="method", choices=ROPE_STRATEGIES,
        help="which key components keep RoPE in the shared key. rorope: PCA of the key heads per frequency, keeping "
        "the components whose loss of RoPE would cost the most attention-score error; freqfold: the same over pairs "
        "of adjacent frequencies; partial: no mixing, MHA2MLA's 2-norm rule",
    )  # fmt: skip
    nope_shrink: str = option(
        "off", group="method", choices=NOPE_SHRINK_MODES,
        help="on: scale each frequency's part of the NoPE key (the key components that lose RoPE) by E[cos(theta "
        "delta)] over query-key distances up to 2048 tokens (near ones weighing more), instead of keeping it as if "
        "unrotated: fast frequencies, whose rotation averages out, shrink towards 0. Better closed forms "
        "(--refine-steps 0; SmolLM2 at 0.5: 1.57x -> 1.49x, --target deepseek 1.77x -> 1.64x), about the same once "
        "refined (1.109x -> 1.104x; deepseek 1.182x -> 1.198x), so off by default",
    )  # fmt: skip
    # "search": per layer, the multiplier of the K/V balance with the least attention-output error on calibration
    # data; a number: that multiplier for every layer
    key_scale: str | float = option(
        "search", group="method", metavar="search|A", parse=parse_key_scale,
        help="weight of the keys against the values in the joint latent, as a multiple of the weight that balances "
        f"their energies: 'search' walks {_grid_text()} per layer from 1 while the error falls (three of the four in "
        "the usual case) and keeps the one that reproduces the source layer's attention output best on calibration "
        "data",
    )  # fmt: skip
    # None: the target's own (`refine_steps`)
    refine_steps: int | None = option(
        None, group="method", metavar="N", at_least=0, zero_means="off",
        help="after the closed-form start, Adam steps per layer fitting each layer's attention output to the "
        "source layer's on calibration activations (one layer at a time, no full-model backward); 0 turns it off. "
        f"Default {RefineOptions.steps}, with --target deepseek {DEEPSEEK_REFINE_STEPS} (SmolLM2 at 0.25: 1.72x the "
        "source's perplexity after 100 steps, 1.59x after 300)",
    )  # fmt: skip
    # None: the target's own (`refine_lr`)
    refine_lr: float | None = option(
        None, group="method", metavar="LR", positive=True,
        help=f"learning rate of refinement; default {RefineOptions.lr:g}, with --target deepseek "
        f"{DEEPSEEK_REFINE_LR:g} (its latent norm makes the layer's loss steeper: at {RefineOptions.lr:g} refinement "
        "makes most layers worse)",
    )  # fmt: skip
    refine_inputs: str = option(
        "source", group="method", choices=REFINE_INPUTS,
        help="the hidden states each layer is refined on. source: the source model's, so every layer is fitted on "
        "its own and never sees the error the layers before it left. converted: the converted model's own (its "
        "earlier layers already converted and refined, applied in order), fitted to the source layer's attention "
        "output on the source's hidden states: each layer learns to give the right output from the inputs it will "
        "really get. residual: the same inputs, fitted to the attention output that brings the converted model's "
        "residual stream back to the source's after the layer (the source's output plus what the earlier layers "
        "left wrong), so each layer also undoes what it can of the earlier layers' error. converted and residual "
        "cost one more pass of the refinement tokens through each converted layer",
    )  # fmt: skip
    refine_precision: str = option(
        "auto", group="method", choices=REFINE_PRECISIONS,
        help="arithmetic of refinement's training steps. bfloat16: their matrix products in bfloat16 (autocast), "
        "while the weights, Adam's moments and the held-out scores that decide whether a layer keeps its "
        "refinement stay float32; float32: all in float32. auto: bfloat16 where the device multiplies it fast "
        "(CUDA GPUs with bfloat16, CPUs with AVX512-BF16 or AMX: 3-4x float32's speed), float32 elsewhere",
    )  # fmt: skip
    solve_output: str = option(
        "on", group="method", choices=SOLVE_OUTPUT_MODES,
        help="on: after refinement's steps, each layer's o_proj is solved by least squares on the refinement "
        "windows, the rest of the layer fixed (its output is linear in o_proj, so this is the optimum the steps "
        "only approach), and kept where held-out windows agree. SmolLM2 at 0.25: 1.586x -> 1.529x the source's "
        "perplexity on held-out WikiText, 3.224x -> 3.115x on Shakespeare. Nothing without refinement, nor where "
        "the refinement windows hold fewer than 4 tokens per o_proj input (heads x v_head_dim)",
    )  # fmt: skip
    # calibration tokens whose attention inputs are kept (in bfloat16) for refinement and the key-scale search
    refine_tokens: int = option(
        32768, group="method", metavar="N", at_least=1,
        help="calibration tokens whose attention inputs are kept for refinement (bfloat16, hidden_size x layers x "
        "2 bytes each: lower it for large models)",
    )  # fmt: skip
    seed: int = option(0, help="seed for data-free calibration sampling")
    dtype: str = option("float32", choices=SAVED_DTYPES, help="saved dtype")
    device: str = option("cpu", help="device for conversion (cpu, cuda, cuda:1, ...)")
    streaming: str = option(
        "auto", choices=STREAMING_MODES,
        help="where the layers are read from (the conversion runs one decoder layer at a time either way, with the "
        "same result). on: from the safetensors shards, one layer at a time (memory: about two layers, the "
        "embeddings and the calibration activations, whatever the depth); off: from the whole source held in memory "
        "(GGUF files and hub ids need it); auto: off only when the conversion's peak memory estimated with the "
        "source in memory is under 60% of the memory available (conversion.json records the estimates of both). "
        "Data-free calibration samples layer by layer from either",
    )  # fmt: skip
    max_shard_size: str = option(
        "2GB", metavar="SIZE",
        help="the largest weights file written (e.g. 500MB, 2GB); larger outputs are sharded with an index",
    )  # fmt: skip


def parse_size(text: str) -> int:
    """`--max-shard-size`: `500MB`, `2GB`, `1GiB` or a number of bytes, as transformers reads it."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmg]i?b|b)?\s*", str(text), re.IGNORECASE)
    if match is None or float(match.group(1)) <= 0:
        raise MLAConvertError(f"--max-shard-size must be a size like 500MB or 2GB, got {text!r}")
    return int(float(match.group(1)) * SIZE_UNITS[(match.group(2) or "").lower()])


def check_options(options: ConversionOptions) -> None:
    """Refuses bad options with the valid range, naming the flags of `convert`, before anything is loaded (budgets
    and ranks depend on the source: `plan_ranks` checks them)."""
    check_fields(options)
    # one calibration sequence: of calibration_seq_len tokens of text, or of at most 256 sampled ones (calibrate.py)
    sequence = options.calibration_seq_len
    if options.calibration is None:
        sequence = min(sequence, SAMPLED_SEQ_LEN)
    if options.calibration_tokens < sequence:
        raise MLAConvertError(
            f"--calibration-tokens must be at least {sequence} (one calibration sequence of {sequence} tokens), got "
            f"{options.calibration_tokens}"
        )
    key_scale = options.key_scale
    if key_scale != "search" and not (
        isinstance(key_scale, (int, float)) and not isinstance(key_scale, bool) and 0 < key_scale < float("inf")
    ):
        raise MLAConvertError(f"--key-scale must be 'search' or a positive number, got {key_scale!r}")
    parse_size(options.max_shard_size)
    if options.target == "deepseek" and options.rope_strategy not in DEEPSEEK_ROPE_STRATEGIES:
        raise MLAConvertError(
            f"--target deepseek needs --rope-strategy {' or '.join(DEEPSEEK_ROPE_STRATEGIES)}: DeepSeek-V3 rotates "
            f"each RoPE pair with one frequency of its own table, and {options.rope_strategy} mixes frequencies"
        )
