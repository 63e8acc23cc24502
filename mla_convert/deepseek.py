"""Conversion under DeepSeek-V3's constraints: what a folder must be for `export.export_deepseek_v3`.

DeepSeek-V3's attention differs from a plain MLA conversion in three ways that a re-layout cannot fix afterwards:

- an RMSNorm on the latent (`kv_a_layernorm`) before the cache, which is not linear and so cannot be folded away;
- one `kv_lora_rank` for every layer;
- one RoPE table: pair `i` of the shared key rotates with `theta ** (-2i / qk_rope_head_dim)`, which for a source head
  of size `d` is source frequency `i * d / qk_rope_head_dim` (`decompose.deepseek_frequency_indices`), one key
  component per frequency.

`mla-convert convert --target deepseek` decomposes a source under those constraints (`check_deepseek_source` gives
the RoPE table) and, layer by layer, adds the norm (`with_layer_latent_norm`, its anchor and weight measured on the
source's activations at that layer) before refinement, which trains the norm's weight with the rest of the layer.
`attach_latent_norm` does the same to a whole MLA model, measuring on that model's own activations (each layer sees
the converted layers before it); `build_deepseek_mla` is that closed form alone. The norm is initialised so
that the layer starts as close to the norm-free closed form as a per-layer constant allows: the norm's weight is
the mean RMS of the latent over calibration tokens, and `kv_b_proj` is unchanged. Where the
attention input has a nearly constant direction (trained pre-norm models do), one latent dimension becomes an
anchor along it (`add_latent_anchor`), so that the latent's RMS, and with it the norm's divisor, hardly changes from
token to token. On SmolLM2-135M at 256 + 64 the norm without the anchor raises the closed form's perplexity from
34.6 to 180 (KL to the source 0.24 -> 1.51); with it, to 35.3 (KL 0.244).

What exactness the norm leaves: it divides each token's latent by that token's own RMS, i.e. rescales the token's
NoPE key and value by `weight / rms(latent)`. A linear `kv_b_proj` cannot undo a per-token factor, so the converted
layer equals the norm-free closed form only on tokens whose latent RMS equals the weight; elsewhere the token's
K_nope and V are off by the factor `mean rms / rms` (with the anchor, by about the anchor's spread, 2% on
SmolLM2). (A latent `c = B n` with `B` an isometry of the normalised attention input `n`, `r >= hidden_size`, would
have a constant RMS and be exact; no useful budget allows that.) The constrained RoPE table itself already costs
exactness against the source whenever the source key has more than one component per allowed frequency (any GQA or
MHA source), so a `--target deepseek` conversion is never exact against its source; the export that follows it is
exact against the converted folder.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from dataclasses import replace

import torch
from transformers import PreTrainedConfig, PreTrainedModel

from mla_modeling import MLAForCausalLM

from .assemble import assemble, mla_config
from .calibrate import collect_input_moments, forward_batches
from .decompose import (
    DecomposeOptions, MLAAttentionWeights, decompose_all, deepseek_frequency_indices, weight_only_moment,
)  # fmt: skip
from .errors import MLAConvertError
from .families import attention_projections, rotary_dim, sliding_window, source_layer_types
from .plan import RankPlan, SourceShape


# The anchor's calibration energy over the latent content's (`add_latent_anchor`): the content then moves a token's
# latent RMS by about half its share, 5e-4, below the anchor's own spread (a few percent on SmolLM2-135M). Larger
# ratios cost float32 precision in the latent (the content shrinks against the anchor).
ANCHOR_ENERGY_RATIO = 1e3
# Ridge of the anchor's direction, relative to the input covariance's mean eigenvalue: the exact most-constant
# direction of a few thousand calibration tokens is ill-conditioned (large entries that cancel), which neither
# float32 nor held-out text tolerates.
ANCHOR_RIDGE = 1e-3

# Relative tolerance between a source frequency (float32, as transformers computes the tables) and DeepSeek's.
ROPE_TABLE_TOLERANCE = 1e-5


def deepseek_rope_table(
    rope_parameters: dict, qk_rope_head_dim: int, max_position_embeddings: int
) -> tuple[torch.Tensor, float]:
    """The inverse frequencies `[qk_rope_head_dim / 2]` and cos/sin scaling that transformers' DeepseekV3 builds
    from `rope_parameters` (what a DeepSeek-format folder with these parameters rotates with)."""
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3RotaryEmbedding

    config = DeepseekV3Config(
        hidden_size=64,
        num_hidden_layers=1,
        num_attention_heads=1,
        qk_rope_head_dim=qk_rope_head_dim,
        max_position_embeddings=max_position_embeddings,
        rope_parameters=dict(rope_parameters),
        q_lora_rank=None,
        first_k_dense_replace=1,
        n_routed_experts=1,
        n_group=1,
        topk_group=1,
        num_experts_per_tok=1,
        num_mtp_layers=0,
    )
    rotary = DeepseekV3RotaryEmbedding(config)
    return rotary.inv_freq.detach().to(torch.float64), float(rotary.attention_scaling)


def rope_table_mismatch(
    source_inv_freq: torch.Tensor,
    source_scaling: float,
    frequency_indices: list[int],
    rope_parameters: dict,
    qk_rope_head_dim: int,
    max_position_embeddings: int,
) -> str | None:
    """Why DeepSeek's RoPE table differs from the source's frequencies at `frequency_indices` (None: it does not).

    Checked numerically, not assumed: Llama-3 scaling acts per frequency by its wavelength and carries over; YaRN's
    correction range is computed in pair indices of the RoPE size, so it carries over only where its rounding does.
    """
    expected = source_inv_freq.detach().to(torch.float64)[torch.tensor(frequency_indices)]
    actual, scaling = deepseek_rope_table(rope_parameters, qk_rope_head_dim, max_position_embeddings)
    deviation = float(((actual - expected).abs() / expected.abs()).max())
    if deviation > ROPE_TABLE_TOLERANCE:
        rope_type = rope_parameters.get("rope_type", "default")
        return (
            f"DeepSeek-V3's {rope_type!r} RoPE table of size {qk_rope_head_dim} differs from the source's "
            f"frequencies {frequency_indices[:4]}... by up to {deviation:.1e} (relative)"
        )
    if abs(scaling - source_scaling) > ROPE_TABLE_TOLERANCE * max(1.0, abs(source_scaling)):
        return f"DeepSeek-V3 scales cos/sin by {scaling}, the source by {source_scaling}"
    return None


def check_deepseek_rope(model: PreTrainedModel, head_dim: int, qk_rope_head_dim: int) -> list[int]:
    """The source frequencies DeepSeek's table rotates with, after checking them against the source's own table
    (`model.model.rotary_emb`); refuses shapes and RoPE types that DeepSeek's format cannot express."""
    return check_deepseek_rope_table(model.model.rotary_emb, model.config, head_dim, qk_rope_head_dim)


