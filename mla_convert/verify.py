"""The check of a converted model against its source before anything is saved: logits on a few sequences, and
a refusal of NaN, infinite or (at full budget) inexact results."""

from __future__ import annotations

import math

import torch
from transformers import PreTrainedModel

from .errors import MLAConvertError
from .evaluate import ScoredBatch, score_batches
from .plan import RankPlan


EXACT_RELATIVE_TOLERANCE = 1e-4


@torch.no_grad()
def compare_logits(source_model: PreTrainedModel, model: PreTrainedModel, input_ids: torch.LongTensor) -> dict:
    """Max relative logit error, KL(source || converted) and top-1 agreement on every position of `input_ids`.
    NaN or infinite logits are refused: a broken model is never reported as agreeing with its source."""
    device = next(model.parameters()).device
    input_ids = input_ids.to(device)
    reference = source_model(input_ids=input_ids, use_cache=False).logits.float()
    logits = model(input_ids=input_ids, use_cache=False).logits.float()
    return logit_agreement(logits, reference)


def logit_agreement(logits: torch.Tensor, reference: torch.Tensor) -> dict:
    """`compare_logits`' figures from the converted model's and the source's logits `[batch, seq, vocab]`."""
    sums = score_batches([ScoredBatch(logits, reference_logits=reference)])
    sums.require_finite("the converted model (or its source)")
    relative_error = float((logits - reference).abs().max() / reference.abs().max())
    metrics = sums.metrics()
    return {
        "max_relative_logit_error": relative_error,
        "kl": metrics["kl"],
        "top1_agreement": metrics["top1_agreement"],
        "tokens": logits.shape[0] * logits.shape[1],
    }


def verification_ids(vocab_size: int, calibration: torch.LongTensor | None, seed: int) -> torch.LongTensor:
    if calibration is not None and len(calibration):
        return calibration[:2, :128]
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (2, 64), generator=generator)


def check_verification(verification: dict, plan: RankPlan) -> None:
    """Refuses to save a model whose check against the source failed: nothing broken is ever reported as done."""
    if not all(math.isfinite(verification[key]) for key in ("max_relative_logit_error", "kl", "top1_agreement")):
        raise MLAConvertError(
            "the converted model computes NaN or inf logits on the check against the source; nothing was written "
            "(lower --refine-lr, or report this with the command that caused it)"
        )
    if plan.exact and verification["max_relative_logit_error"] > EXACT_RELATIVE_TOLERANCE:
        raise MLAConvertError(
            f"full-budget conversion is not exact (max relative logit error "
            f"{verification['max_relative_logit_error']:.2e}); nothing was written: please report this source"
        )
