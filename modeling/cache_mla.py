"""The latent KV cache of Multi-head Latent Attention.

Each layer stores, per token, the joint latent `c` (`kv_lora_rank` numbers) and the shared RoPE key `k_pe`
(`qk_rope_head_dim` numbers), and nothing per head. Both are kept 4-D, `[batch, 1, seq, dim]`, in the slots that
transformers' cache layers call `keys` and `values`, so that crop (assisted decoding), beam reordering, batch
selection and mask sizes all work on dim -2 as they do for any other cache.
"""

import torch
from transformers.cache_utils import DynamicLayer, StaticLayer

from .configuration_mla import MLA_LATENT_LAYER_TYPE


class MLALatentCacheLayer(DynamicLayer):
    """Dynamic cache layer holding `latent` `[batch, 1, seq, kv_lora_rank]` and `rope_key` `[batch, 1, seq, qk_rope_head_dim]`."""

    # Registers the class in transformers' layer-type mapping, so `DynamicCache(config=...)` (and so `generate()`)
    # builds it for every layer the config lists as `mla_latent`.
    _layer_type = MLA_LATENT_LAYER_TYPE

    @property
    def latent(self) -> torch.Tensor | None:
        return self.keys

    @property
    def rope_key(self) -> torch.Tensor | None:
        return self.values


class MLAStaticLatentCacheLayer(StaticLayer):
    """Preallocated latent cache layer for `cache_implementation="static"` and `torch.compile`."""

    _layer_type = MLA_LATENT_LAYER_TYPE

    @property
    def latent(self) -> torch.Tensor | None:
        return self.keys

    @property
    def rope_key(self) -> torch.Tensor | None:
        return self.values


__all__ = ["MLALatentCacheLayer", "MLAStaticLatentCacheLayer"]