def check_deepseek_rope_table(
    rotary: torch.nn.Module, config: PreTrainedConfig, head_dim: int, qk_rope_head_dim: int
) -> list[int]:
    """`check_deepseek_rope` from the source's RoPE module and config."""
    try:
        indices = deepseek_frequency_indices(head_dim, qk_rope_head_dim)
    except ValueError as e:
        raise MLAConvertError(f"--target deepseek: {e}") from None
    rope_parameters = dict(config.rope_parameters or {"rope_type": "default", "rope_theta": 10000.0})
    problem = rope_table_mismatch(
        rotary.inv_freq, float(rotary.attention_scaling), indices, rope_parameters, qk_rope_head_dim,
        config.max_position_embeddings,
    )
    if problem is not None:
        raise MLAConvertError(f"--target deepseek cannot express this source's RoPE: {problem}")
    return indices


@torch.no_grad()
def latent_rms(model: MLAForCausalLM, input_ids: torch.LongTensor, batch_size: int = 4) -> list[float]:
    """Per layer, the mean over tokens of the latent's RMS (the `kv_lora_rank` part of `kv_a_proj_with_mqa`'s
    output, before any norm), on `input_ids` `[sequences, seq]`."""
    return [mean for mean, _ in latent_rms_statistics(model, input_ids, batch_size)]


