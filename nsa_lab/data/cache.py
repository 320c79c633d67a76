"""The token cache: each corpus tokenised once into a flat memory-mapped token file.

An *entry* is a folder under the cache directory (``data.cache_dir``; by default
``token_cache`` beside the MLflow store, see :func:`cache_dir_for`) holding

* ``tokens.bin``: every document's ids followed by EOS, end to end in corpus order,
  as ``uint16`` when the vocabulary fits (``uint32`` otherwise);
* ``meta.json``: what the entry holds (tokens, documents, files, bytes, files that
  are not valid UTF-8 and files skipped as unreadable, the content digest).

Its name is a hash of the source (kind and file list), the tokenizer (kind, vocabulary
and, for BPE, its merges) and the content digest, so a changed file or another
tokenizer makes a new entry and an unchanged corpus is never tokenised again. The
first process to need an entry builds it under a file lock while the others wait
(four ``nsa-lab train`` processes started together, or the ranks of a DDP job, build
it once); files appear by atomic rename, ``meta.json`` last, so a reader never sees a
half-written entry. Tokenising is a batched ``Dataset.map`` (over several processes
for large corpora) whose output goes to disk, then is copied into ``tokens.bin``
batch by batch: no process ever holds the corpus in memory.

A BPE tokenizer is cached the same way (:func:`cached_bpe`), keyed by the training
documents and the vocabulary size.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from datasets import Dataset, Features, List, Value
from filelock import FileLock
from omegaconf import DictConfig

from nsa_lab.config import ConfigError, DataConfig, sqlite_path
from nsa_lab.data.corpus import DocumentEncoder, DocumentSource, document_texts
from nsa_lab.data.tokenizer import BPETokenizer, Tokenizer, token_dtype, train_bpe
from nsa_lab.files import write_atomic

CACHE_FORMAT = 1  # bump when the content of an entry changes for the same key
DEFAULT_FOLDER = "token_cache"
TOKENS_FILE, META_FILE = "tokens.bin", "meta.json"
# A map batch holds documents of about BATCH_BYTES in all (at most MAX_ROWS_PER_BATCH):
# few python_source packages (one can be 50 MB), many short text rows.
BATCH_BYTES = 8 << 20
MAX_ROWS_PER_BATCH = 1024
PARALLEL_BYTES = 64 << 20  # corpora larger than this are tokenised by several processes
MAX_PROCESSES = 8
# A BPE learns from at most this much of the training split (evenly spread pieces of
# BPE_SAMPLE_PIECE characters), which bounds training to well under a minute.
BPE_SAMPLE_CHARS = 32 << 20
BPE_SAMPLE_PIECE = 1 << 16
EXAMPLES_KEPT = 20  # file names kept in meta.json per kind of trouble


def cache_dir_for(data_cfg: DictConfig | DataConfig, tracking_uri: str | None = None) -> Path:
    """``data.cache_dir``, else ``token_cache`` beside a SQLite MLflow store, else in the
    working directory."""
    if data_cfg.cache_dir is not None:
        return Path(data_cfg.cache_dir).expanduser()
    db = None if tracking_uri is None else sqlite_path(tracking_uri)
    if db is not None:
        return db.resolve().parent / DEFAULT_FOLDER
    return Path(DEFAULT_FOLDER)


def check_cache_dir(folder: Path) -> Path:
    """``folder``, created if needed and proven writable; else a ConfigError on
    ``data.cache_dir`` (before any work)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise ConfigError(
            "data.cache_dir",
            str(folder),
            f"cannot hold the token cache: {exc.strerror or exc}",
        ) from None
    return folder


@dataclass(frozen=True)
class CorpusStats:
    """What a corpus (or one entry of it) holds; logged as the run's ``data.corpus_*`` params."""

    n_tokens: int
    n_documents: int
    n_files: int
    n_bytes: int
    non_utf8_files: int
    skipped_files: int
    digest: str
    non_utf8_examples: list[str] = field(default_factory=list)
    skipped_examples: list[str] = field(default_factory=list)

    @classmethod
    def combine(cls, parts: Iterable[CorpusStats]) -> CorpusStats:
        """The stats of a corpus split over several entries (training and validation)."""
        parts = list(parts)
        if len(parts) == 1:
            return parts[0]
        digest = hashlib.blake2b("".join(p.digest for p in parts).encode(), digest_size=16)
        return cls(
            **{name: sum(getattr(p, name) for p in parts) for name in _COUNTS},
            digest=digest.hexdigest(),
            non_utf8_examples=[f for p in parts for f in p.non_utf8_examples][:EXAMPLES_KEPT],
            skipped_examples=[f for p in parts for f in p.skipped_examples][:EXAMPLES_KEPT],
        )

    def params(self) -> dict[str, Any]:
        """MLflow params: the corpus depends on what is installed, so a run records it."""
        return {
            "data.corpus_bytes": self.n_bytes,
            "data.corpus_files": self.n_files,
            "data.corpus_documents": self.n_documents,
            "data.corpus_tokens": self.n_tokens,
            "data.corpus_digest": self.digest,
            "data.corpus_non_utf8_files": self.non_utf8_files,
            "data.corpus_skipped_files": self.skipped_files,
        }


