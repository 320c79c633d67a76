"""Tokenizers: bytes (the default) or a byte-level BPE trained on the training split.

Both share the small interface the pipeline and the model need (:class:`Tokenizer`):
``encode`` text *or raw bytes* into a numpy array, ``decode`` ids leniently,
``vocab_size`` and ``eos_id`` (documents are joined by EOS; the tokenizer never emits
it on its own).

* :class:`ByteTokenizer`: every byte is a token, plus one end-of-document id. It
  needs no trained merges and no download, covers any input losslessly (raw bytes
  that are not UTF-8 included: the bytes *are* the tokens), and keeps the embedding
  table tiny (257 rows), which suits small attention-ablation models whose point is
  sequence length. Long byte sequences are also the regime where sparse attention
  matters.
* :class:`BPETokenizer`: a byte-level BPE (GPT-2 style, from the ``tokenizers``
  library) of ``data.vocab_size`` ids, EOS included; roughly three times fewer
  tokens for the same text, so a context of ``seq_len`` tokens spans more text.
  It reads text, so bytes that are not UTF-8 are first decoded with U+FFFD
  replacement. :func:`train_bpe` learns it from an iterator of texts.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

_N_BYTES = 256
EOS_TOKEN = "<|eos|>"
# BPE encodes long documents in pieces of about this many characters, cut where a
# non-space character is followed by a space: no pre-token of the byte-level (GPT-2)
# pattern spans such a place, so the pieces' tokens are the whole document's. A few
# pieces go to the library at a
# time, since its encodings (tokens, offsets, masks) take ~60 bytes per input character.
_BPE_PIECE_CHARS = 1 << 16
_BPE_PIECES_PER_CALL = 16
_PIECE_BOUNDARY = re.compile(r"(?<=\S)(?=\s)")


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned dtype that holds every id: token files use it on disk."""
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def as_text(data: str | bytes) -> str:
    """``data`` as text; bytes that are not valid UTF-8 become U+FFFD."""
    return data if isinstance(data, str) else data.decode("utf-8", errors="replace")


class Tokenizer(Protocol):
    """What the corpus pipeline, the token cache and the model need of a tokenizer."""

    vocab_size: int
    eos_id: int

    def encode(self, data: str | bytes) -> np.ndarray:
        """Token ids of ``data`` (no EOS added), of dtype ``token_dtype(vocab_size)``."""
        ...

    def decode(self, ids: Sequence[int]) -> str:
        """Text for ``ids``, never failing: unknown ids and EOS are skipped."""
        ...

    def describe(self) -> dict[str, str | int]:
        """What identifies the tokenizer in a token-cache key."""
        ...


class ByteTokenizer:
    """Maps text to its UTF-8 bytes (ids 0..255) and reserves id 256 as end-of-document."""

    vocab_size: int = _N_BYTES + 1
    eos_id: int = _N_BYTES

    def encode(self, data: str | bytes) -> np.ndarray:
        """The bytes of ``data`` (UTF-8 for text); no EOS is added."""
        raw = data.encode("utf-8") if isinstance(data, str) else data
        return np.frombuffer(raw, dtype=np.uint8).astype(token_dtype(self.vocab_size))

    def decode(self, ids: Sequence[int]) -> str:
        """Text for ``ids``, as far as it can be read.

        Model samples may split a multi-byte character or emit EOS (or an id of a
        vocabulary padded past 256) anywhere, so decoding must never fail: ids
        that are not bytes are skipped and invalid UTF-8 becomes U+FFFD.
        """
        data = bytes(int(i) for i in ids if 0 <= i < _N_BYTES)
        return data.decode("utf-8", errors="replace")

    def describe(self) -> dict[str, str | int]:
        return {"kind": "byte", "vocab_size": self.vocab_size}


class BPETokenizer:
    """A trained byte-level BPE (see :func:`train_bpe`); ``vocab_size`` counts EOS."""

    def __init__(self, model: HFTokenizer) -> None:
        # EOS is ours to place between documents: text that happens to spell it
        # (tokenizer code does) is encoded as ordinary text.
        model.encode_special_tokens = True
        self.model = model
        self.vocab_size = model.get_vocab_size()
        self.eos_id = model.token_to_id(EOS_TOKEN)
        self.dtype = token_dtype(self.vocab_size)
        self.digest = hashlib.blake2b(model.to_str().encode(), digest_size=8).hexdigest()

    @classmethod
    def load(cls, path: str | Path) -> BPETokenizer:
        return cls(HFTokenizer.from_file(str(path)))

    def save(self, path: str | Path) -> None:
        self.model.save(str(path))

    def encode(self, data: str | bytes) -> np.ndarray:
        """The BPE ids of ``data`` (bytes decoded with replacement first); no EOS is added."""
        pieces = _pieces(as_text(data), _BPE_PIECE_CHARS)
        arrays = [np.zeros(0, dtype=self.dtype)]
        for start in range(0, len(pieces), _BPE_PIECES_PER_CALL):
            group = pieces[start : start + _BPE_PIECES_PER_CALL]
            encodings = self.model.encode_batch(group, add_special_tokens=False)
            arrays += [np.asarray(e.ids, dtype=self.dtype) for e in encodings]
        return np.concatenate(arrays)

    def decode(self, ids: Sequence[int]) -> str:
        """Text for ``ids``; EOS and ids outside the vocabulary are skipped, and a
        multi-byte character cut short becomes U+FFFD."""
        kept = [int(i) for i in ids if 0 <= i < self.vocab_size and i != self.eos_id]
        return self.model.decode(kept, skip_special_tokens=True)

    def describe(self) -> dict[str, str | int]:
        return {"kind": "bpe", "vocab_size": self.vocab_size, "merges": self.digest}


def _pieces(text: str, size: int) -> list[str]:
    """``text`` cut into pieces of about ``size`` characters where a pre-token ends (see
    ``_PIECE_BOUNDARY``); one piece when there is no such place."""
    pieces, start = [], 0
    while len(text) - start > size:
        boundary = _PIECE_BOUNDARY.search(text, start + size)
        if boundary is None:
            break
        pieces.append(text[start : boundary.end()])
        start = boundary.end()
    if start < len(text):
        pieces.append(text[start:])
    return pieces


def train_bpe(texts: Iterable[str], vocab_size: int) -> BPETokenizer:
    """A byte-level BPE of at most ``vocab_size`` ids learnt from ``texts``.

    The vocabulary starts from all 256 bytes (so any input is encodable) and the
    EOS token, then adds merges until it is full or no pair repeats.
    """
    model = HFTokenizer(models.BPE())
    model.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    model.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    model.train_from_iterator(texts, trainer)
    return BPETokenizer(model)