@torch.no_grad()
def latent_rms_statistics(
    model: MLAForCausalLM, input_ids: torch.LongTensor, batch_size: int = 4
) -> list[tuple[float, float]]:
    """Per layer, the mean over tokens of the latent's RMS (before any norm) on `input_ids` `[sequences, seq]`, and
    its relative spread (standard deviation over mean): how unevenly a latent norm would rescale the tokens."""
    layers = model.model.layers
    sums = [0.0] * len(layers)
    squares = [0.0] * len(layers)

    def make_hook(layer_idx: int):
        # On the attention's input, not on `kv_a_proj_with_mqa`'s output: where the query is folded (small latents,
        # e.g. 64 + 32 on SmolLM2-135M) that projection runs inside one joint matmul and its own forward never does.
        def hook(module, args, kwargs):
            hidden_states = kwargs.get("hidden_states", args[0] if args else None)
            # latent: [batch, seq, kv_lora_rank]
            latent = module.kv_a_proj_with_mqa(hidden_states)[..., : module.kv_lora_rank].double()
            # rms: [batch, seq]
            rms = latent.pow(2).mean(-1).sqrt()
            sums[layer_idx] += float(rms.sum())
            squares[layer_idx] += float(rms.pow(2).sum())

        return hook

    handles = [
        layer.self_attn.register_forward_pre_hook(make_hook(i), with_kwargs=True) for i, layer in enumerate(layers)
    ]
    count = forward_batches(model, input_ids, handles, batch_size)
    statistics = []
    if count and not any(sums):
        raise RuntimeError("no latent reached the latent-RMS hooks: the attention's forward changed")
    for total, total_square in zip(sums, squares):
        mean = total / max(count, 1)
        variance = max(total_square / max(count, 1) - mean**2, 0.0)
        statistics.append((mean, variance**0.5 / mean if mean > 0 else float("inf")))
    return statistics


def with_latent_norm(model: MLAForCausalLM, norm_weights: list[float]) -> MLAForCausalLM:
    """`model` with DeepSeek's latent norm added (`kv_latent_norm`): layer `i`'s norm weight is `norm_weights[i]` in
    every latent dimension and its latent rows of `kv_a_proj_with_mqa` are divided by it; every other weight as in
    `model`. Needs one `kv_lora_rank` for all layers.

    The norm is scale-invariant, so dividing the rows changes nothing but the norm's epsilon: with the mean latent
    RMS as the weight, the latent enters the norm with a mean RMS of 1, far above any epsilon. That matters because
    engines disagree on it (transformers' DeepseekV3 uses 1e-6, vLLM the config's `rms_norm_eps`): at an RMS of 1
    the difference moves the output by about 5e-6, where a latent of RMS 0.01 would move it by 5%.
    """
    config = copy.deepcopy(model.config)
    if len(set(config.kv_lora_ranks)) != 1:
        raise MLAConvertError(
            f"the latent norm needs one kv_lora_rank for all layers, this model has {config.kv_lora_ranks}"
        )
    config.kv_latent_norm = True
    state = dict(model.state_dict())
    rank = config.kv_lora_rank
    for layer_idx, weight in enumerate(norm_weights):
        if not 0 < weight < float("inf"):
            raise MLAConvertError(
                f"layer {layer_idx}'s latent has a mean RMS of {weight} on the calibration text, so the latent norm "
                "has no weight to start from: give other calibration text"
            )
        prefix = f"model.layers.{layer_idx}.self_attn."
        state[prefix + "kv_a_layernorm.weight"] = torch.full((rank,), float(weight))
        # [kv_lora_rank + qk_rope_head_dim, hidden]: the latent rows scaled, the RoPE key's rows as they are
        kv_a = state[prefix + "kv_a_proj_with_mqa.weight"].clone()
        kv_a[:rank] /= float(weight)
        state[prefix + "kv_a_proj_with_mqa.weight"] = kv_a
    normed = MLAForCausalLM(config)
    normed.load_state_dict(state, strict=True)
    normed.generation_config = model.generation_config
    return normed.to(next(model.parameters()).device).eval()


