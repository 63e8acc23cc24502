"""MHA/GQA -> MLA conversion as a pipeline: load -> calibrate -> decompose -> assemble -> verify -> save."""

import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedConfig, PreTrainedModel

from mla_modeling import MLAConfig, MLAForCausalLM

from .decompose import ROPE_STRATEGIES, DecomposeOptions, SourceAttention, decompose_layer, weight_only_moment
from .errors import MLAConvertError
from .folders import prepare_output, save_atomically
from .refine import AttentionTargets, RefineOptions, refine_all
from .sources import check_device, load_source, load_source_config


EXACT_RELATIVE_TOLERANCE = 1e-4
INIT_METHODS = ("pca", "svd")
RANK_ALLOCATIONS = ("uniform", "spectrum")
# Multipliers of the K/V energy balance tried per layer by `key_scale="search"`
KEY_SCALE_GRID = (0.5, 1.0, 2.0, 4.0)


@dataclass
class ConversionOptions:
    """What to convert to. Give `kv_budget`, or `kv_lora_rank` (with optional `qk_rope_head_dim`)."""

    kv_budget: float | None = 0.5
    kv_lora_rank: int | None = None
    qk_rope_head_dim: int | None = None
    init: str = "pca"
    rope_strategy: str = "rorope"
    # "search": per layer, the multiplier of the K/V balance with the least attention-output error on calibration
    # data; a number: that multiplier for every layer
    key_scale: str | float = "search"
    rank_allocation: str = "spectrum"
    calibration: str | None = None
    calibration_tokens: int = 32768
    calibration_seq_len: int = 512
    refine_steps: int = 100
    refine_lr: float = 3e-4
    # calibration tokens whose attention inputs are kept (in bfloat16) for refinement and the key-scale search
    refine_tokens: int = 32768
    seed: int = 0
    dtype: str = "float32"
    device: str = "cpu"


@dataclass
class RankPlan:
    """Cache shape of the converted model, and of the source for comparison (numbers per token and layer)."""

    kv_lora_ranks: list[int]
    qk_rope_head_dim: int
    source_cache_per_layer: int
    exact: bool

    @property
    def cache_per_layer(self) -> list[int]:
        return [rank + self.qk_rope_head_dim for rank in self.kv_lora_ranks]

    @property
    def kv_budget(self) -> float:
        return sum(self.cache_per_layer) / (self.source_cache_per_layer * len(self.kv_lora_ranks))


@dataclass
class SourceShape:
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int

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
        )

    @property
    def cache_per_layer(self) -> int:
        return 2 * self.num_kv_heads * self.head_dim


def plan_ranks(shape: SourceShape, options: ConversionOptions) -> RankPlan:
    """Turns a budget (or explicit ranks) into latent and RoPE sizes, with the valid range in every error."""
    full = shape.cache_per_layer
    all_rope = shape.num_kv_heads * shape.head_dim
    if options.kv_lora_rank is not None:
        rope_dim = options.qk_rope_head_dim if options.qk_rope_head_dim is not None else min(shape.head_dim, all_rope)
        rank = options.kv_lora_rank
    else:
        budget = options.kv_budget if options.kv_budget is not None else 1.0
        smallest = 3 / full
        if not (budget > 0 and budget <= 1.0) or math.isnan(budget):
            raise MLAConvertError(
                f"--kv-budget must be in ({smallest:.4f}, 1.0] (the fraction of the source's KV cache of "
                f"{full} numbers per token and layer that remains), got {budget}"
            )
        total = round(budget * full)
        if total < 3:
            raise MLAConvertError(
                f"--kv-budget {budget} leaves {total} numbers per token and layer; the smallest valid budget "
                f"for this model is {smallest:.4f}"
            )
        if total == full:
            # The exact form (MLA.md §2): every key dimension keeps its RoPE, the latent is V itself.
            return RankPlan([all_rope] * shape.num_layers, all_rope, full, exact=True)
        rope_dim = options.qk_rope_head_dim
        if rope_dim is None:
            # A third of the cache for the RoPE key, at most one head's worth: measured best on SmolLM2 at budgets
            # 0.5 and 0.25 among a sixth, a third and a half.
            rope_dim = max(2, min(shape.head_dim, 2 * round(total / 6)))
        rank = total - rope_dim
    if rope_dim % 2 or not 2 <= rope_dim <= all_rope:
        raise MLAConvertError(
            f"--qk-rope-head-dim must be even and in [2, {all_rope}] for this model "
            f"({shape.num_kv_heads} kv heads x head_dim {shape.head_dim}), got {rope_dim}"
        )
    max_rank = 2 * all_rope - rope_dim
    if not 1 <= rank <= max_rank:
        raise MLAConvertError(
            f"--kv-lora-rank must be in [1, {max_rank}] for this model with --qk-rope-head-dim {rope_dim} "
            f"(latent + RoPE key at most the source's {full} numbers per token and layer), got {rank}"
        )
    exact = rope_dim == all_rope and rank >= all_rope
    if rope_dim == all_rope:
        # With every key dimension rotated the latent only carries V, so more than its size would be wasted.
        rank = min(rank, all_rope)
    return RankPlan([rank] * shape.num_layers, rope_dim, full, exact=exact)


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


