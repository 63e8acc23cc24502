"""MHA/GQA -> MLA conversion as a pipeline: load -> calibrate -> decompose -> assemble -> (latent norm) -> (refine)
-> verify -> save.

Each step is a function of its own module: `plan` (cache shape), `calibrate`, `decompose`, `assemble`, `deepseek`
(the latent norm of `--target deepseek`), `refine`, `verify`; `convert` runs them in order. `ConversionOptions` and
`convert` are imported from here.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, replace
from functools import partial
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedConfig, PreTrainedModel

from mla_modeling import MLAForCausalLM

from .assemble import assemble, mla_config
from .calibrate import Calibration, calibrate, refinement_steps, searches_key_scale
from .conversion_options import (
    KEY_SCALE_GRID,
    ConversionOptions,
    check_options,
    refine_lr,
    refine_steps,
    uses_nope_shrink,
    uses_spectrum_allocation,
)
from .decompose import DecomposeOptions, decompose_all, weight_only_moment
from .deepseek import attach_latent_norm, check_deepseek_source
from .errors import MLAConvertError
from .families import check_source_family, sliding_window, source_layer_types
from .folders import prepare_output, save_model_atomically
from .plan import RankPlan, SourceShape, allocate_ranks, estimated_size, plan_ranks
from .refine import AttentionTargets, RefineOptions, refine_all
from .sources import check_device, load_source, load_source_config, side_files_bytes
from .verify import verify


# Calibration sequences whose latent RMS sets the norm of each key-scale candidate of --target deepseek (4096 tokens
# at the default 512 per sequence: the norm's weight is a mean, and the search runs four candidates)
KEY_SCALE_SEARCH_NORM_SEQUENCES = 8


def convert(
    source: str,
    output: str | os.PathLike,
    options: ConversionOptions | None = None,
    gguf_file: str | None = None,
    overwrite: bool = False,
    force: bool = False,
) -> dict:
    """Converts `source` (folder, hub id or GGUF) to an MLA checkpoint in `output`; returns the conversion report.

    `overwrite` replaces an existing mla-convert output in `output`; `force` with it replaces any folder.
    """
    options = options or ConversionOptions()
    check_options(options)
    check_device(options.device)
    from .stream import Meter, convert_streaming, parse_size, streams  # streaming reuses this module's steps

    max_shard_size = parse_size(options.max_shard_size)  # both paths shard the weights alike

    if streams(source, gguf_file, options):
        return convert_streaming(source, output, options, gguf_file, overwrite=overwrite, force=force)
    started = time.perf_counter()
    meter = Meter()

    # load (config first: bad budgets, architectures and outputs fail before any weight is read)
    source_config = load_source_config(source, gguf_file)
    check_source_family(source_config)
    shape = SourceShape.from_config(source_config)
    plan = plan_ranks(shape, options)
    output = prepare_output(
        output,
        inputs={"source": source, "calibration data": options.calibration},
        overwrite=overwrite,
        force=force,
        required_bytes=estimated_size(source_config, plan, options.dtype) + side_files_bytes(source, gguf_file),
    )
    source_model, tokenizer = load_source(source, gguf_file, dtype=torch.float32, device=options.device)
    if options.target == "deepseek":
        plan = check_deepseek_source(source_model, shape, plan)
    meter.lap("load")

    calibration = calibrate(source_model, tokenizer, shape, plan, options)
    meter.lap("calibrate")
    model, plan, layers, refine_stats = build_mla(source_model, source_config, plan, calibration, options)
    meter.lap("decompose, assemble and refine")
    sequences, calibration_info = calibration.sequences, calibration.info
    del calibration  # its recorded layer inputs are the largest thing a conversion holds

    verification = verify(source_model, model, plan, sequences, options.seed)
    meter.lap("verify")
    report = conversion_report(source, gguf_file, source_config, options, plan, layers, refine_stats, calibration_info)
    report.update(verification=verification, seconds=round(time.perf_counter() - started, 1))
    report.update(streaming=False, **meter.report())
    save_converted(model, tokenizer, report, output, options.dtype, max_shard_size)
    return report


def build_mla(
    source_model: PreTrainedModel,
    source_config: PreTrainedConfig,
    plan: RankPlan,
    calibration: Calibration,
    options: ConversionOptions,
    progress: bool = True,
) -> tuple[MLAForCausalLM, RankPlan, list, list[dict]]:
    """decompose -> assemble -> (DeepSeek's latent norm) -> refine: the MLA model for `plan` (float32, on the
    source's device), the plan with its final per-layer ranks, the decomposed layers and per-layer refinement stats.
    Refinement trains the latent norm's weight with the rest of the layer."""
    plan, layers = decompose(source_model, source_config, plan, calibration, options, progress)
    model = assemble(source_model, mla_config(source_config, source_model, plan, layers), layers)
    model = model.to(next(source_model.parameters()).device)
    if options.target == "deepseek":
        model = attach_latent_norm(model, calibration.moments, calibration.sequences)
    refine_stats = [{} for _ in layers]
    if refinement_steps(plan, options) > 0:
        refine_stats = refine(source_model, model, calibration.layer_inputs, options, progress)
    return model, plan, layers, refine_stats


def decompose(
    source_model: PreTrainedModel,
    source_config: PreTrainedConfig,
    plan: RankPlan,
    calibration: Calibration,
    options: ConversionOptions,
    progress: bool = True,
) -> tuple[RankPlan, list]:
    """Every layer's MLA weights: latent sizes per layer (`--rank-allocation`), then the K/V balance per layer
    (`--key-scale`), then the weights. Returns the plan with its final per-layer ranks, and the layers."""
    shape = SourceShape.from_config(source_config)
    moments = calibration.moments
    if options.init == "svd":
        # Weight-only whatever was calibrated: a calibration shared by several conversions (the quality bench)
        # carries the text's moments, and decomposing in them would be activation-aware PCA, not the SVD baseline.
        moments = weight_only_moment(shape.hidden_size).expand(shape.num_layers, -1, -1)
    decompose_options = decompose_options_for(plan, options)
    key_scales = [first_key_scale(options)] * shape.num_layers
    # An explicit --kv-lora-rank is a size per layer, honoured as given; a --kv-budget is a total to spread.
    if uses_spectrum_allocation(options) and not plan.exact:
        # The spectra in the balanced metric: keys and values weigh alike in every layer, so layers compare.
        layers = decompose_all(
            source_model, shape, moments, plan, decompose_options, key_scales, False, calibration.normalised
        )
        uniform = plan.kv_lora_ranks[0]
        ranks = allocate_ranks([layer.spectrum for layer in layers], sum(plan.kv_lora_ranks), max(1, uniform // 4))
        plan = replace(plan, kv_lora_ranks=ranks)
    if searches_key_scale(plan, options):
        finish = None
        if options.target == "deepseek":
            # Each candidate scored as it will be used: with its anchors and latent norm in place.
            sequences = calibration.sequences[:KEY_SCALE_SEARCH_NORM_SEQUENCES]
            finish = partial(attach_latent_norm, moments=calibration.moments, calibration_ids=sequences)
        _, layers = choose_key_scales(
            source_model, source_config, shape, moments, plan, decompose_options, calibration.layer_inputs, finish,
            calibration.normalised,
        )
    else:
        layers = decompose_all(
            source_model, shape, moments, plan, decompose_options, key_scales, progress, calibration.normalised
        )
    return plan, layers


def decompose_options_for(plan: RankPlan, options: ConversionOptions) -> DecomposeOptions:
    return DecomposeOptions(
        init=options.init,
        rope_strategy=options.rope_strategy,
        rope_frequencies=plan.rope_frequencies,
        nope_shrink=uses_nope_shrink(options),
    )


def first_key_scale(options: ConversionOptions) -> float:
    """The K/V balance of the first decomposition (spectra for rank allocation, or the final one without a search)."""
    return 1.0 if options.key_scale == "search" else float(options.key_scale)


def choose_key_scales(
    source_model: PreTrainedModel,
    source_config: PreTrainedConfig,
    shape: SourceShape,
    moments: torch.Tensor,
    plan: RankPlan,
    decompose_options: DecomposeOptions,
    layer_inputs: list[torch.Tensor],
    finish: Callable[[MLAForCausalLM], MLAForCausalLM] | None = None,
    normalised: list | None = None,
) -> tuple[list[float], list]:
    """Per layer, the multiplier of the K/V balance (from `KEY_SCALE_GRID`) whose conversion reproduces the source
    layer's attention output best on calibration windows. Returns the multipliers and the winning layers.
    `finish`: what the pipeline does to the assembled model before refinement (DeepSeek's latent norm), applied to
    every candidate before it is scored. `normalised`: a QK-norm source's per-layer normalised moments."""
    targets = AttentionTargets(source_model, layer_inputs)
    candidates, errors = [], []
    for factor in tqdm(KEY_SCALE_GRID, desc="searching K/V balance", unit="scale"):
        factors = [factor] * shape.num_layers
        layers = decompose_all(source_model, shape, moments, plan, decompose_options, factors, False, normalised)
        model = assemble(source_model, mla_config(source_config, source_model, plan, layers), layers)
        model = model.to(targets.device)
        if finish is not None:
            model = finish(model)
        candidates.append(layers)
        errors.append(targets.errors(model))
        del model
    best = [min(range(len(KEY_SCALE_GRID)), key=lambda c: errors[c][layer_idx]) for layer_idx in range(shape.num_layers)]
    return [KEY_SCALE_GRID[c] for c in best], [candidates[c][layer_idx] for layer_idx, c in enumerate(best)]


def rank_allocation_used(options: ConversionOptions) -> str:
    if options.kv_lora_rank is not None:
        return "explicit --kv-lora-rank"
    return options.rank_allocation if uses_spectrum_allocation(options) else "uniform"


def refine(
    source_model: PreTrainedModel,
    model: MLAForCausalLM,
    layer_inputs: list[torch.Tensor],
    options: ConversionOptions,
    progress: bool = True,
) -> list[dict]:
    """Fits each MLA layer of `model` to its source layer on the recorded calibration inputs (`--refine-steps`)."""
    refine_options = RefineOptions(steps=refine_steps(options), lr=refine_lr(options))
    return refine_all(source_model, model, layer_inputs, refine_options, options.seed, progress)


def save_converted(
    model: MLAForCausalLM, tokenizer, report: dict, output: Path, dtype: str, max_shard_size: int | None = None
) -> None:
    """Writes the model in `dtype` (it was checked in float32), its tokenizer and `conversion.json` to `output`."""
    model = model.to(getattr(torch, dtype))
    model.config.dtype = getattr(torch, dtype)
    # Every converted folder carries the modeling files and an `auto_map`, so it also loads with
    # `trust_remote_code=True` where mla-convert is not installed.
    type(model.config).register_for_auto_class()
    type(model).register_for_auto_class("AutoModelForCausalLM")
    save_model_atomically(output, model, tokenizer, {"conversion.json": report}, max_shard_size)


def conversion_report(
    source: str,
    gguf_file: str | None,
    source_config: PreTrainedConfig,
    options: ConversionOptions,
    plan: RankPlan,
    layers: list,
    refine_stats: list[dict],
    calibration_info: dict | None = None,
) -> dict:
    shape = SourceShape.from_config(source_config)
    bytes_per_number = torch.finfo(getattr(torch, options.dtype)).bits // 8
    return {
        "source": str(source),
        "gguf_file": gguf_file,
        "source_model_type": source_config.model_type,
        "requested": {key: value for key, value in asdict(options).items() if key not in ("device",)},
        "kv_budget": plan.kv_budget,
        "target": options.target,
        "exact": plan.exact,
        "kv_lora_ranks": plan.kv_lora_ranks,
        "qk_rope_head_dim": plan.qk_rope_head_dim,
        "qk_nope_head_dim": layers[0].qk_nope_head_dim,
        "init": options.init,
        "rope_strategy": options.rope_strategy,
        "nope_shrink": uses_nope_shrink(options),
        "rank_allocation": rank_allocation_used(options),
        "calibration": calibration_info,
        "cache": {
            "source_numbers_per_token_per_layer": shape.cache_per_layer,
            "mla_numbers_per_token_per_layer": plan.cache_per_layer,
            "source_numbers_per_token": shape.cache_per_layer * shape.num_layers,
            "mla_numbers_per_token": sum(plan.cache_per_layer),
            "source_bytes_per_token": shape.cache_per_layer * shape.num_layers * bytes_per_number,
            "mla_bytes_per_token": sum(plan.cache_per_layer) * bytes_per_number,
            # QK-norm: of the MLA numbers per token and layer, the per-kv-head key scales (included above)
            "key_scales_per_token_per_layer": plan.key_scales,
            "dtype": options.dtype,
        },
        "refine_steps": refinement_steps(plan, options),
        "refine_lr": refine_lr(options),
        "layers": [
            dict(layer=i, kv_lora_rank=plan.kv_lora_ranks[i], **layer.stats, **refine_stats[i])
            for i, layer in enumerate(layers)
        ],
        "notes": conversion_notes(source_config),
    }


def conversion_notes(source_config: PreTrainedConfig) -> list[str]:
    notes = []
    layer_types = source_layer_types(source_config)
    if layer_types is not None:
        local = layer_types.count("sliding_attention")
        window = sliding_window(source_config)
        notes.append(
            f"the source attends over a sliding window of {window} tokens in {local} of its {len(layer_types)} "
            f"layers; the MLA model does the same, and its cache keeps at most {window - 1} tokens in those layers"
        )
    return notes
