"""The cache shape of a conversion: the source's attention shape, and the latent and RoPE sizes per layer that a
budget (or explicit ranks) gives, spread over the layers where the calibration spectra need them."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from transformers import PreTrainedConfig

from .conversion_options import ConversionOptions
from .errors import MLAConvertError


# Sources whose attention normalises every query and key head (RMSNorm over head_dim) before RoPE
QK_NORM_MODEL_TYPES = ("qwen3",)


@dataclass
class SourceShape:
    """The source's attention shape, read from its config."""

    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    # per-head QK-norm (Qwen3): the conversion caches one key scale per kv head beside the latent
    qk_norm: bool = False

    @classmethod
    def from_config(cls, config: PreTrainedConfig) -> "SourceShape":
        num_heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // num_heads
        return cls(
            num_layers=config.num_hidden_layers,
            num_heads=num_heads,
            num_kv_heads=getattr(config, "num_key_value_heads", None) or num_heads,
            head_dim=head_dim,
            hidden_size=config.hidden_size,
            qk_norm=config.model_type in QK_NORM_MODEL_TYPES,
        )

    @property
    def cache_per_layer(self) -> int:
        return 2 * self.num_kv_heads * self.head_dim

    @property
    def key_scales(self) -> int:
        """Numbers per token and layer that QK-norm adds to the MLA cache: one key scale per kv head."""
        return self.num_kv_heads if self.qk_norm else 0


@dataclass
class RankPlan:
    """Cache shape of the converted model, and of the source for comparison (numbers per token and layer)."""

    kv_lora_ranks: list[int]
    qk_rope_head_dim: int
    source_cache_per_layer: int
    exact: bool
    # A fixed RoPE table (pair p of the shared key rotates with source frequency rope_frequencies[p]), set for
    # --target deepseek once the source's own table has been checked (`deepseek.check_deepseek_rope`); None: the
    # RoPE strategy places the shared key freely
    rope_frequencies: list[int] | None = None
    # QK-norm sources: the per-kv-head key scales cached beside the latent (numbers per token and layer)
    key_scales: int = 0

    @property
    def cache_per_layer(self) -> list[int]:
        return [rank + self.qk_rope_head_dim + self.key_scales for rank in self.kv_lora_ranks]

    @property
    def kv_budget(self) -> float:
        return sum(self.cache_per_layer) / (self.source_cache_per_layer * len(self.kv_lora_ranks))