def anchor_direction(moment: torch.Tensor) -> tuple[torch.Tensor, float]:
    """The input direction `u` `[hidden]` along which the attention input `x` is most nearly constant over the
    calibration tokens (the largest `E[u.x]^2 / Var(u.x)`, i.e. `u = Cov(x)^-1 E[x]`), and the relative spread
    `std(u.x) / E[u.x]` along it. `moment` is `E[[x; 1] [x; 1]^T]` `[hidden + 1, hidden + 1]`.

    Inputs of a pre-norm decoder are RMS-normalised and share a large common component, so such a direction exists
    in trained models: on SmolLM2-135M `u.x` varies by about 2% from token to token."""
    moment = moment.to(torch.float64)
    # mean: [hidden]; covariance: [hidden, hidden]
    mean = moment[:-1, -1]
    covariance = moment[:-1, :-1] - torch.outer(mean, mean)
    ridge = ANCHOR_RIDGE * float(covariance.trace()) / covariance.shape[0] + 1e-30
    direction = torch.linalg.solve(covariance + ridge * torch.eye(covariance.shape[0], dtype=moment.dtype), mean)
    # E[u.x] = mean^T (Cov + ridge)^-1 mean > 0 unless the mean is 0
    projected_mean = float(direction @ mean)
    if projected_mean <= 0:
        return direction, float("inf")
    # Var(u.x) as a difference of moments: on near-constant inputs float rounding can take it a little below 0 (a
    # complex square root in Python); it is at least 0
    variance = max(float(direction @ covariance @ direction), 0.0)
    return direction, variance**0.5 / projected_mean


def add_latent_anchor(model: MLAForCausalLM, moments: torch.Tensor, anchored_layers: list[int]) -> MLAForCausalLM:
    """`model` with one more latent dimension per layer, the anchor: `s * u.x` with `u` the layer input's most nearly
    constant direction (`anchor_direction`) and `s` such that its calibration energy is `ANCHOR_ENERGY_RATIO` times
    the rest of the latent's; `kv_b_proj` reads nothing from it (a zero column), so without a norm the model computes
    what `model` computes.

    Why: the latent norm divides each token's latent by the token's own RMS, a per-token factor on its K_nope and V
    that `kv_b_proj` cannot undo. With the anchor, the latent's RMS is the anchor's, nearly the same for every token,
    so the norm divides every token by nearly the same number and the layer stays close to the norm-free closed
    form (exactly so on tokens whose anchor equals its mean). It costs one latent dimension of content.
    `moments`: per layer `E[[x; 1] [x; 1]^T]` `[layers, hidden + 1, hidden + 1]` of the attention inputs. Only the
    `anchored_layers` get one; the others keep their latent (the ranks must come out equal: the latent norm needs
    one `kv_lora_rank` for all layers)."""
    config = copy.deepcopy(model.config)
    ranks = [rank + (layer_idx in anchored_layers) for layer_idx, rank in enumerate(config.kv_lora_ranks)]
    config.kv_lora_ranks = ranks
    config.kv_lora_rank = max(ranks)
    state = dict(model.state_dict())
    for layer_idx in anchored_layers:
        rank = model.config.kv_lora_ranks[layer_idx]
        prefix = f"model.layers.{layer_idx}.self_attn."
        moment = moments[layer_idx].to(torch.float64)
        # kv_a: [kv_lora_rank + qk_rope_head_dim, hidden]
        kv_a = state[prefix + "kv_a_proj_with_mqa.weight"]
        kv_a_bias = state.get(prefix + "kv_a_proj_with_mqa.bias")
        # latent rows acting on [x; 1]: [kv_lora_rank, hidden + 1]
        bias = torch.zeros(rank, dtype=torch.float64) if kv_a_bias is None else kv_a_bias[:rank].double()
        latent_rows = torch.cat((kv_a[:rank].double(), bias[:, None]), dim=1)
        content_energy = float((latent_rows @ moment @ latent_rows.T).trace())
        direction, _ = anchor_direction(moment)
        anchor_energy = float(direction @ moment[:-1, :-1] @ direction)
        scale = (ANCHOR_ENERGY_RATIO * content_energy / anchor_energy) ** 0.5 if anchor_energy > 0 else 0.0
        # [kv_lora_rank + 1 + qk_rope_head_dim, hidden]: the latent rows, the anchor row, the RoPE key's rows
        anchor_row = (scale * direction).to(kv_a.dtype)[None]
        state[prefix + "kv_a_proj_with_mqa.weight"] = torch.cat((kv_a[:rank], anchor_row, kv_a[rank:]))
        if kv_a_bias is not None:
            state[prefix + "kv_a_proj_with_mqa.bias"] = torch.cat(
                (kv_a_bias[:rank], kv_a_bias.new_zeros(1), kv_a_bias[rank:])
            )
        # kv_b: [heads * (qk_nope + v_head_dim), kv_lora_rank] -> one more (zero) column for the anchor
        kv_b = state[prefix + "kv_b_proj.weight"]
        state[prefix + "kv_b_proj.weight"] = torch.cat((kv_b, kv_b.new_zeros(kv_b.shape[0], 1)), dim=1)
    anchored = MLAForCausalLM(config)
    anchored.load_state_dict(state, strict=True)
    anchored.generation_config = model.generation_config
    return anchored.to(next(model.parameters()).device).eval()


