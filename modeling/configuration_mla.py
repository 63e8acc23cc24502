"""Configuration of a Multi-head Latent Attention (MLA) decoder converted from an MHA/GQA model."""

from huggingface_hub.dataclasses import strict
from transformers.configuration_utils import PreTrainedConfig
from transformers.modeling_rope_utils import RopeParameters


# The cache layer type registered by `cache_mla.MLALatentCacheLayer`: one latent and one shared RoPE key per token.
MLA_LATENT_LAYER_TYPE = "mla_latent"
# ... and by `cache_mla.MLASlidingLatentCacheLayer`: the same, for the last `sliding_window` tokens only.
MLA_SLIDING_LATENT_LAYER_TYPE = "mla_latent_sliding"

# How a layer attends, in transformers' names (`attention_layer_types`): over the whole context, or over a window.
FULL_ATTENTION = "full_attention"
SLIDING_ATTENTION = "sliding_attention"


@strict
class MLAConfig(PreTrainedConfig):
    r"""
    A Llama-family decoder (RMSNorm, gated MLP) whose attention is DeepSeek-V2/V3's Multi-head Latent Attention.

    Field names follow DeepSeek-V3 where they exist. What a converted model needs on top:

    - `kv_lora_ranks`: per-layer latent sizes; `kv_lora_rank` is their maximum (all layers equal when `None`).
    - `head_dim`: the head size of the source model, over which the RoPE frequencies are defined
      (`rope_parameters`, Llama-3 and YaRN scaling included).
    - `rope_frequency_indices`: per layer, which source frequency each of the `qk_rope_head_dim / 2` pairs of the
      shared RoPE key rotates with. `None` means pair `i` uses frequency `i`, i.e. plain RoPE of size
      `qk_rope_head_dim` (then `head_dim` must equal `qk_rope_head_dim`).
    - `softmax_scale`: the source's own attention scale (not `qk_head_dim ** -0.5`).
    - `attention_bias` (query and joint down-projection, as Qwen2's q/k/v biases) and `attention_output_bias`
      (`o_proj`, as Llama's `attention_bias` also sets).
    - `kv_latent_norm`: DeepSeek's `kv_a_layernorm`, an RMSNorm over the latent part of `kv_a_proj_with_mqa`'s
      output, applied before the cache (the cache holds the normalised latent, as DeepSeek's does). Off for a plain
      conversion; needs one `kv_lora_rank` for all layers (the export to DeepSeek-V3's format requires it).
    - `sliding_window` and `attention_layer_types`: the source's local attention (Mistral's `sliding_window`, Qwen2's
      `use_sliding_window` with `max_window_layers`, Phi-3's). Per layer `"full_attention"` or `"sliding_attention"`
      (transformers' names; `None`: every layer full); a sliding layer attends to the last `sliding_window` tokens
      (itself included) and caches only those. `layer_types`, which transformers' cache utilities read, follows:
      `"mla_latent"` or `"mla_latent_sliding"` per layer.
    - `qk_norm` (Qwen3's per-head QK-norm, `docs/qk_norm.md`): the query's NoPE part is the source's pre-norm
      query, normalised by `q_norm` (whose scale `s_q` also multiplies the RoPE part); `k_proj` keeps the source's
      pre-norm key rows, from which every new token's per-kv-head scale `s_g = 1 / rms(k_g)` is computed and cached
      beside the latent (`qk_norm_heads` numbers per token). `rope_key_heads[layer][p]` is the kv head whose scale
      multiplies RoPE pair `p` of the shared key. Needs `qk_nope_head_dim == head_dim`.
    - `attention_path`: `"auto"` decodes over the latent (absorbed) and lets prefill pick the cheaper form;
      `"absorbed"` and `"expanded"` force one form (for checks and benchmarks).
    """

    model_type = "mla"
    keys_to_ignore_at_inference = ["past_key_values", "cache"]
    # Tensor parallelism splits the heads: `q_proj` and `kv_b_proj` by output rows (each rank up-projects the shared
    # latent for its own heads), `o_proj` by input columns (the ranks' outputs are summed). The joint down-projection
    # and so the cache stay whole on every rank, as in DeepSeek-V2; `mla_kv_a_proj` sums the RoPE key's gradient.
    base_model_tp_plan = {
        "layers.*.self_attn.q_proj": "colwise",
        "layers.*.self_attn.kv_a_proj_with_mqa": "mla_kv_a_proj",
        "layers.*.self_attn.kv_b_proj": "colwise",
        "layers.*.self_attn.o_proj": "rowwise",
        "layers.*.mlp.gate_proj": "colwise",
        "layers.*.mlp.up_proj": "colwise",
        "layers.*.mlp.down_proj": "rowwise",
    }
    base_model_pp_plan = {
        "embed_tokens": (["input_ids"], ["inputs_embeds"]),
        "layers": (["hidden_states", "attention_mask"], ["hidden_states"]),
        "norm": (["hidden_states"], ["hidden_states"]),
    }

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    tie_word_embeddings: bool = False
    rope_parameters: RopeParameters | dict | None = None
    attention_dropout: int | float | None = 0.0
    mlp_bias: bool = False

    # Multi-head Latent Attention
    kv_lora_rank: int = 512
    kv_lora_ranks: list[int] | None = None
    q_lora_rank: int | None = None
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    head_dim: int | None = None
    rope_frequency_indices: list[list[int]] | None = None
    softmax_scale: float | None = None
    attention_bias: bool = False
    attention_output_bias: bool = False
    kv_latent_norm: bool = False
    qk_norm: bool = False
    qk_norm_heads: int = 0
    rope_key_heads: list[list[int]] | None = None
    attention_path: str = "auto"
    sliding_window: int | None = None
    attention_layer_types: list[str] | None = None
    layer_types: list[str] | None = None

    def __post_init__(self, **kwargs):
        if self.kv_lora_ranks is None:
            self.kv_lora_ranks = [self.kv_lora_rank] * self.num_hidden_layers
        self.kv_lora_rank = max(self.kv_lora_ranks)
        if self.head_dim is None:
            self.head_dim = self.qk_rope_head_dim
        if self.softmax_scale is None:
            self.softmax_scale = self.qk_head_dim**-0.5
        if self.layer_types is None:
            # The cache layer of each layer follows from how it attends; `layer_types` is never saved (see
            # `_remove_keys_not_serialized`), so a loaded config rebuilds it here as well.
            attention_layer_types = self.attention_layer_types or [FULL_ATTENTION] * self.num_hidden_layers
            self.layer_types = [
                MLA_SLIDING_LATENT_LAYER_TYPE if kind == SLIDING_ATTENTION else MLA_LATENT_LAYER_TYPE
                for kind in attention_layer_types
            ]
        super().__post_init__(**kwargs)

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def num_key_value_heads(self) -> int:
        # One latent "head" shared by all query heads: what transformers' cache and mask utilities read.
        return 1

    def validate_architecture(self):
        if len(self.kv_lora_ranks) != self.num_hidden_layers:
            raise ValueError(
                f"`kv_lora_ranks` has {len(self.kv_lora_ranks)} entries for {self.num_hidden_layers} layers."
            )
        if min(self.kv_lora_ranks) < 1:
            raise ValueError(f"Every `kv_lora_ranks` entry must be at least 1, got {self.kv_lora_ranks}.")
        if self.q_lora_rank is not None:
            raise ValueError("A low-rank query (`q_lora_rank`) is not supported; set it to None.")
        if self.kv_latent_norm and len(set(self.kv_lora_ranks)) != 1:
            raise ValueError(
                f"`kv_latent_norm` needs one `kv_lora_rank` for all layers, got per-layer ranks {self.kv_lora_ranks}."
            )
        if self.qk_norm:
            self._check_qk_norm()
        if self.qk_rope_head_dim % 2 != 0:
            raise ValueError(f"`qk_rope_head_dim` must be even, got {self.qk_rope_head_dim}.")
        if self.attention_layer_types is not None:
            if len(self.attention_layer_types) != self.num_hidden_layers:
                raise ValueError(
                    f"`attention_layer_types` has {len(self.attention_layer_types)} entries "
                    f"for {self.num_hidden_layers} layers."
                )
            if any(kind not in (FULL_ATTENTION, SLIDING_ATTENTION) for kind in self.attention_layer_types):
                raise ValueError(
                    f"`attention_layer_types` entries must be {FULL_ATTENTION!r} or {SLIDING_ATTENTION!r}, "
                    f"got {self.attention_layer_types}."
                )
            if SLIDING_ATTENTION in self.attention_layer_types and not (
                isinstance(self.sliding_window, int) and self.sliding_window >= 1
            ):
                raise ValueError(
                    f"Sliding-window layers need a positive `sliding_window`, got {self.sliding_window!r}."
                )
        if self.attention_path not in ("auto", "absorbed", "expanded"):
            raise ValueError(
                f"`attention_path` must be 'auto', 'absorbed' or 'expanded', got {self.attention_path!r}."
            )
        if self.rope_frequency_indices is None:
            if self.head_dim != self.qk_rope_head_dim:
                raise ValueError(
                    "Without `rope_frequency_indices`, `head_dim` must equal `qk_rope_head_dim` "
                    f"({self.head_dim} != {self.qk_rope_head_dim})."
                )
            return
        if len(self.rope_frequency_indices) != self.num_hidden_layers:
            raise ValueError(
                f"`rope_frequency_indices` has {len(self.rope_frequency_indices)} entries "
                f"for {self.num_hidden_layers} layers."
            )
        for layer_idx, indices in enumerate(self.rope_frequency_indices):
            if len(indices) != self.qk_rope_head_dim // 2:
                raise ValueError(
                    f"Layer {layer_idx}: `rope_frequency_indices` needs {self.qk_rope_head_dim // 2} entries "
                    f"(one per RoPE pair), got {len(indices)}."
                )
            if indices and not all(0 <= i < self.head_dim // 2 for i in indices):
                raise ValueError(
                    f"Layer {layer_idx}: `rope_frequency_indices` must lie in [0, {self.head_dim // 2})."
                )

    def _check_qk_norm(self):
        # Not a `validate_` method: strict dataclasses run those on every config, this one only with `qk_norm`.
        if self.qk_nope_head_dim != self.head_dim:
            raise ValueError(
                f"`qk_norm` normalises the NoPE query, which must be the whole source head: `qk_nope_head_dim` "
                f"({self.qk_nope_head_dim}) must equal `head_dim` ({self.head_dim})."
            )
        if self.qk_norm_heads < 1 or self.num_attention_heads % self.qk_norm_heads:
            raise ValueError(
                f"`qk_norm_heads` (the source's kv heads) must divide `num_attention_heads` "
                f"({self.num_attention_heads}), got {self.qk_norm_heads}."
            )
        if self.kv_latent_norm:
            raise ValueError("`qk_norm` and `kv_latent_norm` cannot be combined.")
        if self.rope_key_heads is None or len(self.rope_key_heads) != self.num_hidden_layers:
            raise ValueError(f"`qk_norm` needs `rope_key_heads`, one list per layer ({self.num_hidden_layers}).")
        for layer_idx, heads in enumerate(self.rope_key_heads):
            if len(heads) != self.qk_rope_head_dim // 2 or not all(0 <= g < self.qk_norm_heads for g in heads):
                raise ValueError(
                    f"Layer {layer_idx}: `rope_key_heads` needs {self.qk_rope_head_dim // 2} kv head indices in "
                    f"[0, {self.qk_norm_heads}), got {heads}."
                )

    def _remove_keys_not_serialized(self, config_dict: dict) -> None:
        super()._remove_keys_not_serialized(config_dict)
        # `layer_types` follows from `attention_layer_types` (or `num_hidden_layers`) and is rebuilt on load. Left
        # out of `config.json`, the folder's config also loads as a plain `PreTrainedConfig`, which is
        # what `AutoTokenizer` falls back to where the plugin is not installed and remote code is not trusted.
        config_dict.pop("layer_types", None)

    def validate_layer_type(self):
        # The latent cache layer is not one of transformers' built-in layer types, so the base check would refuse it.
        if self.layer_types is None:
            return
        allowed = (MLA_LATENT_LAYER_TYPE, MLA_SLIDING_LATENT_LAYER_TYPE)
        if any(layer_type not in allowed for layer_type in self.layer_types):
            raise ValueError(f"`layer_types` entries must be in {allowed}, got {self.layer_types}.")
        if len(self.layer_types) != self.num_hidden_layers:
            raise ValueError(
                f"`num_hidden_layers` ({self.num_hidden_layers}) must equal the number of `layer_types` "
                f"({len(self.layer_types)})."
            )


__all__ = [
    "FULL_ATTENTION",
    "MLAConfig",
    "MLA_LATENT_LAYER_TYPE",
    "MLA_SLIDING_LATENT_LAYER_TYPE",
    "SLIDING_ATTENTION",
]
