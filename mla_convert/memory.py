"""The conversion's peak resident memory, estimated before anything is loaded for each layer source (the source held
in memory, or read from its safetensors shards one layer at a time), from the safetensors headers, the hidden size
and the calibration sizes. `settings.choose_layer_source` holds the source in memory under `--streaming auto` only
when that estimate fits; `conversion.json` records both estimates beside the measured peak.

A fit to measured peaks (`scripts/bench_scale.py`: Llama-3.2-1B- and Llama-3.1-8B-shaped bf16 sources at 2 to 32
layers, both targets, and SmolLM2-135M in float32 held in memory and streamed; rows in docs/bench_scale.json, each
within 15% of its estimate, `tests/test_bench_scale.py`): the base, layer and embedding terms minimise the largest
relative error over the streamed rows (8 rows, worst -8%), the in-memory share over the two in-memory rows (SmolLM2
stored in float32 +8%, a 2-layer 1B-shaped bf16 source -8%). The rows all calibrate on 1,024 or 2,048 tokens: the
activation terms, from an earlier fit, are the least measured. Terms for what each path holds at its peak:

- both: the interpreter with torch and transformers imported (`BASE_BYTES`), the calibration hidden states in
  float32 (`copies` of `calibration tokens x hidden`: in and out of the layer and their concatenation, one more for
  `--target deepseek`, whose latent norm keeps the layer's inputs) and the attention inputs kept for refinement;
- streamed: the layer being converted (the source layer in float32, the MLA layer, the decomposition's and
  refinement's work: about 1.2 float32 copies of the largest decoder layer) and the larger of the embedding matrix
  and the LM head, read whole in their stored dtype to embed the calibration text and to check the logits (2.5 times
  its stored bytes: the read, its checks and casts);
- in memory: the whole source (its float32 copy, the loading's transient and the layer's work) as a multiple of
  its stored bytes.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

from transformers import PreTrainedConfig

from .conversion_options import SAMPLING_BATCH
from .plan import SourceShape
from .sources import _safetensors_tensors


GiB = 2**30
# the interpreter with torch, transformers and mla_convert imported, the skeleton and RoPE tables
BASE_BYTES = 0.46e9
# bytes per (calibration token x hidden x float32 copy) at the peak: the copies rarely coexist in full
ACTIVATION_SHARE = 0.25
# float32 copies of the calibration hidden states alive at once (the latent norm of --target deepseek adds one)
ACTIVATION_COPIES = {"mla": 3, "deepseek": 4}
# bytes per (kept token x hidden) at the peak: bfloat16 attention inputs and their float32 windows while refining
KEPT_BYTES = 0.78
# streamed: float32 copies of the largest decoder layer at the peak
LAYER_COPIES = 1.2
# streamed: multiple of the larger of the embedding matrix and the LM head (stored dtype) at the peak
EMBEDDING_SHARE = 2.5
# in memory: multiple of the source's stored bytes (the model held in float32, twice a bf16 source's bytes, and the
# loading's transient)
IN_MEMORY_SHARE = 3.0

LAYER_NAME = re.compile(r"(?:^|\.)layers\.(\d+)\.")


@dataclass(frozen=True)
class SourceSizes:
    """What the estimate reads from the safetensors headers."""

    stored_bytes: int
    parameters: int
    # parameters of the largest decoder layer
    largest_layer_params: int
    # stored bytes of the larger of the input embedding matrix and the LM head
    largest_embedding_bytes: int

    @classmethod
    def of(cls, folder: Path) -> SourceSizes | None:
        """None for a folder without safetensors weights."""
        tensors = _safetensors_tensors(folder)
        if tensors is None:
            return None
        layers: dict[int, int] = {}
        embedding = total = 0
        for name, (shape, stored) in tensors.items():
            params = 1
            for size in shape:
                params *= size
            total += params
            match = LAYER_NAME.search(name)
            if match:
                layers[int(match.group(1))] = layers.get(int(match.group(1)), 0) + params
            elif name.endswith(("embed_tokens.weight", "lm_head.weight")):
                embedding = max(embedding, stored)
        return cls(sum(stored for _, stored in tensors.values()), total, max(layers.values(), default=0), embedding)


@dataclass(frozen=True)
class PeakEstimate:
    """The estimated peak resident memory of the conversion, in bytes, for each layer source."""

    in_memory: int
    streamed: int

    def record(self) -> dict:
        return {"in_memory": self.in_memory, "streamed": self.streamed}

    def describe(self) -> str:
        return (f"peak estimated at {self.in_memory / GiB:.1f} GiB with the source in memory, "
                f"{self.streamed / GiB:.1f} GiB read from its shards")


def estimate_peak(
    sizes: SourceSizes, hidden_size: int, calibration_tokens: int, kept_tokens: int, target: str = "mla",
    sampler_cache_bytes: int = 0,
) -> PeakEstimate:
    """Both estimates for a source of `sizes` calibrated on `calibration_tokens` (0: no text read) keeping
    `kept_tokens` for refinement and the key-scale search; `sampler_cache_bytes`: the KV cache data-free calibration
    samples with (`sampling.cache_bytes`), held before any calibration activation exists, so the larger of the two
    counts (not fitted: one measured SmolLM2 row, 1.58 GB sampled from the shards against 1.51 GB estimated)."""
    activations = ACTIVATION_SHARE * ACTIVATION_COPIES[target] * 4 * calibration_tokens * hidden_size
    common = BASE_BYTES + max(activations + KEPT_BYTES * kept_tokens * hidden_size, sampler_cache_bytes)
    streamed = common + LAYER_COPIES * 4 * sizes.largest_layer_params + EMBEDDING_SHARE * sizes.largest_embedding_bytes
    in_memory = common + IN_MEMORY_SHARE * sizes.stored_bytes
    return PeakEstimate(in_memory=round(in_memory), streamed=round(streamed))


def sampler_cache_bytes(config: PreTrainedConfig, num_tokens: int, seq_len: int, batch_size: int = SAMPLING_BATCH) -> int:
    """The float32 KV cache that data-free calibration holds at its largest (one batch of rows) while it samples
    `num_tokens` in rows of `seq_len` (`sampling.sample_layer_by_layer`)."""
    rows = min(batch_size, math.ceil(num_tokens / seq_len))
    shape = SourceShape.from_config(config)
    return rows * seq_len * shape.num_layers * shape.num_kv_heads * shape.head_dim * 2 * 4
