"""Multi-head Latent Attention model code for transformers (installed as `mla_modeling`).

Importing this package registers `MLAConfig` and `MLAForCausalLM` with the Auto classes, so
`AutoModelForCausalLM.from_pretrained(converted_folder)` works without `trust_remote_code`.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .cache_mla import (
    MLALatentCacheLayer,
    MLASlidingLatentCacheLayer,
    MLAStaticLatentCacheLayer,
    MLAStaticSlidingLatentCacheLayer,
)
from .configuration_mla import MLA_LATENT_LAYER_TYPE, MLA_SLIDING_LATENT_LAYER_TYPE, MLAConfig
from .modeling_mla import MLAAttention, MLAForCausalLM, MLAModel, MLAPreTrainedModel


AutoConfig.register(MLAConfig.model_type, MLAConfig, exist_ok=True)
AutoModel.register(MLAConfig, MLAModel, exist_ok=True)
AutoModelForCausalLM.register(MLAConfig, MLAForCausalLM, exist_ok=True)

__all__ = [
    "MLA_LATENT_LAYER_TYPE",
    "MLA_SLIDING_LATENT_LAYER_TYPE",
    "MLAAttention",
    "MLAConfig",
    "MLAForCausalLM",
    "MLALatentCacheLayer",
    "MLASlidingLatentCacheLayer",
    "MLAModel",
    "MLAPreTrainedModel",
    "MLAStaticLatentCacheLayer",
    "MLAStaticSlidingLatentCacheLayer",
]
