"""`conversion.json`: what a conversion asked for, the settings it resolved, the cache it gives and what each layer
became."""

from __future__ import annotations

from dataclasses import asdict

import torch
from transformers import PreTrainedConfig

from .families import sliding_window, source_layer_types
from .plan import RankPlan, SourceShape
from .settings import Settings


def conversion_report(
    source: str,
    gguf_file: str | None,
    source_config: PreTrainedConfig,
    settings: Settings,
    plan: RankPlan,
    layers: list,
    refine_stats: list[dict],
    calibration_info: dict | None = None,
) -> dict:
    shape = SourceShape.from_config(source_config)
    options = settings.options
    bytes_per_number = torch.finfo(getattr(torch, options.dtype)).bits // 8
    return {
        "source": str(source),
        "gguf_file": gguf_file,
        "source_model_type": source_config.model_type,
        "requested": {key: value for key, value in asdict(options).items() if key not in ("device",)},
        "settings": settings.record(),
        "kv_budget": plan.kv_budget,
        "target": settings.target,
        "exact": plan.exact,
        "kv_lora_ranks": plan.kv_lora_ranks,
        "qk_rope_head_dim": plan.qk_rope_head_dim,
        "qk_nope_head_dim": layers[0].qk_nope_head_dim,
        "init": settings.init,
        "rope_strategy": settings.rope_strategy,
        "nope_shrink": settings.nope_shrink,
        "rank_allocation": settings.rank_allocation,
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
        "refine_steps": settings.refine_steps,
        "refine_lr": settings.refine_lr,
        "refine_precision": settings.refine_precision,
        "solve_output": settings.solve_output,
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
