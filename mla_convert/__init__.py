"""mla-convert: turn MHA/GQA transformers models into Multi-head Latent Attention with a latent KV cache.

Importing it registers the MLA model with transformers' Auto classes (see `mla_modeling`).
"""

import os


# A conversion allocates and frees tensors of tens to hundreds of MB all the time (activations, gradients, Adam's
# temporaries, float64 products). Fresh memory arrives in 4 KB pages, each faulted in on first touch, which costs
# about a tenth of a CPU conversion's time on a VM; torch's CPU allocator backs allocations of 2 MB and more with
# transparent huge pages when this is set before its first allocation (so before torch is imported). Nothing
# changes in the numbers. THP_MEM_ALLOC_ENABLE=0 in the environment turns it off.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

import mla_modeling  # noqa: F401  (registers MLAConfig / MLAForCausalLM with the Auto classes)

from .errors import MLAConvertError


__version__ = "0.1.0"

__all__ = ["MLAConvertError", "__version__"]
