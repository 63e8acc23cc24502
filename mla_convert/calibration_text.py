"""The calibration text: the first 80% of the given text, or (data-free) sequences sampled from the source itself,
layer by layer (`sampling.sample_layer_by_layer`)."""

from __future__ import annotations

import sys

import torch

from .conversion_options import SAMPLED_SEQ_LEN, ConversionOptions
from .data import CALIBRATION_PART, load_text, tokenize_into_sequences
from .errors import MLAConvertError
from .sampling import sample_layer_by_layer


def calibration_sequences(stream, tokenizer, options: ConversionOptions) -> tuple[torch.LongTensor, dict]:
    """Calibration tokens: the first 80% of the given text, or (data-free) text sampled from the source itself, layer
    by layer from `stream`'s layer source (`sampling.sample_layer_by_layer`)."""
    if tokenizer is None:
        raise MLAConvertError("calibration needs the source's tokenizer, and none was found beside the weights")
    if options.calibration is None:
        seq_len = min(options.calibration_seq_len, SAMPLED_SEQ_LEN)
        sequences = sample_layer_by_layer(
            stream, tokenizer, options.calibration_tokens, seq_len, seed=options.seed, progress=stream.progress
        )
        info = {
            "kind": "sampled", "description": f"sampled from the source model (seed {options.seed})",
            "sampler": "layer by layer",
        }  # fmt: skip
    else:
        text, description = load_text(options.calibration, CALIBRATION_PART, options.text_column)
        # no flag sets the calibration sequence length: the advice for short text is only "more text"
        sequences = tokenize_into_sequences(
            tokenizer, text, options.calibration_seq_len, options.calibration_tokens, seq_len_flag=None
        )
        info = {"kind": "text", "description": description}
        if sequences.numel() < options.calibration_tokens // options.calibration_seq_len * options.calibration_seq_len:
            print(
                f"note: --calibration-tokens {options.calibration_tokens} asked for more than the calibration part of "
                f"{options.calibration} holds: calibrating on the {sequences.numel()} tokens it gives",
                file=sys.stderr,
            )
    info.update(tokens=int(sequences.numel()), seq_len=int(sequences.shape[1]))
    return sequences, info
