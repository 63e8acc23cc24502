"""Multi-head Latent Attention: the attention layer of `modeling_mla`, its RoPE helpers and its kernels.

This file is copied into every converted checkpoint as remote code, beside `modeling_mla.py`: it imports only torch,
transformers and its sibling files.
"""

from collections.abc import Callable

import torch
from torch import nn
from transformers.cache_utils import Cache
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs
from transformers.utils.deprecation import deprecate_kwarg

from .configuration_mla import SLIDING_ATTENTION, MLAConfig


# The attention implementations whose interface the absorbed form calls: it hands them every head's query as a row of
# one multi-query attention, a value narrower than the key and an explicit 4-D mask. Flash kernels want equal sizes and
# no 4-D mask, flex a block mask, and an implementation registered under another name may want either: all of those
# get the expanded form, which is plain multi-head attention.
ABSORBED_IMPLEMENTATIONS = ("eager", "sdpa")

# The epsilon of the latent norm (`config.kv_latent_norm`): transformers' DeepseekV3 builds its `kv_a_layernorm` with
# the RMSNorm default rather than `rms_norm_eps`, so a model exported to that format computes the same with this one.
# (vLLM uses `rms_norm_eps` there; conversions keep the latent's RMS near 1, where the difference is negligible.)
KV_LATENT_NORM_EPS = 1e-6




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



def rms_scale(states: torch.Tensor, eps: float) -> torch.Tensor:
    """`1 / rms(states)` over the last dim, in float32 as transformers' RMSNorm computes it: `[..., 1]`."""
    return torch.rsqrt(states.to(torch.float32).pow(2).mean(-1, keepdim=True) + eps)


