"""The conversion's settings, resolved once at entry: what `ConversionOptions` asks for, with every default the
target implies filled in and every choice that depends on the source made (how long to refine, how the latent is
spread over the layers, which K/V balances are tried, whether the layer source is read from the shards or held in
memory, and why). The pipeline reads `Settings` and never re-derives a default; `conversion.json` records them."""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil
import torch
from transformers import PreTrainedConfig

from .conversion_options import (
    DEEPSEEK_REFINE_LR, DEEPSEEK_REFINE_STEPS, KEY_SCALE_GRID, SAMPLED_SEQ_LEN, ConversionOptions, parse_size,
)  # fmt: skip
from .decompose import DecomposeOptions
from .errors import MLAConvertError
from .memory import GiB, PeakEstimate, SourceSizes, estimate_peak, sampler_cache_bytes
from .plan import RankPlan
from .refine import RefineOptions


# auto holds the source in memory only when the conversion's peak estimated that way (`memory.estimate_peak`) is under
# this share of the memory available now, and reads it layer by layer from its shards otherwise.
AUTO_MEMORY_SHARE = 0.6


@dataclass(frozen=True)
class Settings:
    """Every decision of a conversion, made once (`resolve`)."""

    options: ConversionOptions
    target: str
    # the full-budget exact form (no calibration, no refinement, no search)
    exact: bool
    init: str
    rope_strategy: str
    nope_shrink: bool
    # "spectrum" (latent sizes per layer by the calibration spectra), "uniform" or "explicit --kv-lora-rank"
    rank_allocation: str
    # the K/V balances tried per layer; one value: no search
    key_scale_grid: tuple[float, ...]
    refine_steps: int
    refine_lr: float
    # whose hidden states the layers are refined on: "source" or "converted" (the converted model's own, in order)
    refine_inputs: str
    # "bfloat16" or "float32": the arithmetic of refinement's training steps (auto resolved for the device)
    refine_precision: str
    # o_proj solved by least squares after refinement's steps
    solve_output: bool
    # "text" (the given file or dataset), "sampled" (data-free: from the source itself) or "none"
    calibration: str
    # calibration tokens whose attention inputs are kept for refinement and the key-scale search (0: none)
    kept_tokens: int
    # read the source layer by layer from its safetensors shards (True) or hold it in memory (False), and why
    streaming: bool
    streaming_reason: str
    max_shard_bytes: int
    # the conversion's peak memory estimated for each layer source (None: a GGUF file, hub id or .bin checkpoint)
    estimated_peak: PeakEstimate | None = None

    @property
    def searches_key_scale(self) -> bool:
        return len(self.key_scale_grid) > 1

    @property
    def first_key_scale(self) -> float:
        """The K/V balance of the spectrum pass (balanced where the search tries several), or the only one."""
        return 1.0 if self.searches_key_scale else self.key_scale_grid[0]

    @property
    def spectrum_allocation(self) -> bool:
        return self.rank_allocation == "spectrum"

    @property
    def refine(self) -> RefineOptions:
        return RefineOptions(
            steps=self.refine_steps, lr=self.refine_lr, precision=self.refine_precision, solve_output=self.solve_output
        )  # fmt: skip

    @property
    def sequential(self) -> bool:
        """Whether the converted model's own hidden states are carried through the layers to refine them on."""
        return self.refine_inputs in ("converted", "residual") and self.refine_steps > 0 and self.kept_tokens > 0

    def decompose(self, plan: RankPlan) -> DecomposeOptions:
        return DecomposeOptions(
            init=self.init, rope_strategy=self.rope_strategy, rope_frequencies=plan.rope_frequencies,
            nope_shrink=self.nope_shrink,
        )  # fmt: skip

    def kept_sequences(self, seq_len: int) -> int:
        """How many calibration sequences of `seq_len` tokens have their attention inputs kept."""
        return math.ceil(self.kept_tokens / seq_len) if self.kept_tokens else 0

    def record(self) -> dict:
        """What `conversion.json` records of the resolved settings."""
        # the estimates are recorded beside the measured peak (`conversion.json`'s `estimated_peak_bytes`)
        record = {key: value for key, value in asdict(self).items() if key not in ("options", "estimated_peak")}
        record["key_scale_grid"] = list(self.key_scale_grid)
        return record


