"""Text for calibration and evaluation: local files, folders or `datasets` hub datasets, split into disjoint parts."""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase
from transformers.generation.streamers import BaseStreamer

from .errors import MLAConvertError


TEXT_SUFFIXES = (".txt", ".jsonl", ".json", ".parquet")
# Big enough that tokenizer call overhead is negligible, small enough that memory stays flat on large corpora.
TOKENIZE_CHUNK_CHARS = 100_000
# Hub datasets usually have only a `train` split; calibration and evaluation then take disjoint parts of it.
DEFAULT_HUB_SPLIT = "train"
# Documents of a multi-record source are joined with a blank line, as a paragraph break.
RECORD_SEPARATOR = "\n\n"


def _percent(fraction: float) -> str:
    return f"{round(fraction * 100, 4):g}"


@dataclass(frozen=True)
class TextPart:
    """A contiguous part of a text source, as fractions of its length: `TextPart(0.8, 1.0)` is the last 20%."""

    start: float
    end: float

    def __post_init__(self):
        if not 0.0 <= self.start < self.end <= 1.0:
            raise MLAConvertError(
                f"invalid text part {self.start}-{self.end}: need 0 <= start < end <= 1 (fractions of the text)"
            )

    def describe(self) -> str:
        """Human-readable name of the part, e.g. "first 80%", "last 20%" or "20%-40%"."""
        if self.start == 0.0 and self.end == 1.0:
            return "all"
        if self.start == 0.0:
            return f"first {_percent(self.end)}%"
        if self.end == 1.0:
            return f"last {_percent(1.0 - self.start)}%"
        return f"{_percent(self.start)}%-{_percent(self.end)}%"


# Calibration and evaluation take disjoint parts of the same source, so evaluation is always on held-out text.
CALIBRATION_PART = TextPart(0.0, 0.8)
EVALUATION_PART = TextPart(0.8, 1.0)


def _line_boundary(text: str, fraction: float) -> int:
    """Character offset nearest to `fraction` of the text that starts a line (or the exact offset if none)."""
    if fraction <= 0.0:
        return 0
    if fraction >= 1.0:
        return len(text)
    target = round(fraction * len(text))
    before = text.rfind("\n", 0, target)  # a cut at before + 1 starts the next line
    after = text.find("\n", target)
    candidates = [i + 1 for i in (before, after) if i != -1]
    if not candidates:
        return target
    return min(candidates, key=lambda i: (abs(i - target), i))


def _cap_chars(text: str, max_chars: int | None) -> str:
    """Keep at most `max_chars` characters, ending on a line boundary when the kept text has one."""
    if max_chars is None or len(text) <= max_chars:
        return text
    last_newline = text.rfind("\n", 0, max_chars)
    return text[: last_newline + 1] if last_newline > 0 else text[:max_chars]


def _chars(text: str, capped: bool) -> str:
    """How much of a multi-record part was kept, for descriptions."""
    return f"first {len(text)} of its chars" if capped else f"{len(text)} chars"


def _read_json_records(path: Path) -> list[dict]:
    try:
        with open(path, encoding="utf-8") as f:
            if path.suffix == ".jsonl":
                return [json.loads(line) for line in f if line.strip()]
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise MLAConvertError(f"cannot read {path}: {e}") from e
    if isinstance(data, list):
        return data
    if isinstance(data, dict):
        # Column-oriented JSON ({"text": [...], ...}), as pandas and `datasets` write it.
        columns = {k: v for k, v in data.items() if isinstance(v, list)}
        if columns:
            length = min(len(v) for v in columns.values())
            return [{k: v[i] for k, v in columns.items()} for i in range(length)]
    raise MLAConvertError(f"{path}: expected a list of records or a dict of columns, got {type(data).__name__}")


def _column(records: list, column: str, where: str) -> list[str]:
    if records and not all(isinstance(r, dict) for r in records):
        raise MLAConvertError(f"{where}: every record must be a JSON object with a {column!r} field")
    available = sorted({key for r in records for key in r})
    if column not in available:
        raise MLAConvertError(f"{where} has no {column!r} column; available columns: {available or 'none'}")
    return ["" if r.get(column) is None else str(r[column]) for r in records]


