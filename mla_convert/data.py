"""Text for calibration, evaluation and healing: local files, folders or `datasets` hub datasets, split into disjoint
parts and read as a stream of records (`open_text_stream`), or whole (`load_text`, built on the same stream)."""

from __future__ import annotations

import itertools
import json
import os
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from .errors import MLAConvertError
from .sources import require_hub


TEXT_SUFFIXES = (".txt", ".jsonl", ".json", ".parquet")
# Every verb that reads records names their text column with this flag
TEXT_COLUMN_FLAG = "--text-column"
# Big enough that tokenizer call overhead is negligible, small enough that memory stays flat on large corpora.
TOKENIZE_CHUNK_CHARS = 100_000
# Characters read from a text file at a time.
READ_BLOCK_CHARS = 1 << 20
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


# ---------------------------------------------------------------------------------------------------- reading


def _read_blocks(path: Path) -> Iterator[str]:
    """Characters of a UTF-8 text file in blocks, newlines translated as `Path.read_text` does."""
    try:
        with open(path, encoding="utf-8") as f:
            while block := f.read(READ_BLOCK_CHARS):
                yield block
    except (OSError, UnicodeDecodeError) as e:
        raise MLAConvertError(f"cannot read {path}: {e}") from e


def _chunks(blocks: Iterable[str], chunk_chars: int | None = None) -> Iterator[str]:
    """Re-cut text blocks into pieces of at most `chunk_chars` (default `TOKENIZE_CHUNK_CHARS`), cut after a newline,
    else after a space, where the piece has one, so that words stay whole. Holds only a block or two."""
    chunk_chars = chunk_chars or TOKENIZE_CHUNK_CHARS
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


def _line_boundary(blocks: Callable[[], Iterable[str]], total: int, fraction: float) -> int:
    """Character offset nearest to `fraction` of a text of `total` characters that starts a line (the exact offset
    if no line starts near it), found in one pass over `blocks()`."""
    if fraction <= 0.0:
        return 0
    if fraction >= 1.0:
        return total
    target = round(fraction * total)
    before = after = -1  # the newlines nearest to the target on either side: a cut after one starts a line
    position = 0
    for block in blocks():
        if position < target and (i := block.rfind("\n", 0, target - position)) != -1:
            before = position + i
        if position + len(block) > target and (j := block.find("\n", max(0, target - position))) != -1:
            after = position + j
            break
        position += len(block)
    candidates = [i + 1 for i in (before, after) if i != -1]
    return min(candidates, key=lambda i: (abs(i - target), i)) if candidates else target


def _record_text(record, column: str, where: str) -> str:
    if not isinstance(record, dict):
        raise MLAConvertError(f"{where}: every record must be a JSON object with a {column!r} field")
    value = record.get(column)
    return "" if value is None else str(value)