def check_deepseek_source(
    config: PreTrainedConfig, attention: torch.nn.Module, rotary: torch.nn.Module, shape: SourceShape, plan: RankPlan
) -> RankPlan:
    """`--target deepseek`, from the source's config, its first attention layer and its RoPE module: refuses what
    DeepSeek-V3 cannot hold (attention or MLP biases, a RoPE table DeepSeek's does not reproduce); returns `plan`
    with DeepSeek's table of source frequencies."""
    projections = attention_projections(attention, config)
    if any(bias is not None for _, bias in projections.values()):
        raise MLAConvertError(
            "--target deepseek cannot convert this source: its attention has biases (q/k/v, as Qwen2's has), and "
            "DeepSeek-V3's attention (and vLLM's DeepSeek path) has none, so every attention score would change"
        )
    if source_layer_types(config) is not None:
        raise MLAConvertError(
            f"--target deepseek cannot convert this source: it attends over a sliding window of "
            f"{sliding_window(config)} tokens, and DeepSeek-V3 over the whole context"
        )
    rope_type = (config.rope_parameters or {}).get("rope_type", "default")
    if rope_type == "longrope":
        raise MLAConvertError(
            "--target deepseek cannot convert this source: its RoPE is longrope (Phi-3's long variants), whose "
            "per-frequency factors and switch at the original context DeepSeek-V3's RoPE types do not have"
        )
    if rotary_dim(config) != shape.head_dim:
        raise MLAConvertError(
            "--target deepseek cannot convert this source: it rotates only part of each head "
            "(partial_rotary_factor), and DeepSeek-V3's RoPE key rotates all of its dims"
        )
    if getattr(config, "mlp_bias", False):
        raise MLAConvertError("--target deepseek cannot convert this source: its MLP has biases, DeepSeek-V3's none")
    frequencies = check_deepseek_rope_table(rotary, config, shape.head_dim, plan.qk_rope_head_dim)
    return replace(plan, rope_frequencies=frequencies)


# ------------------------------------------------------------------------------------ one layer's latent norm


@torch.no_grad()
def layer_latent_rms(weights: MLAAttentionWeights, inputs: Iterable[torch.Tensor]) -> tuple[float, float]:
    """The mean over tokens of one decomposed layer's latent RMS (before any norm) on its attention inputs
    `inputs` (batches `[..., hidden]`, float32), and its relative spread (standard deviation over mean)."""
    rank = weights.kv_lora_rank
    total = total_square = 0.0
    count = 0
    for batch in inputs:
        # the latent as the float32 layer computes it: [tokens, kv_lora_rank]
        rows = weights.kv_a_weight[:rank].to(batch.device, torch.float32)
        latent = batch.reshape(-1, batch.shape[-1]) @ rows.T
        if weights.kv_a_bias is not None:
            latent = latent + weights.kv_a_bias[:rank].to(batch.device, torch.float32)
        rms = latent.double().pow(2).mean(-1).sqrt()
        total += float(rms.sum())
        total_square += float(rms.pow(2).sum())
        count += rms.numel()
    mean = total / max(count, 1)
    variance = max(total_square / max(count, 1) - mean**2, 0.0)
    return mean, (variance**0.5 / mean if mean > 0 else float("inf"))


