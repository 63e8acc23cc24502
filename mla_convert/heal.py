"""Healing: a short distillation fine-tune of a converted MLA model from its source, run by accelerate.

    mla-convert heal ./smollm2-mla ./smollm2-healed --teacher ./SmolLM2-135M --data ../shared/data/wikitext2_valid.txt
    accelerate launch --multi_gpu --num_processes 2 -m mla_convert.heal MLA_FOLDER OUTPUT --teacher ... --data ...

The loss on every predicted position is `kl_weight * KL(teacher || student) + (1 - kl_weight) * CE(next token)`,
both averaged over positions. The teacher is frozen, in eval mode, and runs on the fly; its logits are never stored
beyond the batch. Training text comes from the first 80% of `data` (`data.CALIBRATION_PART`), evaluation text from
the last 20% of `eval_data` (`data.EVALUATION_PART`; `eval_data` defaults to `data`), so the two never overlap.

Data is streamed record by record (a .txt file chunk by chunk) and packed into fixed-length windows, in one
deterministic order. Every process reads the same stream and takes its own slice of each global batch, so the
result does not depend on the number of processes (for the same global batch), and a checkpoint only has to
remember where in the stream the next window starts.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import logging
import math
import os
import shutil
import sys
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch

from .data import (
    CALIBRATION_PART,
    EVALUATION_PART,
    RECORD_SEPARATOR,
    TEXT_SUFFIXES,
    TOKENIZE_CHUNK_CHARS,
    TextPart,
    _line_boundary,
    _looks_like_local_path,
    _parse_hub_spec,
    load_text,
    tokenize_into_sequences,
)
from .errors import MLAConvertError


logger = logging.getLogger(__name__)

# `model_type` of converted checkpoints (`mla_modeling.MLAConfig`).
MLA_MODEL_TYPE = "mla"
TRAIN_CHOICES = ("attention", "all")
MIXED_PRECISION_CHOICES = ("no", "bf16", "fp16")
TEACHER_DTYPES = ("float32", "bfloat16")
SCHEDULES = ("cosine", "constant")
EVAL_PRECISIONS = ("float32", "training")
# The MLA projections inside `model.layers[i].self_attn`: what `train="attention"` fine-tunes.
ATTENTION_PROJECTIONS = ("q_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj")

STATE_FILE = "heal_state.json"
TRAINABLE_FILE = "trainable.safetensors"
CHECKPOINT_PREFIX = "step-"
PARTIAL_SUFFIX = ".partial"
REPORT_FILE = "healing.json"
PLOT_FILE = "healing.png"
# Copied from the student folder into the healed one, beside the weights.
CONVERSION_REPORT = "conversion.json"
# Cosine decay ends at this fraction of the peak learning rate.
MIN_LR_RATIO = 0.1
# Logits turned into loss and gradient at a time: 4 MB float32 temporaries, which stay in cache.
LOSS_CHUNK_ELEMENTS = 1 << 20
# Settings that decide the training trajectory: a resumed run must use the same ones.
TRAJECTORY_SETTINGS = (
    "student",
    "teacher",
    "teacher_gguf_file",
    "teacher_dtype",
    "data",
    "text_column",
    "max_tokens",
    "seq_len",
    "global_batch",
    "grad_accum",
    "lr",
    "warmup_steps",
    "schedule",
    "weight_decay",
    "max_grad_norm",
    "train",
    "kl_weight",
    "mixed_precision",
    "seed",
)


@dataclass
class HealOptions:
    """How to heal. Token counts are global (over all processes); `batch_size` is per process."""

    teacher: str = ""
    data: str = ""
    teacher_gguf_file: str | None = None
    text_column: str = "text"
    eval_data: str | None = None  # default: `data` (its last 20%)
    max_tokens: int = 100_000
    seq_len: int = 512
    batch_size: int = 4
    grad_accum: int = 1
    # Gentle by default: a refined conversion starts close to its source, and on SmolLM2 lr 2e-4 with 10% CE pulled
    # it away (held-out KL 0.15 -> 0.44 -> 0.30 at 0.5) where 5e-5 with pure KL went 0.15 -> 0.12 (README, Healing).
    # The lr did that: 5e-5 with 10% CE ends at KL 0.13 (and perplexity below the source's, by fitting the data).
    lr: float = 5e-5
    warmup_steps: int | None = None  # default: 10% of the optimizer steps (at least 1, at most 100)
    schedule: str = "cosine"
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0  # 0 or None: no clipping
    train: str = "attention"
    kl_weight: float = 1.0
    mixed_precision: str = "no"
    teacher_dtype: str = "float32"
    # float32: evaluate without autocast, against a float32 teacher (an extra copy when teacher_dtype is bfloat16);
    # training: evaluate in the training precision, with the training teacher.
    eval_precision: str = "float32"
    seed: int = 0
    eval_every: int = 25  # optimizer steps; 0: only before and after training
    eval_at_tokens: tuple[int, ...] = ()  # also evaluate at the first step that reaches each of these token counts
    eval_tokens: int = 8192
    eval_seq_len: int | None = None  # default: seq_len
    eval_batch_size: int | None = None  # default: batch_size
    save_every: int = 20  # optimizer steps; 0: no checkpoints
    checkpoint_dir: str | None = None  # default: OUTPUT.checkpoints beside OUTPUT
    resume: bool = False
    keep_checkpoints: bool = False
    overwrite: bool = False
    progress: bool = True
    # Stop once this many optimizer steps are done, without writing the final model (a planned "kill").
    stop_after_steps: int | None = None


# ---------------------------------------------------------------------------------------------------- text stream


def _chunk_stream(blocks: Iterator[str], chunk_chars: int = TOKENIZE_CHUNK_CHARS) -> Iterator[str]:
    """Re-cut a stream of text blocks into pieces of at most `chunk_chars`, cut after a newline (or a space) where
    possible. Gives the same pieces as `data._text_chunks` would on the whole text, holding only a block or two."""
    buffer = ""
    for block in blocks:
        buffer += block
        while len(buffer) > chunk_chars:
            cut = buffer.rfind("\n", 0, chunk_chars)
            if cut <= 0:
                cut = buffer.rfind(" ", 0, chunk_chars)
            cut = cut + 1 if cut > 0 else chunk_chars
            yield buffer[:cut]
            buffer = buffer[cut:]
    if buffer:
        yield buffer


def _read_blocks(path: Path, block_chars: int = 1 << 20) -> Iterator[str]:
    """Characters of a UTF-8 text file in blocks, newlines translated as `Path.read_text` does."""
    try:
        with open(path, encoding="utf-8") as f:
            while block := f.read(block_chars):
                yield block
    except (OSError, UnicodeDecodeError) as e:
        raise MLAConvertError(f"cannot read {path}: {e}") from e


def _text_file_range(path: Path, part: TextPart) -> tuple[int, int]:
    """Character offsets of `part` of a text file, cut exactly where `data.load_text` cuts it, in two streaming
    passes (one to count, one to find the line starts nearest to the targets)."""
    total = sum(len(block) for block in _read_blocks(path))
    bounds = []
    for fraction in (part.start, part.end):
        if fraction <= 0.0 or fraction >= 1.0:
            bounds.append(0 if fraction <= 0.0 else total)
            continue
        target = round(fraction * total)
        before = after = -1
        position = 0
        for block in _read_blocks(path):
            if position < target:
                i = block.rfind("\n", 0, target - position)
                if i != -1:
                    before = position + i
            if position + len(block) > target:
                j = block.find("\n", max(0, target - position))
                if j != -1:
                    after = position + j
                    break
            position += len(block)
        candidates = [i + 1 for i in (before, after) if i != -1]
        bounds.append(min(candidates, key=lambda i: (abs(i - target), i)) if candidates else target)
    return bounds[0], bounds[1]


def _text_file_chunks(path: Path, start: int, end: int) -> Iterator[str]:
    """Pieces of characters `start:end` of a text file, read lazily."""

    def blocks() -> Iterator[str]:
        position = 0
        for block in _read_blocks(path):
            lo, hi = max(start - position, 0), min(end - position, len(block))
            position += len(block)
            if lo < hi:
                yield block[lo:hi]
            if position >= end:
                return

    return _chunk_stream(blocks())


def _record_text(record, column: str, where: str) -> str:
    if not isinstance(record, dict):
        raise MLAConvertError(f"{where}: every record must be a JSON object with a {column!r} field")
    value = record.get(column)
    return "" if value is None else str(value)


class TextStream:
    """One part of a text source as an ordered sequence of records, each an iterator over text pieces.

    `records(start)` yields the records from index `start` of the part on; a blank record yields no pieces.
    """

    description: str = ""

    def records(self, start: int) -> Iterator[Iterator[str]]:
        raise NotImplementedError


class _SingleTextStream(TextStream):
    """A source that is one text (a .txt file, or a file with a single record): cut by characters at line starts."""

    def __init__(self, path: Path, part: TextPart, text: str | None = None, name: str | None = None):
        self.path, self.text = path, text
        if text is None:
            self.start, self.end = _text_file_range(path, part)
        else:
            self.start, self.end = _line_boundary(text, part.start), _line_boundary(text, part.end)
        self.description = f"{name or path.name}, {part.describe()} (chars {self.start}-{self.end})"

    def records(self, start: int) -> Iterator[Iterator[str]]:
        if start == 0:
            if self.text is None:
                yield _text_file_chunks(self.path, self.start, self.end)
            else:
                yield _chunk_stream(iter([self.text[self.start : self.end]]))


class _LocalRecordStream(TextStream):
    """Records of local files (rows of .jsonl/.json/.parquet files, whole .txt files), read lazily in path order."""

    def __init__(self, path: Path, files: list[Path], counts: list[int], part: TextPart, column: str):
        self.files, self.counts, self.column = files, counts, column
        total = sum(counts)
        self.first, self.last = round(part.start * total), round(part.end * total)
        self.description = f"{path.name}, {part.describe()} (records {self.first}-{self.last} of {total})"

    def _file_records(self, path: Path, skip: int) -> Iterator[Iterator[str]]:
        suffix = path.suffix.lower()
        if suffix == ".txt":
            yield _chunk_stream(_read_blocks(path))
        elif suffix == ".jsonl":
            try:
                with open(path, encoding="utf-8") as f:
                    lines = (line for line in f if line.strip())
                    for line in itertools.islice(lines, skip, None):
                        text = _record_text(json.loads(line), self.column, str(path))
                        yield _chunk_stream(iter([text])) if text.strip() else iter(())
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
                raise MLAConvertError(f"cannot read {path}: {e}") from e
        elif suffix == ".json":
            from .data import _read_json_records  # a JSON document can only be read whole

            for record in _read_json_records(path)[skip:]:
                text = _record_text(record, self.column, str(path))
                yield _chunk_stream(iter([text])) if text.strip() else iter(())
        else:  # .parquet
            import pyarrow.parquet as pq

            try:
                batches = pq.ParquetFile(path).iter_batches(batch_size=1024, columns=[self.column])
                values = (value for batch in batches for value in batch.column(0).to_pylist())
                for value in itertools.islice(values, skip, None):
                    text = "" if value is None else str(value)
                    yield _chunk_stream(iter([text])) if text.strip() else iter(())
            except (OSError, ValueError) as e:
                raise MLAConvertError(f"cannot read {path}: {e}") from e

    def records(self, start: int) -> Iterator[Iterator[str]]:
        index = self.first + start  # global record index
        offset = 0
        for path, count in zip(self.files, self.counts):
            if index >= self.last:
                return
            if index >= offset + count:
                offset += count
                continue
            for record in self._file_records(path, index - offset):
                if index >= self.last:
                    return
                yield record
                index += 1
            offset += count


class _HubStream(TextStream):
    """Records of a `datasets` hub dataset `NAME[:CONFIG][@SPLIT]`, streamed."""

    def __init__(self, spec: str, part: TextPart, column: str):
        import datasets  # slow to import; only hub sources need it

        name, config, split = _parse_hub_spec(spec)
        self.spec, self.column = spec, column
        try:
            self.dataset = datasets.load_dataset(name, config, split=split, streaming=True)
        except (OSError, ValueError, ConnectionError) as e:
            raise MLAConvertError(f"cannot load dataset {spec!r} (split {split!r}): {e}") from e
        split_info = (self.dataset.info.splits or {}).get(split)
        total = getattr(split_info, "num_examples", None)
        if not total:
            raise MLAConvertError(
                f"dataset {spec!r} does not state how many records its {split!r} split has, so its "
                f"{part.describe()} cannot be located while streaming: use a local file or folder instead"
            )
        self.first, self.last = round(part.start * total), round(part.end * total)
        where = f"{spec}@{split}" if "@" not in spec else spec
        self.description = f"{where}, {part.describe()} (records {self.first}-{self.last} of {total})"

    def records(self, start: int) -> Iterator[Iterator[str]]:
        first = self.first + start
        if first >= self.last:
            return
        try:
            for record in self.dataset.skip(first).take(self.last - first):
                if self.column not in record:
                    raise MLAConvertError(
                        f"dataset {self.spec!r} has no {self.column!r} column; available columns: {sorted(record)}"
                    )
                text = record[self.column] or ""
                yield _chunk_stream(iter([str(text)])) if str(text).strip() else iter(())
        except (OSError, ConnectionError) as e:
            raise MLAConvertError(f"cannot read dataset {self.spec!r}: {e}") from e


def _count_records(path: Path, column: str) -> int:
    """Records in one local file, checking on the first one that the text column exists."""
    suffix = path.suffix.lower()
    if suffix == ".txt":
        return 1
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            parquet = pq.ParquetFile(path)
        except (OSError, ValueError) as e:
            raise MLAConvertError(f"cannot read {path}: {e}") from e
        names = parquet.schema_arrow.names
        if column not in names:
            raise MLAConvertError(f"{path} has no {column!r} column; available columns: {sorted(names)}")
        return parquet.metadata.num_rows
    if suffix == ".json":
        from .data import _column, _read_json_records

        records = _read_json_records(path)
        _column(records, column, str(path))  # the same check and message as data.load_text
        return len(records)
    count, first = 0, None
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    if first is None:
                        first = json.loads(line)
                    count += 1
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise MLAConvertError(f"cannot read {path}: {e}") from e
    if first is not None:
        if not isinstance(first, dict):
            raise MLAConvertError(f"{path}: every record must be a JSON object with a {column!r} field")
        if column not in first:
            raise MLAConvertError(f"{path} has no {column!r} column; available columns: {sorted(first)}")
    return count


def open_text_stream(spec: str, part: TextPart = CALIBRATION_PART, text_column: str = "text") -> TextStream:
    """The records of one part of a text source, to be read lazily: a local .txt/.jsonl/.json/.parquet file, a
    folder of them (in sorted path order), or a `datasets` hub name `NAME[:CONFIG][@SPLIT]` (streamed).

    Parts are cut exactly as `data.load_text` cuts them (by characters at line starts for a single text, by record
    index otherwise), so a stream of `CALIBRATION_PART` never overlaps `load_text(spec, EVALUATION_PART)`.
    """
    spec = os.fspath(spec)
    path = Path(spec).expanduser()
    if not path.exists():
        if _looks_like_local_path(spec):
            raise MLAConvertError(f"text source not found: {spec}")
        return _HubStream(spec, part, text_column)
    if path.is_file():
        if path.suffix.lower() not in TEXT_SUFFIXES:
            raise MLAConvertError(f"unsupported text file {path}: expected one of {', '.join(TEXT_SUFFIXES)}")
        files = [path]
    else:
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES)
        if not files:
            raise MLAConvertError(f"{path} holds no text files ({', '.join(TEXT_SUFFIXES)})")
    counts = [_count_records(f, text_column) for f in files]
    if sum(counts) == 1:
        only = files[counts.index(1)]
        if only.suffix.lower() == ".txt":
            return _SingleTextStream(only, part, name=path.name)
        stream = _LocalRecordStream(path, files, counts, TextPart(0.0, 1.0), text_column)
        record = next(stream.records(0))
        return _SingleTextStream(only, part, text="".join(record), name=path.name)
    return _LocalRecordStream(path, files, counts, part, text_column)


@dataclass
class DataPosition:
    """Where the next window starts: record `record` of the part (in pass `epoch` over it), after its first
    `chunk` pieces, with `buffer` holding tokens already read but not yet in a window."""

    epoch: int = 0
    record: int = 0
    chunk: int = 0
    buffer: list[int] = field(default_factory=list)


class SequencePacker:
    """Packs the tokens of a `TextStream` into windows of `seq_len` tokens, in one fixed order.

    Records are tokenized piece by piece, separated by `data.RECORD_SEPARATOR`. When the part is used up the stream
    starts over (the next epoch). `position()` says where the window after the last one yielded starts; a packer
    built with that position yields exactly the windows that would have followed.
    """

    def __init__(self, stream: TextStream, tokenizer, seq_len: int, position: DataPosition | None = None):
        self.stream, self.tokenizer, self.seq_len = stream, tokenizer, seq_len
        position = position or DataPosition()
        self._epoch, self._record, self._chunk = position.epoch, position.record, position.chunk
        self._buffer, self._offset = list(position.buffer), 0
        self.on_new_epoch: Callable[[int, int], None] | None = None

    def position(self) -> DataPosition:
        return DataPosition(self._epoch, self._record, self._chunk, self._buffer[self._offset :])

    def _tokenize(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]

    def __iter__(self) -> Iterator[list[int]]:
        seq_len = self.seq_len
        while True:
            from_start = self._record == 0 and self._chunk == 0
            text_tokens = windows = 0
            for record in self.stream.records(self._record):
                pieces = itertools.chain(((piece, False) for piece in record), [(RECORD_SEPARATOR, True)])
                for piece, is_separator in itertools.islice(pieces, self._chunk, None):
                    ids = self._tokenize(piece)
                    self._chunk += 1
                    if not is_separator and piece.strip():
                        text_tokens += len(ids)
                    self._buffer.extend(ids)
                    while len(self._buffer) - self._offset >= seq_len:
                        window = self._buffer[self._offset : self._offset + seq_len]
                        self._offset += seq_len
                        windows += 1
                        yield window
                    if self._offset:
                        del self._buffer[: self._offset]
                        self._offset = 0
                self._record += 1
                self._chunk = 0
            if from_start and windows == 0:
                if text_tokens == 0:
                    raise MLAConvertError(f"no text in {self.stream.description}: the training data is empty")
                raise MLAConvertError(
                    f"{self.stream.description} holds {text_tokens} tokens, fewer than one training sequence of "
                    f"{seq_len}: use more text or a smaller --seq-len"
                )
            self._epoch += 1
            self._record = self._chunk = 0
            if self.on_new_epoch is not None:
                self.on_new_epoch(self._epoch, text_tokens)


# ---------------------------------------------------------------------------------------------------- loss


class _DistillationLoss(torch.autograd.Function):
    """`w * KL(p || q) + (1 - w) * CE(q, target)`, averaged over rows, with q = softmax(student logits) and p the
    teacher's distribution. The gradient, `(q - w p - (1 - w) onehot) / rows`, is computed in the forward pass and
    kept as the only saved tensor: no log-softmax is stored, nothing is computed twice. Rows are processed a few
    at a time so that the temporaries stay in cache."""

    @staticmethod
    def forward(ctx, logits, teacher_log_probs, targets, kl_weight: float):
        rows, vocab = logits.shape
        grad = torch.empty(rows, vocab, dtype=torch.float32, device=logits.device)
        kl_sum = torch.zeros((), dtype=torch.float64, device=logits.device)
        ce_sum = torch.zeros((), dtype=torch.float64, device=logits.device)
        chunk = max(1, LOSS_CHUNK_ELEMENTS // vocab)
        for start in range(0, rows, chunk):
            end = min(start + chunk, rows)
            z = logits[start:end].float()
            lse = z.logsumexp(dim=-1, keepdim=True)
            log_p = teacher_log_probs[start:end]
            p = log_p.exp()
            # KL = sum p (log p - log q), with log q = z - lse; one dot product over the chunk
            log_ratio = torch.sub(log_p, z).add_(lse)
            kl_sum += torch.dot(p.view(-1), log_ratio.view(-1)).double()
            del log_ratio
            index = targets[start:end].unsqueeze(1)
            ce_sum += (lse - z.gather(1, index)).sum(dtype=torch.float64)
            g = torch.sub(z, lse, out=grad[start:end]).exp_().sub_(p, alpha=kl_weight)
            g.scatter_add_(1, index, torch.full(index.shape, -(1.0 - kl_weight), dtype=g.dtype, device=g.device))
            g.div_(rows)
        ctx.save_for_backward(grad)
        ctx.logits_dtype = logits.dtype
        kl, ce = kl_sum / rows, ce_sum / rows
        loss = (kl_weight * kl + (1.0 - kl_weight) * ce).to(torch.float32)
        ctx.mark_non_differentiable(kl, ce)
        return loss, kl, ce

    @staticmethod
    def backward(ctx, grad_loss, _grad_kl, _grad_ce):
        (grad,) = ctx.saved_tensors
        return grad.mul_(grad_loss).to(ctx.logits_dtype), None, None, None


def log_softmax_(logits: torch.Tensor) -> torch.Tensor:
    """Float32 log-probabilities over the last dimension, computed in place when `logits` already is float32 (for
    the teacher, whose logits are the largest tensor of the step and are needed no further)."""
    logits = logits.float()
    return logits.sub_(logits.logsumexp(dim=-1, keepdim=True))


def distillation_loss(
    student_logits: torch.Tensor, teacher_log_probs: torch.Tensor, targets: torch.LongTensor, kl_weight: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, KL(teacher || student), CE): all means over positions, `loss = kl_weight * KL + (1 - kl_weight) * CE`.

    Logits and float32 teacher log-probabilities (`log_softmax_`) are `[..., vocab]`, targets `[...]`.
    """
    vocab = student_logits.shape[-1]
    return _DistillationLoss.apply(
        student_logits.reshape(-1, vocab), teacher_log_probs.reshape(-1, vocab), targets.reshape(-1), kl_weight
    )