def _read_file_records(path: Path, text_column: str) -> list[str]:
    """The texts of one local file: a whole .txt file is one record, JSON and Parquet files one per row."""
    suffix = path.suffix.lower()
    if suffix == ".txt":
        try:
            return [path.read_text(encoding="utf-8")]
        except (OSError, UnicodeDecodeError) as e:
            raise MLAConvertError(f"cannot read {path}: {e}") from e
    if suffix in (".json", ".jsonl"):
        return _column(_read_json_records(path), text_column, str(path))
    if suffix == ".parquet":
        import pyarrow.parquet as pq  # a `datasets` dependency; only needed for Parquet sources

        try:
            names = pq.read_schema(path).names
            if text_column not in names:
                raise MLAConvertError(f"{path} has no {text_column!r} column; available columns: {sorted(names)}")
            values = pq.read_table(path, columns=[text_column]).column(text_column).to_pylist()
        except (OSError, ValueError) as e:
            raise MLAConvertError(f"cannot read {path}: {e}") from e
        return ["" if v is None else str(v) for v in values]
    raise MLAConvertError(f"unsupported text file {path}: expected one of {', '.join(TEXT_SUFFIXES)}")


def _read_local_records(path: Path, text_column: str) -> list[str]:
    if path.is_file():
        return _read_file_records(path, text_column)
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES)
    if not files:
        raise MLAConvertError(f"{path} holds no text files ({', '.join(TEXT_SUFFIXES)})")
    return [text for f in files for text in _read_file_records(f, text_column)]


def _looks_like_local_path(spec: str) -> bool:
    """Whether a spec that does not exist on disk was meant as a local path rather than a hub dataset name."""
    return (
        spec.startswith((".", "/", "~", os.sep))
        or Path(spec).suffix.lower() in TEXT_SUFFIXES
        or spec.count("/") > 1
        or (os.altsep is not None and os.altsep in spec)
    )


def _parse_hub_spec(spec: str) -> tuple[str, str | None, str]:
    """Parse `NAME[:CONFIG][@SPLIT]` into (name, config, split)."""
    match = re.fullmatch(r"([^:@]+)(?::([^:@]+))?(?:@([^:@]+))?", spec)
    if match is None:
        raise MLAConvertError(
            f"invalid text source {spec!r}: expected a local file or folder, or a datasets hub name "
            "NAME[:CONFIG][@SPLIT] such as wikitext:wikitext-2-raw-v1"
        )
    name, config, split = match.groups()
    return name, config, split or DEFAULT_HUB_SPLIT


def _load_hub_part(spec: str, part: TextPart, text_column: str, max_chars: int | None) -> tuple[str, str]:
    """Stream a part of a hub dataset, reading no further than needed."""
    import datasets  # slow to import; only hub sources need it

    name, config, split = _parse_hub_spec(spec)
    try:
        dataset = datasets.load_dataset(name, config, split=split, streaming=True)
    except (OSError, ValueError, ConnectionError) as e:
        raise MLAConvertError(f"cannot load dataset {spec!r} (split {split!r}): {e}") from e
    split_info = (dataset.info.splits or {}).get(split)
    num_records = getattr(split_info, "num_examples", None)
    if not num_records:
        raise MLAConvertError(
            f"dataset {spec!r} does not state how many records its {split!r} split has, so its "
            f"{part.describe()} cannot be located while streaming: use a local file or folder instead"
        )
    first, last = round(part.start * num_records), round(part.end * num_records)
    texts, size, stopped_early = [], 0, False
    try:
        for record in dataset.skip(first).take(last - first):
            if text_column not in record:
                raise MLAConvertError(
                    f"dataset {spec!r} has no {text_column!r} column; available columns: {sorted(record)}"
                )
            text = record[text_column] or ""
            if text.strip():
                texts.append(text)
                size += len(text) + len(RECORD_SEPARATOR)
            if max_chars is not None and size >= max_chars:
                stopped_early = True
                break
    except (OSError, ConnectionError) as e:
        raise MLAConvertError(f"cannot read dataset {spec!r}: {e}") from e
    joined = RECORD_SEPARATOR.join(texts)
    text = _cap_chars(joined, max_chars)
    kept = _chars(text, capped=stopped_early or len(text) < len(joined))
    where = f"{spec}@{split}" if "@" not in spec else spec
    return text, f"{where}, {part.describe()} (records {first}-{last} of {num_records}, {kept})"


