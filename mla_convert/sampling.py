"""Data-free calibration text: sequences sampled from the source model itself."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from tqdm.auto import tqdm
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase
from transformers.generation.streamers import BaseStreamer

from .errors import MLAConvertError


def _start_token_id(tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel) -> int:
    candidates = (tokenizer.bos_token_id, tokenizer.eos_token_id, model.config.bos_token_id, model.config.eos_token_id)
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
    if seq_len < 2 or num_tokens < 1 or batch_size < 1:
        raise MLAConvertError(
            "sampling needs seq_len >= 2, num_tokens >= 1 and batch_size >= 1, "
            f"got {seq_len}, {num_tokens}, {batch_size}"
        )
    num_rows = math.ceil(num_tokens / seq_len)
    start_id = _start_token_id(tokenizer, model)
    eos_ids = _as_list(tokenizer.eos_token_id) or _as_list(model.config.eos_token_id)
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
