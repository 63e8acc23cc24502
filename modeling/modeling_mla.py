"""A Llama-family decoder with DeepSeek-V2/V3 Multi-head Latent Attention and a latent KV cache.

This file is copied into every converted checkpoint as remote code: it imports only torch, transformers and its
sibling files.
"""

from collections.abc import Callable

import torch
from torch import nn
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.generation import GenerationMixin
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import create_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS, dynamic_rope_update
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs, can_return_tuple

from .cache_mla import MLALatentCacheLayer, MLAStaticLatentCacheLayer  # noqa: F401  (registers the cache layers)
from .configuration_mla import MLAConfig


class MLARMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)

    def extra_repr(self):
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}"


class MLARotaryEmbedding(nn.Module):
    """RoPE over the source model's frequencies (`config.head_dim`); each layer picks the pairs it uses."""

    def __init__(self, config: MLAConfig):
        super().__init__()
        self.max_seq_len_cached = config.max_position_embeddings
        self.original_max_seq_len = config.max_position_embeddings
        self.config = config
        self.rope_type = self.config.rope_parameters["rope_type"]
        rope_init_fn: Callable = self.compute_default_rope_parameters
        if self.rope_type != "default":
            rope_init_fn = ROPE_INIT_FUNCTIONS[self.rope_type]
        inv_freq, self.attention_scaling = rope_init_fn(self.config)
        self.inv_freq = nn.Buffer(inv_freq, persistent=False)
        self.original_inv_freq = nn.Buffer(inv_freq.clone(), persistent=False)

    @staticmethod
    def compute_default_rope_parameters(config: MLAConfig, **kwargs) -> tuple[torch.Tensor, float]:
        base = config.rope_parameters["rope_theta"]
        dim = config.head_dim
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
        return inv_freq, 1.0

    @torch.no_grad()
    @dynamic_rope_update
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # freqs: [batch, seq, head_dim / 2]
        freqs = position_ids[..., None].float() * self.inv_freq.to(device=x.device, dtype=torch.float)
        # emb: [batch, seq, head_dim], rotate_half layout
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = emb.cos() * self.attention_scaling
        sin = emb.sin() * self.attention_scaling
        return cos.to(dtype=x.dtype), sin.to(dtype=x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_pos_emb(states: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotates `states` `[batch, heads, seq, dim]` by `cos`/`sin` `[batch, seq, dim]`."""
    cos = cos.unsqueeze(1)
    sin = sin.unsqueeze(1)
    return (states * cos) + (rotate_half(states) * sin)


def rope_gather_index(frequency_indices: list[int]) -> torch.Tensor:
    """Columns of the source's `[cos ; cos]` table that the pairs of a shared RoPE key rotate with."""
    index = torch.tensor(frequency_indices, dtype=torch.long)
    return torch.cat((index, index))


class MLAMLP(nn.Module):
    def __init__(self, config: MLAConfig):
        super().__init__()
        self.hidden_size = config.hidden_size
        self.intermediate_size = config.intermediate_size
        self.gate_proj = nn.Linear(self.hidden_size, self.intermediate_size, bias=config.mlp_bias)
        self.up_proj = nn.Linear(self.hidden_size, self.intermediate_size, bias=config.mlp_bias)
        self.down_proj = nn.Linear(self.intermediate_size, self.hidden_size, bias=config.mlp_bias)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs: Unpack[TransformersKwargs],
) -> tuple[torch.Tensor, torch.Tensor]:
    # Keys and values always come with as many heads as the query here (or one for all), so no repeat is needed.
    attn_weights = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        attn_weights = attn_weights + attention_mask
    attn_weights = nn.functional.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query.dtype)
    attn_weights = nn.functional.dropout(attn_weights, p=dropout, training=module.training)
    attn_output = torch.matmul(attn_weights, value)
    attn_output = attn_output.transpose(1, 2).contiguous()
    return attn_output, attn_weights