def anchor_layer(weights: MLAAttentionWeights, moment: torch.Tensor) -> MLAAttentionWeights:
    """One decomposed layer with its last latent dimension replaced by the anchor (`add_latent_anchor`)."""
    rank = weights.kv_lora_rank
    moment = moment.to(torch.float64)
    kv_a, kv_a_bias = weights.kv_a_weight.to(torch.float64), weights.kv_a_bias
    content = rank - 1
    bias = torch.zeros(content, dtype=torch.float64) if kv_a_bias is None else kv_a_bias[:content].double()
    # the content rows acting on [x; 1]: [kv_lora_rank - 1, hidden + 1]
    latent_rows = torch.cat((kv_a[:content], bias[:, None]), dim=1)
    content_energy = float((latent_rows @ moment @ latent_rows.T).trace())
    direction, _ = anchor_direction(moment)
    anchor_energy = float(direction @ moment[:-1, :-1] @ direction)
    scale = (ANCHOR_ENERGY_RATIO * content_energy / anchor_energy) ** 0.5 if anchor_energy > 0 else 0.0
    # [kv_lora_rank + qk_rope_head_dim, hidden]: the content rows, the anchor row, the RoPE key's rows
    kv_a_weight = torch.cat((kv_a[:content], (scale * direction)[None], kv_a[rank:])).to(weights.kv_a_weight.dtype)
    if kv_a_bias is not None:
        kv_a_bias = torch.cat((kv_a_bias[:content], kv_a_bias.new_zeros(1), kv_a_bias[rank:]))
    # kv_b reads nothing from the anchor: its column is zero
    kv_b = weights.kv_b_weight
    kv_b_weight = torch.cat((kv_b[:, :content], kv_b.new_zeros(kv_b.shape[0], 1)), dim=1)
    return replace(weights, kv_a_weight=kv_a_weight, kv_a_bias=kv_a_bias, kv_b_weight=kv_b_weight)


def normed_layer(weights: MLAAttentionWeights, norm_weight: float, layer_idx: int) -> MLAAttentionWeights:
    """One decomposed layer under DeepSeek's latent norm with weight `norm_weight` in every latent dimension, its
    latent rows divided by it (`with_latent_norm`)."""
    if not 0 < norm_weight < float("inf"):
        raise MLAConvertError(
            f"layer {layer_idx}'s latent has a mean RMS of {norm_weight} on the calibration text, so the latent norm "
            "has no weight to start from: give other calibration text"
        )
    rank = weights.kv_lora_rank
    kv_a_weight = weights.kv_a_weight.clone()
    kv_a_weight[:rank] /= norm_weight
    kv_a_bias = weights.kv_a_bias
    if kv_a_bias is not None:
        kv_a_bias = kv_a_bias.clone()
        kv_a_bias[:rank] /= norm_weight
    norm = torch.full((rank,), float(norm_weight), dtype=kv_a_weight.dtype)
    return replace(weights, kv_a_weight=kv_a_weight, kv_a_bias=kv_a_bias, kv_a_norm_weight=norm)


def with_layer_latent_norm(
    weights: MLAAttentionWeights,
    moment: torch.Tensor,
    inputs: Callable[[], Iterable[torch.Tensor]],
    layer_idx: int,
    latent_anchor: bool | None = None,
) -> MLAAttentionWeights:
    """`attach_latent_norm` for one decomposed layer, measured on that layer's attention inputs: `inputs()` yields
    them in batches (the source's activations, as calibration carries them), `moment` is their
    `E[[x; 1] [x; 1]^T]`. The anchor replaces the last latent dimension where its spread is smaller than the plain
    latent's RMS spread (`latent_anchor` None; True: always; False: never), then the norm's weight is the mean
    latent RMS."""
    anchored = False
    if latent_anchor is not False and weights.kv_lora_rank >= 2:
        anchored = latent_anchor or anchor_direction(moment)[1] < layer_latent_rms(weights, inputs())[1]
    if anchored:
        weights = anchor_layer(weights, moment)
    weights.stats["latent_anchor"] = anchored
    return normed_layer(weights, layer_latent_rms(weights, inputs())[0], layer_idx)


