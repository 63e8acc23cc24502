"""The latent KV cache of Multi-head Latent Attention.

Each layer stores, per token, the joint latent `c` (`kv_lora_rank` numbers) and the shared RoPE key `k_pe`
(`qk_rope_head_dim` numbers), and nothing per head. They live side by side in one buffer
`[batch, 1, capacity, kv_lora_rank + qk_rope_head_dim]`, which absorbed decoding reads as the key of a
multi-query attention (and its first `kv_lora_rank` columns as the value) without copying anything.
`keys` and `values`, the names transformers' cache utilities read, are views of the two parts, so crop (assisted
decoding), beam reordering, batch selection and mask sizes all work on dim -2 as for any other cache.

With QK-norm (`MLAConfig.qk_norm`) the attention hands the cache `[k_pe ; key_scales]` as the second part: each
token's per-kv-head key scales `s_g` sit after its RoPE key in the same row, so every operation above keeps them
with their token, and the cache holds `kv_lora_rank + qk_rope_head_dim + kv_heads` numbers per token.
"""

import torch
from transformers.cache_utils import DynamicLayer, StaticLayer

from .configuration_mla import MLA_LATENT_LAYER_TYPE, MLA_SLIDING_LATENT_LAYER_TYPE


class LatentViews:
    """What both layer types share: one `buffer` holding `[latent ; rope_key]` per token, of which `keys` and `values`
    (the names transformers' cache utilities read) are views that `_refresh_views` rebuilds after `buffer` moves."""

    def offload(self):
        # The base classes move `keys` and `values` on their own, which would leave them no longer views of `buffer`.
        if self.is_initialized:
            self.buffer = self.buffer.to("cpu", non_blocking=True)
            self._refresh_views()

    def prefetch(self):
        if self.is_initialized and self.buffer.device != self.device:
            self.buffer = self.buffer.to(self.device, non_blocking=True)
            self._refresh_views()

    @property
    def latent(self) -> torch.Tensor | None:
        return self.keys

    @property
    def rope_key(self) -> torch.Tensor | None:
        return self.values