def _read_json_records(path: Path) -> list:
    """The records of a .json document, which can only be read whole (rows, or columns as pandas writes them)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise MLAConvertError(f"cannot read {path}: {e}") from e
    if isinstance(data, list):
        return data
    if isinstance(data, dict):
        columns = {k: v for k, v in data.items() if isinstance(v, list)}
        if columns:
            length = min(len(v) for v in columns.values())
            return [{k: v[i] for k, v in columns.items()} for i in range(length)]
    raise MLAConvertError(f"{path}: expected a list of records or a dict of columns, got {type(data).__name__}")


def _jsonl_records(path: Path) -> Iterator:
    number = 0
    try:
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, start=1):
                if line.strip():
                    yield json.loads(line.strip())
    except json.JSONDecodeError as e:
        # json numbers lines within the one line it was given: the file's line is ours to say
        raise MLAConvertError(f"cannot read {path}: line {number} is not JSON ({e.msg}, column {e.colno})") from e
    except (OSError, UnicodeDecodeError) as e:
        raise MLAConvertError(f"cannot read {path}: {e}") from e


def _parquet_file(path: Path, column: str):
    import pyarrow.parquet as pq  # a `datasets` dependency; only needed for Parquet sources

    try:
        parquet = pq.ParquetFile(path)
    except (OSError, ValueError) as e:
        raise MLAConvertError(f"cannot read {path}: {e}") from e
    names = parquet.schema_arrow.names
    if column not in names:
        raise MLAConvertError(
            f"{path} has no {column!r} column; available columns: {sorted(names)} (name one with {TEXT_COLUMN_FLAG})"
        )
    return parquet


def _count_records(path: Path, column: str) -> int:
    """Records in one local file (a .txt file is one), checking that the text column exists (in a .jsonl file, on
    its first record: the file is not parsed twice)."""
    suffix = path.suffix.lower()
    if suffix == ".txt":
        return 1
    if suffix == ".parquet":
        return _parquet_file(path, column).metadata.num_rows
    if suffix == ".json":
        records = _read_json_records(path)
    else:  # .jsonl: the first record, and the count of non-blank lines
        records = list(itertools.islice(_jsonl_records(path), 1))
        try:
            with open(path, encoding="utf-8") as f:
                count = sum(1 for line in f if line.strip())
        except (OSError, UnicodeDecodeError) as e:
            raise MLAConvertError(f"cannot read {path}: {e}") from e
    for record in records:
        _record_text(record, column, str(path))
    available = sorted({key for record in records for key in record})
    if records and column not in available:
        raise MLAConvertError(
            f"{path} has no {column!r} column; available columns: {available} (name one with {TEXT_COLUMN_FLAG})"
        )
    return len(records) if suffix == ".json" else count


def _pieces(text: str) -> Iterator[str]:
    """A record's text pieces; none for a blank record."""
    return _chunks([text]) if text.strip() else iter(())


def _file_texts(path: Path, column: str, skip: int) -> Iterator[Iterator[str]]:
    """The records of one local file from index `skip` on, each as text pieces: a .txt file is one record, JSON
    and Parquet files one per row."""
    suffix = path.suffix.lower()
    if suffix == ".txt":
        yield _chunks(_read_blocks(path))
        return
    if suffix == ".parquet":
        try:
            batches = _parquet_file(path, column).iter_batches(batch_size=1024, columns=[column])
            values = (value for batch in batches for value in batch.column(0).to_pylist())
            for value in itertools.islice(values, skip, None):
                yield _pieces("" if value is None else str(value))
        except (OSError, ValueError) as e:
            raise MLAConvertError(f"cannot read {path}: {e}") from e
        return
    if suffix == ".json":
        records = iter(_read_json_records(path)[skip:])
    else:
        records = itertools.islice(_jsonl_records(path), skip, None)
    for record in records:
        yield _pieces(_record_text(record, column, str(path)))


# ---------------------------------------------------------------------------------------------------- streams


class TextStream:
    """One part of a text source as an ordered sequence of records, each an iterator over its text pieces (of at
    most `TOKENIZE_CHUNK_CHARS`). `records(start)` yields the records from index `start` of the part on; a blank
    record yields no pieces. `description` names the source, the part and where it was cut."""

    description: str = ""

    def records(self, start: int = 0) -> Iterator[Iterator[str]]:
        raise NotImplementedError


class SingleTextStream(TextStream):
    """A source that is one text (a .txt file, or a file with a single record), cut by characters at the line
    starts nearest to the part's fractions: `start:end` of its characters."""

    def __init__(self, name: str, blocks: Callable[[], Iterable[str]], part: TextPart):
        self.name, self.part, self.blocks = name, part, blocks
        total = sum(len(block) for block in blocks())
        self.start, self.end = (_line_boundary(blocks, total, fraction) for fraction in (part.start, part.end))
        self.description = f"{name}, {part.describe()} (chars {self.start}-{self.end})"

    def _part_blocks(self) -> Iterator[str]:
        position = 0
        for block in self.blocks():
            lo, hi = max(self.start - position, 0), min(self.end - position, len(block))
            position += len(block)
            if lo < hi:
                yield block[lo:hi]
            if position >= self.end:
                return

    def records(self, start: int = 0) -> Iterator[Iterator[str]]:
        if start == 0:
            yield _chunks(self._part_blocks())