def load_text(
    spec: str, part: TextPart, text_column: str = "text", max_chars: int | None = None
) -> tuple[str, str]:
    """Return the text of one part of a text source, and a description of it to quote in reports.

    `spec` is a local `.txt` file (one text), `.jsonl`/`.json`/`.parquet` file (one text per row of
    `text_column`), a folder of such files (read in sorted path order), or a `datasets` hub dataset written
    `NAME[:CONFIG][@SPLIT]` (split `train` by default), which is streamed.

    A single text is cut at the line boundaries nearest to the part's fractions of its characters; several records
    are cut by record index and joined with blank lines. Cuts depend only on the source and the fractions, so
    `CALIBRATION_PART` and `EVALUATION_PART` never overlap. `max_chars` then keeps only the start of the part.
    """
    spec = os.fspath(spec)
    if max_chars is not None and max_chars < 1:
        raise MLAConvertError(f"max_chars must be a positive number of characters, got {max_chars}")
    path = Path(spec).expanduser()
    if not path.exists():
        if _looks_like_local_path(spec):
            raise MLAConvertError(f"text source not found: {spec}")
        text, description = _load_hub_part(spec, part, text_column, max_chars)
    else:
        records = _read_local_records(path, text_column)
        if len(records) == 1:
            whole = records[0]
            start, end = _line_boundary(whole, part.start), _line_boundary(whole, part.end)
            text = _cap_chars(whole[start:end], max_chars)
            description = f"{path.name}, {part.describe()} (chars {start}-{start + len(text)})"
        else:
            first, last = round(part.start * len(records)), round(part.end * len(records))
            joined = RECORD_SEPARATOR.join(r for r in records[first:last] if r.strip())
            text = _cap_chars(joined, max_chars)
            kept = _chars(text, capped=len(text) < len(joined))
            description = f"{path.name}, {part.describe()} (records {first}-{last} of {len(records)}, {kept})"
    if not text.strip():
        raise MLAConvertError(f"no text in {description}: use a larger source or another part")
    return text, description


def _text_chunks(text: str, chunk_chars: int) -> Iterator[str]:
    """Split text into pieces of about `chunk_chars`, cut after a newline where possible so words stay whole."""
    start = 0
    while start < len(text):
        end = min(start + chunk_chars, len(text))
        if end < len(text):
            newline = text.rfind("\n", start, end)
            if newline > start:
                end = newline + 1
            else:
                space = text.rfind(" ", start, end)
                end = space + 1 if space > start else end
        yield text[start:end]
        start = end


def tokenize_into_sequences(
    tokenizer: PreTrainedTokenizerBase, text: str, seq_len: int, max_tokens: int | None = None
) -> torch.LongTensor:
    """Tokenize text into a `[num_sequences, seq_len]` tensor of consecutive, non-overlapping windows.

    Kept simple on purpose: no special tokens are added (no BOS prefix per window), and the tokens left over after
    the last full window are dropped. The text is tokenized in chunks of `TOKENIZE_CHUNK_CHARS` characters and
    tokenization stops once `max_tokens` (rounded down to whole windows) is reached.
    """
    if seq_len < 2:
        raise MLAConvertError(f"seq_len must be at least 2 tokens (context and a token to predict), got {seq_len}")
    if max_tokens is not None and max_tokens < seq_len:
        raise MLAConvertError(f"max_tokens ({max_tokens}) must be at least seq_len ({seq_len})")
    limit = None if max_tokens is None else max_tokens // seq_len * seq_len
    ids: list[int] = []
    for chunk in _text_chunks(text, TOKENIZE_CHUNK_CHARS):
        # verbose=False: the "longer than the model's maximum length" warning is moot, windows are cut below.
        ids.extend(tokenizer(chunk, add_special_tokens=False, verbose=False)["input_ids"])
        if limit is not None and len(ids) >= limit:
            break
    num_sequences = len(ids) // seq_len
    if limit is not None:
        num_sequences = min(num_sequences, limit // seq_len)
    if num_sequences == 0:
        raise MLAConvertError(
            f"the text gives {len(ids)} tokens, fewer than one sequence of {seq_len}: "
            "use more text or a shorter seq_len"
        )
    return torch.tensor(ids[: num_sequences * seq_len], dtype=torch.long).view(num_sequences, seq_len)


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