class MLALatentCacheLayer(LatentViews, DynamicLayer):
    """Growing cache layer: `latent` `[batch, 1, seq, kv_lora_rank]` and `rope_key` `[batch, 1, seq, qk_rope_head_dim]`.

    Growth is amortised: the buffer is reallocated only when full, with `1 / growth_divisor` of slack, instead
    of concatenating (and so copying the whole cache) at every decoding step.
    """

    # Registers the class in transformers' layer-type mapping, so `DynamicCache(config=...)` (and so `generate()`)
    # builds it for every layer the config lists as `mla_latent`.
    _layer_type = MLA_LATENT_LAYER_TYPE
    growth_divisor = 16
    growth_granularity = 16

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.buffer: torch.Tensor | None = None
        self.cumulative_length = 0
        self.kv_lora_rank = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.kv_lora_rank = key_states.shape[-1]
        width = key_states.shape[-1] + value_states.shape[-1]
        # buffer: [batch, 1, capacity, kv_lora_rank + qk_rope_head_dim]
        self.buffer = key_states.new_empty(key_states.shape[0], 1, 0, width)
        self.cumulative_length = 0
        self.is_initialized = True
        self._refresh_views()

    def _refresh_views(self) -> None:
        joint = self.buffer[:, :, : self.cumulative_length]
        self.keys = joint[..., : self.kv_lora_rank]
        self.values = joint[..., self.kv_lora_rank :]

    @property
    def joint(self) -> torch.Tensor:
        """`[batch, 1, seq, kv_lora_rank + qk_rope_head_dim]`: the latent and the RoPE key of every cached token."""
        return self.buffer[:, :, : self.cumulative_length]

    @property
    def capacity(self) -> int:
        return 0 if self.buffer is None else self.buffer.shape[-2]

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        start = self.cumulative_length
        end = start + key_states.shape[-2]
        if end > self.capacity:
            slack = -(-end // self.growth_divisor)
            capacity = -(-(end + slack) // self.growth_granularity) * self.growth_granularity
            grown = self.buffer.new_empty(*self.buffer.shape[:2], capacity, self.buffer.shape[-1])
            grown[:, :, :start] = self.buffer[:, :, :start]
            self.buffer = grown
        self.buffer[:, :, start:end, : self.kv_lora_rank] = key_states
        self.buffer[:, :, start:end, self.kv_lora_rank :] = value_states
        self.cumulative_length = end
        self._refresh_views()
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.cumulative_length if self.is_initialized else 0

    def reset(self) -> None:
        self.buffer = None
        super().reset()
        self.cumulative_length = 0

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError(
                f"Calling `crop` with a positive value (`{tokens_to_remove}`) is not supported. "
                "Please use a negative integer to remove that number of tokens from the cache instead."
            )
        if tokens_to_remove == 0 or not self.is_initialized:
            return
        # The tail stays allocated and is overwritten by the next update.
        self.cumulative_length = max(self.cumulative_length + tokens_to_remove, 0)
        self._refresh_views()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.get_seq_length() > 0:
            self.buffer = self.buffer.index_select(0, beam_idx.to(self.buffer.device))
            self._refresh_views()

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.get_seq_length() > 0:
            self.buffer = self.joint.repeat_interleave(repeats, dim=0)
            self._refresh_views()

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.get_seq_length() > 0:
            self.buffer = self.buffer[indices, ...]
            self._refresh_views()


class MLASlidingLatentCacheLayer(MLALatentCacheLayer):
    """Cache layer of a sliding-window layer: the latent and RoPE key of the last `sliding_window - 1` tokens only,
    which is all the next token can attend to besides itself (as transformers' `DynamicSlidingWindowLayer` keeps
    keys and values), so the cache of a local layer stops growing at the window.

    `update` returns the kept tokens followed by the new ones (`joint` is that `[latent ; k_pe]` row), the keys the
    sliding-window mask of `get_mask_sizes` covers; then only the last `sliding_window - 1` of them stay. `buffer`
    holds exactly the kept tokens.

    `DynamicCache(config=...)` builds layers from `config.layer_types` without arguments, so the window is set by
    the model (`set_sliding_window`) before its first mask is built.
    """

    _layer_type = MLA_SLIDING_LATENT_LAYER_TYPE
    is_sliding = True

    def __init__(self, sliding_window: int | None = None, **kwargs):
        super().__init__(**kwargs)
        self.sliding_window = sliding_window
        # [batch, 1, kept + new, kv_lora_rank + qk_rope_head_dim]: what the last `update` returned
        self.visible: torch.Tensor | None = None

    def set_sliding_window(self, sliding_window: int) -> None:
        if self.sliding_window is None:
            self.sliding_window = sliding_window
        elif self.sliding_window != sliding_window:
            raise ValueError(f"This cache layer keeps a window of {self.sliding_window} tokens, not {sliding_window}.")

    def _refresh_views(self) -> None:
        self.keys = self.buffer[..., : self.kv_lora_rank]
        self.values = self.buffer[..., self.kv_lora_rank :]

    @property
    def joint(self) -> torch.Tensor:
        """`[batch, 1, kept + new, kv_lora_rank + qk_rope_head_dim]`: the tokens the last `update` returned."""
        return self.visible if self.visible is not None else self.buffer

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.sliding_window is None:
            raise ValueError("The sliding-window latent cache layer needs its window (`set_sliding_window`) first.")
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        # visible: [batch, 1, kept + new, kv_lora_rank + qk_rope_head_dim]
        self.visible = torch.cat((self.buffer, torch.cat((key_states, value_states), dim=-1)), dim=-2)
        self.cumulative_length += key_states.shape[-2]
        # kept: [batch, 1, min(kept + new, sliding_window - 1), kv_lora_rank + qk_rope_head_dim]
        kept = self.visible[:, :, max(self.visible.shape[-2] - (self.sliding_window - 1), 0) :]
        # After a long prefill, a copy: a view would hold on to the whole prompt's storage.
        self.buffer = kept.clone() if self.visible.shape[-2] > self.sliding_window else kept
        self._refresh_views()
        return self.visible[..., : self.kv_lora_rank], self.visible[..., self.kv_lora_rank :]

    def get_mask_sizes(self, query_length: int, *args, **kwargs) -> tuple[int, int]:
        # As `DynamicSlidingWindowLayer`: the kept tokens and the new ones, starting `kv_offset` tokens in.
        kept = min(self.cumulative_length, self.sliding_window - 1)
        kv_offset = max(self.cumulative_length - self.sliding_window + 1, 0)
        return kept + query_length, kv_offset

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def get_max_length(self) -> int:
        return self.sliding_window

    def reset(self) -> None:
        super().reset()
        self.visible = None

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove == 0 or not self.is_initialized:
            return
        if tokens_to_remove > 0 or self.cumulative_length >= self.sliding_window:
            raise ValueError(
                "A sliding-window latent cache layer can only be cropped by a negative count of tokens, and only "
                "before it has reached its window (the tokens before the window are gone)."
            )
        kept = max(self.buffer.shape[-2] + tokens_to_remove, 0)
        self.buffer = self.buffer[:, :, :kept]
        self.cumulative_length = kept
        self.visible = None
        self._refresh_views()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        self.visible = None

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            self.buffer = self.buffer.repeat_interleave(repeats, dim=0)
            self.visible = None
            self._refresh_views()

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        self.visible = None


class MLAStaticLatentCacheLayer(LatentViews, StaticLayer):
    """Preallocated latent cache layer for `cache_implementation="static"` and `torch.compile`."""

    _layer_type = MLA_LATENT_LAYER_TYPE

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.batch_size, self.num_heads = key_states.shape[:2]
        self.k_head_dim, self.v_head_dim = key_states.shape[-1], value_states.shape[-1]
        # buffer: [batch, 1, max_cache_len, kv_lora_rank + qk_rope_head_dim]; keys and values are views of it
        self.buffer = torch.zeros(
            (self.batch_size, self.num_heads, self.max_cache_len, self.k_head_dim + self.v_head_dim),
            dtype=self.dtype,
            device=self.device,
        )
        self._refresh_views()
        self.cumulative_length = self.cumulative_length.to(self.device)
        if not torch.compiler.is_compiling():
            torch._dynamo.mark_static_address(self.buffer)
            torch._dynamo.mark_static_address(self.cumulative_length)
        self.is_initialized = True

    def _refresh_views(self) -> None:
        # `update` writes through `keys` and `values` in place; the attention reads `buffer`: they must stay one.
        self.keys = self.buffer[..., : self.k_head_dim]
        self.values = self.buffer[..., self.k_head_dim :]

    @property
    def joint(self) -> torch.Tensor:
        return self.buffer

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        # In place: the buffer's address is what compiled graphs hold on to.
        if self.is_initialized:
            self.buffer.copy_(self.buffer.index_select(0, beam_idx.to(self.buffer.device)))


class MLAStaticSlidingLatentCacheLayer(MLAStaticLatentCacheLayer):
    """Static cache of a sliding-window layer: the whole `max_cache_len`, like a full layer. The sliding-window mask
    keeps attention to the window, so results are exact; the saving of the window is only in the dynamic cache."""

    _layer_type = MLA_SLIDING_LATENT_LAYER_TYPE


__all__ = [
    "MLALatentCacheLayer",
    "MLASlidingLatentCacheLayer",
    "MLAStaticLatentCacheLayer",
    "MLAStaticSlidingLatentCacheLayer",
]