_COUNTS = ("n_tokens", "n_documents", "n_files", "n_bytes", "non_utf8_files", "skipped_files")


@dataclass(frozen=True)
class TokenFile:
    """A complete cache entry; ``built`` says whether this process tokenised it."""

    folder: Path
    dtype: np.dtype
    stats: CorpusStats
    source: DocumentSource
    built: bool
    seconds: float = 0.0

    def tokens(self) -> np.memmap:
        """The token stream, memory-mapped read-only: pages are read as windows touch them."""
        if self.stats.n_tokens == 0:
            raise ConfigError(
                self.source.key,
                self.source.path or self.source.kind,
                "has no text to train on (every document is empty or unreadable)",
            )
        return np.memmap(self.folder / TOKENS_FILE, dtype=self.dtype, mode="r")


def cached_tokens(source: DocumentSource, tokenizer: Tokenizer, cache_dir: Path) -> TokenFile:
    """The entry of ``source`` under ``tokenizer``, built first if no process has yet."""
    digest = source.digest
    key = {
        "format": CACHE_FORMAT,
        "source": source.describe(),
        "tokenizer": tokenizer.describe(),
        "digest": digest,
    }
    folder = cache_dir / f"{source.kind}-{_hash(key)}"
    if not (folder / META_FILE).exists():
        with FileLock(str(folder) + ".lock"):
            if not (folder / META_FILE).exists():
                return _build(folder, source, tokenizer, digest)
    return _open(folder, source)


def _open(folder: Path, source: DocumentSource) -> TokenFile:
    meta = json.loads((folder / META_FILE).read_text())
    return TokenFile(folder, np.dtype(meta["dtype"]), CorpusStats(**meta["stats"]), source, False)


def _build(folder: Path, source: DocumentSource, tokenizer: Tokenizer, digest: str) -> TokenFile:
    start = time.perf_counter()
    folder.mkdir(parents=True, exist_ok=True)
    dtype = token_dtype(tokenizer.vocab_size)
    scratch = Path(tempfile.mkdtemp(prefix="scratch-", dir=folder))
    try:
        documents = _tokenised(source, tokenizer, dtype, scratch, folder.name)
        stats = _write_tokens(documents, folder / TOKENS_FILE, dtype, source, digest)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    meta = {
        "format": CACHE_FORMAT,
        "dtype": dtype.name,
        "stats": asdict(stats),
        "tokenizer": tokenizer.describe(),
        "source": {"kind": source.kind, "key": source.key, "path": source.path},
    }
    write_atomic(
        folder / META_FILE, lambda tmp: tmp.write_bytes(json.dumps(meta, indent=1).encode())
    )
    _report_trouble(source, stats, tokenizer)
    return TokenFile(folder, dtype, stats, source, True, time.perf_counter() - start)


