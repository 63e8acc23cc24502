"""The GQA baseline: fewer KV heads by mean-pooling, the comparison for MLA at the same KV-cache size.

Grouped-query attention (Ainslie et al. 2023, "GQA: Training Generalized Multi-Query Transformer Models from
Multi-Head Checkpoints") shrinks the KV cache by letting groups of query heads share one key/value head. A
checkpoint is converted by mean-pooling the key and value projections of each group of adjacent KV heads; the query
heads and `o_proj` stay as they are. The paper then "uptrains" the pooled model on a fraction of the pretraining
data; this module does only the pooling, so that a pooled model and an MLA conversion of the same source, at the
same budget, are compared before any training (both can then be fine-tuned alike).

At `--kv-budget F` the pooled model caches `F` times the source's numbers per token, exactly like
`mla-convert convert --kv-budget F`; unlike MLA, only budgets `n / source_kv_heads` exist, for the `n` that divide
both the query and the KV head counts.
"""

from __future__ import annotations

import math
import os
import time

import torch
from torch import nn
from transformers import PreTrainedConfig, PreTrainedModel

from .errors import MLAConvertError
from .folders import prepare_output, save_model_atomically
from .plan import SourceShape
from .sources import load_source, load_source_config, side_files_bytes


METHOD = "gqa-mean-pool"
# The families with separate `k_proj` and `v_proj` to pool
GQA_MODEL_TYPES = ("llama", "mistral", "qwen2")
# A budget matches a head count when it is this close to `count / source_kv_heads` (bounded below by a quarter of
# the spacing of valid budgets): budgets like 1/3 cannot be typed exactly, and 0.333 must still mean one third.
BUDGET_TOLERANCE = 1e-3


def _head_counts(config: PreTrainedConfig) -> tuple[int, int, int]:
    """(query heads, KV heads, head_dim) of a llama/mistral/qwen2 config."""
    shape = SourceShape.from_config(config)
    return shape.num_heads, shape.num_kv_heads, shape.head_dim


def valid_gqa_head_counts(config: PreTrainedConfig) -> list[int]:
    """KV head counts the source can be pooled to: those dividing both its query and its KV head counts."""
    num_heads, num_kv_heads, _ = _head_counts(config)
    common = math.gcd(num_heads, num_kv_heads)
    return [count for count in range(1, common + 1) if common % count == 0]


def valid_gqa_budgets(config: PreTrainedConfig) -> list[float]:
    """KV budgets (new KV heads / source KV heads) that pooling can reach, smallest first; 1.0 is the source."""
    _, num_kv_heads, _ = _head_counts(config)
    return [count / num_kv_heads for count in valid_gqa_head_counts(config)]


def _format_budget(budget: float) -> str:
    return f"{budget:.4g}"


def _describe(config: PreTrainedConfig) -> str:
    num_heads, num_kv_heads, _ = _head_counts(config)
    return f"this model has {num_heads} query heads and {num_kv_heads} KV heads"


def check_head_count(config: PreTrainedConfig, num_kv_heads: int) -> int:
    """Returns `num_kv_heads` if the source can be pooled to it, else raises with the valid counts."""
    valid = valid_gqa_head_counts(config)
    if isinstance(num_kv_heads, bool) or not isinstance(num_kv_heads, int) or num_kv_heads not in valid:
        raise MLAConvertError(
            f"--num-kv-heads {num_kv_heads} is not valid: {_describe(config)}, and the new count must divide both; "
            f"valid counts: {', '.join(map(str, valid))}"
        )
    return num_kv_heads


def head_count_for_budget(config: PreTrainedConfig, kv_budget: float) -> int:
    """The KV head count that keeps `kv_budget` of the source's cache, or an error listing the valid budgets."""
    _, num_kv_heads, _ = _head_counts(config)
    valid = valid_gqa_head_counts(config)
    tolerance = min(BUDGET_TOLERANCE, 0.25 / num_kv_heads)
    try:
        budget = float(kv_budget)
    except (TypeError, ValueError):
        budget = math.nan
    for count in valid:
        if abs(budget - count / num_kv_heads) <= tolerance:
            return count
    budgets = ", ".join(_format_budget(count / num_kv_heads) for count in valid)
    raise MLAConvertError(
        f"--kv-budget {kv_budget} cannot be reached by pooling KV heads ({_describe(config)}; a budget is new KV "
        f"heads / {num_kv_heads}, and the new count must divide both); valid budgets: {budgets}"
    )