class MLAAttention(nn.Module):
    """Multi-head Latent Attention (DeepSeek-V2), full-rank queries.

    Two forms give the same result:
    - expanded: up-project the cached latent into per-head keys and values, then run the attention backend;
    - absorbed: move each head's query into latent space (`W_uk_h^T q_nope_h`) and attend over `[latent ; k_pe]`
      as multi-query attention, reading nothing but the cache; `W_uv_h` is applied to the latent-sized output.
    """

    def __init__(self, config: MLAConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.kv_lora_rank = config.kv_lora_ranks[layer_idx]
        self.qk_nope_head_dim = config.qk_nope_head_dim
        self.qk_rope_head_dim = config.qk_rope_head_dim
        self.qk_head_dim = config.qk_head_dim
        self.v_head_dim = config.v_head_dim
        self.scaling = config.softmax_scale
        self.attention_dropout = config.attention_dropout
        self.is_causal = True
        # Both forms hand the backend one key head per query head (expanded) or one query row per head (absorbed).
        self.num_key_value_groups = 1

        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.qk_head_dim, bias=config.attention_bias)
        self.kv_a_proj_with_mqa = nn.Linear(
            config.hidden_size, self.kv_lora_rank + self.qk_rope_head_dim, bias=config.attention_bias
        )
        self.kv_b_proj = nn.Linear(
            self.kv_lora_rank, self.num_heads * (self.qk_nope_head_dim + self.v_head_dim), bias=False
        )
        self.o_proj = nn.Linear(
            self.num_heads * self.v_head_dim, config.hidden_size, bias=config.attention_output_bias
        )

        rope_index = None
        if config.rope_frequency_indices is not None:
            rope_index = rope_gather_index(config.rope_frequency_indices[layer_idx])
        self.register_buffer("rope_index", rope_index, persistent=False)

    def _rope_tables(
        self, position_embeddings: tuple[torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        cos, sin = position_embeddings
        if self.rope_index is None:
            return cos, sin
        # [batch, seq, head_dim] -> [batch, seq, qk_rope_head_dim]
        return cos.index_select(-1, self.rope_index), sin.index_select(-1, self.rope_index)

    def _use_absorbed(self, query_length: int, kv_length: int, attention_mask) -> bool:
        if attention_mask is not None and not (isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 4):
            # Block masks (flex) and 2-D padding masks (flash) only fit the per-head form.
            return False
        path = self.config.attention_path
        if path != "auto":
            return path == "absorbed"
        rank, heads = self.kv_lora_rank, self.num_heads
        up_projection = heads * rank * (self.qk_nope_head_dim + self.v_head_dim)
        pairs = query_length * kv_length * heads
        # Multiply-adds of each form for this call: expansion of every cached token vs. queries moved to latent space.
        expanded = kv_length * up_projection + pairs * (self.qk_head_dim + self.v_head_dim)
        absorbed = query_length * up_projection + pairs * (2 * rank + self.qk_rope_head_dim)
        return absorbed <= expanded

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        past_key_values: Cache | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        batch_size, query_length, _ = hidden_states.shape

        # query_states: [batch, heads, seq, qk_head_dim]
        query_states = self.q_proj(hidden_states).view(batch_size, query_length, self.num_heads, self.qk_head_dim)
        query_states = query_states.transpose(1, 2)
        q_nope, q_pe = torch.split(query_states, [self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)

        # compressed: [batch, seq, kv_lora_rank + qk_rope_head_dim]
        compressed = self.kv_a_proj_with_mqa(hidden_states)
        latent, k_pe = torch.split(compressed, [self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        # latent: [batch, 1, seq, kv_lora_rank]; k_pe: [batch, 1, seq, qk_rope_head_dim]
        latent = latent.unsqueeze(1)
        k_pe = k_pe.unsqueeze(1)

        cos, sin = self._rope_tables(position_embeddings)
        q_pe = apply_rotary_pos_emb(q_pe, cos, sin)
        k_pe = apply_rotary_pos_emb(k_pe, cos, sin)

        joint = None
        if past_key_values is not None:
            # latent: [batch, 1, kv_len, kv_lora_rank]; k_pe: [batch, 1, kv_len, qk_rope_head_dim]
            latent, k_pe = past_key_values.update(latent, k_pe, self.layer_idx)
            # The latent cache keeps both side by side: [batch, 1, kv_len, kv_lora_rank + qk_rope_head_dim]
            joint = getattr(past_key_values.layers[self.layer_idx], "joint", None)

        kv_length = latent.shape[-2]
        if self._use_absorbed(query_length, kv_length, attention_mask):
            if joint is None:
                joint = torch.cat((latent, k_pe), dim=-1)
            attn_output, attn_weights = self._absorbed_attention(q_nope, q_pe, joint, attention_mask, **kwargs)
        else:
            attn_output, attn_weights = self._expanded_attention(q_nope, q_pe, latent, k_pe, attention_mask, **kwargs)

        # attn_output: [batch, seq, heads, v_head_dim] -> [batch, seq, heads * v_head_dim]
        attn_output = attn_output.reshape(batch_size, query_length, -1).contiguous()
        attn_output = self.o_proj(attn_output)
        return attn_output, attn_weights

    def _expanded_attention(self, q_nope, q_pe, latent, k_pe, attention_mask, **kwargs):
        batch_size, _, kv_length, _ = latent.shape
        # kv: [batch, kv_len, heads * (qk_nope_head_dim + v_head_dim)] -> [batch, heads, kv_len, qk_nope + v]
        kv = self.kv_b_proj(latent.squeeze(1))
        kv = kv.view(batch_size, kv_length, self.num_heads, self.qk_nope_head_dim + self.v_head_dim).transpose(1, 2)
        k_nope, value_states = torch.split(kv, [self.qk_nope_head_dim, self.v_head_dim], dim=-1)
        # key_states: [batch, heads, kv_len, qk_head_dim]
        key_states = torch.cat((k_nope, k_pe.expand(-1, self.num_heads, -1, -1)), dim=-1)
        query_states = torch.cat((q_nope, q_pe), dim=-1)

        implementation = self.config._attn_implementation or "eager"
        pad_value = "flash" in implementation and self.v_head_dim != self.qk_head_dim
        if pad_value:
            # Flash kernels want equal query/key and value sizes.
            value_states = nn.functional.pad(value_states, [0, self.qk_head_dim - self.v_head_dim])

        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(implementation, eager_attention_forward)
        attn_output, attn_weights = attention_interface(
            self,
            query_states,
            key_states,
            value_states,
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            **kwargs,
        )
        if pad_value:
            attn_output = attn_output[..., : self.v_head_dim]
        return attn_output, attn_weights

    def _absorbed_attention(self, q_nope, q_pe, joint, attention_mask, **kwargs):
        """`joint`: `[batch, 1, kv_len, kv_lora_rank + qk_rope_head_dim]`, the cached latent and RoPE key."""
        batch_size, num_heads, query_length, _ = q_nope.shape
        kv_length = joint.shape[-2]
        # The latent doubles as the value: [batch, 1, kv_len, kv_lora_rank]
        latent = joint[..., : self.kv_lora_rank]
        # w_kv_b: [heads, qk_nope_head_dim + v_head_dim, kv_lora_rank]
        w_kv_b = self.kv_b_proj.weight.view(num_heads, self.qk_nope_head_dim + self.v_head_dim, self.kv_lora_rank)
        w_uk, w_uv = torch.split(w_kv_b, [self.qk_nope_head_dim, self.v_head_dim], dim=1)

        # q_latent: [batch, heads, seq, kv_lora_rank]
        q_latent = torch.matmul(q_nope, w_uk)
        # Heads become query rows of one multi-query attention over the cache: [batch, 1, heads * seq, r + d_r]
        query_states = torch.cat((q_latent, q_pe), dim=-1).reshape(batch_size, 1, num_heads * query_length, -1)

        if attention_mask is None and query_length > 1:
            # No mask means causal attention without padding, aligned top-left as sdpa's `is_causal` reads it (a
            # static cache's prefill sees keys up to `max_cache_len`); the head rows need it spelled out.
            positions = torch.arange(query_length, device=joint.device)
            attention_mask = positions[:, None] >= torch.arange(kv_length, device=joint.device)[None, :]
            attention_mask = attention_mask[None, None]
        if attention_mask is not None:
            # [batch, 1, seq, kv_len] -> [batch, 1, heads * seq, kv_len], rows ordered head-major as the query
            attention_mask = attention_mask.repeat(1, 1, num_heads, 1)

        implementation = self.config._attn_implementation or "eager"
        if implementation in ("eager", "sdpa"):
            attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(implementation, eager_attention_forward)
        else:
            attention_interface = sdpa_attention_forward
        attn_output, attn_weights = attention_interface(
            self,
            query_states,
            joint,
            latent,
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            is_causal=False,
            **kwargs,
        )
        # attn_output: [batch, heads * seq, 1, kv_lora_rank] -> [batch, heads, seq, kv_lora_rank]
        attn_output = attn_output.reshape(batch_size, num_heads, query_length, self.kv_lora_rank)
        # [batch, heads, seq, kv_lora_rank] @ [heads, kv_lora_rank, v_head_dim] -> [batch, heads, seq, v_head_dim]
        attn_output = torch.matmul(attn_output, w_uv.transpose(1, 2))
        if attn_weights is not None:
            attn_weights = attn_weights.reshape(batch_size, num_heads, query_length, kv_length)
        # [batch, seq, heads, v_head_dim], as the backends return
        return attn_output.transpose(1, 2), attn_weights


class MLADecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: MLAConfig, layer_idx: int):
        super().__init__()
        self.hidden_size = config.hidden_size
        self.self_attn = MLAAttention(config=config, layer_idx=layer_idx)
        self.mlp = MLAMLP(config)
        self.input_layernorm = MLARMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = MLARMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        use_cache: bool | None = False,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> torch.Tensor:
        residual = hidden_states
        hidden_states = self.input_layernorm(hidden_states)
        hidden_states, _ = self.self_attn(
            hidden_states=hidden_states,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            use_cache=use_cache,
            position_embeddings=position_embeddings,
            **kwargs,
        )
        hidden_states = residual + hidden_states

        residual = hidden_states
        hidden_states = self.post_attention_layernorm(hidden_states)
        hidden_states = self.mlp(hidden_states)
        hidden_states = residual + hidden_states
        return hidden_states


class MLAPreTrainedModel(PreTrainedModel):
    config_class = MLAConfig
    config: MLAConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["MLADecoderLayer"]
    _skip_keys_device_placement = ["past_key_values"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _can_compile_fullgraph = True
    _supports_attention_backend = True

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, MLAAttention) and module.rope_index is not None:
            # Non-persistent buffers are not in the checkpoint: rebuild them from the config.
            init.copy_(module.rope_index, rope_gather_index(self.config.rope_frequency_indices[module.layer_idx]))


class MLAModel(MLAPreTrainedModel):
    def __init__(self, config: MLAConfig):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(
            [MLADecoderLayer(config, layer_idx) for layer_idx in range(config.num_hidden_layers)]
        )
        self.norm = MLARMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = MLARotaryEmbedding(config=config)
        self.gradient_checkpointing = False
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> BaseModelOutputWithPast:
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        use_cache = use_cache if use_cache is not None else self.config.use_cache

        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)

        if use_cache and past_key_values is None:
            # Builds one `MLALatentCacheLayer` per layer from `config.layer_types`.
            past_key_values = DynamicCache(config=self.config)

        if position_ids is None:
            past_seen_tokens = past_key_values.get_seq_length() if past_key_values is not None else 0
            position_ids = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past_seen_tokens
            position_ids = position_ids.unsqueeze(0)

        causal_mask = create_causal_mask(
            config=self.config,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            past_key_values=past_key_values,
            position_ids=position_ids,
        )

        hidden_states = inputs_embeds
        position_embeddings = self.rotary_emb(hidden_states, position_ids=position_ids)

        for decoder_layer in self.layers[: self.config.num_hidden_layers]:
            hidden_states = decoder_layer(
                hidden_states,
                attention_mask=causal_mask,
                position_embeddings=position_embeddings,
                position_ids=position_ids,
                past_key_values=past_key_values,
                use_cache=use_cache,
                **kwargs,
            )

        hidden_states = self.norm(hidden_states)
        return BaseModelOutputWithPast(last_hidden_state=hidden_states, past_key_values=past_key_values)


class MLAForCausalLM(MLAPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: MLAConfig):
        super().__init__(config)
        self.model = MLAModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs: Unpack[TransformersKwargs],
    ) -> CausalLMOutputWithPast:
        outputs: BaseModelOutputWithPast = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        slice_indices = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, slice_indices, :])

        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)

        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )


__all__ = ["MLAForCausalLM", "MLAModel", "MLAPreTrainedModel", "MLAAttention"]