def _tokenised(
    source: DocumentSource, tokenizer: Tokenizer, dtype: np.dtype, scratch: Path, name: str
) -> Dataset:
    """One row per document: its ids and what reading it found, on disk under ``scratch``."""
    rows = source.rows()
    features = Features(
        {
            "ids": List(Value(dtype.name)),
            "n_bytes": Value("int64"),
            "non_utf8": List(Value("string")),
            "skipped": List(Value("string")),
        }
    )
    n_bytes = source.size_hint()
    processes = min(os.cpu_count() or 1, MAX_PROCESSES, len(rows))
    rows_per_batch = min(MAX_ROWS_PER_BATCH, max(1, len(rows) * BATCH_BYTES // max(1, n_bytes)))
    return rows.map(
        DocumentEncoder(tokenizer),
        batched=True,
        batch_size=rows_per_batch,
        writer_batch_size=rows_per_batch,  # rows reach the disk as soon as a batch is done
        remove_columns=rows.column_names,
        features=features,
        cache_file_name=str(scratch / "ids.arrow"),
        new_fingerprint=name,
        num_proc=processes if n_bytes > PARALLEL_BYTES and processes > 1 else None,
        desc=f"Tokenising {source.label}",
    )


def _write_tokens(
    documents: Dataset, path: Path, dtype: np.dtype, source: DocumentSource, digest: str
) -> CorpusStats:
    """Copy every document's ids into ``path`` and tally what reading found, one record
    batch at a time.

    The map's output files are read as Arrow streams, not memory-mapped, so the pages
    read are not held on to by this process (memory mapping them would add the whole
    output to the process's resident memory).
    """
    n_tokens = n_documents = n_bytes = 0
    non_utf8: list[str] = []
    skipped: list[str] = []

    def write_tokens(tmp: Path) -> None:
        nonlocal n_tokens, n_documents, n_bytes
        with open(tmp, "wb") as out:
            for batch in _record_batches(documents):
                flat = pc.list_flatten(batch["ids"]).to_numpy()
                flat.astype(dtype, copy=False).tofile(out)
                n_tokens += len(flat)
                n_documents += (
                    pc.sum(pc.greater(pc.list_value_length(batch["ids"]), 0)).as_py() or 0
                )
                n_bytes += pc.sum(batch["n_bytes"]).as_py() or 0
                non_utf8.extend(pc.list_flatten(batch["non_utf8"]).to_pylist())
                skipped.extend(pc.list_flatten(batch["skipped"]).to_pylist())
            out.flush()
            os.fsync(out.fileno())

    write_atomic(path, write_tokens)
    return CorpusStats(
        n_tokens=n_tokens,
        n_documents=n_documents,
        n_files=len(source.files),
        n_bytes=n_bytes,
        non_utf8_files=len(non_utf8),
        skipped_files=len(skipped),
        digest=digest,
        non_utf8_examples=non_utf8[:EXAMPLES_KEPT],
        skipped_examples=skipped[:EXAMPLES_KEPT],
    )


def _record_batches(documents: Dataset) -> Iterator[pa.RecordBatch]:
    """The rows of ``documents`` (a map's output, one or more Arrow stream files, in order)."""
    for cache_file in documents.cache_files:
        with pa.OSFile(cache_file["filename"]) as f:
            yield from pa.ipc.open_stream(f)


def _report_trouble(source: DocumentSource, stats: CorpusStats, tokenizer: Tokenizer) -> None:
    """One line on stderr when files were not UTF-8 or could not be read."""
    if not stats.non_utf8_files and not stats.skipped_files:
        return
    kept = "kept as raw bytes" if tokenizer.describe()["kind"] == "byte" else "decoded with U+FFFD"
    parts = []
    if stats.non_utf8_files:
        parts.append(f"{stats.non_utf8_files} not valid UTF-8 ({kept})")
    if stats.skipped_files:
        parts.append(
            f"{stats.skipped_files} unreadable and skipped, e.g. {stats.skipped_examples[0]}"
        )
    print(f"nsa-lab: {source.label}: of {stats.n_files} files, {'; '.join(parts)}", file=sys.stderr)


def cached_bpe(
    source: DocumentSource, head_fraction: float, vocab_size: int, cache_dir: Path
) -> BPETokenizer:
    """The BPE of ``vocab_size`` ids learnt from the training documents of ``source``:
    those ending within its first ``head_fraction`` (the rest is validation text)."""
    key = {
        "format": CACHE_FORMAT,
        "source": source.describe(),
        "digest": source.digest,
        "head_fraction": head_fraction,
        "vocab_size": vocab_size,
        "sample_chars": BPE_SAMPLE_CHARS,
    }
    path = cache_dir / f"bpe-{_hash(key)}.json"
    if not path.exists():
        with FileLock(str(path) + ".lock"):
            if not path.exists():
                sample = bpe_sample(
                    document_texts(source), source.size_hint(), head_fraction, BPE_SAMPLE_CHARS
                )
                bpe = train_bpe(sample, vocab_size)
                write_atomic(path, lambda tmp: bpe.save(tmp))
    return BPETokenizer.load(path)


def bpe_sample(texts: Iterable[str], total: int, head_fraction: float, cap: int) -> Iterator[str]:
    """Pieces of the documents that end within ``head_fraction`` of ``total`` characters,
    every k-th piece so that about ``cap`` characters spread over the whole head."""
    head = math.inf if head_fraction >= 1 else head_fraction * total
    stride = max(1, math.ceil(head_fraction * total / cap))
    position = piece = 0
    for text in texts:
        position += len(text)
        if position > head:
            return
        for start in range(0, len(text), BPE_SAMPLE_PIECE):
            if piece % stride == 0:
                yield text[start : start + BPE_SAMPLE_PIECE]
            piece += 1


def _hash(key: dict[str, Any]) -> str:
    return hashlib.blake2b(json.dumps(key, sort_keys=True).encode(), digest_size=10).hexdigest()
