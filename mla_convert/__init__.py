"""mla-convert: turn MHA/GQA transformers models into Multi-head Latent Attention with a latent KV cache.

Importing it registers the MLA model with transformers' Auto classes (see `mla_modeling`).
"""

import mla_modeling  # noqa: F401  (registers MLAConfig / MLAForCausalLM with the Auto classes)

from .errors import MLAConvertError


__version__ = "0.1.0"

__all__ = ["MLAConvertError", "__version__"]