def anchored_layers(
    model: MLAForCausalLM, moments: torch.Tensor, calibration_ids: torch.LongTensor, latent_anchor: bool | None
) -> list[int]:
    """The layers that get a latent anchor (`add_latent_anchor`): None, those where the anchor's spread on the
    calibration tokens is smaller than the plain latent's RMS spread; True: every layer; False: none. Never a layer
    whose latent has fewer than 2 dimensions (the anchor takes one)."""
    layers = range(model.config.num_hidden_layers)
    if latent_anchor is False or model.config.kv_lora_rank < 2:
        return []
    if latent_anchor:
        return list(layers)
    plain_spread = [spread for _, spread in latent_rms_statistics(model, calibration_ids)]
    anchor_spread = [anchor_direction(moment)[1] for moment in moments]
    return [i for i in layers if anchor_spread[i] < plain_spread[i]]


def drop_last_latent_dimension(model: MLAForCausalLM, layers: list[int]) -> MLAForCausalLM:
    """`model` with the last latent dimension of `layers` removed (its row of `kv_a_proj_with_mqa`, its column of
    `kv_b_proj`). The decomposition's latent is a PCA, ordered by variance, so this is the same layer decomposed one
    dimension smaller: what an anchor replaces."""
    config = copy.deepcopy(model.config)
    config.kv_lora_ranks = [rank - (i in layers) for i, rank in enumerate(config.kv_lora_ranks)]
    config.kv_lora_rank = max(config.kv_lora_ranks)
    state = dict(model.state_dict())
    for layer_idx in layers:
        rank = model.config.kv_lora_ranks[layer_idx]
        prefix = f"model.layers.{layer_idx}.self_attn."
        keep = [i for i in range(state[prefix + "kv_a_proj_with_mqa.weight"].shape[0]) if i != rank - 1]
        for name in ("kv_a_proj_with_mqa.weight", "kv_a_proj_with_mqa.bias"):
            if prefix + name in state:
                state[prefix + name] = state[prefix + name][keep]
        state[prefix + "kv_b_proj.weight"] = state[prefix + "kv_b_proj.weight"][:, : rank - 1]
    smaller = MLAForCausalLM(config)
    smaller.load_state_dict(state, strict=True)
    smaller.generation_config = model.generation_config
    return smaller.to(next(model.parameters()).device).eval()


def attach_latent_norm(
    model: MLAForCausalLM,
    moments: torch.Tensor,
    calibration_ids: torch.LongTensor,
    latent_anchor: bool | None = None,
) -> MLAForCausalLM:
    """A norm-free MLA model with one `kv_lora_rank` -> the same under DeepSeek's latent norm: in the layers that
    `anchored_layers` picks, the last latent dimension becomes an anchor (`add_latent_anchor`), then the norm is
    added with its weight at the mean latent RMS on `calibration_ids` `[sequences, seq]` (`with_latent_norm`), so
    the layer starts as near the norm-free model as a per-layer constant allows. `moments`: per layer
    `E[[x; 1] [x; 1]^T]` of the attention inputs, from calibration text."""
    anchored = anchored_layers(model, moments, calibration_ids, latent_anchor)
    if anchored:
        model = add_latent_anchor(drop_last_latent_dimension(model, anchored), moments, anchored)
    return with_latent_norm(model, latent_rms(model, calibration_ids))


