"""Calibration: what the conversion learns from the calibration text (`calibration_text.py`): every
attention layer's input moment (and a QK-norm source's normalised moments), summed batch by batch. The conversion
takes them layer by layer (`stream.run_layer`); `collect_input_moments` takes them from a whole model in one pass."""

from __future__ import annotations

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel



@torch.no_grad()
def forward_batches(
    model: PreTrainedModel, sequences: torch.LongTensor, handles: list, batch_size: int = 4, desc: str | None = None
) -> int:
    """Runs the base model over `sequences` `[sequences, seq]` batch by batch, for the hooks behind `handles` to
    see every attention layer's inputs or outputs; removes the hooks afterwards (also on error). Returns the number
    of tokens run. `desc`: a progress bar's label (None: no bar)."""
    device = next(model.parameters()).device
    count = 0
    try:
        for start in tqdm(range(0, len(sequences), batch_size), desc=desc, unit="batch", disable=desc is None):
            batch = sequences[start : start + batch_size].to(device)
            # The base model only: the LM head is a fifth of the FLOPs and no hook needs it.
            model.model(input_ids=batch, use_cache=False)
            count += batch.numel()
    finally:
        for handle in handles:
            handle.remove()
    return count


def moment_sum(hidden_states: torch.Tensor) -> torch.Tensor:
    """`sum [x; 1] [x; 1]^T` over the tokens of one batch of attention inputs `[..., hidden]`: `[hidden + 1, hidden + 1]`
    float64 on the CPU (the whole-model and the streaming conversion accumulate it alike)."""
    # x: [tokens, hidden + 1]
    x = hidden_states.reshape(-1, hidden_states.shape[-1]).float()
    x = torch.cat((x, torch.ones(x.shape[0], 1, dtype=x.dtype, device=x.device)), dim=1)
    # float32 within a batch, float64 across batches: fast, and the sum over many batches stays accurate
    return (x.T @ x).cpu().to(torch.float64)


@torch.no_grad()
def collect_input_moments(
    model: PreTrainedModel, sequences: torch.LongTensor, batch_size: int = 4, keep_sequences: int = 0
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """`E[[x; 1] [x; 1]^T]` of every attention layer's input, accumulated batch by batch: `[layers, hidden + 1, hidden + 1]`.

    Also returns the attention inputs of the first `keep_sequences` sequences, per layer `[keep, seq, hidden]` (on
    the CPU, in bfloat16 to halve their memory), for layer-wise refinement; an empty list when `keep_sequences` is 0.
    """
    layers = model.model.layers
    hidden = model.config.hidden_size
    moments = torch.zeros(len(layers), hidden + 1, hidden + 1, dtype=torch.float64)
    kept: list[list[torch.Tensor]] = [[] for _ in layers]

    def make_hook(layer_idx: int):
        def hook(module, args, kwargs):
            hidden_states = kwargs.get("hidden_states", args[0] if args else None)
            moments[layer_idx] += moment_sum(hidden_states)
            still_needed = keep_sequences - sum(len(part) for part in kept[layer_idx])
            if still_needed > 0:
                kept[layer_idx].append(hidden_states[:still_needed].detach().to("cpu", torch.bfloat16))

        return hook

    handles = [layer.self_attn.register_forward_pre_hook(make_hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    count = forward_batches(model, sequences, handles, batch_size, desc="calibrating")
    layer_inputs = [torch.cat(parts) for parts in kept] if keep_sequences > 0 else []
    return moments / max(count, 1), layer_inputs


def normalised_moment_sums(
    attention, hidden_states: torch.Tensor, heads: int, kv_heads: int, head_dim: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One batch's sums (float64, CPU) behind a QK-norm layer's `decompose.NormalisedMoments`, from its attention
    module and input `[..., hidden]`."""
    hidden_states = hidden_states.float()
    # queries: [tokens, heads, head_dim]; keys: [tokens, kv_heads, head_dim], as the source normalises them
    queries = attention.q_norm(attention.q_proj(hidden_states).view(-1, heads, head_dim))
    raw_keys = attention.k_proj(hidden_states).view(-1, kv_heads, head_dim)
    keys = attention.k_norm(raw_keys).reshape(-1, kv_heads * head_dim)
    scales_sq = 1.0 / (raw_keys.pow(2).mean(-1) + attention.k_norm.variance_epsilon)
    return (
        torch.einsum("thd,the->hde", queries, queries).cpu().to(torch.float64),
        (keys.T @ keys).cpu().to(torch.float64),
        scales_sq.sum(0).cpu().to(torch.float64),
    )