# ---------------------------------------------------------------------------------------------------- calibrate


@torch.no_grad()
def collect_input_moments(
    model: PreTrainedModel, sequences: torch.LongTensor, batch_size: int = 4, keep_sequences: int = 0
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """`E[[x; 1] [x; 1]^T]` of every attention layer's input, accumulated batch by batch: `[layers, hidden + 1, hidden + 1]`.

    Also returns the attention inputs of the first `keep_sequences` sequences, per layer `[keep, seq, hidden]` (on
    the CPU, in bfloat16 to halve their memory), for layer-wise refinement; an empty list when `keep_sequences` is 0.
    """
    layers = model.model.layers
    hidden = model.config.hidden_size
    moments = torch.zeros(len(layers), hidden + 1, hidden + 1, dtype=torch.float64)
    kept: list[list[torch.Tensor]] = [[] for _ in layers]
    count = 0

    def make_hook(layer_idx: int):
        def hook(module, args, kwargs):
            hidden_states = kwargs.get("hidden_states", args[0] if args else None)
            # x: [tokens, hidden + 1]
            x = hidden_states.reshape(-1, hidden).float()
            x = torch.cat((x, torch.ones(x.shape[0], 1, dtype=x.dtype, device=x.device)), dim=1)
            # float32 within a batch, float64 across batches: fast, and the sum over many batches stays accurate
            moments[layer_idx] += (x.T @ x).cpu().to(torch.float64)
            still_needed = keep_sequences - sum(len(part) for part in kept[layer_idx])
            if still_needed > 0:
                kept[layer_idx].append(hidden_states[:still_needed].detach().to("cpu", torch.bfloat16))

        return hook

    handles = [layer.self_attn.register_forward_pre_hook(make_hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    device = next(model.parameters()).device
    try:
        for start in tqdm(range(0, len(sequences), batch_size), desc="calibrating", unit="batch"):
            batch = sequences[start : start + batch_size].to(device)
            # The base model only: the LM head is a fifth of the FLOPs and calibration needs none of it.
            model.model(input_ids=batch, use_cache=False)
            count += batch.numel()
    finally:
        for handle in handles:
            handle.remove()
    layer_inputs = [torch.cat(parts) for parts in kept] if keep_sequences > 0 else []
    return moments / max(count, 1), layer_inputs


def calibration_sequences(model, tokenizer, options: ConversionOptions) -> tuple[torch.LongTensor, dict]:
    """Calibration tokens: the first 80% of the given text, or (data-free) text sampled from the source itself."""
    from .data import CALIBRATION_PART, load_text, tokenize_into_sequences
    from .sampling import sample_from_model

    if tokenizer is None:
        raise MLAConvertError("calibration needs the source's tokenizer, and none was found beside the weights")
    if options.calibration is None:
        seq_len = min(options.calibration_seq_len, 256)
        sequences = sample_from_model(model, tokenizer, options.calibration_tokens, seq_len, seed=options.seed)
        info = {"kind": "sampled", "description": f"sampled from the source model (seed {options.seed})"}
    else:
        text, description = load_text(options.calibration, CALIBRATION_PART)
        sequences = tokenize_into_sequences(tokenizer, text, options.calibration_seq_len, options.calibration_tokens)
        info = {"kind": "text", "description": description}
        if sequences.numel() < options.calibration_tokens // options.calibration_seq_len * options.calibration_seq_len:
            print(
                f"note: --calibration-tokens {options.calibration_tokens} asked for more than the calibration part of "
                f"{options.calibration} holds: calibrating on the {sequences.numel()} tokens it gives",
                file=sys.stderr,
            )
    info.update(tokens=int(sequences.numel()), seq_len=int(sequences.shape[1]))
    return sequences, info


# ---------------------------------------------------------------------------------------------------- decompose


def source_attention(model: PreTrainedModel, layer_idx: int, shape: SourceShape) -> SourceAttention:
    attention = model.model.layers[layer_idx].self_attn

    def weight(linear):
        return linear.weight.detach().to("cpu", torch.float64)

    def bias(linear):
        return None if linear.bias is None else linear.bias.detach().to("cpu", torch.float64)

    return SourceAttention(
        q_weight=weight(attention.q_proj),
        k_weight=weight(attention.k_proj),
        v_weight=weight(attention.v_proj),
        o_weight=weight(attention.o_proj),
        q_bias=bias(attention.q_proj),
        k_bias=bias(attention.k_proj),
        v_bias=bias(attention.v_proj),
        o_bias=bias(attention.o_proj),
        num_heads=shape.num_heads,
        num_kv_heads=shape.num_kv_heads,
        head_dim=shape.head_dim,
    )


def decompose_all(
    model: PreTrainedModel,
    shape: SourceShape,
    moments: torch.Tensor,
    plan: RankPlan,
    options: DecomposeOptions,
    key_scales: list[float] | None = None,
    progress: bool = True,
) -> list:
    # The source's RoPE frequencies (scaled ones included), to judge what losing RoPE costs at each
    inv_freq = model.model.rotary_emb.inv_freq.detach().to("cpu", torch.float64)
    # The matrices are small (a few hundred wide): one thread is fastest, and multi-threaded LAPACK can slow down a
    # hundredfold when another process competes for the cores.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return [
            decompose_layer(
                source_attention(model, layer_idx, shape),
                moments[layer_idx],
                plan.kv_lora_ranks[layer_idx],
                plan.qk_rope_head_dim,
                inv_freq=inv_freq,
                options=options,
                key_scale=None if key_scales is None else key_scales[layer_idx],
            )
            for layer_idx in tqdm(range(shape.num_layers), desc="decomposing", unit="layer", disable=not progress)
        ]
    finally:
        torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------------- assemble


def mla_config(source_config: PreTrainedConfig, model: PreTrainedModel, plan: RankPlan, layers: list) -> MLAConfig:
    shape = SourceShape.from_config(source_config)
    attention = model.model.layers[0].self_attn
    rope_parameters = dict(source_config.rope_parameters or {"rope_type": "default", "rope_theta": 10000.0})
    return MLAConfig(
        vocab_size=source_config.vocab_size,
        hidden_size=source_config.hidden_size,
        intermediate_size=source_config.intermediate_size,
        num_hidden_layers=source_config.num_hidden_layers,
        num_attention_heads=shape.num_heads,
        hidden_act=source_config.hidden_act,
        max_position_embeddings=source_config.max_position_embeddings,
        initializer_range=getattr(source_config, "initializer_range", 0.02),
        rms_norm_eps=source_config.rms_norm_eps,
        pad_token_id=source_config.pad_token_id,
        bos_token_id=source_config.bos_token_id,
        eos_token_id=source_config.eos_token_id,
        tie_word_embeddings=bool(source_config.tie_word_embeddings),
        rope_parameters=rope_parameters,
        attention_dropout=float(getattr(source_config, "attention_dropout", 0.0) or 0.0),
        mlp_bias=bool(getattr(source_config, "mlp_bias", False)),
        kv_lora_ranks=list(plan.kv_lora_ranks),
        qk_nope_head_dim=layers[0].qk_nope_head_dim,
        qk_rope_head_dim=plan.qk_rope_head_dim,
        v_head_dim=shape.head_dim,
        head_dim=shape.head_dim,
        rope_frequency_indices=rope_tables(layers, plan.qk_rope_head_dim, shape.head_dim),
        softmax_scale=float(attention.scaling),
        attention_bias=attention.q_proj.bias is not None or attention.k_proj.bias is not None,
        attention_output_bias=attention.o_proj.bias is not None,
    )


def rope_tables(layers: list, qk_rope_head_dim: int, head_dim: int) -> list[list[int]] | None:
    """Per-layer RoPE frequency tables, or None when every layer uses the plain table (DeepSeek-V3's own layout),
    which spares decoding a gather of the RoPE tables in every layer at every step."""
    tables = [layer.rope_frequency_indices for layer in layers]
    plain = list(range(qk_rope_head_dim // 2))
    if qk_rope_head_dim == head_dim and all(table == plain for table in tables):
        return None
    return tables


def assemble(source_model: PreTrainedModel, config: MLAConfig, layers: list) -> MLAForCausalLM:
    """Copies everything but attention from the source and fills in the MLA projections."""
    state = {key: value for key, value in source_model.state_dict().items() if ".self_attn." not in key}
    for layer_idx, weights in enumerate(layers):
        prefix = f"model.layers.{layer_idx}.self_attn."
        entries = {
            "q_proj.weight": weights.q_weight,
            "q_proj.bias": weights.q_bias,
            "kv_a_proj_with_mqa.weight": weights.kv_a_weight,
            "kv_a_proj_with_mqa.bias": weights.kv_a_bias,
            "kv_b_proj.weight": weights.kv_b_weight,
            "o_proj.weight": weights.o_weight,
            "o_proj.bias": weights.o_bias,
        }
        state.update({prefix + name: tensor for name, tensor in entries.items() if tensor is not None})
    if config.tie_word_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    model = MLAForCausalLM(config)
    state = {key: value.to(torch.float32) for key, value in state.items()}
    model.load_state_dict(state, strict=True)
    model.generation_config = source_model.generation_config
    return model.eval()


# ---------------------------------------------------------------------------------------------------- verify


@torch.no_grad()
def compare_logits(source_model: PreTrainedModel, model: PreTrainedModel, input_ids: torch.LongTensor) -> dict:
    """Max relative logit error, KL(source || converted) and top-1 agreement on every position of `input_ids`.
    NaN or infinite logits are refused: a broken model is never reported as agreeing with its source."""
    from .evaluate import ScoredBatch, score_batches

    device = next(model.parameters()).device
    input_ids = input_ids.to(device)
    reference = source_model(input_ids=input_ids, use_cache=False).logits.float()
    logits = model(input_ids=input_ids, use_cache=False).logits.float()
    sums = score_batches([ScoredBatch(logits, reference_logits=reference)])
    sums.require_finite("the converted model (or its source)")
    relative_error = float((logits - reference).abs().max() / reference.abs().max())
    metrics = sums.metrics()
    return {
        "max_relative_logit_error": relative_error,
        "kl": metrics["kl"],
        "top1_agreement": metrics["top1_agreement"],
        "tokens": input_ids.numel(),
    }


def verification_ids(vocab_size: int, calibration: torch.LongTensor | None, seed: int) -> torch.LongTensor:
    if calibration is not None and len(calibration):
        return calibration[:2, :128]
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (2, 64), generator=generator)


def check_verification(verification: dict, plan: RankPlan) -> None:
    """Refuses to save a model whose check against the source failed: nothing broken is ever reported as done."""
    if not all(math.isfinite(verification[key]) for key in ("max_relative_logit_error", "kl", "top1_agreement")):
        raise MLAConvertError(
            "the converted model computes NaN or inf logits on the check against the source; nothing was written "
            "(lower --refine-lr, or report this with the command that caused it)"
        )
    if plan.exact and verification["max_relative_logit_error"] > EXACT_RELATIVE_TOLERANCE:
        raise MLAConvertError(
            f"full-budget conversion is not exact (max relative logit error "
            f"{verification['max_relative_logit_error']:.2e}); nothing was written: please report this source"
        )


# ---------------------------------------------------------------------------------------------------- save


def save_converted(model: MLAForCausalLM, tokenizer, report: dict, output: Path) -> None:
    # Every converted folder carries the modeling files and an `auto_map`, so it also loads with
    # `trust_remote_code=True` where mla-convert is not installed.
    type(model.config).register_for_auto_class()
    type(model).register_for_auto_class("AutoModelForCausalLM")

    def write(folder: Path) -> None:
        model.save_pretrained(folder)
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)
        (folder / "conversion.json").write_text(json.dumps(report, indent=2) + "\n")

    save_atomically(output, write)


# ---------------------------------------------------------------------------------------------------- pipeline


def check_sliding_window(source_config: PreTrainedConfig, options: ConversionOptions) -> None:
    """Refuses a source whose sliding window is shorter than the calibration windows, up front.

    The MLA model attends to the whole context; within the window that is what the source computes, beyond it not,
    and a conversion calibrated and checked on longer windows than the source ever attends over would be wrong.
    """
    window = sliding_window(source_config)
    if window is not None and window < options.calibration_seq_len:
        raise MLAConvertError(
            f"the source attends over a sliding window of {window} tokens, shorter than the "
            f"{options.calibration_seq_len}-token calibration windows; MLA models do not honour sliding windows yet, "
            "so this source cannot be converted"
        )


def sliding_window(source_config: PreTrainedConfig) -> int | None:
    window = getattr(source_config, "sliding_window", None)
    return window if window is not None and getattr(source_config, "use_sliding_window", True) else None


def estimated_size(source_config: PreTrainedConfig, plan: RankPlan, dtype: str) -> int:
    """About how many bytes the converted checkpoint takes: the source's parameters outside attention, plus MLA's."""
    shape = SourceShape.from_config(source_config)
    hidden, layers = shape.hidden_size, shape.num_layers
    tied = bool(getattr(source_config, "tie_word_embeddings", False))
    embeddings = source_config.vocab_size * hidden * (1 if tied else 2)
    mlp = 3 * hidden * source_config.intermediate_size
    qk_head_dim = shape.head_dim + plan.qk_rope_head_dim
    attention = [
        hidden * shape.num_heads * qk_head_dim  # q_proj
        + hidden * (rank + plan.qk_rope_head_dim)  # kv_a_proj_with_mqa
        + rank * shape.num_heads * 2 * shape.head_dim  # kv_b_proj
        + shape.num_heads * shape.head_dim * hidden  # o_proj
        for rank in plan.kv_lora_ranks
    ]
    numbers = embeddings + layers * mlp + sum(attention)
    return numbers * torch.finfo(getattr(torch, dtype)).bits // 8


def check_options(options: ConversionOptions) -> None:
    """Rejects bad options with the valid range, before anything is loaded."""

    def one_of(flag: str, value, valid) -> None:
        if value not in valid:
            raise MLAConvertError(f"{flag} must be one of {', '.join(valid)}, got {value!r}")

    one_of("--init", options.init, INIT_METHODS)
    one_of("--rope-strategy", options.rope_strategy, ROPE_STRATEGIES)
    one_of("--rank-allocation", options.rank_allocation, RANK_ALLOCATIONS)
    one_of("--dtype", options.dtype, ("float32", "bfloat16", "float16"))
    if options.key_scale != "search" and not (isinstance(options.key_scale, (int, float)) and options.key_scale > 0):
        raise MLAConvertError(f"--key-scale must be 'search' or a positive number, got {options.key_scale!r}")
    for flag, value in (
        ("--calibration-tokens", options.calibration_tokens),
        ("calibration_seq_len", options.calibration_seq_len),
        ("--refine-tokens", options.refine_tokens),
    ):
        if value < 1:
            raise MLAConvertError(f"{flag} must be positive, got {value}")
    if options.refine_steps < 0:
        raise MLAConvertError(f"--refine-steps must be 0 (off) or positive, got {options.refine_steps}")
    if not options.refine_lr > 0:
        raise MLAConvertError(f"--refine-lr must be positive, got {options.refine_lr}")


def choose_key_scales(
    source_model: PreTrainedModel,
    source_config: PreTrainedConfig,
    shape: SourceShape,
    moments: torch.Tensor,
    plan: RankPlan,
    decompose_options: DecomposeOptions,
    layer_inputs: list[torch.Tensor],
) -> tuple[list[float], list]:
    """Per layer, the multiplier of the K/V balance (from `KEY_SCALE_GRID`) whose conversion reproduces the source
    layer's attention output best on calibration windows. Returns the multipliers and the winning layers."""
    targets = AttentionTargets(source_model, layer_inputs)
    candidates, errors = [], []
    for factor in tqdm(KEY_SCALE_GRID, desc="searching K/V balance", unit="scale"):
        layers = decompose_all(source_model, shape, moments, plan, decompose_options, [factor] * shape.num_layers, False)
        model = assemble(source_model, mla_config(source_config, source_model, plan, layers), layers)
        candidates.append(layers)
        errors.append(targets.errors(model.to(targets.device)))
        del model
    best = [min(range(len(KEY_SCALE_GRID)), key=lambda c: errors[c][layer_idx]) for layer_idx in range(shape.num_layers)]
    return [KEY_SCALE_GRID[c] for c in best], [candidates[c][layer_idx] for layer_idx, c in enumerate(best)]


def searches_key_scale(plan: RankPlan, options: ConversionOptions) -> bool:
    return not plan.exact and options.init == "pca" and options.key_scale == "search"


def refine(
    source_model: PreTrainedModel,
    model: MLAForCausalLM,
    layer_inputs: list[torch.Tensor],
    options: ConversionOptions,
    progress: bool = True,
) -> list[dict]:
    """Fits each MLA layer of `model` to its source layer on the recorded calibration inputs (`--refine-steps`)."""
    refine_options = RefineOptions(steps=options.refine_steps, lr=options.refine_lr)
    return refine_all(source_model, model, layer_inputs, refine_options, options.seed, progress)


@dataclass
class Calibration:
    """What a conversion learns from calibration text: the sequences, a description for the report, every attention
    layer's input moment `[layers, hidden + 1, hidden + 1]`, and the recorded attention inputs of the first
    sequences (per layer `[sequences, seq, hidden]`, bfloat16) for the key-scale search and refinement."""

    sequences: torch.LongTensor | None
    info: dict
    moments: torch.Tensor
    layer_inputs: list[torch.Tensor]


def calibrate(
    source_model: PreTrainedModel, tokenizer, shape: SourceShape, plan: RankPlan, options: ConversionOptions
) -> Calibration:
    """Reads calibration text (or samples it) and records what the chosen options need of it: nothing for the exact
    form, only the inputs to refine for weight-only SVD."""
    refine_steps = 0 if plan.exact else options.refine_steps
    search = searches_key_scale(plan, options)
    if plan.exact or (options.init == "svd" and refine_steps == 0):
        description = "not needed" if plan.exact else "not needed (weight-only SVD)"
        info = {"kind": "none", "description": description, "tokens": 0}
        return Calibration(None, info, weight_only_moment(shape.hidden_size).expand(shape.num_layers, -1, -1), [])
    sequences, info = calibration_sequences(source_model, tokenizer, options)
    keep = math.ceil(options.refine_tokens / sequences.shape[1]) if refine_steps > 0 or search else 0
    moments, layer_inputs = collect_input_moments(source_model, sequences, keep_sequences=keep)
    if options.init == "svd":
        info["decomposition"] = "weight-only SVD (calibration text only for refinement)"
    return Calibration(sequences, info, moments, layer_inputs)


def build_mla(
    source_model: PreTrainedModel,
    source_config: PreTrainedConfig,
    plan: RankPlan,
    calibration: Calibration,
    options: ConversionOptions,
    progress: bool = True,
) -> tuple[MLAForCausalLM, RankPlan, list, list[dict]]:
    """decompose -> assemble -> refine: the MLA model for `plan` (float32, on the source's device), the plan with
    its final per-layer ranks, the decomposed layers and per-layer refinement stats."""
    shape = SourceShape.from_config(source_config)
    moments, layer_inputs = calibration.moments, calibration.layer_inputs
    if options.init == "svd":
        # Weight-only whatever was calibrated: a calibration shared by several conversions (the quality bench)
        # carries the text's moments, and decomposing in them would be activation-aware PCA, not the SVD baseline.
        moments = weight_only_moment(shape.hidden_size).expand(shape.num_layers, -1, -1)

    # decompose: latent sizes per layer, then the K/V balance per layer, then the weights
    decompose_options = DecomposeOptions(init=options.init, rope_strategy=options.rope_strategy)
    key_scales = [1.0 if options.key_scale == "search" else float(options.key_scale)] * shape.num_layers
    # An explicit --kv-lora-rank is a size per layer, honoured as given; a --kv-budget is a total to spread.
    if options.rank_allocation == "spectrum" and not plan.exact and options.kv_lora_rank is None:
        # The spectra in the balanced metric: keys and values weigh alike in every layer, so layers compare.
        layers = decompose_all(source_model, shape, moments, plan, decompose_options, key_scales, False)
        uniform = plan.kv_lora_ranks[0]
        ranks = allocate_ranks([layer.spectrum for layer in layers], sum(plan.kv_lora_ranks), max(1, uniform // 4))
        plan = replace(plan, kv_lora_ranks=ranks)
    if searches_key_scale(plan, options):
        key_scales, layers = choose_key_scales(
            source_model, source_config, shape, moments, plan, decompose_options, layer_inputs
        )
    else:
        layers = decompose_all(source_model, shape, moments, plan, decompose_options, key_scales, progress)

    # assemble
    config = mla_config(source_config, source_model, plan, layers)
    model = assemble(source_model, config, layers).to(next(source_model.parameters()).device)

    # refine: fit each layer to its source layer on the recorded calibration activations
    refine_stats = [{} for _ in layers]
    if not plan.exact and options.refine_steps > 0:
        refine_stats = refine(source_model, model, layer_inputs, options, progress)
    return model, plan, layers, refine_stats


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
    started = time.perf_counter()

    # load (config first: bad budgets, architectures and outputs fail before any weight is read)
    source_config = load_source_config(source, gguf_file)
    shape = SourceShape.from_config(source_config)
    plan = plan_ranks(shape, options)
    check_sliding_window(source_config, options)
    output = prepare_output(
        output,
        inputs={"source": source, "calibration data": options.calibration},
        overwrite=overwrite,
        force=force,
        required_bytes=estimated_size(source_config, plan, options.dtype),
    )
    source_model, tokenizer = load_source(source, gguf_file, dtype=torch.float32, device=options.device)

    calibration = calibrate(source_model, tokenizer, shape, plan, options)
    model, plan, layers, refine_stats = build_mla(source_model, source_config, plan, calibration, options)
    sequences, info = calibration.sequences, calibration.info
    del calibration

    # verify (in float32, before any cast)
    verification = compare_logits(source_model, model, verification_ids(source_config.vocab_size, sequences, options.seed))
    check_verification(verification, plan)
    model = model.to(getattr(torch, options.dtype))
    model.config.dtype = getattr(torch, options.dtype)

    # save
    report = conversion_report(source, gguf_file, source_config, options, plan, layers, refine_stats, info)
    report.update(verification=verification, seconds=round(time.perf_counter() - started, 1))
    save_converted(model, tokenizer, report, output)
    return report


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
        "exact": plan.exact,
        "kv_lora_ranks": plan.kv_lora_ranks,
        "qk_rope_head_dim": plan.qk_rope_head_dim,
        "qk_nope_head_dim": layers[0].qk_nope_head_dim,
        "init": options.init,
        "rope_strategy": options.rope_strategy,
        "rank_allocation": options.rank_allocation if options.kv_lora_rank is None else "explicit --kv-lora-rank",
        "calibration": calibration_info,
        "cache": {
            "source_numbers_per_token_per_layer": shape.cache_per_layer,
            "mla_numbers_per_token_per_layer": plan.cache_per_layer,
            "source_numbers_per_token": shape.cache_per_layer * shape.num_layers,
            "mla_numbers_per_token": sum(plan.cache_per_layer),
            "source_bytes_per_token": shape.cache_per_layer * shape.num_layers * bytes_per_number,
            "mla_bytes_per_token": sum(plan.cache_per_layer) * bytes_per_number,
            "dtype": options.dtype,
        },
        "refine_steps": 0 if plan.exact else options.refine_steps,
        "layers": [
            dict(layer=i, kv_lora_rank=plan.kv_lora_ranks[i], **layer.stats, **refine_stats[i])
            for i, layer in enumerate(layers)
        ],
        "notes": conversion_notes(source_config),
    }


def conversion_notes(source_config: PreTrainedConfig) -> list[str]:
    notes = []
    window = sliding_window(source_config)
    if window is not None:
        notes.append(
            f"the source uses a sliding window of {window} tokens; the MLA model attends to the full context, "
            f"so it matches the source only up to {window} tokens"
        )
    return notes