def resolve(
    options: ConversionOptions, source: str, gguf_file: str | None, source_config: PreTrainedConfig, plan: RankPlan
) -> Settings:
    """`options` for this source and cache plan, with every default filled in (see the module's docstring)."""
    exact = plan.exact
    if options.kv_lora_rank is not None:
        rank_allocation = "explicit --kv-lora-rank"
    elif options.rank_allocation == "spectrum" and options.target == "mla" and not exact:
        rank_allocation = "spectrum"
    else:
        # DeepSeek-V3 has one kv_lora_rank; the exact form has nothing to spread
        rank_allocation = "uniform"
    search = not exact and options.init == "pca" and options.key_scale == "search"
    if search:
        grid = KEY_SCALE_GRID
    else:
        grid = (1.0 if options.key_scale == "search" else float(options.key_scale),)
    deepseek = options.target == "deepseek"
    steps = options.refine_steps if options.refine_steps is not None else (
        DEEPSEEK_REFINE_STEPS if deepseek else RefineOptions.steps
    )  # fmt: skip
    steps = 0 if exact else steps
    lr = options.refine_lr if options.refine_lr is not None else (DEEPSEEK_REFINE_LR if deepseek else RefineOptions.lr)
    # weight-only SVD reads text only to refine; DeepSeek's latent norm always starts from the latent's RMS on text
    weight_only = options.init == "svd" and steps == 0 and not deepseek
    if exact or weight_only:
        calibration = "none"
    else:
        calibration = "sampled" if options.calibration is None else "text"
    kept_tokens = options.refine_tokens if calibration != "none" and (steps > 0 or search) else 0
    estimate = estimated_peak(source, gguf_file, options, source_config, calibration, kept_tokens)
    streaming, reason = choose_layer_source(source, gguf_file, options, estimate)
    return Settings(
        options=options,
        target=options.target,
        exact=exact,
        init=options.init,
        rope_strategy=options.rope_strategy,
        nope_shrink=options.nope_shrink == "on",
        rank_allocation=rank_allocation,
        key_scale_grid=tuple(grid),
        refine_steps=steps,
        refine_lr=lr,
        refine_inputs=options.refine_inputs,
        refine_precision=refine_precision(options.refine_precision, options.device),
        solve_output=options.solve_output == "on" and steps > 0,
        calibration=calibration,
        kept_tokens=kept_tokens,
        streaming=streaming,
        streaming_reason=reason,
        max_shard_bytes=parse_size(options.max_shard_size),
        estimated_peak=estimate,
    )


def refine_precision(requested: str, device: str) -> str:
    """`--refine-precision` for `device`: auto is bfloat16 where the device multiplies bfloat16 faster than float32."""
    if requested != "auto":
        return requested
    return "bfloat16" if fast_bfloat16(torch.device(device)) else "float32"


def fast_bfloat16(device: torch.device) -> bool:
    """Whether `device` has bfloat16 matrix units: a CUDA GPU that computes bfloat16 natively (Ampere on), a CPU with
    AVX512-BF16 or AMX (where bfloat16 products ran 4.7x float32's on one core: 438 against 93 GFLOP/s). Without
    them bfloat16 products are computed by conversion to float32, and gain nothing but rounding."""
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        # private probes of torch.cpu: a build without them reads as no such units, the safe side
        probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
        return any(getattr(torch.cpu, probe, lambda: False)() for probe in probes)
    return False


# ------------------------------------------------------------------------------------------ the layer source


def estimated_peak(
    source: str, gguf_file: str | None, options: ConversionOptions, source_config: PreTrainedConfig, calibration: str,
    kept_tokens: int,
) -> PeakEstimate | None:
    """The conversion's peak memory estimated for each layer source, from the safetensors headers (None for a GGUF
    file, hub id or .bin checkpoint)."""
    path = Path(os.fspath(source)).expanduser()
    if gguf_file is not None or path.suffix.lower() == ".gguf" or not path.is_dir():
        return None
    sizes = SourceSizes.of(path)
    if sizes is None:
        return None
    tokens = 0 if calibration == "none" else options.calibration_tokens
    sampler_cache = 0
    if calibration == "sampled":
        seq_len = min(options.calibration_seq_len, SAMPLED_SEQ_LEN)
        sampler_cache = sampler_cache_bytes(source_config, options.calibration_tokens, seq_len)
    return estimate_peak(sizes, source_config.hidden_size, tokens, kept_tokens, options.target, sampler_cache)


def choose_layer_source(
    source: str, gguf_file: str | None, options: ConversionOptions, estimate: PeakEstimate | None
) -> tuple[bool, str]:
    """Whether the layers are read from the safetensors shards one at a time (True) or from the source held in
    memory (False), and why; refuses, in one line, a `--streaming on` that cannot be honoured."""
    path = Path(os.fspath(source)).expanduser()
    if options.streaming == "on":
        check_streamable(path, source, gguf_file, estimate)
        return True, "--streaming on"
    if options.streaming == "off":
        return False, "--streaming off"
    if gguf_file is not None or path.suffix.lower() == ".gguf" or not path.is_dir():
        return False, "auto: a GGUF file or hub id is read into memory"
    if estimate is None:
        return False, "auto: the source has no safetensors shards to read layer by layer"
    available = psutil.virtual_memory().available
    held = f"{estimate.describe()}; {available / GiB:.1f} GiB are available"
    if estimate.in_memory < AUTO_MEMORY_SHARE * available:
        return False, f"auto: the source fits ({held})"
    return True, f"auto: the source would not fit comfortably in memory ({held})"


def check_streamable(path: Path, source: str, gguf_file: str | None, estimate: PeakEstimate | None) -> None:
    """Refuses, in one line, what reading the source layer by layer from its shards cannot do."""
    if gguf_file is not None or path.suffix.lower() == ".gguf":
        raise MLAConvertError("streaming conversion reads safetensors shards, not GGUF: convert with --streaming off")
    if not path.is_dir():
        raise MLAConvertError(f"streaming conversion reads a local model folder, and {source} is none: download it first")
    if estimate is None:
        raise MLAConvertError(f"streaming conversion reads safetensors weights, and {source} has none: use --streaming off")