def pooled_size(config: PreTrainedConfig, num_kv_heads: int) -> int:
    """Bytes of the pooled model's weights in float32 (the source's parameters, counted on the meta device, less the
    KV heads pooling removes)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        numbers = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
    _, source_kv_heads, head_dim = _head_counts(config)
    removed = 2 * (source_kv_heads - num_kv_heads) * head_dim * config.hidden_size * config.num_hidden_layers
    return (numbers - removed) * 4


def _pool_rows(tensor: torch.Tensor, old_heads: int, new_heads: int, head_dim: int) -> torch.Tensor:
    """Mean over groups of adjacent heads of a `[old_heads * head_dim, ...]` weight or bias."""
    group = old_heads // new_heads
    rest = tensor.shape[1:]
    pooled = tensor.to(torch.float64).reshape(new_heads, group, head_dim, *rest).mean(dim=1)
    return pooled.reshape(new_heads * head_dim, *rest).to(tensor.dtype)


def _pooled_linear(linear: nn.Linear, old_heads: int, new_heads: int, head_dim: int) -> nn.Linear:
    weight = linear.weight.detach()
    pooled = nn.Linear(
        linear.in_features,
        new_heads * head_dim,
        bias=linear.bias is not None,
        device=weight.device,
        dtype=weight.dtype,
    )
    with torch.no_grad():
        pooled.weight.copy_(_pool_rows(weight, old_heads, new_heads, head_dim))
        if linear.bias is not None:
            pooled.bias.copy_(_pool_rows(linear.bias.detach(), old_heads, new_heads, head_dim))
    pooled.weight.requires_grad_(linear.weight.requires_grad)
    if linear.bias is not None:
        pooled.bias.requires_grad_(linear.bias.requires_grad)
    return pooled


def check_poolable(config: PreTrainedConfig) -> None:
    # Pooling rewrites `k_proj` and `v_proj`: Phi-3's fused `qkv_proj` has neither.
    if config.model_type not in GQA_MODEL_TYPES:
        raise MLAConvertError(
            f"cannot pool the KV heads of a {config.model_type!r} model; supported model types: "
            f"{', '.join(GQA_MODEL_TYPES)}"
        )


@torch.no_grad()
def pool_kv_heads(model: PreTrainedModel, num_kv_heads: int) -> PreTrainedModel:
    """Pools a llama/mistral/qwen2 model, in place, to `num_kv_heads` KV heads; returns the same model.

    New KV head `j` is the mean of source KV heads `j*g ... j*g + g - 1` (`g` = source KV heads / `num_kv_heads`),
    for `k_proj` and `v_proj`, weights and biases. transformers maps query head `h` to KV head
    `h // (num_heads / num_kv_heads)`, so every query head reads the pooled head of the group its own KV head was
    in: query heads and `o_proj` need no change. Pooling to the source's own count changes nothing.
    """
    config = model.config
    check_poolable(config)
    check_head_count(config, num_kv_heads)
    num_heads, old_kv_heads, head_dim = _head_counts(config)
    if num_kv_heads == old_kv_heads:
        return model
    for layer in model.model.layers:
        attention = layer.self_attn
        attention.k_proj = _pooled_linear(attention.k_proj, old_kv_heads, num_kv_heads, head_dim)
        attention.v_proj = _pooled_linear(attention.v_proj, old_kv_heads, num_kv_heads, head_dim)
        # Read by the attention functions (repeat_kv / SDPA's enable_gqa) to expand KV heads to query heads.
        attention.num_key_value_groups = num_heads // num_kv_heads
    config.num_key_value_heads = num_kv_heads
    return model


def convert_to_gqa(
    source: str,
    output: str | os.PathLike,
    num_kv_heads: int | None = None,
    kv_budget: float | None = None,
    gguf_file: str | None = None,
    overwrite: bool = False,
    force: bool = False,
) -> dict:
    """Pools `source` (folder, hub id or GGUF) to fewer KV heads and saves it in `output`; returns the report.

    Give `num_kv_heads`, or `kv_budget` (new KV heads / source KV heads). `output` becomes an ordinary checkpoint
    of the source's architecture (loads with `AutoModelForCausalLM`, no mla_convert needed), in float32, with the
    tokenizer and a `conversion.json` report. It is written beside itself and renamed into place.
    """
    if (num_kv_heads is None) == (kv_budget is None):
        raise MLAConvertError("give either --num-kv-heads or --kv-budget (exactly one)")
    started = time.perf_counter()

    # Config first: a bad count, budget or output fails before any weight is read.
    config = load_source_config(source, gguf_file)
    check_poolable(config)
    if kv_budget is not None:
        num_kv_heads = head_count_for_budget(config, kv_budget)
    check_head_count(config, num_kv_heads)
    num_heads, source_kv_heads, head_dim = _head_counts(config)
    output = prepare_output(
        output, inputs={"source": source}, overwrite=overwrite, force=force,
        required_bytes=pooled_size(config, num_kv_heads) + side_files_bytes(source, gguf_file),
    )  # fmt: skip

    model, tokenizer = load_source(source, gguf_file, dtype=torch.float32)
    pool_kv_heads(model, num_kv_heads)

    num_layers = config.num_hidden_layers
    source_per_layer = 2 * source_kv_heads * head_dim
    gqa_per_layer = 2 * num_kv_heads * head_dim
    bytes_per_number = torch.finfo(torch.float32).bits // 8
    report = {
        "source": str(source),
        "gguf_file": gguf_file,
        "source_model_type": config.model_type,
        "method": METHOD,
        "requested": {"num_kv_heads": None if kv_budget is not None else num_kv_heads, "kv_budget": kv_budget},
        "num_attention_heads": num_heads,
        "num_kv_heads_before": source_kv_heads,
        "num_kv_heads_after": num_kv_heads,
        "heads_pooled_per_kv_head": source_kv_heads // num_kv_heads,
        "kv_budget": num_kv_heads / source_kv_heads,
        "head_dim": head_dim,
        "cache": {
            "source_numbers_per_token_per_layer": source_per_layer,
            "gqa_numbers_per_token_per_layer": gqa_per_layer,
            "source_numbers_per_token": source_per_layer * num_layers,
            "gqa_numbers_per_token": gqa_per_layer * num_layers,
            "source_bytes_per_token": source_per_layer * num_layers * bytes_per_number,
            "gqa_bytes_per_token": gqa_per_layer * num_layers * bytes_per_number,
            "dtype": "float32",
        },
        "notes": [
            "k_proj/v_proj of each group of adjacent KV heads mean-pooled, no uptraining (Ainslie et al. 2023 "
            "uptrain after pooling): the baseline for an MLA conversion at the same kv_budget"
        ],
        "seconds": round(time.perf_counter() - started, 1),
    }

    save_model_atomically(output, model, tokenizer, {"conversion.json": report})
    return report
