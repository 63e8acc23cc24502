"""Data-free calibration text: sequences sampled from the source model itself.

Two samplers give the same rows, token for token: `sample_from_model` runs `generate` on a whole model held in memory;
`sample_layer_by_layer` runs the source one decoder layer at a time from any layer source (the model in memory or its
safetensors shards), in memory bounded by one layer, the batch's KV cache and the embeddings and LM head. The
conversion uses the second whatever its layer source, so a data-free conversion is the same from either."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import DynamicCache, GenerationConfig, PreTrainedConfig, PreTrainedModel, PreTrainedTokenizerBase
from transformers.generation.streamers import BaseStreamer
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

from .conversion_options import SAMPLING_BATCH
from .errors import MLAConvertError

if TYPE_CHECKING:
    from .stream import Stream


def _start_token_id(tokenizer: PreTrainedTokenizerBase, config: PreTrainedConfig) -> int:
    candidates = (tokenizer.bos_token_id, tokenizer.eos_token_id, config.bos_token_id, config.eos_token_id)
    for token_id in candidates:
        if isinstance(token_id, int):
            return token_id
    raise MLAConvertError("the tokenizer has neither a bos nor an eos token to start sampled calibration text from")


class _ProgressStreamer(BaseStreamer):
    """Advances a progress bar as `generate` produces tokens, so a large batch does not look stalled."""

    def __init__(self, bar: tqdm):
        self.bar = bar
        self.count = 0

    def put(self, value: torch.Tensor) -> None:
        self.count += value.numel()
        self.bar.update(value.numel())

    def end(self) -> None:
        pass


def _as_list(token_ids: int | Iterable[int] | None) -> list[int]:
    if token_ids is None:
        return []
    return [token_ids] if isinstance(token_ids, int) else list(token_ids)


def _eos_ids(tokenizer: PreTrainedTokenizerBase, config: PreTrainedConfig) -> list[int]:
    return _as_list(tokenizer.eos_token_id) or _as_list(config.eos_token_id)


def _check_sizes(num_tokens: int, seq_len: int, batch_size: int) -> int:
    """The number of rows; refuses sizes that sample nothing."""
    if seq_len < 2 or num_tokens < 1 or batch_size < 1:
        raise MLAConvertError(
            "sampling needs seq_len >= 2, num_tokens >= 1 and batch_size >= 1, "
            f"got {seq_len}, {num_tokens}, {batch_size}"
        )
    return math.ceil(num_tokens / seq_len)


@torch.no_grad()
def sample_from_model(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    num_tokens: int,
    seq_len: int,
    seed: int = 0,
    batch_size: int = 64,
    progress: bool = True,
) -> torch.LongTensor:
    """Data-free calibration text: `ceil(num_tokens / seq_len)` rows of `seq_len` tokens sampled from the model.

    Each row is the tokenizer's bos token (eos if it has none) followed by `seq_len - 1` tokens of plain sampling
    (temperature 1, no top-k/top-p). End-of-sequence tokens are suppressed so that every row is full length. The
    caller's random state is left untouched; the same seed and batch size give the same rows.
    """
    num_rows = _check_sizes(num_tokens, seq_len, batch_size)
    start_id = _start_token_id(tokenizer, model.config)
    eos_ids = _eos_ids(tokenizer, model.config)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos_ids or [start_id])[0]
    # A fresh config, so that the checkpoint's own sampling defaults (temperature, top_p, repetition penalty...)
    # do not leak into calibration data. min_new_tokens suppresses eos until the row is full.
    generation_config = GenerationConfig(
        do_sample=True,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        max_new_tokens=seq_len - 1,
        min_new_tokens=seq_len - 1,
        bos_token_id=start_id,
        eos_token_id=eos_ids or None,
        pad_token_id=pad_id,
    )
    was_training = model.training
    model.eval()
    device = model.device
    rows = []
    cuda_devices = [device.index or 0] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=cuda_devices):
            torch.manual_seed(seed)
            bar = tqdm(total=num_rows * seq_len, desc="Sampling calibration text", unit="tok", disable=not progress)
            with bar:
                for first in range(0, num_rows, batch_size):
                    n = min(batch_size, num_rows - first)
                    input_ids = torch.full((n, 1), start_id, dtype=torch.long, device=device)
                    streamer = _ProgressStreamer(bar)
                    out = model.generate(
                        input_ids=input_ids,
                        attention_mask=torch.ones_like(input_ids),
                        generation_config=generation_config,
                        streamer=streamer,
                    )
                    rows.append(out[:, :seq_len].cpu())
                    bar.update(n * seq_len - streamer.count)  # keep the total exact whatever the streamer saw
    finally:
        model.train(was_training)
    sequences = torch.cat(rows)
    if sequences.shape != (num_rows, seq_len):
        raise RuntimeError(f"sampling produced {tuple(sequences.shape)} tokens, expected {(num_rows, seq_len)}")
    return sequences


def _restarts_cache(config: PreTrainedConfig, length: int, cached: int) -> bool:
    """Whether `generate` drops the cache and runs the whole row again before this step (rows of `length` tokens,
    `cached` of them in the cache): Phi-3 does where a row first grows past its original context (longrope then
    rotates every position with its long factors; `Phi3ForCausalLM.prepare_inputs_for_generation`)."""
    limit = getattr(config, "original_max_position_embeddings", None) if config.model_type == "phi3" else None
    return limit is not None and cached > 0 and length >= limit + 1 and cached <= limit


@torch.no_grad()
def sample_layer_by_layer(
    stream: Stream,
    tokenizer: PreTrainedTokenizerBase,
    num_tokens: int,
    seq_len: int,
    seed: int = 0,
    batch_size: int = SAMPLING_BATCH,
    progress: bool = True,
) -> torch.LongTensor:
    """`sample_from_model`'s rows (the same seed and batch size give the same tokens), from the source's layers read
    one at a time from `stream`'s layer source, as the conversion reads them.

    Per batch of rows, token by token: the new token's embedding runs through every layer in turn, each layer
    reading and writing its own part of the batch's cache (float32, as the layers compute); the final norm and the
    LM head give the logits, sampled as `generate` samples them (temperature 1, no top-k/top-p, eos suppressed
    until the row is full). Memory: one source layer in float32 (plus its stored dtype when that is another), the
    cache `batch x seq_len x layers x kv_heads x head_dim x 2 (K, V) x 4` bytes, the embedding matrix in its stored
    dtype and the LM head in float32. Time: every layer is read once per generated token, from memory or from the
    shards through files kept open.
    """
    from .stream import RepeatedLayers, load_module

    config = stream.skeleton.config
    num_rows = _check_sizes(num_tokens, seq_len, batch_size)
    start_id = _start_token_id(tokenizer, config)
    eos_ids = _eos_ids(tokenizer, config)
    device, num_layers = stream.device, stream.shape.num_layers
    windows = stream.windows
    reader = stream.reader
    # embeddings: rows cast to float32 as they are looked up; the head whole in float32, as the model computes
    embed = reader.read("model.embed_tokens.weight")
    head_name = "model.embed_tokens.weight" if config.tie_word_embeddings else "lm_head.weight"
    head = (embed if head_name == "model.embed_tokens.weight" else reader.read(head_name)).to(device, torch.float32)
    with torch.device("meta"):
        norm = type(stream.skeleton.model.norm)(stream.shape.hidden_size, eps=stream.source_config.rms_norm_eps)
    norm = load_module(norm, {"weight": reader.read("model.norm.weight")}, device)
    eos = torch.tensor(eos_ids, dtype=torch.long, device=device)
    is_eos = None  # [vocab] bool, once the vocabulary size is known from the first logits
    rows = []
    cuda_devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda_devices), RepeatedLayers(stream) as layers:
        torch.manual_seed(seed)
        steps = (seq_len - 1) * num_layers * math.ceil(num_rows / batch_size)
        bar = tqdm(total=steps, desc="Sampling calibration text (layer by layer)", unit="layer", disable=not progress)
        with bar:
            for first in range(0, num_rows, batch_size):
                n = min(batch_size, num_rows - first)
                ids = torch.full((n, 1), start_id, dtype=torch.long, device=device)
                # one cache layer per decoder layer (sliding-window layers keep their window), as `generate` makes it
                cache = DynamicCache(config=config)
                for _ in range(seq_len - 1):
                    new_ids = ids[:, -1:]
                    if _restarts_cache(config, ids.shape[1], cache.get_seq_length()):
                        cache, new_ids = DynamicCache(config=config), ids
                    hidden = embed[new_ids.cpu()].to(device, torch.float32)
                    # what the model's forward computes once per step for all its layers: positions, masks, RoPE
                    attention_mask = torch.ones_like(ids)
                    position_ids = attention_mask.cumsum(-1)[:, -new_ids.shape[1] :] - 1
                    masks = {
                        window: (create_causal_mask if window is None else create_sliding_window_causal_mask)(
                            config, hidden, attention_mask, cache, position_ids
                        )
                        for window in set(windows)
                    }
                    position_embeddings = stream.rotary(hidden, position_ids)
                    for layer_idx in range(num_layers):
                        layer = layers.layer(layer_idx)
                        output = layer(
                            hidden, attention_mask=masks[windows[layer_idx]], position_embeddings=position_embeddings,
                            position_ids=position_ids, cache=cache, use_cache=True,
                        )  # fmt: skip
                        hidden = output[0] if isinstance(output, tuple) else output
                        del layer, output
                        bar.update(1)
                    logits = nn.functional.linear(norm(hidden)[:, -1:, :], head)[:, -1].to(torch.float32)
                    # eos cannot end a row before it is full (`generate`'s min_new_tokens)
                    if is_eos is None:
                        is_eos = torch.isin(torch.arange(logits.shape[-1], device=device), eos)
                    scores = torch.where(is_eos, -math.inf, logits)
                    next_ids = torch.multinomial(nn.functional.softmax(scores, dim=-1), num_samples=1)
                    ids = torch.cat([ids, next_ids], dim=-1)
                rows.append(ids.cpu())
                del cache
    sequences = torch.cat(rows)
    if sequences.shape != (num_rows, seq_len):
        raise RuntimeError(f"sampling produced {tuple(sequences.shape)} tokens, expected {(num_rows, seq_len)}")
    return sequences
