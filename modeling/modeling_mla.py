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
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS, dynamic_rope_update
from transformers.modeling_utils import PreTrainedModel, slice_logits_to_keep
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs, can_return_tuple
from transformers.utils.deprecation import deprecate_kwarg
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import capture_outputs

from .cache_mla import (  # noqa: F401  (registers the cache layers)
    MLALatentCacheLayer,
    MLASlidingLatentCacheLayer,
    MLAStaticLatentCacheLayer,
    MLAStaticSlidingLatentCacheLayer,
)
from .configuration_mla import FULL_ATTENTION, SLIDING_ATTENTION, MLAConfig
from .attention_mla import MLAAttention, MLARMSNorm, qk_norm_indices, rope_gather_index


def cache_field(output_class: type) -> str:
    """The field of `output_class` that holds the cache: `cache` from transformers 5.24, `past_key_values` in 5.23."""
    return "cache" if "cache" in output_class.__dataclass_fields__ else "past_key_values"


# The cache's keyword in the installed transformers' `generate()` and its `prepare_inputs_for_generation` (renamed
# with the output field)
GENERATION_CACHE_ARGUMENT = cache_field(CausalLMOutputWithPast)


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
        # A partial RoPE (`partial_rotary_factor` < 1) has frequencies for the rotated dims only; the converted
        # layout puts the source's pass-through dims in the pairs after them, which rotate by angle 0.
        self.pass_through_pairs = config.head_dim // 2 - inv_freq.shape[0]

    @staticmethod
    def compute_default_rope_parameters(config: MLAConfig, **kwargs) -> tuple[torch.Tensor, float]:
        base = config.rope_parameters["rope_theta"]
        dim = int(config.head_dim * config.rope_parameters.get("partial_rotary_factor", 1.0))
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
        return inv_freq, 1.0

    @torch.no_grad()
    @dynamic_rope_update
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # freqs: [batch, seq, rotated pairs]
        freqs = position_ids[..., None].float() * self.inv_freq.to(device=x.device, dtype=torch.float)
        cos = freqs.cos() * self.attention_scaling
        sin = freqs.sin() * self.attention_scaling
        if self.pass_through_pairs:
            # [batch, seq, rotated pairs] -> [batch, seq, head_dim / 2]: the source leaves its pass-through dims as
            # they are, unscaled by `attention_scaling` (longrope's), so exactly cos 1 and sin 0 there
            cos = nn.functional.pad(cos, [0, self.pass_through_pairs], value=1.0)
            sin = nn.functional.pad(sin, [0, self.pass_through_pairs], value=0.0)
        # cos, sin: [batch, seq, head_dim], rotate_half layout
        cos, sin = torch.cat((cos, cos), dim=-1), torch.cat((sin, sin), dim=-1)
        return cos.to(dtype=x.dtype), sin.to(dtype=x.dtype)


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


class MLADecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: MLAConfig, layer_idx: int):
        super().__init__()
        self.hidden_size = config.hidden_size
        self.self_attn = MLAAttention(config=config, layer_idx=layer_idx)
        # Which mask this layer reads: the sliding-window one on local layers
        attention_layer_types = config.attention_layer_types or [FULL_ATTENTION] * config.num_hidden_layers
        self.attention_type = attention_layer_types[layer_idx]
        self.mlp = MLAMLP(config)
        self.input_layernorm = MLARMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = MLARMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
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
            cache=cache,
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
    _skip_keys_device_placement = ["past_key_values", "cache"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _can_compile_fullgraph = True
    _supports_attention_backend = True
    _can_record_outputs = {
        "hidden_states": MLADecoderLayer,
        "attentions": MLAAttention,
    }

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, MLAAttention) and module.rope_index is not None:
            # Non-persistent buffers are not in the checkpoint: rebuild them from the config.
            init.copy_(module.rope_index, rope_gather_index(self.config.rope_frequency_indices[module.layer_idx]))
        if isinstance(module, MLAAttention) and module.head_groups is not None:
            head_groups, rope_key_head_index = qk_norm_indices(self.config, module.layer_idx)
            init.copy_(module.head_groups, head_groups)
            init.copy_(module.rope_key_head_index, rope_key_head_index)


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
        self.attention_types = {layer.attention_type for layer in self.layers}
        self.has_sliding_layers = SLIDING_ATTENTION in self.attention_types
        self.gradient_checkpointing = False
        self.post_init()

    # transformers 5.24 renamed the cache argument `past_key_values` to `cache`; 5.23's `generate()` still passes the
    # old name, which this maps to the new one (with transformers' deprecation warning).
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    @merge_with_config_defaults
    @capture_outputs
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> BaseModelOutputWithPast:
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")

        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)

        if use_cache and cache is None:
            # Builds one `MLALatentCacheLayer` per layer from `config.layer_types`.
            cache = DynamicCache(config=self.config)

        if position_ids is None:
            past_seen_tokens = cache.get_seq_length() if cache is not None else 0
            position_ids = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past_seen_tokens
            position_ids = position_ids.unsqueeze(0)

        if cache is not None and self.has_sliding_layers:
            # `DynamicCache(config=...)` (what `generate()` builds) makes its layers without arguments: the sliding
            # ones learn their window here, before the masks read their sizes.
            for layer in cache.layers:
                if isinstance(layer, MLASlidingLatentCacheLayer):
                    layer.set_sliding_window(self.config.sliding_window)

        # The cache goes by position: its keyword is `past_key_values` in transformers 5.23 and `cache` in 5.24.
        # One mask per kind of layer the model has (Mistral's are all local, Qwen2's may mix both).
        mask_functions = {FULL_ATTENTION: create_causal_mask, SLIDING_ATTENTION: create_sliding_window_causal_mask}
        causal_masks = {
            kind: mask_functions[kind](self.config, inputs_embeds, attention_mask, cache, position_ids)
            for kind in self.attention_types
        }

        hidden_states = inputs_embeds
        position_embeddings = self.rotary_emb(hidden_states, position_ids=position_ids)

        for decoder_layer in self.layers[: self.config.num_hidden_layers]:
            hidden_states = decoder_layer(
                hidden_states,
                attention_mask=causal_masks[decoder_layer.attention_type],
                position_embeddings=position_embeddings,
                position_ids=position_ids,
                cache=cache,
                use_cache=use_cache,
                **kwargs,
            )

        hidden_states = self.norm(hidden_states)
        return BaseModelOutputWithPast(last_hidden_state=hidden_states, **{cache_field(BaseModelOutputWithPast): cache})


class MLAForCausalLM(MLAPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    _tp_plan = {"lm_head": "colwise_gather_output"}
    _pp_plan = {"lm_head": (["hidden_states"], ["logits"])}

    def __init__(self, config: MLAConfig):
        super().__init__(config)
        self.model = MLAModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def prepare_inputs_for_generation(
        self,
        input_ids: torch.LongTensor,
        cache: Cache | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs,
    ):
        # `generate()` accepts only the inputs this signature (or `forward`'s, for `**kwargs`) names: `inputs_embeds`,
        # and the cache under the installed transformers' name for it (`past_key_values` in 5.23, which `forward`
        # takes only through its deprecation shim).
        cache = cache if cache is not None else past_key_values
        # LongRoPE (Phi-3's long variants) rotates with other frequencies once the sequence passes the original
        # context, which invalidates the keys cached before: as Phi-3 does, the step that crosses it recomputes the
        # whole sequence (one slower step; the cached latents and RoPE keys are rebuilt with the long factors).
        rope_parameters = self.config.rope_parameters or {}
        original_context = rope_parameters.get("original_max_position_embeddings")
        if (
            rope_parameters.get("rope_type") == "longrope"
            and original_context is not None
            and cache is not None
            and input_ids.shape[1] > original_context
            and cache.get_seq_length() <= original_context
        ):
            cache = None
            if "next_sequence_length" in kwargs:
                kwargs["next_sequence_length"] = None
        model_inputs = super().prepare_inputs_for_generation(
            input_ids, inputs_embeds=inputs_embeds, **{GENERATION_CACHE_ARGUMENT: cache}, **kwargs
        )
        # `forward`'s own name in every version, so that 5.23's decoding steps raise no deprecation warning
        if "past_key_values" in model_inputs:
            model_inputs["cache"] = model_inputs.pop("past_key_values")
        return model_inputs

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
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
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        hidden_states = slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep)
        logits = self.lm_head(hidden_states)

        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)

        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            **{cache_field(CausalLMOutputWithPast): getattr(outputs, cache_field(BaseModelOutputWithPast))},
        )


__all__ = ["MLAForCausalLM", "MLAModel", "MLAPreTrainedModel", "MLAAttention"]
