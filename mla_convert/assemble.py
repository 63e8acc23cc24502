"""Assembling the MLA model: its config from the source's and the plan, and its weights from the decomposed layers
(everything outside attention is copied from the source)."""

from __future__ import annotations

import torch
from transformers import PreTrainedConfig, PreTrainedModel

from mla_modeling import MLAConfig, MLAForCausalLM

from .families import attention_projections, llama_layout_state, sliding_window, source_layer_types
from .plan import RankPlan, SourceShape


def mla_config(source_config: PreTrainedConfig, model: PreTrainedModel, plan: RankPlan, layers: list) -> MLAConfig:
    shape = SourceShape.from_config(source_config)
    attention = model.model.layers[0].self_attn
    projections = attention_projections(attention, source_config)
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
        attention_bias=projections["q"][1] is not None or projections["k"][1] is not None,
        attention_output_bias=projections["o"][1] is not None,
        sliding_window=sliding_window(source_config) if source_layer_types(source_config) else None,
        attention_layer_types=source_layer_types(source_config),
        # QK-norm (Qwen3): the source's kv heads, and per layer the kv head whose key scale each RoPE pair takes
        qk_norm=shape.qk_norm,
        qk_norm_heads=shape.num_kv_heads if shape.qk_norm else 0,
        rope_key_heads=[layer.rope_key_heads for layer in layers] if shape.qk_norm else None,
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
    # Phi-3's fused gate/up projection split into the MLA model's (Llama's) two
    state = llama_layout_state(source_model.state_dict())
    state = {key: value for key, value in state.items() if ".self_attn." not in key}
    for layer_idx, weights in enumerate(layers):
        prefix = f"model.layers.{layer_idx}.self_attn."
        state.update({prefix + name: tensor for name, tensor in attention_entries(weights).items()})
    if config.tie_word_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    model = MLAForCausalLM(config)
    state = {key: value.to(torch.float32) for key, value in state.items()}
    model.load_state_dict(state, strict=True)
    model.generation_config = source_model.generation_config
    return model.eval()


def attention_entries(weights) -> dict[str, torch.Tensor]:
    """One decomposed layer's `MLAAttention` parameters by name (within `self_attn.`), as they are stored."""
    entries = {
        "q_proj.weight": weights.q_weight,
        "q_proj.bias": weights.q_bias,
        "kv_a_proj_with_mqa.weight": weights.kv_a_weight,
        "kv_a_proj_with_mqa.bias": weights.kv_a_bias,
        "kv_a_layernorm.weight": getattr(weights, "kv_a_norm_weight", None),
        "kv_b_proj.weight": weights.kv_b_weight,
        "o_proj.weight": weights.o_weight,
        "o_proj.bias": weights.o_bias,
        "q_norm.weight": weights.q_norm_weight,
        "k_proj.weight": weights.k_weight,
        "k_proj.bias": weights.k_bias,
    }
    return {name: tensor for name, tensor in entries.items() if tensor is not None}