class RecordStream(TextStream):
    """Records `first:last` of `total`, cut by record index, from `read(index)` (the records from a global index
    on)."""

    def __init__(self, name: str, total: int, part: TextPart, read: Callable[[int], Iterator[Iterator[str]]]):
        self.name, self.part, self.total, self.read = name, part, total, read
        self.first, self.last = round(part.start * total), round(part.end * total)
        self.description = f"{name}, {part.describe()} (records {self.first}-{self.last} of {total})"

    def records(self, start: int = 0) -> Iterator[Iterator[str]]:
        first = self.first + start
        if first < self.last:
            yield from itertools.islice(self.read(first), self.last - first)


def _local_records(files: list[Path], counts: list[int], column: str) -> Callable[[int], Iterator[Iterator[str]]]:
    """The records of local files in path order, from a global index on; files before it are not opened."""

    def read(index: int) -> Iterator[Iterator[str]]:
        offset = 0
        for path, count in zip(files, counts):
            if index < offset + count:
                yield from _file_texts(path, column, max(0, index - offset))
            offset += count

    return read


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


def _hub_stream(spec: str, part: TextPart, column: str) -> RecordStream:
    """A `datasets` hub dataset, streamed: it must state its size, so that the part can be located."""
    import datasets  # slow to import; only hub sources need it

    name, config, split = _parse_hub_spec(spec)
    require_hub(f"text source {spec!r} is not a local file or folder, and as a datasets hub name it")
    try:
        dataset = datasets.load_dataset(name, config, split=split, streaming=True)
    except (OSError, ValueError, ConnectionError) as e:
        raise MLAConvertError(f"cannot load dataset {spec!r} (split {split!r}): {e}") from e
    total = getattr((dataset.info.splits or {}).get(split), "num_examples", None)
    if not total:
        raise MLAConvertError(
            f"dataset {spec!r} does not state how many records its {split!r} split has, so its "
            f"{part.describe()} cannot be located while streaming: use a local file or folder instead"
        )

    def read(index: int) -> Iterator[Iterator[str]]:
        try:
            for record in dataset.skip(index):
                if column not in record:
                    raise MLAConvertError(
                        f"dataset {spec!r} has no {column!r} column; available columns: {sorted(record)} (name one "
                        f"with {TEXT_COLUMN_FLAG})"
                    )
                yield _pieces("" if record[column] is None else str(record[column]))
        except (OSError, ConnectionError) as e:
            raise MLAConvertError(f"cannot read dataset {spec!r}: {e}") from e

    return RecordStream(spec if "@" in spec else f"{spec}@{split}", total, part, read)


def open_text_stream(spec: str | os.PathLike, part: TextPart = CALIBRATION_PART, text_column: str = "text") -> TextStream:
    """The records of one part of a text source, to be read lazily.

    `spec` is a local `.txt` file (one text), `.jsonl`/`.json`/`.parquet` file (one text per row of `text_column`),
    a folder of such files (read in sorted path order), or a `datasets` hub dataset written `NAME[:CONFIG][@SPLIT]`
    (split `train` by default), which is streamed. A single text is cut at the line starts nearest to the part's
    fractions of its characters, several records by record index. Cuts depend only on the source and the
    fractions, so `CALIBRATION_PART` and `EVALUATION_PART` never overlap.
    """
    spec = os.fspath(spec)
    path = Path(spec).expanduser()
    if not path.exists():
        if _looks_like_local_path(spec):
            raise MLAConvertError(f"text source not found: {spec}")
        return _hub_stream(spec, part, text_column)
    if path.is_file():
        if path.suffix.lower() not in TEXT_SUFFIXES:
            raise MLAConvertError(f"unsupported text file {path}: expected one of {', '.join(TEXT_SUFFIXES)}")
        files = [path]
    else:
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES)
        if not files:
            raise MLAConvertError(f"{path} holds no text files ({', '.join(TEXT_SUFFIXES)})")
    counts = [_count_records(f, text_column) for f in files]
    read = _local_records(files, counts, text_column)
    if sum(counts) != 1:
        return RecordStream(path.name, sum(counts), part, read)
    only = files[counts.index(1)]
    if only.suffix.lower() == ".txt":
        return SingleTextStream(path.name, lambda: _read_blocks(only), part)
    text = "".join(next(read(0)))
    return SingleTextStream(path.name, lambda: [text], part)


