"""The two models of healing: the converted student (trained) and its source, the teacher (frozen), and the checks
that they belong together."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from ..errors import MLAConvertError
from ..families import llama_layout_state
from .checkpoints import same_path
from .options import HealOptions


logger = logging.getLogger(__name__)

# The MLA projections inside `model.layers[i].self_attn`, and the latent norm of a `--target deepseek` conversion
# (`kv_a_layernorm`, part of the layer it was refined with), and a QK-norm conversion's query norm and key rows
# (`q_norm`, `k_proj`, which set the per-head scales): what `train="attention"` fine-tunes.
ATTENTION_PROJECTIONS = ("q_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj", "kv_a_layernorm", "q_norm", "k_proj")
# Copied from the student folder into the healed one; names the source the student was converted from.
CONVERSION_REPORT = "conversion.json"
# A student's embeddings, MLP and norms are its source's own, up to the rounding of a bfloat16 copy of either.
SHARED_WEIGHT_TOLERANCE = 1e-2


def vocab_size(model) -> int:
    return model.get_input_embeddings().num_embeddings


def _what_distillation_needs(any_teacher: bool) -> str:
    if any_teacher:
        # --any-teacher lifts "the student's source", not "the same tokens"
        return "distillation compares the two models token by token, so even with --any-teacher the teacher must use the student's tokenizer"
    return "distillation needs the source the student was converted from"


def check_vocabularies(
    student: str, student_vocab: int | None, teacher: str, teacher_vocab: int, any_teacher: bool = False
) -> None:
    if student_vocab is not None and student_vocab != teacher_vocab:
        raise MLAConvertError(
            f"the teacher {teacher} has a vocabulary of {teacher_vocab} tokens and the student {student} "
            f"{student_vocab}: {_what_distillation_needs(any_teacher)}"
        )


def check_same_tokenizer(
    student_tokenizer, teacher_tokenizer, student: str, teacher: str, any_teacher: bool = False
) -> None:
    from ..sources import same_tokenizer

    if student_tokenizer is None or teacher_tokenizer is None:
        return
    if not same_tokenizer(student_tokenizer, teacher_tokenizer):
        raise MLAConvertError(
            f"the teacher {teacher} and the student {student} use different tokenizers ({len(teacher_tokenizer)} "
            f"and {len(student_tokenizer)} tokens, or the same tokens with other ids): "
            f"{_what_distillation_needs(any_teacher)}"
        )


def recorded_source(student: str) -> str | None:
    """The source named in the student's conversion.json, if it has a readable one."""
    try:
        source = json.loads((Path(student) / CONVERSION_REPORT).read_text(encoding="utf-8")).get("source")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        return None
    return source if isinstance(source, str) else None


def shares_weights(student, teacher) -> bool:
    """Whether every weight outside attention (embeddings, MLP, norms, head) is the teacher's own."""
    # A Phi-3 teacher's fused gate/up projection compared as the student's two
    teacher_weights = llama_layout_state(dict(teacher.named_parameters()))
    compared = 0
    for name, weight in student.named_parameters():
        other = teacher_weights.get(name)
        if "self_attn" in name.split(".") or other is None or other.shape != weight.shape:
            continue
        a, b = weight.detach().float(), other.detach().float()
        if (a - b).abs().max() > SHARED_WEIGHT_TOLERANCE * max(b.abs().max().item(), 1e-12):
            return False
        compared += 1
    return compared > 0


def check_teacher_is_source(student: str, model, teacher_model, options: HealOptions) -> None:
    """Refuses a teacher that is not the student's source, unless `any_teacher`: the student's weights outside
    attention are its source's own (after `--train all` they are not, and the conversion.json's source decides)."""
    if options.any_teacher or shares_weights(model, teacher_model):
        return
    source = recorded_source(student)
    if source is not None and same_path(source, options.teacher):
        return
    converted_from = f"; it was converted from {source}" if source else ""
    raise MLAConvertError(
        f"the teacher {options.teacher} is not the source of the student {student} (their embeddings, MLP and norms "
        f"differ{converted_from}): pass its source as --teacher, or --any-teacher to distill from another model"
    )


def load_teacher(options: HealOptions, dtype: torch.dtype, device):
    """The frozen teacher, in eval mode, and its tokenizer."""
    from ..sources import load_source

    teacher, tokenizer = load_source(options.teacher, options.teacher_gguf_file, dtype=dtype, device="cpu")
    return teacher.eval().requires_grad_(False).to(device), tokenizer


def select_trainable(model, train: str) -> list[str]:
    """Freezes what is not trained; returns the names of the trained parameters (tied ones once)."""
    names = []
    for name, parameter in model.named_parameters():
        parts = name.split(".")
        trained = train == "all" or ("self_attn" in parts and any(p in parts for p in ATTENTION_PROJECTIONS))
        parameter.requires_grad_(trained)
        if trained:
            names.append(name)
    if not names:
        raise MLAConvertError(f"--train {train} selects no parameters of the student")
    return names


def warn_beyond_positions(config, seq_len: int, eval_seq_len: int) -> None:
    """Sequences longer than the student was made for still run (RoPE extrapolates), but rarely well."""
    limit = getattr(config, "max_position_embeddings", None)
    longest = max(seq_len, eval_seq_len)
    if limit is not None and longest > limit:
        flag = "--seq-len" if seq_len > limit else "--eval-seq-len"
        logger.warning(
            "%s %d is longer than the student's max_position_embeddings (%d): positions beyond it were never "
            "trained and may heal and evaluate poorly",
            flag,
            longest,
            limit,
        )