def plan_ranks(shape: SourceShape, options: ConversionOptions) -> RankPlan:
    """Turns a budget (or explicit ranks) into latent and RoPE sizes, with the valid range in every error."""
    check_qk_norm_options(shape, options)
    if options.target == "deepseek":
        return plan_deepseek_ranks(shape, options)
    full = shape.cache_per_layer
    scales = shape.key_scales
    all_rope = shape.num_kv_heads * shape.head_dim
    if options.kv_lora_rank is not None:
        rope_dim = options.qk_rope_head_dim if options.qk_rope_head_dim is not None else min(shape.head_dim, all_rope)
        rank = options.kv_lora_rank
    else:
        budget = options.kv_budget if options.kv_budget is not None else 1.0
        # at least a latent of 1, a RoPE pair and (QK-norm) the key scales; shown rounded up, so it is valid
        smallest = math.ceil((3 + scales) / full * 1e4) / 1e4
        if not (budget > 0 and budget <= 1.0) or math.isnan(budget):
            raise MLAConvertError(
                f"--kv-budget must be in [{smallest:.4f}, 1.0] (the fraction of the source's KV cache of "
                f"{full} numbers per token and layer that remains), got {budget}"
            )
        total = round(budget * full)
        # below the smallest budget even where it rounds up to it: the message names that minimum
        if budget * full < 3 + scales - 1e-9 or total < 3 + scales:
            raise MLAConvertError(
                f"--kv-budget {budget} leaves {budget * full:.4g} of the {full} numbers per token and layer, fewer "
                f"than a latent of 1 and a RoPE pair need; the smallest valid budget for this model is {smallest:.4f}"
            )
        if total == full:
            if options.qk_rope_head_dim is not None and options.qk_rope_head_dim != all_rope:
                raise MLAConvertError(
                    f"--kv-budget {budget} keeps the whole cache, which is the exact form: its RoPE key is every key "
                    f"dimension ({all_rope}), so --qk-rope-head-dim {options.qk_rope_head_dim} cannot apply; leave "
                    "it out, or give a budget below 1.0"
                )
            # The exact form (MLA.md §2): every key dimension keeps its RoPE, the latent is V itself.
            # With QK-norm the key scales come on top: the exact form caches `full + kv_heads` numbers.
            return RankPlan([all_rope] * shape.num_layers, all_rope, full, exact=True, key_scales=scales)
        rope_dim = options.qk_rope_head_dim
        if rope_dim is None:
            # A third of the cache for the RoPE key, at most one head's worth: measured best on SmolLM2 at budgets
            # 0.5 and 0.25 among a sixth, a third and a half.
            rope_dim = max(2, min(shape.head_dim, 2 * round((total - scales) / 6)))
        # The key scales of QK-norm are part of the budget: the latent gives up their room.
        rank = total - rope_dim - scales
    if rope_dim % 2 or not 2 <= rope_dim <= all_rope:
        raise MLAConvertError(
            f"--qk-rope-head-dim must be even and in [2, {all_rope}] for this model "
            f"({shape.num_kv_heads} kv heads x head_dim {shape.head_dim}), got {rope_dim}"
        )
    max_rank = 2 * all_rope - rope_dim
    if options.kv_lora_rank is None and rank < 1:
        # the rank was derived, not given: name what the user gave
        room = total - scales
        largest = (room - 1) // 2 * 2  # even, and leaving a latent of at least 1
        hint = f"a --qk-rope-head-dim of at most {largest}" if largest >= 2 else "no --qk-rope-head-dim"
        raise MLAConvertError(
            f"--kv-budget {options.kv_budget} leaves {room} numbers per token and layer for the RoPE key and the "
            f"latent, and --qk-rope-head-dim {rope_dim} takes them all: give {hint}, or a larger --kv-budget"
        )
    if not 1 <= rank <= max_rank:
        raise MLAConvertError(
            f"--kv-lora-rank must be in [1, {max_rank}] for this model with --qk-rope-head-dim {rope_dim} "
            f"(latent + RoPE key at most the source's {full} numbers per token and layer), got {rank}"
        )
    exact = rope_dim == all_rope and rank >= all_rope
    if rope_dim == all_rope:
        # With every key dimension rotated the latent only carries V, so more than its size would be wasted.
        rank = min(rank, all_rope)
    return RankPlan([rank] * shape.num_layers, rope_dim, full, exact=exact, key_scales=scales)


def check_qk_norm_options(shape: SourceShape, options: ConversionOptions) -> None:
    """Refuses, before anything is loaded, the options a QK-norm source cannot be converted with."""
    if not shape.qk_norm:
        return
    if options.target == "deepseek":
        raise MLAConvertError(
            "--target deepseek cannot convert a QK-norm source (Qwen3): DeepSeek-V3's attention has no per-head key "
            "norm, so its keys could not be reproduced; convert with the default --target"
        )
    if options.rope_strategy == "freqfold":
        raise MLAConvertError(
            "--rope-strategy freqfold mixes key heads, which QK-norm's per-head key scales forbid "
            "(docs/qk_norm.md): use rorope or partial for this source"
        )


