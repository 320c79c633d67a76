"""Corpus loading, byte-level tokenisation, packing and the Lightning data module."""

from nsa_lab.data.corpus import DocumentSource, builtin_documents, corpus_sources, token_stream
from nsa_lab.data.datamodule import NSADataModule, PackedExamples, split_tail
from nsa_lab.data.tokenizer import ByteTokenizer

__all__ = [
    "ByteTokenizer",
    "DocumentSource",
    "NSADataModule",
    "PackedExamples",
    "builtin_documents",
    "corpus_sources",
    "split_tail",
    "token_stream",
]
