"""What differs between the source families, read in one place, so that the rest of the pipeline sees every source
in Llama's layout.

- Phi-3/Phi-4 (`phi3`) fuse the query, key and value projections into `qkv_proj` (rows `[q ; k ; v]`) and the MLP's
  gate and up projections into `gate_up_proj` (rows `[gate ; up]`): both split exactly into the separate
  projections the other families have.
- A `partial_rotary_factor` below 1 (Phi-4-mini's 0.75) rotates only the first `rotary_dim` dims of every head, in
  `rotate_half` layout over those dims (`i` with `i + rotary_dim / 2`); the other dims pass through. Permuting each
  query and key head's rows (`rotary_permutation`) puts that head in the plain `rotate_half` layout over the whole
  `head_dim`, with the pass-through dims as pairs of frequency 0 (`source_inv_freq`): a rotation by angle 0 is the
  identity, and the same permutation of queries and keys leaves every score unchanged. Those pairs then cost nothing
  to leave without RoPE, so below full budget they join the NoPE key first.
- Sliding windows (Mistral's `sliding_window`, Qwen2's `use_sliding_window` with `max_window_layers`, Phi-3's
  `sliding_window`): per layer, whether attention is local (`source_layer_types`), and the window.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedConfig, PreTrainedModel

from .errors import MLAConvertError


SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "phi3")

SLIDING_ATTENTION = "sliding_attention"
FULL_ATTENTION = "full_attention"


def head_dim(config: PreTrainedConfig) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def rotary_dim(config: PreTrainedConfig) -> int:
    """How many dims of each head RoPE rotates (all of them unless `partial_rotary_factor` is set below 1)."""
    rope_parameters = config.rope_parameters or {}
    factor = rope_parameters.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", None)) or 1.0
    return int(head_dim(config) * factor)


def check_source_family(config: PreTrainedConfig) -> None:
    """Refuses, with one line, a source whose RoPE layout the pipeline cannot put in `rotate_half` form."""
    dim, rotated = head_dim(config), rotary_dim(config)
    if rotated % 2 or (dim - rotated) % 2 or not 0 < rotated <= dim:
        raise MLAConvertError(
            f"the source rotates {rotated} of its {dim} head dims (partial_rotary_factor); only an even number of "
            "rotated and of pass-through dims can be converted"
        )


def rotary_permutation(dim: int, rotated: int) -> torch.Tensor:
    """`permutation[v]`: the source head dim that dim `v` of the plain `rotate_half` layout over `dim` takes.

    Pair `j < rotated / 2` (dims `j`, `j + dim / 2`) is the source's rotated pair (`j`, `j + rotated / 2`); pair
    `rotated / 2 + m` is the `m`-th pair of pass-through dims (`rotated + m`, `rotated + (dim - rotated) / 2 + m`).
    The identity when every dim is rotated.
    """
    half, rotated_half, passed_half = dim // 2, rotated // 2, (dim - rotated) // 2
    permutation = torch.empty(dim, dtype=torch.long)
    pairs = torch.arange(rotated_half)
    permutation[pairs], permutation[pairs + half] = pairs, pairs + rotated_half
    passed = torch.arange(passed_half)
    permutation[rotated_half + passed] = rotated + passed
    permutation[rotated_half + passed + half] = rotated + passed_half + passed
    return permutation


def source_inv_freq(model: PreTrainedModel) -> torch.Tensor:
    """The source's RoPE frequencies (scaled ones included), `[head_dim / 2]`: pass-through pairs at frequency 0."""
    inv_freq = model.model.rotary_emb.inv_freq.detach().to("cpu", torch.float64)
    missing = head_dim(model.config) // 2 - inv_freq.shape[0]
    return torch.cat((inv_freq, inv_freq.new_zeros(missing)))


def _weight(linear: torch.nn.Linear) -> torch.Tensor:
    return linear.weight.detach().to("cpu", torch.float64)


