"""How to heal: `HealOptions`, whose fields carry their command-line help, choices and group, their validation, and
the `heal` verb's arguments built from them."""

from __future__ import annotations

import argparse
import math
from dataclasses import MISSING, dataclass, field, fields

from ..errors import MLAConvertError


TRAIN_CHOICES = ("attention", "all")
MIXED_PRECISION_CHOICES = ("no", "bf16", "fp16")
TEACHER_DTYPES = ("float32", "bfloat16")
SCHEDULES = ("cosine", "constant")
EVAL_PRECISIONS = ("float32", "training")


def option(default=MISSING, *, help: str | None = None, group: str = "training", **cli):
    """A field of `HealOptions` with what its command-line flag needs: `help`, `group`, and argparse keywords
    (`choices`, `metavar`, `type`, `required`); `help=None` leaves the field off the command line."""
    metadata = {"help": help, "group": group, "cli": cli}
    if isinstance(default, (list, tuple)):
        return field(default_factory=lambda: default, metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class HealOptions:
    """How to heal. Token counts are global (over all processes); `batch_size` is per process."""

    teacher: str = option("", help="the source model the student was converted from", group="models",
                          metavar="SOURCE", required=True)  # fmt: skip
    teacher_gguf_file: str | None = option(None, help="GGUF file name inside the teacher folder", group="models",
                                           metavar="NAME")  # fmt: skip
    teacher_dtype: str = option(
        "float32", choices=TEACHER_DTYPES, group="models",
        help="dtype of the frozen teacher (bfloat16: faster where bf16 matmuls are, targets slightly rounded)",
    )  # fmt: skip
    any_teacher: bool = option(
        False, group="models",
        help="distill from a teacher that is not the student's source (refused without this flag)",
    )  # fmt: skip
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
    eval_tokens: int = option(8192, help="held-out tokens", group="data", metavar="N")
    eval_seq_len: int | None = option(None, help="held-out sequence length (if unset: --seq-len)", group="data",
                                      metavar="L", type=int)  # fmt: skip
    eval_batch_size: int | None = option(None, help="held-out sequences per forward pass (if unset: --batch-size)",
                                         group="data", metavar="B", type=int)  # fmt: skip
    eval_precision: str = option(
        "float32", choices=EVAL_PRECISIONS, group="data",
        help="float32: evaluate without autocast against a float32 teacher (a second copy if --teacher-dtype is "
        "bfloat16); training: in the training precision",
    )  # fmt: skip
    max_tokens: int = option(100_000, help="training tokens", metavar="N")
    seq_len: int = option(512, help="tokens per sequence", metavar="L")
    batch_size: int = option(4, help="sequences per process and micro-step", metavar="B")
    grad_accum: int = option(1, help="micro-steps per optimizer step", metavar="K")
    lr: float = option(5e-5, help="peak learning rate (AdamW)")
    warmup_steps: int | None = option(None, help="linear warmup (if unset: 10% of the steps, 1 to 100)", metavar="N",
                                      type=int)  # fmt: skip
    schedule: str = option("cosine", help="after warmup", choices=SCHEDULES)
    weight_decay: float = option(0.0, help="AdamW", metavar="WD")
    max_grad_norm: float | None = option(1.0, help="gradient clipping (0: none)", metavar="N", type=float)
    train: str = option("attention", choices=TRAIN_CHOICES,
                        help="attention: only the MLA projections (cheapest, least damage); all: every weight")
    kl_weight: float = option(
        1.0, metavar="W",
        help="loss = W * KL(teacher || student) + (1 - W) * next-token cross-entropy; 1 is pure KL",
    )  # fmt: skip
    mixed_precision: str = option("no", choices=MIXED_PRECISION_CHOICES,
                                  help="autocast of the student (and teacher) forward, by accelerate")  # fmt: skip
    seed: int = option(0, help="seeds torch, numpy and random")
    eval_every: int = option(25, help="optimizer steps (0: start and end)", group="checkpoints", metavar="N")
    # Also evaluate at the first step that reaches each of these token counts (the healing bench's points).
    eval_at_tokens: tuple[int, ...] = option(())
    save_every: int = option(20, help="optimizer steps (0: never)", group="checkpoints", metavar="N")
    checkpoint_dir: str | None = option(None, help="if unset: OUTPUT.checkpoints beside OUTPUT", group="checkpoints",
                                        metavar="DIR")  # fmt: skip
    resume: bool = option(False, help="continue from the latest checkpoint", group="checkpoints")
    keep_checkpoints: bool = option(False, help="keep checkpoints after success", group="checkpoints")
    overwrite: bool = option(
        False, group="checkpoints",
        help="replace OUTPUT if it is an mla-convert output or empty, and discard checkpoints of an earlier run",
    )  # fmt: skip
    force: bool = option(False, help="with --overwrite: replace OUTPUT whatever it holds", group="checkpoints")
    progress: bool = option(True)  # the command line's --no-progress
    # Stop once this many optimizer steps are done, without writing the final model (a planned "kill", for tests).
    stop_after_steps: int | None = option(None)


GROUPS = {"models": None, "data": "data", "training": "training", "checkpoints": "evaluation and checkpoints"}


def add_heal_arguments(parser: argparse.ArgumentParser) -> None:
    """The `heal` verb's arguments: MLA_FOLDER OUTPUT, then one flag per documented `HealOptions` field."""
    parser.add_argument("student", metavar="MLA_FOLDER", help="converted MLA folder to heal")
    parser.add_argument("output", metavar="OUTPUT", help="folder to write the healed model to (atomically)")
    groups = {key: parser.add_argument_group(title) if title else parser for key, title in GROUPS.items()}
    for f in fields(HealOptions):
        if f.metadata["help"] is None:
            continue
        flag = "--" + f.name.replace("_", "-")
        keywords = {"help": f.metadata["help"].replace("%", "%%"), **f.metadata["cli"]}
        if isinstance(f.default, bool):
            keywords["action"] = "store_true"
        else:
            keywords.setdefault("type", type(f.default) if f.default is not None else str)
            keywords["default"] = None if keywords.get("required") else f.default
        groups[f.metadata["group"]].add_argument(flag, **keywords)
    groups["checkpoints"].add_argument("--no-progress", action="store_true", help="no progress bar")


def options_from_args(args: argparse.Namespace) -> HealOptions:
    values = {f.name: getattr(args, f.name) for f in fields(HealOptions) if hasattr(args, f.name)}
    return HealOptions(**values, progress=not getattr(args, "no_progress", False))


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_options(options: HealOptions) -> None:
    """Refuses bad options with the valid range, naming the flags of `heal`, before anything is loaded."""
    if not options.teacher:
        raise MLAConvertError("--teacher is required: the source model the student was converted from")
    if not options.data:
        raise MLAConvertError("--data is required: the training text (its first 80% is used)")
    for f in fields(HealOptions):
        choices = f.metadata["cli"].get("choices")
        value = getattr(options, f.name)
        if choices and value not in choices:
            raise MLAConvertError(f"{_flag(f.name)} must be one of {', '.join(choices)}, got {value!r}")
    required = {"max_tokens": 1, "batch_size": 1, "grad_accum": 1, "eval_tokens": 1, "seq_len": 2}
    optional = {"eval_seq_len": 2, "eval_batch_size": 1}  # None: the training value
    for name, low in {**required, **optional}.items():
        value = getattr(options, name)
        if (value is not None or name in required) and not (value is not None and value >= low):
            raise MLAConvertError(f"{_flag(name)} must be at least {low}, got {value}")
    eval_seq_len = options.eval_seq_len or options.seq_len
    if options.eval_tokens < eval_seq_len:
        which = "--eval-seq-len" if options.eval_seq_len else "--seq-len (the held-out sequence length by default)"
        raise MLAConvertError(
            f"--eval-tokens ({options.eval_tokens}) must be at least {which} ({eval_seq_len}): one held-out sequence"
        )
    if not options.lr > 0 or math.isinf(options.lr):
        raise MLAConvertError(f"--lr must be a positive number, got {options.lr}")
    if not 0.0 <= options.kl_weight <= 1.0:
        raise MLAConvertError(f"--kl-weight must be in [0, 1], got {options.kl_weight}")
    for name in ("eval_every", "save_every", "weight_decay", "warmup_steps", "max_grad_norm"):
        value = getattr(options, name)
        if value is not None and not value >= 0:
            raise MLAConvertError(f"{_flag(name)} must not be negative, got {value}")
    if options.force and not options.overwrite:
        raise MLAConvertError("--force only widens --overwrite: pass both to replace a folder that is not ours")
