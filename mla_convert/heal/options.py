"""How to heal: `HealOptions`, whose fields carry their command-line help, choices, group and checks (see
`mla_convert.options`), and the `heal` verb's arguments built from them."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from functools import partial

from ..errors import MLAConvertError
from ..options import add_options, check_fields, option
from ..options import options_from_args as read_options


TRAIN_CHOICES = ("attention", "all")
MIXED_PRECISION_CHOICES = ("no", "bf16", "fp16")
TEACHER_DTYPES = ("float32", "bfloat16", "float16")
SCHEDULES = ("cosine", "constant")
EVAL_PRECISIONS = ("float32", "training")

# Healing's peak learning rate. A student with DeepSeek's latent norm (`convert --target deepseek`) needs a smaller
# one, as its refinement does: on SmolLM2-135M at budget 0.5, 5e-5 took KL to the source from 0.21 to 0.96 in
# 25,600 tokens and left it at 0.50 after 100k, where 1e-5 kept it near 0.22 while perplexity fell (docs/deepseek.md).
DEFAULT_LR = 5e-5
DEEPSEEK_LR = 1e-5

training_option = partial(option, group="training")
checkpoint_option = partial(option, group="checkpoints")


@dataclass
class HealOptions:
    """How to heal. Token counts are global (over all processes); `batch_size` is per process."""

    teacher: str = option("", help="the source model the student was converted from", metavar="SOURCE",
                          required=True)  # fmt: skip
    teacher_gguf_file: str | None = option(None, help="GGUF file name inside the teacher folder", metavar="NAME")
    teacher_dtype: str = option(
        "float32", choices=TEACHER_DTYPES,
        help="dtype of the frozen teacher (bfloat16: faster where bf16 matmuls are, targets slightly rounded; half "
        "the memory of float32 on every process, which keeps a whole teacher even when the student is sharded)",
    )  # fmt: skip
    any_teacher: bool = option(
        False, help="distill from a teacher that is not the student's source (refused without this flag)"
    )
    data: str = option(
        "", group="data", metavar="DATA", required=True,
        help="training text: a .txt/.jsonl/.json/.parquet file or folder, or a datasets hub name NAME[:CONFIG][@SPLIT] "
        "(streamed); its first 80% is used",
    )  # fmt: skip
    text_column: str = option("text", help="column of records that holds the text", group="data", metavar="NAME")
    eval_data: str | None = option(
        None, group="data", metavar="DATA",
        help="held-out text, same forms as --data; its last 20% is used (if unset: the last 20% of --data)",
    )  # fmt: skip
    eval_tokens: int = option(8192, help="held-out tokens", group="data", metavar="N", at_least=1)
    eval_seq_len: int | None = option(None, help="held-out sequence length (if unset: --seq-len)", group="data",
                                      metavar="L", at_least=2)  # fmt: skip
    eval_batch_size: int | None = option(None, help="held-out sequences per forward pass (if unset: --batch-size)",
                                         group="data", metavar="B", at_least=1)  # fmt: skip
    eval_precision: str = option(
        "float32", choices=EVAL_PRECISIONS, group="data",
        help="float32: evaluate without autocast against a float32 teacher (a second copy if --teacher-dtype is "
        "not float32); training: in the training precision",
    )  # fmt: skip
    max_tokens: int = training_option(100_000, help="training tokens", metavar="N", at_least=1)
    seq_len: int = training_option(512, help="tokens per sequence", metavar="L", at_least=2)
    batch_size: int = training_option(4, help="sequences per process and micro-step", metavar="B", at_least=1)
    grad_accum: int = training_option(1, help="micro-steps per optimizer step", metavar="K", at_least=1)
    # None: the student's own (`heal_lr`)
    lr: float | None = training_option(
        None, positive=True,
        help=f"peak learning rate (AdamW); default {DEFAULT_LR:g}, for a student with DeepSeek's latent norm "
        f"(`convert --target deepseek`) {DEEPSEEK_LR:g} (at {DEFAULT_LR:g} it first moves away from the source)",
    )  # fmt: skip
    warmup_steps: int | None = training_option(None, help="linear warmup (if unset: 10% of the steps, 1 to 100)",
                                               metavar="N", at_least=0)  # fmt: skip
    schedule: str = training_option("cosine", help="after warmup", choices=SCHEDULES)
    weight_decay: float = training_option(0.0, help="AdamW", metavar="WD", at_least=0)
    max_grad_norm: float | None = training_option(1.0, help="gradient clipping (0: none)", metavar="N", at_least=0,
                                                  zero_means="none")  # fmt: skip
    train: str = training_option("attention", choices=TRAIN_CHOICES,
                                 help="attention: only the MLA projections (cheapest, least damage); all: every weight")
    kl_weight: float = training_option(
        1.0, metavar="W", at_least=0, at_most=1,
        help="loss = W * KL(teacher || student) + (1 - W) * next-token cross-entropy; 1 is pure KL",
    )  # fmt: skip
    mixed_precision: str = training_option("no", choices=MIXED_PRECISION_CHOICES,
                                           help="autocast of the student (and teacher) forward, by accelerate")
    gradient_checkpointing: bool = training_option(
        False, help="recompute each decoder layer's activations in the backward pass: much less memory for long "
        "--seq-len, about a third more compute (the same loss and gradients)",
    )  # fmt: skip
    seed: int = training_option(0, help="seeds torch, numpy and random")
    eval_every: int = checkpoint_option(25, help="optimizer steps (0: start and end)", metavar="N", at_least=0,
                                        zero_means="start and end")  # fmt: skip
    # Also evaluate at the first step that reaches each of these token counts (the healing bench's points).
    eval_at_tokens: tuple[int, ...] = option(())
    save_every: int = checkpoint_option(20, help="optimizer steps (0: never)", metavar="N", at_least=0,
                                        zero_means="never")  # fmt: skip
    checkpoint_dir: str | None = checkpoint_option(None, help="if unset: OUTPUT.checkpoints beside OUTPUT",
                                                   metavar="DIR")  # fmt: skip
    resume: bool = checkpoint_option(False, help="continue from the latest checkpoint")
    keep_checkpoints: bool = checkpoint_option(False, help="keep checkpoints after success")
    overwrite: bool = checkpoint_option(
        False, help="replace OUTPUT if it is an mla-convert output or empty, and discard checkpoints of an earlier run"
    )
    force: bool = checkpoint_option(False, help="with --overwrite: replace OUTPUT whatever it holds")
    progress: bool = option(True)  # the command line's --no-progress
    # Stop once this many optimizer steps are done, without writing the final model (a planned "kill", for tests).
    stop_after_steps: int | None = option(None)


# The flags' argument groups, in the order `--help` lists them (the models' flags stand with the command's own).
GROUP_TITLES = {"data": "data", "training": "training", "checkpoints": "evaluation and checkpoints"}


def add_heal_arguments(parser: argparse.ArgumentParser) -> None:
    """The `heal` verb's arguments: MLA_FOLDER OUTPUT, then one flag per documented `HealOptions` field."""
    parser.add_argument("student", metavar="MLA_FOLDER", help="converted MLA folder to heal")
    parser.add_argument("output", metavar="OUTPUT", help="folder to write the healed model to (atomically)")
    groups = {key: parser.add_argument_group(title) for key, title in GROUP_TITLES.items()}
    add_options(parser, HealOptions, groups)
    groups["checkpoints"].add_argument("--no-progress", action="store_true", help="no progress bar")