def _bias(linear: torch.nn.Linear) -> torch.Tensor | None:
    return None if linear.bias is None else linear.bias.detach().to("cpu", torch.float64)


def attention_projections(attention: torch.nn.Module, config: PreTrainedConfig) -> dict:
    """One source attention layer's `q`, `k`, `v`, `o` projections as `(weight [out, in], bias [out] or None)`,
    float64 on the CPU, query and key heads in plain `rotate_half` layout over the whole head."""
    dim = head_dim(config)
    num_heads = config.num_attention_heads
    num_kv_heads = getattr(config, "num_key_value_heads", None) or num_heads
    if hasattr(attention, "qkv_proj"):
        # Phi-3: rows [q (heads * head_dim) ; k (kv_heads * head_dim) ; v (kv_heads * head_dim)]
        sizes = [num_heads * dim, num_kv_heads * dim, num_kv_heads * dim]
        weights = torch.split(_weight(attention.qkv_proj), sizes)
        bias = _bias(attention.qkv_proj)
        biases = torch.split(bias, sizes) if bias is not None else (None, None, None)
        projections = dict(zip("qkv", zip(weights, biases)))
    else:
        projections = {
            name: (_weight(linear), _bias(linear))
            for name, linear in (("q", attention.q_proj), ("k", attention.k_proj), ("v", attention.v_proj))
        }
    projections["o"] = (_weight(attention.o_proj), _bias(attention.o_proj))
    rotated = rotary_dim(config)
    if rotated != dim:
        permutation = rotary_permutation(dim, rotated)
        for name, heads in (("q", num_heads), ("k", num_kv_heads)):
            weight, bias = projections[name]
            # [heads * head_dim, hidden] -> [heads, head_dim, hidden], each head's rows permuted alike
            weight = weight.view(heads, dim, -1)[:, permutation].reshape(heads * dim, -1)
            bias = None if bias is None else bias.view(heads, dim)[:, permutation].reshape(-1)
            projections[name] = (weight, bias)
    return projections


def llama_layout_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A source state dict with Phi-3's fused `mlp.gate_up_proj` (rows `[gate ; up]`, as `Phi3MLP` chunks them) split
    into Llama's `mlp.gate_proj` and `mlp.up_proj`; other families' states pass unchanged."""
    split = {}
    for key, value in state.items():
        if key.endswith("mlp.gate_up_proj.weight"):
            prefix = key[: -len("gate_up_proj.weight")]
            gate, up = value.chunk(2, dim=0)
            split[prefix + "gate_proj.weight"], split[prefix + "up_proj.weight"] = gate, up
        else:
            split[key] = value
    return split


def sliding_window(config: PreTrainedConfig) -> int | None:
    """The source's attention window, None when no layer is local (Qwen2 sets it only with `use_sliding_window`)."""
    window = getattr(config, "sliding_window", None)
    if window is None or not getattr(config, "use_sliding_window", True):
        return None
    return int(window)


def source_layer_types(config: PreTrainedConfig) -> list[str] | None:
    """Per layer `sliding_attention` or `full_attention` as the source attends, None when no layer is local.

    Qwen2 lists its layers in `layer_types` (local from `max_window_layers` on); Mistral and Phi-3 apply the window
    in every layer when it is set.
    """
    if sliding_window(config) is None:
        return None
    layer_types = getattr(config, "layer_types", None)
    if layer_types is None:
        return [SLIDING_ATTENTION] * config.num_hidden_layers
    if SLIDING_ATTENTION not in layer_types:
        return None
    return [SLIDING_ATTENTION if kind == SLIDING_ATTENTION else FULL_ATTENTION for kind in layer_types]


def layer_windows(config: PreTrainedConfig) -> list[int | None]:
    """Per layer, the window the source attends over (None: the whole context)."""
    layer_types = source_layer_types(config) or [FULL_ATTENTION] * config.num_hidden_layers
    return [sliding_window(config) if kind == SLIDING_ATTENTION else None for kind in layer_types]
