"""Conversion under DeepSeek-V3's constraints (issue 13): what a folder must be for `export.export_deepseek_v3`.

DeepSeek-V3's attention differs from a plain MLA conversion in three ways that a re-layout cannot fix afterwards:

- an RMSNorm on the latent (`kv_a_layernorm`) before the cache, which is not linear and so cannot be folded away;
- one `kv_lora_rank` for every layer;
- one RoPE table: pair `i` of the shared key rotates with `theta ** (-2i / qk_rope_head_dim)`, which for a source head
  of size `d` is source frequency `i * d / qk_rope_head_dim` (`decompose.deepseek_frequency_indices`), one key
  component per frequency.

`build_deepseek_mla` decomposes a source under those constraints (closed form, no refinement) and adds the norm,
initialised so that the layer starts as close to the norm-free closed form as a per-layer constant allows: the
norm's weight is the mean RMS of the latent over calibration tokens, and `kv_b_proj` is unchanged.

What exactness the norm leaves: it divides each token's latent by that token's own RMS, i.e. rescales the token's
NoPE key and value by `weight / rms(latent)`. A linear `kv_b_proj` cannot undo a per-token factor, so the converted
layer equals the norm-free closed form only on tokens whose latent RMS equals the weight; elsewhere the token's
K_nope and V are off by the factor `mean rms / rms`. (At full budget a latent `c = B n` with `B` an isometry of the
normalised attention input `n`, `r >= hidden_size`, would have a constant RMS and be exact; no useful budget allows
that.) The constrained RoPE table itself already costs exactness against the source whenever the source key has more
than one component per allowed frequency (any GQA or MHA source), so a `--target deepseek` conversion is never
exact against its source; the export that follows it is exact against the converted folder.
"""

from __future__ import annotations

import copy

import torch
from transformers import PreTrainedConfig, PreTrainedModel

from mla_modeling import MLAConfig, MLAForCausalLM

from .decompose import DecomposeOptions, deepseek_frequency_indices, weight_only_moment
from .errors import MLAConvertError


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
    try:
        indices = deepseek_frequency_indices(head_dim, qk_rope_head_dim)
    except ValueError as e:
        raise MLAConvertError(f"--target deepseek: {e}") from None
    rotary = model.model.rotary_emb
    rope_parameters = dict(model.config.rope_parameters or {"rope_type": "default", "rope_theta": 10000.0})
    problem = rope_table_mismatch(
        rotary.inv_freq, float(rotary.attention_scaling), indices, rope_parameters, qk_rope_head_dim,
        model.config.max_position_embeddings,
    )
    if problem is not None:
        raise MLAConvertError(f"--target deepseek cannot express this source's RoPE: {problem}")
    return indices


@torch.no_grad()
def latent_rms(model: MLAForCausalLM, input_ids: torch.LongTensor, batch_size: int = 4) -> list[float]:
    """Per layer, the mean over tokens of the latent's RMS (the `kv_lora_rank` part of `kv_a_proj_with_mqa`'s
    output, before any norm), on `input_ids` `[sequences, seq]`."""
    layers = model.model.layers
    sums = [0.0] * len(layers)
    count = 0

    def make_hook(layer_idx: int):
        def hook(module, args, output):
            rank = layers[layer_idx].self_attn.kv_lora_rank
            # latent: [batch, seq, kv_lora_rank]
            latent = output[..., :rank].double()
            sums[layer_idx] += float(latent.pow(2).mean(-1).sqrt().sum())

        return hook

    handles = [
        layer.self_attn.kv_a_proj_with_mqa.register_forward_hook(make_hook(i)) for i, layer in enumerate(layers)
    ]
    device = next(model.parameters()).device
    try:
        for start in range(0, len(input_ids), batch_size):
            batch = input_ids[start : start + batch_size].to(device)
            model.model(input_ids=batch, use_cache=False)
            count += batch.numel()
    finally:
        for handle in handles:
            handle.remove()
    return [total / max(count, 1) for total in sums]


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


# The converter's building blocks, by name, and the modules that may hold them (convert.py is being split).
CONVERTER_MODULES = ("plan", "calibrate", "assemble", "convert")


def converter(name: str):
    """`name` from whichever of the converter's modules defines it (imported lazily)."""
    import importlib

    for module_name in CONVERTER_MODULES:
        try:
            module = importlib.import_module(f"{__package__}.{module_name}")
        except ImportError:
            continue
        if hasattr(module, name):
            return getattr(module, name)
    raise ImportError(f"no converter module defines {name}")


def build_deepseek_mla(
    source_model: PreTrainedModel,
    source_config: PreTrainedConfig,
    kv_lora_rank: int,
    qk_rope_head_dim: int,
    calibration_ids: torch.LongTensor,
    init: str = "pca",
    key_scale: float = 1.0,
) -> MLAForCausalLM:
    """The closed-form MLA model of `source_model` under DeepSeek-V3's constraints (`deepseek_closed_form`) with the
    latent norm added, its weight the mean latent RMS on `calibration_ids` `[sequences, seq]` (`with_latent_norm`).
    This is where layer-wise refinement and healing start; they keep the norm in place."""
    plain = deepseek_closed_form(
        source_model, source_config, kv_lora_rank, qk_rope_head_dim, calibration_ids, init=init, key_scale=key_scale
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
) -> MLAForCausalLM:
    """The closed-form MLA model of `source_model` with one `kv_lora_rank` for all layers and DeepSeek's RoPE table
    (one key component per allowed frequency, chosen by the score-error criterion; everything else NoPE), without
    the latent norm. `calibration_ids` `[sequences, seq]` give the activation moments of `init="pca"`."""
    shape = converter("SourceShape").from_config(source_config)
    frequencies = check_deepseek_rope(source_model, shape.head_dim, qk_rope_head_dim)
    ranks = [kv_lora_rank] * shape.num_layers
    plan = converter("RankPlan")(ranks, qk_rope_head_dim, shape.cache_per_layer, exact=False)
    if init == "pca":
        moments, _ = converter("collect_input_moments")(source_model, calibration_ids)
    else:
        moments = weight_only_moment(shape.hidden_size).expand(shape.num_layers, -1, -1)
    options = DecomposeOptions(init=init, rope_strategy="rorope", key_scale=key_scale, rope_frequencies=frequencies)
    layers = converter("decompose_all")(source_model, shape, moments, plan, options, progress=False)
    config: MLAConfig = converter("mla_config")(source_config, source_model, plan, layers)
    return converter("assemble")(source_model, config, layers)


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
    "build_deepseek_mla",
    "check_deepseek_rope",
    "converter",
    "deepseek_closed_form",
    "deepseek_rope_table",
    "latent_rms",
    "rope_table_mismatch",
    "save_mla_folder",
    "with_latent_norm",
]
