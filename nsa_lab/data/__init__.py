"""Corpus sources, tokenizers, the token cache, packing and the Lightning data module."""

from nsa_lab.data.cache import CorpusStats, TokenFile, cache_dir_for, cached_tokens
from nsa_lab.data.corpus import DocumentSource, builtin_documents, corpus_sources
from nsa_lab.data.datamodule import NSADataModule, PackedExamples, split_tail
from nsa_lab.data.tokenizer import BPETokenizer, ByteTokenizer, Tokenizer

__all__ = [
    "BPETokenizer",
    "ByteTokenizer",
    "CorpusStats",
    "DocumentSource",
    "NSADataModule",
    "PackedExamples",
    "TokenFile",
    "Tokenizer",
    "builtin_documents",
    "cache_dir_for",
    "cached_tokens",
    "corpus_sources",
    "split_tail",
]