def plan_deepseek_ranks(shape: SourceShape, options: ConversionOptions) -> RankPlan:
    """`--target deepseek`: one latent size for every layer and a RoPE key whose size divides the source's head_dim
    (DeepSeek's table holds every `head_dim / qk_rope_head_dim`-th source frequency). A `--kv-budget` becomes
    `round(budget * full) - qk_rope_head_dim`; `--kv-lora-rank R --qk-rope-head-dim D` are used as given. Never
    exact: the latent norm rescales each token (`deepseek` module docstring), even at full budget."""
    full = shape.cache_per_layer
    head_dim = shape.head_dim
    if options.kv_lora_rank is not None:
        rope_dim = options.qk_rope_head_dim if options.qk_rope_head_dim is not None else head_dim
        total = options.kv_lora_rank + rope_dim
    else:
        budget = options.kv_budget if options.kv_budget is not None else 1.0
        if math.isnan(budget) or not 0 < budget <= 1.0:
            raise MLAConvertError(
                f"--kv-budget must be in (0, 1.0] (the fraction of the source's KV cache of {full} numbers per token "
                f"and layer that remains), got {budget}"
            )
        total = round(budget * full)
        rope_dim = options.qk_rope_head_dim
        if rope_dim is None:
            # As for the plain target, about a third of the cache, rounded down to a size DeepSeek's table has.
            third = max(2, min(head_dim, 2 * round(total / 6)))
            rope_dim = max(d for d in range(2, third + 1, 2) if head_dim % d == 0)
    if rope_dim < 2 or rope_dim % 2 or head_dim % rope_dim:
        sizes = ", ".join(str(d) for d in range(2, head_dim + 1, 2) if head_dim % d == 0)
        raise MLAConvertError(
            f"--target deepseek needs a --qk-rope-head-dim that is even and divides the source's head_dim {head_dim} "
            f"(DeepSeek's RoPE table then holds every head_dim / qk_rope_head_dim-th source frequency): one of "
            f"{sizes}, got {rope_dim}"
        )
    rank = total - rope_dim
    max_rank = full - rope_dim
    if not 1 <= rank <= max_rank:
        flag = "--kv-lora-rank" if options.kv_lora_rank is not None else f"--kv-budget {options.kv_budget}"
        raise MLAConvertError(
            f"{flag} gives a latent of {rank} with --qk-rope-head-dim {rope_dim}; --target deepseek needs one in "
            f"[1, {max_rank}] for this model (latent + RoPE key at most the source's {full} numbers per token and "
            "layer)"
        )
    return RankPlan([rank] * shape.num_layers, rope_dim, full, exact=False)


def allocate_ranks(spectra: list[torch.Tensor], total_rank: int, min_rank: int = 1) -> list[int]:
    """Latent sizes per layer that add up to `total_rank`, spent where the calibration spectra need them.

    `spectra[l]`: layer `l`'s weighted `[k_nope ; v]` eigenvalues, descending. Each further dimension of layer `l`
    removes `spectra[l][k] / sum(spectra[l])` of that layer's relative reconstruction error; the dimensions with the
    largest removals win, which minimises the summed relative error of all layers (the spectra are descending, so
    the winners are a prefix of every layer's). Every layer keeps at least `min_rank`.
    """
    num_layers = len(spectra)
    max_ranks = [len(spectrum) for spectrum in spectra]
    if not num_layers * min_rank <= total_rank <= sum(max_ranks):
        raise MLAConvertError(
            f"cannot spread a latent of {total_rank} over {num_layers} layers with {min_rank} to "
            f"{min(max_ranks)} per layer"
        )
    relative = [spectrum.double() / spectrum.double().sum().clamp_min(1e-30) for spectrum in spectra]
    # listed dimension by dimension, so that the stable sort spreads ties (flat or zero spectra) evenly over layers
    gains = [
        (float(relative[layer_idx][k]), layer_idx)
        for k in range(min_rank, max(max_ranks))
        for layer_idx in range(num_layers)
        if k < max_ranks[layer_idx]
    ]
    gains.sort(key=lambda item: -item[0])
    ranks = [min_rank] * num_layers
    for _, layer_idx in gains[: total_rank - num_layers * min_rank]:
        ranks[layer_idx] += 1
    return ranks


def estimated_size(source_config: PreTrainedConfig, plan: RankPlan, dtype: str) -> int:
    """About how many bytes the converted checkpoint takes: the source's parameters outside attention, plus MLA's."""
    shape = SourceShape.from_config(source_config)
    hidden, layers = shape.hidden_size, shape.num_layers
    tied = bool(getattr(source_config, "tie_word_embeddings", False))
    embeddings = source_config.vocab_size * hidden * (1 if tied else 2)
    mlp = 3 * hidden * source_config.intermediate_size
    qk_head_dim = shape.head_dim + plan.qk_rope_head_dim
    # QK-norm: the source's key rows, kept for the key scales
    key_rows = hidden * shape.num_kv_heads * shape.head_dim if shape.qk_norm else 0
    attention = [
        hidden * shape.num_heads * qk_head_dim  # q_proj
        + hidden * (rank + plan.qk_rope_head_dim)  # kv_a_proj_with_mqa
        + rank * shape.num_heads * 2 * shape.head_dim  # kv_b_proj
        + shape.num_heads * shape.head_dim * hidden  # o_proj
        + key_rows
        for rank in plan.kv_lora_ranks
    ]
    numbers = embeddings + layers * mlp + sum(attention)
    return numbers * torch.finfo(getattr(torch, dtype)).bits // 8