def options_from_args(args: argparse.Namespace) -> HealOptions:
    return read_options(HealOptions, args, progress=not getattr(args, "no_progress", False))


def check_options(options: HealOptions) -> None:
    """Refuses bad options with the valid range, naming the flags of `heal`, before anything is loaded."""
    if not options.teacher:
        raise MLAConvertError("--teacher is required: the source model the student was converted from")
    if not options.data:
        raise MLAConvertError("--data is required: the training text (its first 80% is used)")
    check_fields(options)
    eval_seq_len = options.eval_seq_len or options.seq_len
    if options.eval_tokens < eval_seq_len:
        which = "--eval-seq-len" if options.eval_seq_len else "--seq-len (the held-out sequence length by default)"
        raise MLAConvertError(
            f"--eval-tokens ({options.eval_tokens}) must be at least {which} ({eval_seq_len}): one held-out sequence"
        )
    if options.force and not options.overwrite:
        raise MLAConvertError("--force only widens --overwrite: pass both to replace a folder that is not ours")


def heal_lr(options: HealOptions, student_config) -> float:
    """The peak learning rate healing uses: `--lr`, else the student's default (smaller under a latent norm)."""
    if options.lr is not None:
        return options.lr
    return DEEPSEEK_LR if getattr(student_config, "kv_latent_norm", False) else DEFAULT_LR
