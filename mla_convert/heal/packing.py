"""Training windows: the tokens of a text stream packed into fixed-length windows, in one deterministic order that a
checkpoint can resume from its position."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from ..data import RECORD_SEPARATOR, TextStream
from ..errors import MLAConvertError


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
