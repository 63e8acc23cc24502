"""Held-out evaluation during healing: the student against the teacher on fixed sequences, shared out over the
processes, scored by the one scoring core (`evaluate.score_batches`)."""

from __future__ import annotations

import contextlib
import math

import torch

from ..data import EVALUATION_PART, load_text, tokenize_into_sequences
from ..evaluate import ScoredBatch, ScoreSums, score_batches


def held_out_sequences(
    tokenizer, spec: str, text_column: str, seq_len: int, tokens: int, seq_len_flag: str = "--seq-len"
) -> tuple[torch.Tensor, str]:
    """`[n, seq_len]` windows from the last 20% of `spec` (the part training never reads), and their description.
    `seq_len_flag`: the flag that set `seq_len`, for the advice when the text is too short."""
    # About 4 characters a token in English text; 32 leaves room for any tokenizer and stays small.
    text, description = load_text(spec, EVALUATION_PART, text_column, max_chars=max(tokens * 32, 1 << 16))
    return tokenize_into_sequences(tokenizer, text, seq_len, tokens, seq_len_flag), description


@contextlib.contextmanager
def _without_autocast(accelerator, model):
    """Runs the prepared model's own forward, not the autocast one accelerate put in its place for mixed precision."""
    unwrapped = accelerator.unwrap_model(model)
    original = getattr(unwrapped, "_original_forward", None)
    if original is None:
        yield
        return
    patched = unwrapped.forward
    unwrapped.forward = original
    try:
        yield
    finally:
        unwrapped.forward = patched


def _my_share(sequences: torch.Tensor, rank: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This process's rows and their weights: every process runs the same number of forward passes, as FSDP
    requires, the last ones padded with rows of weight 0."""
    per_process = math.ceil(len(sequences) / world)
    mine = sequences[rank * per_process : (rank + 1) * per_process]
    weights = torch.ones(len(mine))
    if len(mine) < per_process:
        pad = per_process - len(mine)
        mine = torch.cat([mine, sequences[:1].expand(pad, -1)])
        weights = torch.cat([weights, torch.zeros(pad)])
    return mine, weights


@torch.no_grad()
def evaluate_held_out(
    accelerator, model, teacher, sequences: torch.LongTensor, batch_size: int, full_precision: bool = False
) -> dict:
    """Held-out perplexity of student and teacher, KL(teacher || student) and top-1 agreement, the same quantities
    as `evaluate.evaluate`. `full_precision`: no autocast. Non-finite logits are refused."""
    mine, weights = _my_share(sequences, accelerator.process_index, accelerator.num_processes)
    keep = torch.arange(sequences.shape[1] - 1, device=accelerator.device)

    def precision():  # a fresh context per batch: these context managers are single-use
        return _without_autocast(accelerator, model) if full_precision else accelerator.autocast()

    def batches():
        for batch, weight in zip(mine.split(batch_size), weights.split(batch_size)):
            batch = batch.to(accelerator.device)
            with precision():
                logits = model(input_ids=batch, use_cache=False, logits_to_keep=keep).logits
                teacher_logits = teacher(input_ids=batch, use_cache=False, logits_to_keep=keep).logits
            position_weights = weight[:, None].expand(-1, len(keep))
            yield ScoredBatch(logits, batch[:, 1:], teacher_logits, position_weights)

    was_training = model.training
    model.eval()
    try:
        sums = score_batches(batches())
    finally:
        model.train(was_training)
    sums = ScoreSums(*accelerator.reduce(sums.as_tensor(accelerator.device), reduction="sum").cpu().tolist())
    sums.require_finite("the student or the teacher")
    metrics = sums.metrics()
    return {
        "perplexity": metrics["perplexity"],
        "nll": metrics["nll"],
        "teacher_perplexity": metrics["reference_perplexity"],
        "kl": metrics["kl"],
        "top1_agreement": metrics["top1_agreement"],
        "tokens": metrics["tokens"],
    }
