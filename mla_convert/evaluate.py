"""Quality of a (converted) causal LM: perplexity, and agreement with a reference model such as its source."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from .errors import MLAConvertError


def _vocab_size(model: PreTrainedModel) -> int:
    return model.get_input_embeddings().num_embeddings


def _next_token_logits(model: PreTrainedModel, input_ids: torch.LongTensor) -> torch.Tensor:
    """Float32 logits predicting tokens 1..L-1 of each row (the last position predicts nothing we can score)."""
    logits = model(input_ids=input_ids.to(model.device), use_cache=False).logits
    return logits[:, :-1].float()


class ReferenceLogProbs:
    """A reference model's next-token log-probabilities on fixed sequences, computed once and kept in float16, so
    that many models can be compared with it (a benchmark's conversions) without running it again each time."""

    def __init__(self, reference: PreTrainedModel, sequences: torch.LongTensor, batch_size: int = 4, progress: bool = True):
        self.sequences = sequences
        self.batch_size = batch_size
        self.vocab_size = _vocab_size(reference)
        was_training = reference.training
        reference.eval()
        self.batches = []
        try:
            with torch.no_grad():
                for batch in tqdm(sequences.split(batch_size), desc="Reference", unit="batch", disable=not progress):
                    self.batches.append(_next_token_logits(reference, batch).log_softmax(dim=-1).to(torch.float16).cpu())
        finally:
            reference.train(was_training)


@torch.no_grad()
def evaluate(
    model: PreTrainedModel,
    sequences: torch.LongTensor,
    reference: "PreTrainedModel | ReferenceLogProbs | None" = None,
    batch_size: int = 4,
    progress: bool = True,
) -> dict[str, float | int]:
    """Score `model` on `[num_sequences, seq_len]` token windows, batch by batch so logits are never all held.

    Returns `perplexity` (exp of the mean next-token negative log-likelihood), `nll` and `tokens` (the number of
    predicted tokens). With a `reference` model on the same tokenizer, also `reference_perplexity`,
    `reference_nll`, `kl` (mean per-token KL(reference || model), in float32) and `top1_agreement` (fraction of
    positions where both models' most likely next tokens agree).
    """
    if sequences.dim() != 2 or sequences.shape[0] == 0 or sequences.shape[1] < 2:
        raise MLAConvertError(
            f"evaluation needs a [num_sequences, seq_len] tensor with seq_len >= 2, got shape {tuple(sequences.shape)}"
        )
    if batch_size < 1:
        raise MLAConvertError(f"batch_size must be at least 1, got {batch_size}")
    vocab_size = _vocab_size(model)
    if sequences.min() < 0 or sequences.max() >= vocab_size:
        raise MLAConvertError(
            f"token ids range over {sequences.min().item()}..{sequences.max().item()}, outside the model's vocabulary "
            f"of {vocab_size}: the text was tokenized with another tokenizer"
        )
    cached = isinstance(reference, ReferenceLogProbs)
    if cached and (reference.sequences is not sequences or reference.batch_size != batch_size):
        raise MLAConvertError("the cached reference was computed on other sequences or batches")
    reference_vocab_size = reference.vocab_size if cached else (_vocab_size(reference) if reference is not None else 0)
    if reference is not None and reference_vocab_size != vocab_size:
        raise MLAConvertError(
            f"the reference model has a vocabulary of {reference_vocab_size} tokens and the model {vocab_size}: "
            "they must share a tokenizer"
        )

    models = [model] if reference is None or cached else [model, reference]
    was_training = [m.training for m in models]
    for m in models:
        m.eval()
    # Sums in float64 on the host: per-batch float32 sums of ~1e5 tokens would lose digits of the mean.
    nll_sum = ref_nll_sum = kl_sum = 0.0
    agree = tokens = 0
    try:
        with tqdm(total=sequences.numel(), desc="Evaluating", unit="tok", disable=not progress) as bar:
            for index, batch in enumerate(sequences.split(batch_size)):
                logits = _next_token_logits(model, batch)
                targets = batch[:, 1:].to(logits.device)
                log_probs = logits.log_softmax(dim=-1)
                del logits
                nll_sum += -log_probs.gather(-1, targets.unsqueeze(-1)).sum().double().item()
                if reference is not None:
                    if cached:
                        ref_log_probs = reference.batches[index].to(log_probs.device, torch.float32)
                    else:
                        ref_log_probs = _next_token_logits(reference, batch).to(log_probs.device).log_softmax(dim=-1)
                    ref_nll_sum += -ref_log_probs.gather(-1, targets.unsqueeze(-1)).sum().double().item()
                    # kl_div(input, target) is KL(target || input): the reference is the distribution to match.
                    kl_sum += F.kl_div(log_probs, ref_log_probs, log_target=True, reduction="sum").double().item()
                    agree += (log_probs.argmax(dim=-1) == ref_log_probs.argmax(dim=-1)).sum().item()
                    del ref_log_probs
                tokens += targets.numel()
                bar.update(batch.numel())
    finally:
        for m, training in zip(models, was_training):
            m.train(training)

    nll = nll_sum / tokens
    results: dict[str, float | int] = {"perplexity": math.exp(nll), "nll": nll, "tokens": tokens}
    if reference is not None:
        ref_nll = ref_nll_sum / tokens
        results.update(
            reference_perplexity=math.exp(ref_nll),
            reference_nll=ref_nll,
            kl=kl_sum / tokens,
            top1_agreement=agree / tokens,
        )
    return results