# ---------------------------------------------------------------------------------------------------- models


def _read_student_config(folder: str) -> dict:
    """The raw config.json of the converted folder, checked to be an MLA one."""
    path = Path(folder)
    config_path = path / "config.json"
    if not path.is_dir() or not config_path.is_file():
        raise MLAConvertError(f"{folder} is not a converted MLA folder (no config.json there)")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise MLAConvertError(f"cannot read {config_path}: {e}") from e
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if model_type != MLA_MODEL_TYPE:
        raise MLAConvertError(
            f"{folder} holds a {model_type!r} model, not a converted MLA one: convert it first with "
            "`mla-convert convert`, and pass the source as --teacher"
        )
    return config


def _load_student_tokenizer(folder: str):
    from transformers import AutoTokenizer

    path = Path(folder)
    if not any((path / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        return None
    try:
        return AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError, KeyError) as e:
        raise MLAConvertError(f"the tokenizer in {folder} could not be read: {e}") from e


def _load_student_model(folder: str):
    """The converted MLA model, in float32 for training."""
    import mla_modeling  # noqa: F401  (registers the MLA classes with the Auto classes)
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    except (OSError, ValueError, SafetensorError, EOFError) as e:
        raise MLAConvertError(f"the MLA checkpoint in {folder} could not be read: {e}") from e


def _vocab_size(model) -> int:
    return model.get_input_embeddings().num_embeddings


def _check_same_tokenizer(student_tokenizer, teacher_tokenizer, student: str, teacher: str) -> None:
    if student_tokenizer is None or teacher_tokenizer is None:
        return
    same = len(student_tokenizer) == len(teacher_tokenizer)
    if not same or student_tokenizer.get_vocab() != teacher_tokenizer.get_vocab():
        raise MLAConvertError(
            f"the teacher {teacher} and the student {student} use different tokenizers ({len(teacher_tokenizer)} "
            f"and {len(student_tokenizer)} tokens, or the same tokens with other ids): distillation needs the "
            "source the student was converted from"
        )


def _select_trainable(model, train: str) -> list[str]:
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


def lr_lambda(total_steps: int, warmup_steps: int, schedule: str) -> Callable[[int], float]:
    """Linear warmup over `warmup_steps`, then constant or a cosine decay to `MIN_LR_RATIO` at `total_steps`."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return MIN_LR_RATIO + (1.0 - MIN_LR_RATIO) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


# ---------------------------------------------------------------------------------------------------- evaluation


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


@torch.no_grad()
def _evaluate(
    accelerator, model, teacher, sequences: torch.LongTensor, batch_size: int, full_precision: bool = False
) -> dict:
    """Held-out perplexity of student and teacher, KL(teacher || student) and top-1 agreement: the same quantities
    as `evaluate.evaluate`, with the sequences shared out over the processes (every process runs the same number of
    forward passes, padding with rows of weight 0, as FSDP requires). `full_precision`: no autocast."""
    world, rank = accelerator.num_processes, accelerator.process_index
    per_process = math.ceil(len(sequences) / world)
    mine = sequences[rank * per_process : (rank + 1) * per_process]
    weights = torch.ones(len(mine), dtype=torch.float64)
    if len(mine) < per_process:
        pad = per_process - len(mine)
        mine = torch.cat([mine, sequences[:1].expand(pad, -1)])
        weights = torch.cat([weights, torch.zeros(pad, dtype=torch.float64)])
    was_training = model.training
    model.eval()
    sums = torch.zeros(5, dtype=torch.float64)  # nll, teacher nll, kl, agreements, tokens
    keep = torch.arange(sequences.shape[1] - 1, device=accelerator.device)

    def precision():  # a fresh context per batch: these context managers are single-use
        return _without_autocast(accelerator, model) if full_precision else accelerator.autocast()

    try:
        for batch, weight in zip(mine.split(batch_size), weights.split(batch_size)):
            batch = batch.to(accelerator.device)
            targets = batch[:, 1:].unsqueeze(-1)
            with precision():
                log_q = model(input_ids=batch, use_cache=False, logits_to_keep=keep).logits.float().log_softmax(-1)
                log_p = teacher(input_ids=batch, use_cache=False, logits_to_keep=keep).logits.float().log_softmax(-1)
            rows = [
                -log_q.gather(-1, targets).squeeze(-1).sum(-1),
                -log_p.gather(-1, targets).squeeze(-1).sum(-1),
                (log_p.exp() * (log_p - log_q)).sum(-1).sum(-1),
                (log_q.argmax(-1) == log_p.argmax(-1)).sum(-1),
                torch.full((len(batch),), targets.shape[1], device=batch.device),
            ]
            del log_q, log_p
            sums += (torch.stack([r.double().cpu() for r in rows], dim=1) * weight[:, None]).sum(0)
    finally:
        model.train(was_training)
    sums = accelerator.reduce(sums.to(accelerator.device), reduction="sum").cpu()
    tokens = sums[4].item()
    nll, teacher_nll = sums[0].item() / tokens, sums[1].item() / tokens
    return {
        "perplexity": math.exp(nll),
        "nll": nll,
        "teacher_perplexity": math.exp(teacher_nll),
        "kl": sums[2].item() / tokens,
        "top1_agreement": sums[3].item() / tokens,
        "tokens": int(tokens),
    }


# ---------------------------------------------------------------------------------------------------- checkpoints


def default_checkpoint_dir(output: str | os.PathLike) -> Path:
    output = Path(output).absolute()
    return output.parent / f"{output.name}.checkpoints"


def _checkpoint_step(path: Path) -> int | None:
    name = path.name
    if not name.startswith(CHECKPOINT_PREFIX) or not (path / STATE_FILE).is_file():
        return None
    try:
        return int(name[len(CHECKPOINT_PREFIX) :])
    except ValueError:
        return None


def complete_checkpoints(checkpoint_dir: Path) -> list[Path]:
    """Checkpoints that were written in full, oldest first (a save cut short is left as a `.partial` folder)."""
    if not checkpoint_dir.is_dir():
        return []
    found = [(step, p) for p in checkpoint_dir.iterdir() if p.is_dir() and (step := _checkpoint_step(p)) is not None]
    return [p for _, p in sorted(found)]


def _save_checkpoint(accelerator, checkpoint_dir: Path, step: int, state: dict) -> None:
    """accelerate's state (trained weights, optimizer, scheduler, RNG) plus our `heal_state.json`, written under a
    `.partial` name and renamed once complete, so a kill during the save leaves the previous checkpoint usable."""
    final = checkpoint_dir / f"{CHECKPOINT_PREFIX}{step:08d}"
    partial = final.with_name(final.name + PARTIAL_SUFFIX)
    if accelerator.is_main_process:
        checkpoint_dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(partial, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (partial / STATE_FILE).write_text(json.dumps(state) + "\n")
        if final.exists():
            shutil.rmtree(final)
        os.replace(partial, final)
        for old in complete_checkpoints(checkpoint_dir):
            if old != final:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def _remove_checkpoints(checkpoint_dir: Path) -> None:
    """Removes our checkpoints (and the folder, if nothing else is in it): never anything else a user put there."""
    if not checkpoint_dir.is_dir():
        return
    for path in checkpoint_dir.iterdir():
        if path.is_dir() and path.name.startswith(CHECKPOINT_PREFIX):
            shutil.rmtree(path, ignore_errors=True)
    with contextlib.suppress(OSError):
        checkpoint_dir.rmdir()


def _register_weight_hooks(accelerator, model, trainable: list[str]) -> None:
    """Checkpoints hold only the trained parameters (a tenth of the model for attention-only healing), by name of
    the unwrapped model, so a checkpoint resumes under any number of processes. Not under FSDP/DeepSpeed, whose
    own sharded formats accelerate writes."""
    from accelerate.utils import DistributedType
    from safetensors.torch import load_file, save_file

    if accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        return
    unwrapped = accelerator.unwrap_model(model)

    def ours(candidate) -> bool:  # accelerate keeps the model it was given, not the DDP wrapper it returned
        return accelerator.unwrap_model(candidate) is unwrapped

    def save_hook(models, weights, output_dir):
        if accelerator.is_main_process:
            parameters = dict(unwrapped.named_parameters())
            tensors = OrderedDict((name, parameters[name].detach().cpu().contiguous()) for name in trainable)
            save_file(tensors, os.path.join(output_dir, TRAINABLE_FILE), metadata={"format": "pt"})
        # Leave `models` alone (it is accelerate's own list); without its weights accelerate writes no model file,
        # which would repeat the frozen weights.
        weights.pop(next(i for i, m in enumerate(models) if ours(m)))

    def load_hook(models, input_dir):
        tensors = load_file(os.path.join(input_dir, TRAINABLE_FILE))
        if sorted(tensors) != sorted(trainable):
            raise MLAConvertError(
                f"the checkpoint in {input_dir} holds other parameters than this run trains: was it made with "
                "another --train setting or student?"
            )
        parameters = dict(unwrapped.named_parameters())
        with torch.no_grad():
            for name, tensor in tensors.items():
                parameters[name].copy_(tensor)
        models[:] = [m for m in models if not ours(m)]

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


# ---------------------------------------------------------------------------------------------------- report


def write_plot(report: dict, path: Path) -> bool:
    """Training loss/KL and held-out KL/perplexity against training tokens, as a PNG. False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed: no %s (pip install matplotlib)", path.name)
        return False
    curve, evals = report["curve"], report["eval"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    if curve:
        tokens = [row["tokens"] for row in curve]
        left.plot(tokens, [row["loss"] for row in curve], label="loss")
        left.plot(tokens, [row["kl"] for row in curve], label="KL(teacher || student)")
        left.plot(tokens, [row["ce"] for row in curve], label="next-token CE", alpha=0.6)
    left.set_xlabel("training tokens")
    left.set_title(f"training ({report['data']['train']})", fontsize=9)
    left.legend()
    if evals:
        tokens = [row["tokens_seen"] for row in evals]
        right.plot(tokens, [row["kl"] for row in evals], "o-", color="C1", label="held-out KL")
        right.set_ylabel("KL(teacher || student)")
        right.set_xlabel("training tokens")
        twin = right.twinx()
        twin.plot(tokens, [row["perplexity"] for row in evals], "s--", color="C2", label="student perplexity")
        twin.axhline(evals[0]["teacher_perplexity"], color="gray", linestyle=":", label="teacher perplexity")
        twin.set_ylabel("perplexity")
        lines = right.get_legend_handles_labels()
        more = twin.get_legend_handles_labels()
        right.legend(lines[0] + more[0], lines[1] + more[1])
    right.set_title(f"held out ({report['data']['eval']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


# ---------------------------------------------------------------------------------------------------- heal


def _check_options(options: HealOptions) -> None:
    def positive(name: str, value) -> None:
        if value is None or not value >= 1:
            raise MLAConvertError(f"--{name.replace('_', '-')} must be at least 1, got {value}")

    if not options.teacher:
        raise MLAConvertError("--teacher is required: the source model the student was converted from")
    if not options.data:
        raise MLAConvertError("--data is required: the training text (its first 80% is used)")
    for name in ("max_tokens", "batch_size", "grad_accum", "eval_tokens"):
        positive(name, getattr(options, name))
    for name in ("seq_len", "eval_seq_len"):
        value = getattr(options, name)
        if value is not None and value < 2:
            raise MLAConvertError(f"--{name.replace('_', '-')} must be at least 2, got {value}")
    if options.eval_batch_size is not None:
        positive("eval_batch_size", options.eval_batch_size)
    if not options.lr > 0 or math.isinf(options.lr):
        raise MLAConvertError(f"--lr must be a positive number, got {options.lr}")
    if not 0.0 <= options.kl_weight <= 1.0:
        raise MLAConvertError(f"--kl-weight must be in [0, 1], got {options.kl_weight}")
    if options.train not in TRAIN_CHOICES:
        raise MLAConvertError(f"--train must be one of {', '.join(TRAIN_CHOICES)}, got {options.train!r}")
    if options.mixed_precision not in MIXED_PRECISION_CHOICES:
        raise MLAConvertError(
            f"--mixed-precision must be one of {', '.join(MIXED_PRECISION_CHOICES)}, got {options.mixed_precision!r}"
        )
    if options.teacher_dtype not in TEACHER_DTYPES:
        raise MLAConvertError(
            f"--teacher-dtype must be one of {', '.join(TEACHER_DTYPES)}, got {options.teacher_dtype!r}"
        )
    if options.eval_precision not in EVAL_PRECISIONS:
        raise MLAConvertError(
            f"--eval-precision must be one of {', '.join(EVAL_PRECISIONS)}, got {options.eval_precision!r}"
        )
    if options.schedule not in SCHEDULES:
        raise MLAConvertError(f"--schedule must be one of {', '.join(SCHEDULES)}, got {options.schedule!r}")
    for name in ("eval_every", "save_every", "weight_decay"):
        if getattr(options, name) < 0:
            raise MLAConvertError(f"--{name.replace('_', '-')} must not be negative, got {getattr(options, name)}")
    if options.warmup_steps is not None and options.warmup_steps < 0:
        raise MLAConvertError(f"--warmup-steps must not be negative, got {options.warmup_steps}")
    if options.max_grad_norm is not None and not options.max_grad_norm >= 0:
        raise MLAConvertError(f"--max-grad-norm must not be negative (0: no clipping), got {options.max_grad_norm}")


def _make_accelerator(options: HealOptions):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    if AcceleratorState._shared_state and int(os.environ.get("WORLD_SIZE", "1")) == 1:
        # A single process may heal several times with different settings (accelerate's state is a singleton
        # that refuses a second mixed precision); under a launcher the state is the launcher's and stays.
        AcceleratorState._reset_state(reset_partial_state=True)
    # Without cpu=True accelerate runs every process of a multi-process CPU launch as a lone one.
    cpu = not torch.accelerator.is_available()
    try:
        return Accelerator(cpu=cpu, mixed_precision=options.mixed_precision)
    except ValueError as e:
        raise MLAConvertError(f"accelerate cannot run with --mixed-precision {options.mixed_precision}: {e}") from e


def heal(student: str | os.PathLike, output: str | os.PathLike, options: HealOptions) -> dict:
    """Distill `options.teacher` into the converted MLA model in `student`, and write the healed model to `output`.

    Returns the report also written to `output/healing.json` (with `"stopped": True` and no model written when
    `stop_after_steps` ends the run early). Runs in one process or under `accelerate launch`; every process must
    call it with the same arguments.
    """
    from .convert import check_output, save_atomically
    from .sources import load_source, load_source_config

    _check_options(options)
    student = str(Path(student).absolute())
    output = Path(output).absolute()
    checkpoint_dir = default_checkpoint_dir(output)
    if options.checkpoint_dir:
        checkpoint_dir = Path(options.checkpoint_dir).absolute()
    seq_len = options.seq_len
    eval_seq_len = options.eval_seq_len or seq_len
    eval_data = options.eval_data or options.data
    started = time.perf_counter()

    accelerator = _make_accelerator(options)
    main = accelerator.is_main_process
    world = accelerator.num_processes

    # ---- cheap checks first: nothing is loaded or written before they pass
    check_output(output, options.overwrite)
    existing = complete_checkpoints(checkpoint_dir)
    if options.resume and not existing:
        raise MLAConvertError(
            f"--resume: no checkpoint to resume from in {checkpoint_dir} (checkpoints are written every "
            "--save-every steps; pass --checkpoint-dir if they are elsewhere)"
        )
    if existing and not options.resume and not options.overwrite:
        raise MLAConvertError(
            f"{checkpoint_dir} holds checkpoints of an earlier run (up to {existing[-1].name}): pass --resume to "
            "continue it, or --overwrite to discard them and start over"
        )
    student_config = _read_student_config(student)
    saved_dtype = student_config.get("dtype") or student_config.get("torch_dtype") or "float32"
    teacher_config = load_source_config(options.teacher, options.teacher_gguf_file)
    student_vocab = student_config.get("vocab_size")
    if student_vocab is not None and student_vocab != teacher_config.vocab_size:
        raise MLAConvertError(
            f"the teacher {options.teacher} has a vocabulary of {teacher_config.vocab_size} tokens and the "
            f"student {student} {student_vocab}: distillation needs the source the student was converted from"
        )
    tokenizer = _load_student_tokenizer(student)

    def prepare_data(tokenizer):
        stream = open_text_stream(options.data, CALIBRATION_PART, options.text_column)
        next(iter(SequencePacker(stream, tokenizer, seq_len)))  # empty or too short: fail now
        eval_text, eval_description = load_text(
            eval_data, EVALUATION_PART, options.text_column, max_chars=max(options.eval_tokens * 32, 1 << 16)
        )
        eval_sequences = tokenize_into_sequences(tokenizer, eval_text, eval_seq_len, options.eval_tokens)
        return stream, eval_description, eval_sequences

    # ---- data (before the models, so that bad data fails fast), then the models
    if tokenizer is not None:
        stream, eval_description, eval_sequences = prepare_data(tokenizer)
    model = _load_student_model(student)
    teacher, teacher_tokenizer = load_source(
        options.teacher,
        options.teacher_gguf_file,
        dtype=getattr(torch, options.teacher_dtype),
        device="cpu",
    )
    if _vocab_size(teacher) != _vocab_size(model):
        raise MLAConvertError(
            f"the teacher {options.teacher} has a vocabulary of {_vocab_size(teacher)} tokens and the student "
            f"{student} {_vocab_size(model)}: distillation needs the source the student was converted from"
        )
    _check_same_tokenizer(tokenizer, teacher_tokenizer, student, options.teacher)
    if tokenizer is None:
        tokenizer = teacher_tokenizer
        if tokenizer is None:
            raise MLAConvertError(f"neither {student} nor the teacher {options.teacher} has a tokenizer")
        stream, eval_description, eval_sequences = prepare_data(tokenizer)

    # ---- trajectory
    global_batch = options.batch_size * world
    tokens_per_step = seq_len * global_batch * options.grad_accum
    total_steps = max(1, math.ceil(options.max_tokens / tokens_per_step))
    warmup = options.warmup_steps if options.warmup_steps is not None else min(100, max(1, round(total_steps / 10)))
    settings = {
        "student": student,
        "teacher": str(options.teacher),
        "teacher_gguf_file": options.teacher_gguf_file,
        "teacher_dtype": options.teacher_dtype,
        "data": str(options.data),
        "text_column": options.text_column,
        "max_tokens": options.max_tokens,
        "seq_len": seq_len,
        "global_batch": global_batch,
        "batch_size": options.batch_size,
        "grad_accum": options.grad_accum,
        "lr": options.lr,
        "warmup_steps": warmup,
        "schedule": options.schedule,
        "weight_decay": options.weight_decay,
        "max_grad_norm": options.max_grad_norm,
        "train": options.train,
        "kl_weight": options.kl_weight,
        "mixed_precision": options.mixed_precision,
        "seed": options.seed,
        "eval_data": str(eval_data),
        "eval_precision": options.eval_precision,
        "eval_tokens": int(eval_sequences.numel()),
        "eval_seq_len": eval_seq_len,
        "num_processes": world,
        "tokens_per_step": tokens_per_step,
        "total_steps": total_steps,
    }

    # ---- training objects
    from accelerate.utils import set_seed

    set_seed(options.seed)
    trainable = _select_trainable(model, options.train)
    model.config.use_cache = False
    model.train()
    teacher.eval().requires_grad_(False)
    full_precision_eval = options.eval_precision == "float32"
    eval_teacher = teacher
    if full_precision_eval and teacher.dtype != torch.float32:
        eval_teacher = load_source(options.teacher, options.teacher_gguf_file, dtype=torch.float32)[0]
        eval_teacher.eval().requires_grad_(False).to(accelerator.device)
    teacher.to(accelerator.device)
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=options.lr, betas=(0.9, 0.95), weight_decay=options.weight_decay)
    # Not passed to prepare(): accelerate would step it once per process. Registered for save_state instead.
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(total_steps, warmup, options.schedule))
    model, optimizer = accelerator.prepare(model, optimizer)
    accelerator.register_for_checkpointing(scheduler)
    _register_weight_hooks(accelerator, model, trainable)
    trained_parameters = [p for p in model.parameters() if p.requires_grad]

    # ---- resume
    step, position = 0, DataPosition()
    curve: list[dict] = []
    evals: list[dict] = []
    train_seconds = 0.0
    runs: list[dict] = []
    if options.overwrite and existing and not options.resume:
        accelerator.wait_for_everyone()
        if main:
            _remove_checkpoints(checkpoint_dir)
        accelerator.wait_for_everyone()
    elif options.resume:
        latest = existing[-1]
        state = json.loads((latest / STATE_FILE).read_text())
        changed = [
            f"{key} ({state['settings'].get(key)!r} -> {settings[key]!r})"
            for key in TRAJECTORY_SETTINGS
            if state["settings"].get(key) != settings[key]
        ]
        if changed:
            raise MLAConvertError(
                f"--resume: the checkpoint {latest} was made with other settings: {', '.join(changed)}; resume "
                "with the same ones (the batch size per process may change with the number of processes)"
            )
        accelerator.load_state(str(latest))
        step, position = state["step"], DataPosition(**state["position"])
        curve, evals, train_seconds, runs = state["curve"], state["eval"], state["train_seconds"], state["runs"]
        if main:
            logger.warning("resuming from %s (step %d of %d)", latest, step, total_steps)
    runs.append({"start_step": step, "num_processes": world, "batch_size": options.batch_size})

    packer = SequencePacker(stream, tokenizer, seq_len, position)

    def announce_epoch(epoch: int, tokens: int) -> None:
        if main:
            logger.warning(
                "read all of %s (%d tokens); starting over from its beginning (pass %d)",
                stream.description,
                tokens,
                epoch + 1,
            )

    packer.on_new_epoch = announce_epoch
    windows = iter(packer)
    eval_batch_size = options.eval_batch_size or options.batch_size
    eval_thresholds = sorted(set(options.eval_at_tokens))

    def run_eval() -> None:
        if evals and evals[-1]["step"] == step:
            return
        result = _evaluate(accelerator, model, eval_teacher, eval_sequences, eval_batch_size, full_precision_eval)
        evals.append({"step": step, "tokens_seen": step * tokens_per_step, **result})
        if main:
            logger.info("step %d: held-out %s", step, result)

    def eval_due() -> bool:
        if options.eval_every and step % options.eval_every == 0:
            return True
        tokens = step * tokens_per_step
        return any(tokens - tokens_per_step < t <= tokens for t in eval_thresholds)

    if step == 0:
        run_eval()

    keep = torch.arange(seq_len - 1, device=accelerator.device)
    rank, batch_size = accelerator.process_index, options.batch_size
    stopped = False
    from tqdm.auto import tqdm

    bar = tqdm(
        total=total_steps * tokens_per_step,
        initial=step * tokens_per_step,
        unit="tok",
        unit_scale=True,
        desc="healing",
        disable=not (main and options.progress),
    )
    run_tokens, run_seconds = 0, 0.0
    with bar:
        while step < total_steps:
            if options.stop_after_steps is not None and step >= options.stop_after_steps:
                stopped = True
                break
            step_started = time.perf_counter()
            sums = torch.zeros(3, dtype=torch.float64, device=accelerator.device)
            for micro in range(options.grad_accum):
                rows = [next(windows) for _ in range(global_batch)]
                batch = torch.tensor(rows[rank * batch_size : (rank + 1) * batch_size], device=accelerator.device)
                with torch.inference_mode(), accelerator.autocast():
                    teacher_log_probs = log_softmax_(
                        teacher(input_ids=batch, use_cache=False, logits_to_keep=keep).logits
                    )
                sync = micro == options.grad_accum - 1
                with contextlib.nullcontext() if sync else accelerator.no_sync(model):
                    logits = model(input_ids=batch, use_cache=False, logits_to_keep=keep).logits
                    loss, kl, ce = distillation_loss(logits, teacher_log_probs, batch[:, 1:], options.kl_weight)
                    del logits, teacher_log_probs
                    accelerator.backward(loss / options.grad_accum)
                sums += torch.stack([loss.detach().double(), kl, ce]) / options.grad_accum
            grad_norm = None
            if options.max_grad_norm:
                grad_norm = accelerator.clip_grad_norm_(trained_parameters, options.max_grad_norm)
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            loss_value, kl_value, ce_value = accelerator.reduce(sums, reduction="mean").tolist()
            seconds = time.perf_counter() - step_started
            run_tokens += tokens_per_step
            run_seconds += seconds
            train_seconds += seconds
            curve.append(
                {
                    "step": step,
                    "tokens": step * tokens_per_step,
                    "loss": loss_value,
                    "kl": kl_value,
                    "ce": ce_value,
                    "lr": lr,
                    "grad_norm": None if grad_norm is None else float(grad_norm),
                }
            )
            bar.update(tokens_per_step)
            bar.set_postfix(loss=f"{loss_value:.4f}", kl=f"{kl_value:.4f}", refresh=False)
            if not math.isfinite(loss_value):
                raise RuntimeError(f"the loss became {loss_value} at step {step}: lower --lr")
            if step == total_steps or eval_due():
                run_eval()
            if options.save_every and step % options.save_every == 0 and step < total_steps:
                state = {
                    "step": step,
                    "tokens_seen": step * tokens_per_step,
                    "position": asdict(packer.position()),
                    "settings": settings,
                    "curve": curve,
                    "eval": evals,
                    "train_seconds": train_seconds,
                    "runs": runs,
                }
                _save_checkpoint(accelerator, checkpoint_dir, step, state)
    runs[-1].update(end_step=step, tokens=run_tokens, train_seconds=run_seconds)

    report = {
        "student": student,
        "teacher": str(options.teacher),
        "data": {
            "train": stream.description,
            "eval": f"{eval_description}, {eval_sequences.shape[0]} sequences of {eval_seq_len} tokens",
            "text_column": options.text_column,
            "train_passes": packer.position().epoch + 1,
        },
        "loss": f"{options.kl_weight} * KL(teacher || student) + {1 - options.kl_weight:g} * next-token CE",
        "settings": settings,
        "trained_parameters": int(sum(p.numel() for p in trained_parameters)),
        "tokens_seen": step * tokens_per_step,
        "optimizer_steps": step,
        "stopped": stopped,
        "train_seconds": train_seconds,
        "tokens_per_second": (step * tokens_per_step) / train_seconds if train_seconds else None,
        "runs": runs,
        "curve": curve,
        "eval": evals,
        "seconds": None,
    }
    if stopped:
        accelerator.wait_for_everyone()
        return report

    # ---- the healed model, written atomically
    state_dict = accelerator.get_state_dict(model)
    accelerator.wait_for_everyone()
    if main:
        unwrapped = accelerator.unwrap_model(model)
        dtype = getattr(torch, saved_dtype, torch.float32) if isinstance(saved_dtype, str) else torch.float32
        unwrapped.config.use_cache = True
        unwrapped.config.dtype = dtype
        state_dict = {key: value.to(dtype) for key, value in state_dict.items()}
        type(unwrapped.config).register_for_auto_class()
        type(unwrapped).register_for_auto_class("AutoModelForCausalLM")
        report["seconds"] = round(time.perf_counter() - started, 1)

        def write(folder: Path) -> None:
            unwrapped.save_pretrained(folder, state_dict=state_dict)
            tokenizer.save_pretrained(folder)
            conversion = Path(student) / CONVERSION_REPORT
            if conversion.is_file():
                shutil.copy2(conversion, folder / CONVERSION_REPORT)
            (folder / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
            write_plot(report, folder / PLOT_FILE)

        save_atomically(output, write)
        if not options.keep_checkpoints:
            _remove_checkpoints(checkpoint_dir)
    accelerator.wait_for_everyone()
    return report


# ---------------------------------------------------------------------------------------------------- CLI


def add_heal_arguments(parser: argparse.ArgumentParser) -> None:
    """The `heal` subcommand's arguments (MLA_FOLDER OUTPUT and options)."""
    defaults = HealOptions()
    parser.add_argument("student", metavar="MLA_FOLDER", help="converted MLA folder to heal")
    parser.add_argument("output", metavar="OUTPUT", help="folder to write the healed model to (atomically)")
    parser.add_argument("--teacher", required=True, metavar="SOURCE", help="the source model the student came from")
    parser.add_argument("--teacher-gguf-file", metavar="NAME", help="GGUF file name inside the teacher folder")
    parser.add_argument(
        "--teacher-dtype",
        choices=TEACHER_DTYPES,
        default=defaults.teacher_dtype,
        help="dtype of the frozen teacher (bfloat16: faster where bf16 matmuls are, targets slightly rounded)",
    )
    data = parser.add_argument_group("data")
    data.add_argument(
        "--data",
        required=True,
        metavar="DATA",
        help="training text: a .txt/.jsonl/.json/.parquet file or folder, or a datasets hub name "
        "NAME[:CONFIG][@SPLIT] (streamed); its first 80%% is used",
    )
    data.add_argument(
        "--text-column", default=defaults.text_column, metavar="NAME", help="column of records that holds the text"
    )
    data.add_argument(
        "--eval-data",
        metavar="DATA",
        help="held-out text, same forms as --data; its last 20%% is used (if unset: the last 20%% of --data)",
    )
    data.add_argument("--eval-tokens", type=int, default=defaults.eval_tokens, metavar="N", help="held-out tokens")
    data.add_argument("--eval-seq-len", type=int, metavar="L", help="held-out sequence length (if unset: --seq-len)")
    data.add_argument(
        "--eval-precision",
        choices=EVAL_PRECISIONS,
        default=defaults.eval_precision,
        help="float32: evaluate without autocast against a float32 teacher (a second copy if --teacher-dtype is "
        "bfloat16); training: in the training precision",
    )
    training = parser.add_argument_group("training")
    training.add_argument("--max-tokens", type=int, default=defaults.max_tokens, metavar="N", help="training tokens")
    training.add_argument("--seq-len", type=int, default=defaults.seq_len, metavar="L", help="tokens per sequence")
    training.add_argument(
        "--batch-size", type=int, default=defaults.batch_size, metavar="B", help="sequences per process and micro-step"
    )
    training.add_argument(
        "--grad-accum", type=int, default=defaults.grad_accum, metavar="K", help="micro-steps per optimizer step"
    )
    training.add_argument("--lr", type=float, default=defaults.lr, help="peak learning rate (AdamW)")
    training.add_argument(
        "--warmup-steps", type=int, metavar="N", help="linear warmup (if unset: 10%% of the steps, 1 to 100)"
    )
    training.add_argument("--schedule", choices=SCHEDULES, default=defaults.schedule, help="after warmup")
    training.add_argument("--weight-decay", type=float, default=defaults.weight_decay, metavar="WD", help="AdamW")
    training.add_argument(
        "--max-grad-norm", type=float, default=defaults.max_grad_norm, metavar="N", help="gradient clipping (0: none)"
    )
    training.add_argument(
        "--train",
        choices=TRAIN_CHOICES,
        default=defaults.train,
        help="attention: only the MLA projections (cheapest, least damage); all: every weight",
    )
    training.add_argument(
        "--kl-weight",
        type=float,
        default=defaults.kl_weight,
        metavar="W",
        help="loss = W * KL(teacher || student) + (1 - W) * next-token cross-entropy",
    )
    training.add_argument(
        "--mixed-precision",
        choices=MIXED_PRECISION_CHOICES,
        default=defaults.mixed_precision,
        help="autocast of the student (and teacher) forward, by accelerate",
    )
    training.add_argument("--seed", type=int, default=defaults.seed, help="seeds torch, numpy and random")
    progress = parser.add_argument_group("evaluation and checkpoints")
    progress.add_argument(
        "--eval-every", type=int, default=defaults.eval_every, metavar="N", help="optimizer steps (0: start and end)"
    )
    progress.add_argument(
        "--save-every", type=int, default=defaults.save_every, metavar="N", help="optimizer steps (0: never)"
    )
    progress.add_argument("--checkpoint-dir", metavar="DIR", help="if unset: OUTPUT.checkpoints beside OUTPUT")
    progress.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    progress.add_argument("--keep-checkpoints", action="store_true", help="keep checkpoints after success")
    progress.add_argument(
        "--overwrite", action="store_true", help="replace OUTPUT, and discard checkpoints of an earlier run"
    )
    progress.add_argument("--no-progress", action="store_true", help="no progress bar")


def options_from_args(args: argparse.Namespace) -> HealOptions:
    names = {f.name for f in fields(HealOptions)}
    values = {name: getattr(args, name) for name in names if hasattr(args, name)}
    values["progress"] = not getattr(args, "no_progress", False)
    return HealOptions(**values)


def run_heal(args: argparse.Namespace) -> None:
    from accelerate import PartialState

    report = heal(args.student, args.output, options_from_args(args))
    if not PartialState().is_main_process:
        return
    evals = report["eval"]
    print(f"wrote {Path(args.output).absolute()}")
    print(
        f"trained on {report['tokens_seen']} tokens of {report['data']['train']} in {report['optimizer_steps']} "
        f"steps ({report['tokens_per_second'] or 0:.0f} tokens/s)"
    )
    if evals:
        first, last = evals[0], evals[-1]
        print(
            f"held out ({report['data']['eval']}): KL {first['kl']:.4f} -> {last['kl']:.4f}, perplexity "
            f"{first['perplexity']:.3f} -> {last['perplexity']:.3f} (teacher {last['teacher_perplexity']:.3f})"
        )


def main(argv: list[str] | None = None) -> int:
    """`python -m mla_convert.heal ...` (for `accelerate launch -m mla_convert.heal ...`): `mla-convert heal ...`."""
    from .cli import main as cli_main

    return cli_main(["heal", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
