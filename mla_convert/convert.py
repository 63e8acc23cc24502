"""MHA/GQA -> MLA conversion: resolve the settings once, open the layer source, then one pass over the decoder
layers (`stream`): calibrate -> decompose -> assemble -> (latent norm) -> (refine) -> verify -> write, per layer.

Each step is a function of its own module: `settings` (every option resolved), `plan` (cache shape), `calibrate`,
`decompose`, `assemble`, `deepseek` (the latent norm of `--target deepseek`), `refine`, `verify`; `stream` runs them
layer by layer over the source, held in memory or read from its shards. `ConversionOptions` and `convert` are
imported from here.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import replace
from pathlib import Path

import torch

from .calibration_text import calibration_sequences
from .conversion_options import ConversionOptions, check_options
from .deepseek import check_deepseek_source
from .families import check_source_family
from .folders import prepare_output, save_atomically, scratch_folder
from .plan import SourceShape, allocate_ranks, estimated_size, plan_ranks
from .report import conversion_report
from .settings import Settings, resolve
from .sources import _load_tokenizer, check_device, load_source, load_source_config, side_files_bytes
from .stream import (
    LayerCache, LazySource, Meter, ModelSource, ShardWriter, Stream, collect_spectra, convert_layers, write_model_files,
)  # fmt: skip
from .verify import check_verification, verification_ids


__all__ = ["ConversionOptions", "convert"]


def convert(
    source: str,
    output: str | os.PathLike,
    options: ConversionOptions | None = None,
    gguf_file: str | None = None,
    overwrite: bool = False,
    force: bool = False,
    progress: bool = True,
) -> dict:
    """Converts `source` (folder, hub id or GGUF) to an MLA checkpoint in `output`; returns the conversion report
    (also written as `conversion.json`), with peak memory and seconds per stage.

    `overwrite` replaces an existing mla-convert output in `output`; `force` with it replaces any folder.
    """
    options = options or ConversionOptions()
    check_options(options)
    check_device(options.device)
    started = time.perf_counter()
    meter = Meter()

    # config first: bad budgets, architectures and outputs fail before any weight is read
    source_config = load_source_config(source, gguf_file)
    check_source_family(source_config)
    shape = SourceShape.from_config(source_config)
    plan = plan_ranks(shape, options)
    settings = resolve(options, source, gguf_file, source_config, plan)
    output = prepare_output(
        output,
        inputs={"source": source, "calibration data": options.calibration},
        overwrite=overwrite,
        force=force,
        required_bytes=estimated_size(source_config, plan, options.dtype) + side_files_bytes(source, gguf_file)
        + scratch_bytes(source_config, settings),
    )
    with meter.stage("load"):
        reader, tokenizer = open_layer_source(source, gguf_file, settings)
    stream = Stream.open(reader, source_config, settings, meter, progress)
    if settings.target == "deepseek":
        first = stream.source_layer(0)
        plan = check_deepseek_source(source_config, first.self_attn, stream.rotary, shape, plan)
        del first

    with meter.stage("calibration text"):
        sequences, calibration_info = calibration_text(stream, tokenizer, settings)
    # Scratch space beside the output for what the spectrum pass computes of each layer that the main pass would
    # compute again (`stream.LayerCache`), removed at the end
    with contextlib.ExitStack() as scratch:
        cache = None
        if settings.spectrum_allocation:
            cache = LayerCache(scratch.enter_context(scratch_folder(output)))
            with meter.stage("spectrum pass"):
                spectra = collect_spectra(stream, plan, sequences, cache)
                uniform = plan.kv_lora_ranks[0]
                ranks = allocate_ranks(spectra, sum(plan.kv_lora_ranks), max(1, uniform // 4))
                plan = replace(plan, kv_lora_ranks=ranks)
        check_ids = verification_ids(source_config.vocab_size, sequences, options.seed)
        dtype = getattr(torch, options.dtype)

        def write(staging: Path) -> None:
            writer = ShardWriter(staging, settings.max_shard_bytes, dtype)
            records, refine_stats, verification, working = convert_layers(stream, plan, sequences, check_ids, writer, cache)
            check_verification(verification, plan)
            with meter.stage("write"):
                writer.finish()
                write_model_files(staging, stream, working, plan, records, options.dtype)
                if tokenizer is not None:
                    tokenizer.save_pretrained(staging)
            report = conversion_report(source, gguf_file, source_config, settings, plan, records, refine_stats, calibration_info)
            report.update(verification=verification, seconds=round(time.perf_counter() - started, 1))
            report.update(streaming=settings.streaming, **meter.report())
            # beside the measured peak: what it was estimated at for each layer source (`memory.estimate_peak`)
            estimate = settings.estimated_peak
            report.update(estimated_peak_bytes=estimate.record() if estimate is not None else None)
            (staging / "conversion.json").write_text(json.dumps(report, indent=2) + "\n")
            reports.append(report)

        reports: list[dict] = []
        save_atomically(output, write)
    return reports[0]


def scratch_bytes(source_config, settings: Settings) -> int:
    """Disk the spectrum pass's layer files take beside the output (`stream.LayerCache`), 0 without that pass."""
    if not settings.spectrum_allocation:
        return 0
    return LayerCache.disk_bytes(source_config, settings.options.calibration_tokens, settings.kept_tokens)


def source_stream(
    source: str, options: ConversionOptions, gguf_file: str | None = None, progress: bool = True
) -> tuple[Stream, object]:
    """The source's layers as a conversion with `options` reads them (from the shards or held in memory, as
    `--streaming` resolves), and its tokenizer: to run the source layer by layer outside a conversion (the
    data-free sampler's tests and benchmark)."""
    source_config = load_source_config(source, gguf_file)
    check_source_family(source_config)
    plan = plan_ranks(SourceShape.from_config(source_config), options)
    settings = resolve(options, source, gguf_file, source_config, plan)
    reader, tokenizer = open_layer_source(source, gguf_file, settings)
    return Stream.open(reader, source_config, settings, Meter(), progress), tokenizer


def open_layer_source(source: str, gguf_file: str | None, settings: Settings) -> tuple[LazySource | ModelSource, object]:
    """The source's layers, read from its safetensors shards (`settings.streaming`) or held in memory, and its
    tokenizer (None when it has none)."""
    if settings.streaming:
        folder = str(Path(os.fspath(source)).expanduser())
        return LazySource(Path(folder)), _load_tokenizer(folder, None)
    # On the CPU whatever the device: each layer moves to the device as it is converted, as from the shards.
    model, tokenizer = load_source(source, gguf_file, dtype=torch.float32, device="cpu")
    return ModelSource(model), tokenizer


def calibration_text(stream: Stream, tokenizer, settings: Settings) -> tuple[torch.LongTensor | None, dict]:
    """The calibration sequences (None where the conversion reads no text) and their description for the report."""
    if settings.calibration == "none":
        description = "not needed" if settings.exact else "not needed (weight-only SVD)"
        return None, {"kind": "none", "description": description, "tokens": 0}
    # data-free calibration samples from the source layer by layer, whichever layer source holds it
    sequences, info = calibration_sequences(stream, tokenizer, settings.options)
    if settings.init == "svd":
        info["decomposition"] = "weight-only SVD (calibration text only for refinement)"
    return sequences, info
