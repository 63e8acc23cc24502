"""Quality of a (converted) causal LM: perplexity, and agreement with a reference model such as its source.

`score_batches` is the one place where negative log-likelihood, KL and top-1 agreement are computed: conversion's
check, the `eval` command and healing's evaluation all sum through it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from dataclasses import astuple, dataclass
from typing import NamedTuple

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from .errors import MLAConvertError


logger = logging.getLogger(__name__)
# Logit rows scored at a time: float32 temporaries of 16 MB at most, whatever the batch and vocabulary.
SCORE_CHUNK_ELEMENTS = 1 << 22


class ScoredBatch(NamedTuple):
    """Logits `[..., vocab]` of the model (and of the reference, same shape), the tokens they predict `[...]` (None:
    no likelihood), and a weight per position `[...]` (None: 1; padding rows get 0)."""

    logits: torch.Tensor
    targets: torch.Tensor | None = None
    reference_logits: torch.Tensor | None = None
    weights: torch.Tensor | None = None


@dataclass
class ScoreSums:
    """Float64 sums over scored positions. `nonfinite` counts positions where either model's logits are NaN or
    +inf (or all -inf): their NLL and KL are not numbers and their argmax means nothing, so a result with any
    must be refused, never reported as agreement (`require_finite`)."""

    nll: float = 0.0
    reference_nll: float = 0.0
    kl: float = 0.0
    agreements: float = 0.0
    tokens: float = 0.0
    nonfinite: float = 0.0

    def __add__(self, other: ScoreSums) -> ScoreSums:
        return ScoreSums(*(a + b for a, b in zip(astuple(self), astuple(other))))

    def as_tensor(self, device=None) -> torch.Tensor:
        """For summing over processes (`accelerator.reduce`); `ScoreSums(*tensor.tolist())` reads it back."""
        return torch.tensor(astuple(self), dtype=torch.float64, device=device)

    def require_finite(self, what: str) -> None:
        if self.nonfinite:
            raise MLAConvertError(
                f"{what} gives NaN or infinite logits at {int(self.nonfinite)} of {int(self.tokens)} positions: its "
                "weights (or the reference's) are broken, so no quality can be reported"
            )

    def metrics(self, reference: bool = True) -> dict[str, float | int]:
        """`perplexity`, `nll`, `tokens`, and with a reference `reference_perplexity`, `reference_nll`, `kl` (mean
        KL(reference || model) per position) and `top1_agreement`."""
        tokens = max(self.tokens, 1.0)
        nll = self.nll / tokens
        results: dict[str, float | int] = {"perplexity": math.exp(nll), "nll": nll, "tokens": int(self.tokens)}
        if reference:
            reference_nll = self.reference_nll / tokens
            results.update(
                reference_perplexity=math.exp(reference_nll),
                reference_nll=reference_nll,
                kl=self.kl / tokens,
                top1_agreement=self.agreements / tokens,
            )
        return results


def _log_probs(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 log-probabilities of logit rows, and whether each row's normalizer is finite."""
    z = logits.float()
    lse = z.logsumexp(dim=-1, keepdim=True)
    return z - lse, lse.squeeze(-1).isfinite()


def _score_rows(logits, targets, reference_logits, weights) -> torch.Tensor:
    """The six sums of `ScoreSums` for logit rows `[rows, vocab]`."""
    log_q, finite = _log_probs(logits)
    sums = torch.zeros(6, dtype=torch.float64, device=logits.device)
    if targets is not None:
        sums[0] = (-log_q.gather(-1, targets[:, None]).squeeze(-1) * weights).sum(dtype=torch.float64)
    if reference_logits is not None:
        log_p, reference_finite = _log_probs(reference_logits)
        finite &= reference_finite
        if targets is not None:
            sums[1] = (-log_p.gather(-1, targets[:, None]).squeeze(-1) * weights).sum(dtype=torch.float64)
        kl = torch.linalg.vecdot(log_p.exp(), log_p - log_q)
        sums[2] = (kl * weights).sum(dtype=torch.float64)
        # Non-finite rows would agree with each other (NaN is everybody's argmax): they count as disagreement.
        agree = (log_q.argmax(-1) == log_p.argmax(-1)) & finite
        sums[3] = (agree * weights).sum(dtype=torch.float64)
    sums[4] = weights.sum(dtype=torch.float64)
    sums[5] = ((~finite) * weights).sum(dtype=torch.float64)
    return sums


def score_batches(batches: Iterable[ScoredBatch]) -> ScoreSums:
    """NLL of the targets (model and reference), KL(reference || model) and top-1 agreement, summed over all
    positions of all batches, a few logit rows at a time so that no float32 copy of a batch's logits is made."""
    total = torch.zeros(6, dtype=torch.float64)
    for batch in batches:
        vocab = batch.logits.shape[-1]
        logits = batch.logits.reshape(-1, vocab)
        targets = None if batch.targets is None else batch.targets.reshape(-1).to(logits.device)
        reference = None if batch.reference_logits is None else batch.reference_logits.reshape(-1, vocab)
        weights = torch.ones(len(logits), device=logits.device)
        if batch.weights is not None:
            weights = batch.weights.reshape(-1).to(logits.device, torch.float32)
        rows = max(1, SCORE_CHUNK_ELEMENTS // vocab)
        for start in range(0, len(logits), rows):
            part = slice(start, start + rows)
            total += _score_rows(
                logits[part],
                None if targets is None else targets[part],
                None if reference is None else reference[part].to(logits.device),
                weights[part],
            ).cpu()
    return ScoreSums(*total.tolist())


def _vocab_size(model: PreTrainedModel) -> int:
    return model.get_input_embeddings().num_embeddings


def _next_token_logits(model: PreTrainedModel, input_ids: torch.LongTensor) -> torch.Tensor:
    """Logits predicting tokens 1..L-1 of each row (the last position predicts nothing we can score)."""
    return model(input_ids=input_ids.to(model.device), use_cache=False).logits[:, :-1]


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
                    logits = _next_token_logits(reference, batch).float()
                    self.batches.append(logits.log_softmax(dim=-1).to(torch.float16).cpu())
        finally:
            reference.train(was_training)


def _check_inputs(model, sequences, reference, batch_size) -> None:
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
    `reference_nll`, `kl` (mean per-token KL(reference || model)) and `top1_agreement` (fraction of positions
    where both models' most likely next tokens agree). Non-finite logits are refused (`MLAConvertError`).
    """
    _check_inputs(model, sequences, reference, batch_size)
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and sequences.shape[1] > limit:
        logger.warning(
            "sequences of %d tokens are longer than the model's max_position_embeddings (%d): positions beyond it "
            "were never trained, so the scores there say little",
            sequences.shape[1],
            limit,
        )
    cached = isinstance(reference, ReferenceLogProbs)
    models = [model] if reference is None or cached else [model, reference]
    was_training = [m.training for m in models]
    for m in models:
        m.eval()

    def batches(bar):
        for index, batch in enumerate(sequences.split(batch_size)):
            reference_logits = None
            if cached:
                reference_logits = reference.batches[index]
            elif reference is not None:
                reference_logits = _next_token_logits(reference, batch)
            yield ScoredBatch(_next_token_logits(model, batch), batch[:, 1:], reference_logits)
            bar.update(batch.numel())

    try:
        with tqdm(total=sequences.numel(), desc="Evaluating", unit="tok", disable=not progress) as bar:
            sums = score_batches(batches(bar))
    finally:
        for m, training in zip(models, was_training):
            m.train(training)
    sums.require_finite("the model" if reference is None else "the model or the reference")
    return sums.metrics(reference is not None)
