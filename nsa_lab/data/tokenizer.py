"""Byte-level tokenizer: every UTF-8 byte is a token, plus one end-of-document id.

A byte vocabulary needs no trained merges and no download, covers any text
losslessly, and keeps the embedding table tiny (257 rows), which suits small
attention-ablation models whose point is sequence length, not vocabulary. Long
byte sequences are also exactly the regime in which sparse attention matters.
"""

from __future__ import annotations

from collections.abc import Sequence

_N_BYTES = 256


class ByteTokenizer:
    """Maps text to its UTF-8 bytes (ids 0..255) and reserves id 256 as end-of-document."""

    vocab_size: int = _N_BYTES + 1
    eos_id: int = _N_BYTES

    def encode(self, text: str) -> list[int]:
        """The UTF-8 bytes of ``text``; no EOS is added (documents end where the caller says)."""
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        """Text for ``ids``, as far as it can be read.

        Model samples may split a multi-byte character or emit EOS (or an id of a
        vocabulary padded past 256) anywhere, so decoding must never fail: ids
        that are not bytes are skipped and invalid UTF-8 becomes U+FFFD.
        """
        data = bytes(i for i in ids if 0 <= i < _N_BYTES)
        return data.decode("utf-8", errors="replace")