def build_deepseek_mla(
    source_model: PreTrainedModel,
    source_config: PreTrainedConfig,
    kv_lora_rank: int,
    qk_rope_head_dim: int,
    calibration_ids: torch.LongTensor,
    init: str = "pca",
    key_scale: float = 1.0,
    latent_anchor: bool | None = None,
) -> MLAForCausalLM:
    """The closed-form MLA model of `source_model` under DeepSeek-V3's constraints (`deepseek_closed_form`) with the
    latent norm added, its weight the mean latent RMS on `calibration_ids` `[sequences, seq]` (`with_latent_norm`).
    What `mla-convert convert --target deepseek --refine-steps 0 --key-scale K` computes, without the command."""
    plain = deepseek_closed_form(
        source_model, source_config, kv_lora_rank, qk_rope_head_dim, calibration_ids, init=init, key_scale=key_scale,
        latent_anchor=latent_anchor,
    )
    return with_latent_norm(plain, latent_rms(plain, calibration_ids))


def deepseek_closed_form(
    source_model: PreTrainedModel,
    source_config: PreTrainedConfig,
    kv_lora_rank: int,
    qk_rope_head_dim: int,
    calibration_ids: torch.LongTensor,
    init: str = "pca",
    key_scale: float = 1.0,
    latent_anchor: bool | None = None,
    nope_shrink: bool = False,
) -> MLAForCausalLM:
    """The closed-form MLA model of `source_model` with one `kv_lora_rank` for all layers and DeepSeek's RoPE table
    (one key component per allowed frequency, chosen by the score-error criterion; everything else NoPE), without
    the latent norm. `calibration_ids` `[sequences, seq]` give the activation moments of `init="pca"`.

    `latent_anchor` (activation-aware `init="pca"` only): `kv_lora_rank - 1` dimensions of content and one anchor
    dimension (`add_latent_anchor`) that keeps the latent norm from rescaling tokens unevenly, in the layers that
    `anchored_layers` picks (None: where it helps; True: all; False: none). `nope_shrink`: as `--nope-shrink on`."""
    shape = SourceShape.from_config(source_config)
    # (No refusal of biases here, unlike `convert --target deepseek`: the tests export such a model to see the
    # export refuse it.)
    frequencies = check_deepseek_rope(source_model, shape.head_dim, qk_rope_head_dim)
    plan = RankPlan([kv_lora_rank] * shape.num_layers, qk_rope_head_dim, shape.cache_per_layer, False, frequencies)
    if init == "pca":
        moments, _ = collect_input_moments(source_model, calibration_ids)
    else:
        moments = weight_only_moment(shape.hidden_size).expand(shape.num_layers, -1, -1)
    options = DecomposeOptions(
        init=init,
        rope_strategy="rorope",
        key_scale=key_scale,
        rope_frequencies=plan.rope_frequencies,
        nope_shrink=nope_shrink,
    )
    layers = decompose_all(source_model, shape, moments, plan, options, progress=False)
    plain = assemble(source_model, mla_config(source_config, source_model, plan, layers), layers)
    anchored = anchored_layers(plain, moments, calibration_ids, latent_anchor if init == "pca" else False)
    if not anchored:
        return plain
    return add_latent_anchor(drop_last_latent_dimension(plain, anchored), moments, anchored)


def save_mla_folder(model: MLAForCausalLM, tokenizer, output, report: dict) -> None:
    """Saves an MLA model as a converted folder (modeling files, `auto_map`, tokenizer, `conversion.json`), in one
    atomic step; `output` must have passed `folders.prepare_output`."""
    import json
    from pathlib import Path

    from .folders import save_atomically

    type(model.config).register_for_auto_class()
    type(model).register_for_auto_class("AutoModelForCausalLM")

    def write(folder: Path) -> None:
        model.save_pretrained(folder)
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)
        (folder / "conversion.json").write_text(json.dumps(report, indent=2) + "\n")

    save_atomically(Path(output), write)


__all__ = [
    "add_latent_anchor",
    "anchor_direction",
    "anchored_layers",
    "attach_latent_norm",
    "build_deepseek_mla",
    "check_deepseek_rope",
    "check_deepseek_rope_table",
    "check_deepseek_source",
    "deepseek_closed_form",
    "deepseek_rope_table",
    "drop_last_latent_dimension",
    "latent_rms",
    "latent_rms_statistics",
    "layer_latent_rms",
    "rope_table_mismatch",
    "save_mla_folder",
    "with_latent_norm",
    "with_layer_latent_norm",
]