def qk_norm_indices(config: MLAConfig, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
    """QK-norm (`config.qk_norm`): the kv head of every query head `[heads]`, and the kv head whose key scale
    multiplies each dim of the shared RoPE key `[qk_rope_head_dim]` (both coordinates of a pair, `rotate_half`
    layout)."""
    head_groups = torch.arange(config.num_attention_heads) // (config.num_attention_heads // config.qk_norm_heads)
    pair_heads = torch.tensor(config.rope_key_heads[layer_idx], dtype=torch.long)
    return head_groups, torch.cat((pair_heads, pair_heads))


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_pos_emb(states: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotates `states` `[batch, seq, heads, qk_rope_head_dim]` by `cos`/`sin` `[batch, seq, 1, qk_rope_head_dim]`."""
    return (states * cos) + (rotate_half(states) * sin)


def rope_gather_index(frequency_indices: list[int]) -> torch.Tensor:
    """Columns of the source's `[cos ; cos]` table that the pairs of a shared RoPE key rotate with."""
    index = torch.tensor(frequency_indices, dtype=torch.long)
    return torch.cat((index, index))


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


def latent_attention_forward(
    query: torch.Tensor,
    joint: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
) -> torch.Tensor:
    """Multi-query attention of `query` `[batch, 1, rows, r + d_r]` over `joint` `[batch, 1, kv_len, r + d_r]`.

    Plain matmuls, for absorbed decoding with transformers' sdpa on CPU: sdpa there has no fused kernel for a value
    (`value`, the latent, `[batch, 1, kv_len, r]`) narrower than the key, and its math fallback rescales the whole
    cached key at every step. `attention_mask` may be boolean (sdpa's, True = attend) or additive; it broadcasts over
    the rows. Returns the output `[batch, rows, 1, r]`, in the layout attention interfaces return.
    """
    # scores: [batch, 1, rows, kv_len]
    scores = torch.matmul(query, joint.transpose(2, 3))
    if scaling != 1.0:
        scores = scores * scaling
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            scores = torch.where(attention_mask, scores, torch.finfo(scores.dtype).min)
        else:
            scores = scores + attention_mask
    probabilities = nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    return torch.matmul(probabilities, value).transpose(1, 2)


def _version(tensor: torch.Tensor) -> int:
    """In-place changes bump a tensor's version; inference tensors have none (nor change outside inference mode)."""
    return -1 if tensor.is_inference() else tensor._version


class MLAAttention(nn.Module):
    """Multi-head Latent Attention (DeepSeek-V2), full-rank queries, in two forms that give the same result:

    - expanded (`expanded_attention`): up-project the cached latent into per-head keys and values (`expand_kv`) and
      run the attention backend as for any multi-head attention;
    - absorbed (`absorbed_attention`): move each head's NoPE query into latent space (`W_uk_h^T q_nope_h`) and
      attend over the cached `[latent ; k_pe]` as multi-query attention, reading nothing but the cache; `W_uv_h` is
      applied to the latent-sized output.

    `config.attention_path` forces one form; `"auto"` picks the cheaper one per call (decoding: absorbed).

    With `config.kv_latent_norm` the latent passes DeepSeek's `kv_a_layernorm` before the cache, so both forms read
    the normalised latent, as DeepSeek-V3 caches and reads it.

    Attention backends: both forms call the implementation the user chose (`config._attn_implementation`, looked up
    in `ALL_ATTENTION_FUNCTIONS`, so a function registered under a name is the one called). The absorbed form needs
    an implementation in `ABSORBED_IMPLEMENTATIONS` (eager, sdpa); under any other the expanded form runs, and
    `attention_path="absorbed"` is refused. The one place this module uses a kernel of its own is `latent_attention`:
    with transformers' own sdpa function on CPU, absorbed decoding multiplies plain matrices
    (`latent_attention_forward`) and absorbed prefill hands sdpa the whole `[latent ; k_pe]` row as the value (its
    fused CPU kernel needs a value as wide as the key). A function registered in place of sdpa is called as it is.

    Under tensor parallelism (`config.base_model_tp_plan`) `q_proj` and `kv_b_proj` hold this rank's heads and
    `o_proj` sums the ranks' outputs: every shape below takes the head count from the tensors, not the config.

    For inference (eval mode, no gradient to the parameters) the absorbed form can use weights folded from the
    parameters once instead of applying `W_uk` and `W_uv` at every step (see `_use_folded`): one projection from
    the hidden states to every head's latent query, its RoPE part and the new token's latent and RoPE key, and one
    from the latent-sized attention output to the hidden states. The folded weights are derived buffers, never saved,
    and are refolded when the parameters change.
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
        # A local layer attends to the last `sliding_window` tokens: the mask says so for eager, sdpa and flex (and
        # the absorbed form), flash kernels read the window itself.
        is_sliding = bool(config.attention_layer_types) and config.attention_layer_types[layer_idx] == SLIDING_ATTENTION
        self.sliding_window = config.sliding_window if is_sliding else None

        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.qk_head_dim, bias=config.attention_bias)
        self.kv_a_proj_with_mqa = nn.Linear(
            config.hidden_size, self.kv_lora_rank + self.qk_rope_head_dim, bias=config.attention_bias
        )
        # DeepSeek's `kv_a_layernorm`: normalises the latent before it is cached and up-projected (None: plain MLA).
        self.kv_a_layernorm = (
            MLARMSNorm(self.kv_lora_rank, eps=KV_LATENT_NORM_EPS) if config.kv_latent_norm else None
        )
        self.kv_b_proj = nn.Linear(
            self.kv_lora_rank, self.num_heads * (self.qk_nope_head_dim + self.v_head_dim), bias=False
        )
        self.o_proj = nn.Linear(
            self.num_heads * self.v_head_dim, config.hidden_size, bias=config.attention_output_bias
        )

        # QK-norm (Qwen3, `docs/qk_norm.md`): `q_norm` is the source's query norm, applied to the NoPE query (the
        # source's pre-norm query); its scale also multiplies the RoPE query, whose rows carry the norm's weight.
        # `k_proj` holds the source's pre-norm key rows, read only for each new token's per-kv-head key scale
        # `s_g = 1 / rms(k_g)`: the key norm's weight is folded into `kv_b_proj`'s W_uk and the RoPE key rows, and
        # `s_g` (cached beside the latent) multiplies kv head g's NoPE scores and its share of the RoPE key.
        self.q_norm = self.k_proj = None
        head_groups = rope_key_head_index = None
        if config.qk_norm:
            self.num_key_value_heads = config.qk_norm_heads
            self.q_norm = MLARMSNorm(config.head_dim, eps=config.rms_norm_eps)
            self.k_proj = nn.Linear(
                config.hidden_size, config.qk_norm_heads * config.head_dim, bias=config.attention_bias
            )
            head_groups, rope_key_head_index = qk_norm_indices(config, layer_idx)
        self.register_buffer("head_groups", head_groups, persistent=False)
        self.register_buffer("rope_key_head_index", rope_key_head_index, persistent=False)

        rope_index = None
        if config.rope_frequency_indices is not None:
            rope_index = rope_gather_index(config.rope_frequency_indices[layer_idx])
        self.register_buffer("rope_index", rope_index, persistent=False)

        # Folding pays where it saves multiply-adds per token (it replaces two products by one), which depends on the
        # shapes: a latent wider than the NoPE head makes the folded query projection larger than `q_proj`.
        heads, rank, hidden = self.num_heads, self.kv_lora_rank, config.hidden_size
        unfolded_query = heads * self.qk_head_dim * hidden + heads * self.qk_nope_head_dim * rank
        # Through QK-norm the query cannot be folded: `q_norm` sits between `q_proj` and W_uk.
        self.fold_query = heads * (rank + self.qk_rope_head_dim) * hidden < unfolded_query and not config.qk_norm
        self.fold_output = hidden * heads * rank < heads * rank * self.v_head_dim + hidden * heads * self.v_head_dim
        # The folded weights (`_fold`): [(heads + 1) * (r + d_r), hidden], [(heads + 1) * (r + d_r)] and
        # [hidden, heads * r]; None until the first absorbed call that may use them.
        self.register_buffer("folded_q_weight", None, persistent=False)
        self.register_buffer("folded_q_bias", None, persistent=False)
        self.register_buffer("folded_o_weight", None, persistent=False)
        self._folded_key = self._folded_from = None

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        query_length = hidden_states.shape[1]
        kv_length = cache.get_mask_sizes(query_length, self.layer_idx)[0] if cache is not None else query_length
        cos, sin = self.rope_tables(position_embeddings)
        if self.use_absorbed(query_length, kv_length, attention_mask):
            return self.absorbed_attention(hidden_states, cos, sin, attention_mask, cache, **kwargs)
        if cache is not None:
            # Decoding follows: fold in this (eager) call, so that compiled decoding steps find the folded weights.
            self._use_folded()
        return self.expanded_attention(hidden_states, cos, sin, attention_mask, cache, **kwargs)

    def rope_tables(self, position_embeddings: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """This layer's `cos`, `sin` `[batch, seq, 1, qk_rope_head_dim]` from the source's `[batch, seq, head_dim]`."""
        cos, sin = position_embeddings
        if self.rope_index is not None:
            cos, sin = cos.index_select(-1, self.rope_index), sin.index_select(-1, self.rope_index)
        return cos.unsqueeze(2), sin.unsqueeze(2)

    def use_absorbed(self, query_length: int, kv_length: int, attention_mask) -> bool:
        path = self.config.attention_path
        if self.config._attn_implementation not in ABSORBED_IMPLEMENTATIONS:
            if path == "absorbed":
                raise ValueError(
                    f"attention_path='absorbed' runs on {ABSORBED_IMPLEMENTATIONS}, not on "
                    f"{self.config._attn_implementation!r}: set attention_path to 'auto' or 'expanded'."
                )
            return False
        if attention_mask is not None and not (isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 4):
            return False
        if path != "auto":
            return path == "absorbed"
        rank, heads = self.kv_lora_rank, self.num_heads
        up_projection = heads * rank * (self.qk_nope_head_dim + self.v_head_dim)
        pairs = query_length * kv_length * heads
        # Multiply-adds of each form for this call: expansion of every cached token vs. queries moved to latent space.
        expanded = kv_length * up_projection + pairs * (self.qk_head_dim + self.v_head_dim)
        absorbed = query_length * up_projection + pairs * (2 * rank + self.qk_rope_head_dim)
        return absorbed <= expanded

    def project(
        self, hidden_states: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The query parts `q_nope`, `q_pe` `[batch, seq, heads, ...]` and the new tokens' `latent`
        `[batch, 1, seq, kv_lora_rank]` and `k_pe` `[batch, 1, seq, qk_rope_head_dim]`, RoPE applied.

        With QK-norm, `k_pe` is followed by the new tokens' key scales: `[batch, 1, seq, qk_rope_head_dim + kv_heads]`,
        which is what the cache stores beside the latent."""
        batch_size, query_length, _ = hidden_states.shape
        # query_states: [batch, seq, heads, qk_head_dim]
        query_states = self.q_proj(hidden_states).view(batch_size, query_length, -1, self.qk_head_dim)
        q_nope, q_pe = torch.split(query_states, [self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)
        # latent: [batch, seq, kv_lora_rank]; k_pe: [batch, seq, qk_rope_head_dim]
        compressed = self.kv_a_proj_with_mqa(hidden_states)
        latent, k_pe = torch.split(compressed, [self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        if self.kv_a_layernorm is not None:
            # Normalised before the cache, as DeepSeek caches it: both forms read the same cached latent.
            latent = self.kv_a_layernorm(latent)
        key_scales = None
        if self.q_norm is not None:
            eps = self.q_norm.variance_epsilon
            # query_scale: [batch, seq, heads, 1], the source's q_norm scale of each head
            query_scale = rms_scale(q_nope, eps)
            q_nope = self.q_norm.weight * (q_nope.to(torch.float32) * query_scale).to(q_nope.dtype)
            q_pe = (q_pe.to(torch.float32) * query_scale).to(q_pe.dtype)
            # key_states: [batch, seq, kv_heads, head_dim], the source's pre-norm keys
            key_states = self.k_proj(hidden_states).view(batch_size, query_length, -1, self.config.head_dim)
            # key_scales: [batch, seq, kv_heads], s_g = 1 / rms(k_g): all that the key norm adds to a linear key
            key_scales = rms_scale(key_states, eps).squeeze(-1).to(k_pe.dtype)
            # Each RoPE pair belongs to one kv head's normalised key: scaled before RoPE, so it is cached post-norm.
            k_pe = k_pe * key_scales.index_select(-1, self.rope_key_head_index)
        q_pe = apply_rotary_pos_emb(q_pe, cos, sin)
        # k_pe: [batch, seq, 1, qk_rope_head_dim] -> [batch, 1, seq, qk_rope_head_dim], the cache's one-head layout
        k_pe = apply_rotary_pos_emb(k_pe.unsqueeze(2), cos, sin).transpose(1, 2)
        if key_scales is not None:
            # [batch, 1, seq, qk_rope_head_dim + kv_heads]: the scales travel with the RoPE key into the cache
            k_pe = torch.cat((k_pe, key_scales.unsqueeze(1)), dim=-1)
        return q_nope, q_pe, latent.unsqueeze(1), k_pe

    def expand_kv(self, latent: torch.Tensor, k_pe: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-head keys `[batch, heads, kv_len, qk_head_dim]` and values `[batch, heads, kv_len, v_head_dim]` from
        the cached `latent` `[batch, 1, kv_len, kv_lora_rank]` and `k_pe` `[batch, 1, kv_len, qk_rope_head_dim]`
        (with QK-norm `[batch, 1, kv_len, qk_rope_head_dim + kv_heads]`, the key scales last)."""
        batch_size, _, kv_length, _ = latent.shape
        # kv: [batch, 1, kv_len, heads * (qk_nope + v)] -> [batch, heads, kv_len, qk_nope + v]
        kv = self.kv_b_proj(latent).view(batch_size, kv_length, -1, self.qk_nope_head_dim + self.v_head_dim)
        k_nope, value_states = torch.split(kv.transpose(1, 2), [self.qk_nope_head_dim, self.v_head_dim], dim=-1)
        if self.q_norm is not None:
            k_pe, key_scales = torch.split(k_pe, [self.qk_rope_head_dim, self.num_key_value_heads], dim=-1)
            # [batch, 1, kv_len, kv_heads] -> [batch, heads, kv_len, 1]: each head's NoPE key times its kv head's s_g
            head_scales = key_scales.index_select(-1, self.head_groups).permute(0, 3, 2, 1)
            k_nope = k_nope * head_scales
        key_states = torch.cat((k_nope, k_pe.expand(-1, k_nope.shape[1], -1, -1)), dim=-1)
        return key_states, value_states

    def expanded_attention(self, hidden_states, cos, sin, attention_mask, cache, **kwargs):
        batch_size, query_length, _ = hidden_states.shape
        q_nope, q_pe, latent, k_pe = self.project(hidden_states, cos, sin)
        if cache is not None:
            # latent: [batch, 1, kv_len, kv_lora_rank]; k_pe: [batch, 1, kv_len, qk_rope_head_dim]
            latent, k_pe = cache.update(latent, k_pe, self.layer_idx)
        # query_states: [batch, heads, seq, qk_head_dim]
        query_states = torch.cat((q_nope, q_pe), dim=-1).transpose(1, 2)
        key_states, value_states = self.expand_kv(latent, k_pe)

        implementation = self.config._attn_implementation
        # Flash kernels want equal query/key and value sizes; so does CPU sdpa's fused kernel, without which it falls
        # back to the math kernel (several times slower on long prompts).
        pad_value = self.v_head_dim != self.qk_head_dim and (
            "flash" in implementation
            or (implementation == "sdpa" and query_states.device.type == "cpu" and self.v_head_dim < self.qk_head_dim)
        )
        if pad_value:
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
            sliding_window=self.sliding_window,
            **kwargs,
        )
        # attn_output: [batch, seq, heads, v_head_dim] -> [batch, seq, heads * v_head_dim]
        attn_output = attn_output[..., : self.v_head_dim].reshape(batch_size, query_length, -1).contiguous()
        return self.o_proj(attn_output), attn_weights

    def absorbed_attention(self, hidden_states, cos, sin, attention_mask, cache, **kwargs):
        # A cache means decoding follows: fold already in this (eager) call, so that compiled decoding steps find the
        # folded weights.
        use_folded = self._use_folded()
        if use_folded and self.folded_q_weight is not None:
            query_states, latent, k_pe = self.folded_projection(hidden_states, cos, sin)
            scaling = 1.0  # folded into the query
        else:
            q_nope, q_pe, latent, k_pe = self.project(hidden_states, cos, sin)
            # query_states: [batch, seq, heads, kv_lora_rank + qk_rope_head_dim]
            query_states = torch.cat((self.absorb_query(q_nope), q_pe), dim=-1)
            scaling = self.scaling

        joint = None
        if cache is not None:
            # latent: [batch, 1, kv_len, kv_lora_rank]; k_pe: [batch, 1, kv_len, qk_rope_head_dim]
            latent, k_pe = cache.update(latent, k_pe, self.layer_idx)
            # The latent cache keeps both side by side: [batch, 1, kv_len, kv_lora_rank + qk_rope_head_dim]
            joint = getattr(cache.layers[self.layer_idx], "joint", None)
        if joint is None:
            joint = torch.cat((latent, k_pe), dim=-1)
        # attn_output: [batch, seq, heads, kv_lora_rank]
        if self.q_norm is not None:
            attn_output, attn_weights = self.scaled_latent_attention(query_states, joint, attention_mask, scaling)
        else:
            attn_output, attn_weights = self.latent_attention(
                query_states, joint, latent, attention_mask, scaling, **kwargs
            )

        if use_folded and self.folded_o_weight is not None:
            # [batch, seq, heads * kv_lora_rank] -> [batch, seq, hidden]: W_uv is folded into the output projection
            return nn.functional.linear(attn_output.flatten(2), self.folded_o_weight, self.o_proj.bias), attn_weights
        return self.o_proj(self.up_project_values(attn_output)), attn_weights

    def latent_up_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """`W_uk` `[heads, qk_nope_head_dim, kv_lora_rank]` and `W_uv` `[heads, v_head_dim, kv_lora_rank]`."""
        weight = self.kv_b_proj.weight
        if hasattr(weight, "to_local"):
            # A tensor-parallel shard (DTensor): this rank's heads, as `q_proj` returns them
            weight = weight.to_local()
        weight = weight.view(-1, self.qk_nope_head_dim + self.v_head_dim, self.kv_lora_rank)
        w_uk, w_uv = torch.split(weight, [self.qk_nope_head_dim, self.v_head_dim], dim=1)
        return w_uk, w_uv

    def absorb_query(self, q_nope: torch.Tensor) -> torch.Tensor:
        """`W_uk_h^T q_nope_h`: `[batch, seq, heads, qk_nope_head_dim]` -> `[batch, seq, heads, kv_lora_rank]`."""
        batch_size, query_length, heads, _ = q_nope.shape
        w_uk, _ = self.latent_up_weights()
        # Heads as the batch, so W_uk is read once: [heads, batch * seq, qk_nope] @ [heads, qk_nope, r]
        q_latent = torch.bmm(q_nope.reshape(batch_size * query_length, heads, -1).transpose(0, 1), w_uk)
        return q_latent.transpose(0, 1).view(batch_size, query_length, heads, self.kv_lora_rank)

    def up_project_values(self, attn_output: torch.Tensor) -> torch.Tensor:
        """`W_uv_h` on each head's output: `[batch, seq, heads, kv_lora_rank]` -> `[batch, seq, heads * v_head_dim]`."""
        batch_size, query_length, heads, _ = attn_output.shape
        _, w_uv = self.latent_up_weights()
        # [heads, batch * seq, kv_lora_rank] @ [heads, kv_lora_rank, v_head_dim] -> [heads, batch * seq, v_head_dim]
        attn_output = attn_output.reshape(batch_size * query_length, heads, self.kv_lora_rank).transpose(0, 1)
        attn_output = torch.bmm(attn_output, w_uv.transpose(1, 2))
        return attn_output.transpose(0, 1).reshape(batch_size, query_length, heads * self.v_head_dim)

    def folded_projection(
        self, hidden_states: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Every head's scaled latent query `[batch, seq, heads, r + d_r]` and the new tokens' `latent`
        `[batch, 1, seq, r]` and `k_pe` `[batch, 1, seq, d_r]`, from one product with the folded weights."""
        batch_size, query_length, _ = hidden_states.shape
        rank = self.kv_lora_rank
        # projected: [batch, seq, heads + 1, r + d_r]: every head's query, then the new token's [latent ; k_pe]
        projected = nn.functional.linear(hidden_states, self.folded_q_weight, self.folded_q_bias)
        projected = projected.view(batch_size, query_length, -1, rank + self.qk_rope_head_dim)
        latent_part, rope_part = torch.split(projected, [rank, self.qk_rope_head_dim], dim=-1)
        projected = torch.cat((latent_part, apply_rotary_pos_emb(rope_part, cos, sin)), dim=-1)
        # latent, k_pe: [batch, seq, 1, ...] -> [batch, 1, seq, ...]
        latent, k_pe = torch.split(projected[:, :, -1:].transpose(1, 2), [rank, self.qk_rope_head_dim], dim=-1)
        if self.kv_a_layernorm is not None:
            # The norm is not linear, so it stays outside the folded product (the queries never pass through it).
            latent = self.kv_a_layernorm(latent)
        return projected[:, :, :-1], latent, k_pe

    def latent_attention(self, query_states, joint, latent, attention_mask, scaling, **kwargs):
        """Multi-query attention of every head's `query_states` `[batch, seq, heads, r + d_r]` over `joint`
        `[batch, 1, kv_len, r + d_r]`, with the cached `latent` `[batch, 1, kv_len, r]` as the value.

        Returns `[batch, seq, heads, kv_lora_rank]` and the attention weights, if any, `[batch, heads, seq, kv_len]`.
        """
        batch_size, query_length, heads, width = query_states.shape
        kv_length = joint.shape[-2]
        dropout = 0.0 if not self.training else self.attention_dropout
        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        # transformers' own sdpa on CPU: the kernels of this module's own (see the class docstring)
        own_cpu_kernel = attention_interface is sdpa_attention_forward and joint.device.type == "cpu"

        if own_cpu_kernel and query_length > 1:
            # Prefill: the heads as sdpa's heads sharing one key, so that causality needs no mask (and a mask
            # broadcasts over the heads), and the whole joint row as the value, as wide as the key.
            shared = joint.expand(-1, heads, -1, -1)
            # attn_output: [batch, seq, heads, r + d_r]
            attn_output, attn_weights = attention_interface(
                self, query_states.transpose(1, 2), shared, shared, attention_mask, dropout=dropout, scaling=scaling,
                **kwargs,
            )
            return attn_output[..., : self.kv_lora_rank], attn_weights

        # Heads become query rows of one multi-query attention over the cache, query-major:
        # [batch, 1, seq * heads, r + d_r] (a view when decoding one token)
        query_states = query_states.reshape(batch_size, 1, query_length * heads, width)
        if attention_mask is None and query_length > 1:
            # No mask means causal attention without padding, aligned top-left as sdpa's `is_causal` reads it (a
            # static cache's prefill sees keys up to `max_cache_len`); the head rows need it spelled out.
            positions = torch.arange(max(query_length, kv_length), device=joint.device)
            future = positions[None, :kv_length] > positions[:query_length, None]
            attention_mask = torch.zeros(future.shape, dtype=query_states.dtype, device=joint.device)
            attention_mask = attention_mask.masked_fill(future, torch.finfo(query_states.dtype).min)[None, None]
        if attention_mask is not None and query_length > 1:
            # [batch, 1, seq, kv_len] -> [batch, 1, seq * heads, kv_len], each query's row once per head (a single
            # query's row broadcasts over the heads as it is)
            attention_mask = attention_mask.repeat_interleave(heads, dim=2)

        if own_cpu_kernel and dropout == 0.0:
            attn_output = latent_attention_forward(query_states, joint, latent, attention_mask, scaling)
            attn_weights = None
        else:
            attn_output, attn_weights = attention_interface(
                self, query_states, joint, latent, attention_mask, dropout=dropout, scaling=scaling, is_causal=False,
                **kwargs,
            )
        if attn_weights is not None:
            # [batch, 1, seq * heads, kv_len] -> [batch, heads, seq, kv_len]
            attn_weights = attn_weights.view(batch_size, query_length, heads, kv_length).transpose(1, 2)
        # [batch, seq * heads, 1, kv_lora_rank] -> [batch, seq, heads, kv_lora_rank]
        return attn_output.reshape(batch_size, query_length, heads, self.kv_lora_rank), attn_weights

    def scaled_latent_attention(self, query_states, joint, attention_mask, scaling):
        """QK-norm's absorbed attention: every head's `query_states` `[batch, seq, heads, r + d_r]` over the cached
        `joint` `[batch, 1, kv_len, r + d_r + kv_heads]` (latent, RoPE key, key scales), with the latent as value.

        A head's NoPE score against a cached token is multiplied by that token's scale `s_g` for the head's kv head,
        so the heads no longer share one key: the scores are plain matmuls, the NoPE and RoPE parts apart.
        Returns `[batch, seq, heads, kv_lora_rank]` and the attention weights `[batch, heads, seq, kv_len]`.
        """
        query_length, kv_length = query_states.shape[1], joint.shape[-2]
        latent, k_pe, key_scales = torch.split(
            joint, [self.kv_lora_rank, self.qk_rope_head_dim, self.num_key_value_heads], dim=-1
        )
        # [batch, seq, heads, r + d_r] -> [batch, heads, seq, r + d_r]
        q_latent, q_pe = torch.split(query_states.transpose(1, 2), [self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        # head_scales: [batch, 1, kv_len, kv_heads] -> [batch, heads, 1, kv_len]
        head_scales = key_scales.index_select(-1, self.head_groups).permute(0, 3, 1, 2)
        # scores: [batch, heads, seq, kv_len]
        scores = torch.matmul(q_latent, latent.transpose(2, 3)) * head_scales + torch.matmul(q_pe, k_pe.transpose(2, 3))
        scores = scores * scaling
        if attention_mask is None and query_length > 1:
            # No mask means causal attention without padding, aligned top-left as in `latent_attention`.
            positions = torch.arange(max(query_length, kv_length), device=joint.device)
            attention_mask = positions[None, :kv_length] <= positions[:query_length, None]
        if attention_mask is not None:
            if attention_mask.dtype == torch.bool:
                scores = torch.where(attention_mask, scores, torch.finfo(scores.dtype).min)
            else:
                scores = scores + attention_mask
        probabilities = nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(query_states.dtype)
        dropout = 0.0 if not self.training else self.attention_dropout
        probabilities = nn.functional.dropout(probabilities, p=dropout, training=self.training)
        # [batch, heads, seq, kv_len] @ [batch, 1, kv_len, r] -> [batch, seq, heads, r]
        return torch.matmul(probabilities, latent).transpose(1, 2), probabilities

    # ------------------------------------------------------------------------------------------ folded weights

    def _fold_sources(self) -> list[torch.Tensor] | None:
        """The parameters the folded weights derive from, or None where there is no plain weight to fold."""
        # Read from the module dictionaries: this runs at every decoding step, and attribute lookup through
        # `nn.Module.__getattr__` would cost more than the rest of the check.
        projections = [self._modules[name] for name in ("q_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj")]
        if any(type(projection) is not nn.Linear or "forward" in projection.__dict__ for projection in projections):
            # Wrapped or quantized projections (adapters, ...), or a forward replaced on the instance (tensor-parallel
            # styles gather and reduce there): the folded products would bypass them.
            return None
        parameters = [projection._parameters for projection in projections]
        sources = [p[name] for p in parameters for name in ("weight", "bias") if p[name] is not None]
        # Offloaded weights (on the meta device until a hook brings them in)
        return None if any(p.is_meta for p in sources) else sources

    def _use_folded(self) -> bool:
        """Whether this call may use the folded weights; folds them first when missing or stale."""
        if self.training or not (self.fold_query or self.fold_output):
            return False
        sources = self._fold_sources()
        if sources is None or (torch.is_grad_enabled() and any(p.requires_grad for p in sources)):
            # Gradients must reach the parameters themselves.
            return False
        if torch.compiler.is_compiling():
            # Compiled graphs cannot compare data pointers: they use what the last eager call folded (an eager
            # prefill over the same cache folds before compiled decoding starts).
            return True
        # The folded weights are current while every source keeps its storage and its version (in-place changes
        # such as optimizer steps and `load_state_dict` bump it; changes through `.data` do not and are not seen).
        key = [(p.data_ptr(), _version(p)) for p in sources]
        if key != self._folded_key:
            self._fold()
            self._folded_key = key
            # Keeps the sources' storage alive, so that a new tensor cannot reuse a recorded address.
            self._folded_from = [p.detach() for p in sources]
        return True

    @torch.no_grad()
    def _fold(self) -> None:
        heads, rank, rope = self.num_heads, self.kv_lora_rank, self.qk_rope_head_dim
        dtype = self.kv_b_proj.weight.dtype
        # Folded in float64 (float32 on MPS, which has none) and rounded once to the parameters' dtype.
        compute = torch.float32 if self.kv_b_proj.weight.device.type == "mps" else torch.float64
        w_kv_b = self.kv_b_proj.weight.to(compute).view(heads, self.qk_nope_head_dim + self.v_head_dim, rank)
        # w_uk: [heads, qk_nope_head_dim, kv_lora_rank]; w_uv: [heads, v_head_dim, kv_lora_rank]
        w_uk, w_uv = torch.split(w_kv_b, [self.qk_nope_head_dim, self.v_head_dim], dim=1)

        self.folded_q_weight = self.folded_q_bias = self.folded_o_weight = None
        if self.fold_query:
            hidden = self.q_proj.in_features
            w_q = self.q_proj.weight.to(compute).view(heads, self.qk_head_dim, hidden)
            w_q_nope, w_q_pe = torch.split(w_q, [self.qk_nope_head_dim, rope], dim=1)
            # Per head, W_uk^T W_q_nope: [heads, kv_lora_rank, qk_nope] @ [heads, qk_nope, hidden]
            w_q_latent = torch.bmm(w_uk.transpose(1, 2), w_q_nope)
            # [heads, kv_lora_rank + qk_rope_head_dim, hidden]: the softmax scale goes into the query
            w_query = torch.cat((w_q_latent, w_q_pe), dim=1) * self.scaling
            # The joint down-projection is one more "head" of the same layout, [latent ; k_pe]:
            # [(heads + 1) * (kv_lora_rank + qk_rope_head_dim), hidden]
            w_kv_a = self.kv_a_proj_with_mqa.weight.to(compute)
            self.folded_q_weight = torch.cat((w_query.reshape(-1, hidden), w_kv_a)).to(dtype)
            q_bias, kv_a_bias = self.q_proj.bias, self.kv_a_proj_with_mqa.bias
            if q_bias is not None or kv_a_bias is not None:
                query_bias = w_query.new_zeros(heads, rank + rope)
                if q_bias is not None:
                    q_bias = q_bias.to(compute).view(heads, self.qk_head_dim)
                    b_q_nope, b_q_pe = torch.split(q_bias, [self.qk_nope_head_dim, rope], dim=1)
                    # [heads, kv_lora_rank, qk_nope] @ [heads, qk_nope, 1] -> [heads, kv_lora_rank]
                    b_q_latent = torch.bmm(w_uk.transpose(1, 2), b_q_nope.unsqueeze(-1)).squeeze(-1)
                    query_bias = torch.cat((b_q_latent, b_q_pe), dim=1) * self.scaling
                kv_a_bias = w_kv_a.new_zeros(rank + rope) if kv_a_bias is None else kv_a_bias.to(compute)
                self.folded_q_bias = torch.cat((query_bias.reshape(-1), kv_a_bias)).to(dtype)
        if self.fold_output:
            hidden = self.o_proj.out_features
            w_o = self.o_proj.weight.to(compute).view(hidden, heads, self.v_head_dim)
            # o_proj after W_uv, per head: [hidden, v_head_dim] @ [v_head_dim, kv_lora_rank] -> [hidden, heads * r]
            self.folded_o_weight = torch.einsum("ohv,hvr->ohr", w_o, w_uv).reshape(hidden, heads * rank).to(dtype)

    def _drop_folded(self) -> None:
        self.folded_q_weight = self.folded_q_bias = self.folded_o_weight = None
        self._folded_key = self._folded_from = None

    def train(self, mode: bool = True):
        if mode:
            # Training changes the parameters at every step: free the folded copies, fold again in eval mode.
            self._drop_folded()
        return super().train(mode)

    def _apply(self, fn, recurse=True):
        # `.to()`, `.half()`, ...: fold again from the moved or cast parameters rather than converting stale copies.
        self._drop_folded()
        return super()._apply(fn, recurse)