def load_text(
    spec: str | os.PathLike, part: TextPart, text_column: str = "text", max_chars: int | None = None
) -> tuple[str, str]:
    """The text of one part of a text source (see `open_text_stream`), and a description of it to quote in reports.

    Records are joined with blank lines (blank records skipped). `max_chars` keeps only the start of the part, ending
    on a line boundary where it has one; reading stops there.
    """
    if max_chars is not None and max_chars < 1:
        raise MLAConvertError(f"max_chars must be a positive number of characters, got {max_chars}")
    stream = open_text_stream(spec, part, text_column)
    texts, length = [], -len(RECORD_SEPARATOR)  # length: of the texts joined
    for record in stream.records():
        limit = None if max_chars is None else max_chars - length - len(RECORD_SEPARATOR)
        text = _read_record(record, limit)
        if text.strip():
            texts.append(text)
            length += len(RECORD_SEPARATOR) + len(text)
        if max_chars is not None and length > max_chars:
            break  # what follows cannot change where the text is cut
    text = _cap_chars(RECORD_SEPARATOR.join(texts), max_chars)
    if isinstance(stream, SingleTextStream):
        description = f"{stream.name}, {part.describe()} (chars {stream.start}-{stream.start + len(text)})"
    else:
        kept = f"first {len(text)} of its chars" if len(text) < length else f"{len(text)} chars"
        description = f"{stream.description[:-1]}, {kept})"
    if not text.strip():
        raise MLAConvertError(f"no text in {description}: use a larger source or another part")
    return text, description


def _cap_chars(text: str, max_chars: int | None) -> str:
    """Keep at most `max_chars` characters, ending on a line boundary when the kept text has one."""
    if max_chars is None or len(text) <= max_chars:
        return text
    last_newline = text.rfind("\n", 0, max_chars)
    return text[: last_newline + 1] if last_newline > 0 else text[:max_chars]


def _read_record(pieces: Iterable[str], limit: int | None) -> str:
    """A record's text, read no further than needed to hold more than `limit` characters that are not all blank."""
    kept, length = [], 0
    for piece in pieces:
        kept.append(piece)
        length += len(piece)
        if limit is not None and length > limit and piece.strip():
            break
    return "".join(kept)


def tokenize_into_sequences(
    tokenizer: PreTrainedTokenizerBase,
    text: str,
    seq_len: int,
    max_tokens: int | None = None,
    seq_len_flag: str | None = "--seq-len",
) -> torch.LongTensor:
    """Tokenize text into a `[num_sequences, seq_len]` tensor of consecutive, non-overlapping windows.

    Kept simple on purpose: no special tokens are added (no BOS prefix per window), and the tokens left over after
    the last full window are dropped. The text is tokenized in pieces of `TOKENIZE_CHUNK_CHARS` characters and
    tokenization stops once `max_tokens` (rounded down to whole windows) is reached. `seq_len_flag`: the flag that
    sets `seq_len`, for the advice when the text is too short (None where the user cannot set it).
    """
    if seq_len < 2:
        raise MLAConvertError(f"sequences need at least 2 tokens (context and a token to predict), got {seq_len}")
    if max_tokens is not None and max_tokens < seq_len:
        raise MLAConvertError(f"{max_tokens} tokens do not fill one sequence of {seq_len}")
    limit = None if max_tokens is None else max_tokens // seq_len * seq_len
    ids: list[int] = []
    for piece in _chunks([text]):
        # verbose=False: the "longer than the model's maximum length" warning is moot, windows are cut below.
        ids.extend(tokenizer(piece, add_special_tokens=False, verbose=False)["input_ids"])
        if limit is not None and len(ids) >= limit:
            break
    num_sequences = len(ids) // seq_len
    if limit is not None:
        num_sequences = min(num_sequences, limit // seq_len)
    if num_sequences == 0:
        shorter = f", or a shorter {seq_len_flag}" if seq_len_flag else ""
        raise MLAConvertError(
            f"the text gives {len(ids)} tokens, fewer than one sequence of {seq_len}: use more text{shorter}"
        )
    return torch.tensor(ids[: num_sequences * seq_len], dtype=torch.long).view(num_sequences, seq_len)
