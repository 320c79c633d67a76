"""Where training text comes from, read robustly, one document at a time.

Every source becomes a Hugging Face :class:`datasets.Dataset` of *rows* that
:class:`DocumentEncoder` turns into token ids with ``Dataset.map`` (see
:mod:`nsa_lab.data.cache`, which writes them to a token file):

* ``builtin``: the Python reference manual's topic texts, which ship with every
  Python install (see :func:`builtin_documents`), so a fresh checkout trains
  with no download;
* ``python_source``: the installed Python code, one document per top-level
  package (:mod:`nsa_lab.data.python_source`);
* ``text``: local files, each file one document, read verbatim as bytes;
* ``json`` / ``parquet``: local files, each row one document, the text in the
  column ``data.text_field``;
* ``hub``: a Hugging Face Hub dataset ``data.path`` (configuration
  ``data.name``, split ``data.split``), each row one document; it loads online
  or from the local cache.

Documents made of files (``text``, ``python_source``) are read as bytes: the byte
tokenizer takes the bytes as they are, the BPE decodes them with U+FFFD
replacement. Files that are not valid UTF-8 are counted, files that cannot be read
(permission denied, vanished, a broken link) are skipped and counted, and an empty
file is simply an empty document; real directory trees hold all of these.

Sources are resolved (globs expanded, packages found, files checked) by
:func:`corpus_sources` before anything is loaded, so a wrong path, or a corpus with
nothing in it, fails at once with a :class:`~nsa_lab.config.ConfigError` naming the
key and its value.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
from datasets import Dataset, load_dataset
from omegaconf import DictConfig

from nsa_lab.config import ConfigError, DataConfig
from nsa_lab.data import python_source
from nsa_lab.data.tokenizer import Tokenizer, as_text

TEXT = "text"
FILES, ROOT = "files", "root"  # the columns of rows that are documents made of files
FILE_SOURCES = ("text", "json", "parquet")
_BUILDER_BY_SUFFIX = {".txt": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
_READ_CHUNK = 1 << 20


def builtin_documents() -> list[str]:
    """The topic texts of the Python Language Reference, one document per topic.

    They come from the standard library module ``pydoc_data.topics`` (what
    ``help("if")`` shows): about 465k characters of technical English prose with
    code examples, present in every CPython install. Licence: PSF License
    Agreement (the Python documentation licence). Topics are taken in sorted key
    order so that the corpus, and hence the train/val split, is the same on
    every machine running the same Python version.
    """
    try:
        from pydoc_data.topics import topics
    except ModuleNotFoundError:  # some distributions strip it from the stdlib
        raise ConfigError(
            "data.source",
            "builtin",
            "this Python has no pydoc_data module; point data.source/data.path at a corpus",
        ) from None
    return [topics[key] for key in sorted(topics)]


@dataclass(frozen=True)
class FileDocument:
    """A document made of whole files, read in order; with a ``root``, each file is
    preceded by a header line naming it relative to the root (python_source)."""

    files: tuple[str, ...]
    root: str | None = None


@dataclass(frozen=True)
class DocumentSource:
    """A checked place to read documents from.

    ``key`` is the config key that named the source, so that errors found while
    loading (a missing column, an unreachable hub dataset) name it too. Sources of
    files list them in ``files``; ``documents`` says how files make documents
    (``text``, ``python_source``), where ``json``/``parquet`` rows are documents.
    """

    kind: str  # builtin | python_source | text | json | parquet | hub
    key: str
    path: str | None = None
    files: tuple[str, ...] = ()
    documents: tuple[FileDocument, ...] = field(default=(), repr=False)
    name: str | None = None
    split: str = "train"
    text_field: str = TEXT

    @property
    def label(self) -> str:
        """``key=value`` as the user wrote it, for messages."""
        return f"{self.key}={self.path or self.kind!r}"

    def load(self) -> Dataset:
        """The documents as a dataset with a single ``text`` column (not for file documents)."""
        if self.kind == "builtin":
            return Dataset.from_dict({TEXT: builtin_documents()})
        if self.kind == "hub":
            return self._only_text_column(self._load_hub())
        raw = load_dataset(self.kind, data_files=list(self.files), split="train")
        return self._only_text_column(raw)

    def rows(self) -> Dataset:
        """What :class:`DocumentEncoder` maps over: file lists for documents made of files,
        else the documents' text."""
        if not self.documents:
            return self.load()
        return Dataset.from_dict(
            {
                FILES: [list(d.files) for d in self.documents],
                ROOT: [d.root or "" for d in self.documents],
            }
        )

    @cached_property
    def digest(self) -> str:
        """A digest of the content: the files' bytes for local files; for a hub dataset, the
        public facts that pin its version (revision in the cache paths, sizes, version).
        Computed once per source object (it reads the whole corpus)."""
        if self.files:
            return files_digest(self.files)
        if self.kind == "builtin":
            return _text_digest(builtin_documents())
        dataset = self._load_hub()
        facts = {
            "path": self.path,
            "name": self.name,
            "split": self.split,
            "version": str(dataset.info.version),
            "rows": dataset.num_rows,
            "cache_files": [f["filename"] for f in dataset.cache_files],
        }
        return _text_digest([json.dumps(facts, sort_keys=True)])

    def size_hint(self) -> int:
        """About how many bytes of text the source holds (to size work before reading it)."""
        if self.documents:
            return sum(_size(f) for f in self.files)
        return self.load().data.nbytes

    def describe(self) -> dict[str, Any]:
        """What identifies the source in a token-cache key (with :meth:`digest`)."""
        return {
            "kind": self.kind,
            "path": self.path,
            "files": list(self.files),
            "roots": sorted({d.root for d in self.documents if d.root}),
            "name": self.name,
            "split": self.split,
            "text_field": self.text_field,
        }

    def _load_hub(self) -> Dataset:
        try:
            return load_dataset(self.path, self.name, split=self.split)
        except Exception as exc:  # offline, unknown id, bad name/split: all reported the same way
            detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ConfigError(
                self.key,
                self.path,
                f"cannot load this hub dataset (data.name={self.name!r}, "
                f"data.split={self.split!r}) online or from the cache: {detail}",
            ) from exc

    def _only_text_column(self, raw: Dataset) -> Dataset:
        field_name = self.text_field
        if field_name not in raw.column_names:
            raise ConfigError(
                "data.text_field",
                field_name,
                f"is not a column of {self.key}={self.path!r}; its columns are {raw.column_names}",
            )
        documents = raw.select_columns([field_name])
        return documents if field_name == TEXT else documents.rename_column(field_name, TEXT)


def files_digest(paths: tuple[str, ...]) -> str:
    """A digest of each file's path and bytes, in order; an unreadable file counts as such."""
    outer = hashlib.blake2b(digest_size=16)
    for path in paths:
        inner = hashlib.blake2b(digest_size=16)
        try:
            with open(path, "rb") as f:
                while chunk := f.read(_READ_CHUNK):
                    inner.update(chunk)
        except OSError:
            inner = hashlib.blake2b(b"unreadable", digest_size=16)
        outer.update(path.encode("utf-8", errors="surrogateescape") + b"\0" + inner.digest())
    return outer.hexdigest()


def _text_digest(texts: list[str]) -> str:
    h = hashlib.blake2b(digest_size=16)
    for text in texts:
        h.update(hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest())
    return h.hexdigest()


@dataclass(frozen=True)
class DocumentRead:
    """One document as read: its content, the bytes read, and what reading found."""

    content: bytes | str
    n_bytes: int
    non_utf8: list[str] = field(default_factory=list)  # files that are not valid UTF-8
    skipped: list[str] = field(default_factory=list)  # unreadable files, as "path (reason)"


def read_file_document(files: list[str], root: str | None) -> DocumentRead:
    """The document made of ``files``, as bytes, each file after its header when ``root``
    is set; unreadable files are left out and listed."""
    parts: list[bytes] = []
    n_bytes, non_utf8, skipped = 0, [], []
    for path in files:
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            skipped.append(f"{path} ({exc.strerror or type(exc).__name__})")
            continue
        n_bytes += len(data)
        if not _is_utf8(data):
            non_utf8.append(path)
        if root:
            parts.append(python_source.header(root, path))
            if data and not data.endswith(b"\n"):
                data += b"\n"  # the next header starts a line of its own
        parts.append(data)
    return DocumentRead(b"".join(parts), n_bytes, non_utf8, skipped)


def text_document(text: str | None) -> DocumentRead:
    """A document that is a dataset row's text (a missing value is an empty document)."""
    text = text or ""
    return DocumentRead(text, len(text.encode("utf-8")))


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def read_rows(batch: dict[str, list[Any]]) -> Iterator[DocumentRead]:
    """The documents of a batch of :meth:`DocumentSource.rows`, read one by one."""
    if FILES in batch:
        for files, root in zip(batch[FILES], batch[ROOT], strict=True):
            yield read_file_document(files, root)
    else:
        yield from (text_document(text) for text in batch[TEXT])


@dataclass(frozen=True)
class DocumentEncoder:
    """The ``Dataset.map`` function that tokenises a batch of rows.

    Each row becomes one document's ids followed by EOS (none for an empty document),
    with what reading it found (see :class:`DocumentRead`).
    """

    tokenizer: Tokenizer

    def __call__(self, batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
        columns: dict[str, list[Any]] = {"ids": [], "n_bytes": [], "non_utf8": [], "skipped": []}
        for document in read_rows(batch):  # one document's text in memory at a time
            columns["ids"].append(self._ids(document.content))
            columns["n_bytes"].append(document.n_bytes)
            columns["non_utf8"].append(document.non_utf8)
            columns["skipped"].append(document.skipped)
        return columns

    def _ids(self, content: bytes | str) -> np.ndarray:
        ids = self.tokenizer.encode(content)
        if len(ids) == 0:
            return ids
        return np.append(ids, np.array(self.tokenizer.eos_id, dtype=ids.dtype))


def document_texts(source: DocumentSource) -> Iterator[str]:
    """Each document of ``source`` as text (undecodable bytes replaced), in corpus order:
    what a BPE learns from. Reads a few documents at a time."""
    for batch in source.rows().iter(batch_size=8):
        yield from (as_text(d.content) for d in read_rows(batch))


def corpus_sources(cfg: DictConfig | DataConfig) -> tuple[DocumentSource, DocumentSource | None]:
    """The training source and the validation source, if it is not the training tail.

    Local files are listed here, so that a missing file or an empty corpus is reported
    before any work starts. A validation file is read with the same builder as the
    training files, or, when those do not come from local files, by its suffix.
    ``python_source`` holds out whole packages (unless ``data.val_path`` is given).
    """
    if cfg.source == "python_source":
        train, val = _python_sources(cfg)
    else:
        train, val = _main_source(cfg), None
    if cfg.val_path is None:
        return train, val
    files = resolve_files("data.val_path", cfg.val_path)
    kind = cfg.source if cfg.source in FILE_SOURCES else _builder_for_suffixes(files, cfg.val_path)
    return train, file_source(kind, "data.val_path", cfg.val_path, files, cfg.text_field)


def file_source(
    kind: str, key: str, pattern: str, files: tuple[str, ...], text_field: str
) -> DocumentSource:
    """A source of local ``files``, checked to hold some bytes; a text file is one document."""
    require_content(key, pattern, files)
    documents = tuple(FileDocument((f,)) for f in files) if kind == "text" else ()
    return DocumentSource(kind, key, pattern, files, documents, text_field=text_field)


def _main_source(cfg: DictConfig | DataConfig) -> DocumentSource:
    if cfg.source == "builtin":
        return DocumentSource("builtin", "data.source")
    if cfg.source not in (*FILE_SOURCES, "hub"):
        raise ConfigError(
            "data.source", cfg.source, f"must be one of {['builtin', *FILE_SOURCES, 'hub']}"
        )
    if cfg.path is None:
        raise ConfigError("data.path", None, f"is required for data.source={cfg.source}")
    if cfg.source == "hub":
        return DocumentSource("hub", "data.path", cfg.path, name=cfg.name, split=cfg.split)
    files = resolve_files("data.path", cfg.path)
    return file_source(cfg.source, "data.path", cfg.path, files, cfg.text_field)


def _python_sources(cfg: DictConfig | DataConfig) -> tuple[DocumentSource, DocumentSource | None]:
    """python_source's training and held-out packages; all packages train when
    ``data.val_path`` is the validation set."""
    key, value = ("data.path", cfg.path) if cfg.path is not None else ("data.source", cfg.source)
    packages = python_source.find_packages(python_source.python_roots(cfg.path))
    if not packages:
        raise ConfigError(key, value, "holds no .py file in an importable package or module")
    require_content(key, value, tuple(f for p in packages for f in p.files))

    def source(side: list[python_source.Package]) -> DocumentSource:
        documents = tuple(FileDocument(p.files, p.root) for p in side)
        files = tuple(f for p in side for f in p.files)
        return DocumentSource("python_source", key, cfg.path, files, documents)

    if cfg.val_path is not None:
        return source(packages), None
    train, val = python_source.split_packages(packages, cfg.val_fraction)
    return source(train), source(val)


def require_content(key: str, value: Any, files: tuple[str, ...]) -> None:
    """Refuse a corpus whose files are all empty (or unreadable): nothing to train on."""
    if not any(_size(f) for f in files):
        raise ConfigError(
            key, value, f"has no text: its {len(files)} file(s) are empty or unreadable"
        )


def _size(path: str) -> int:
    try:
        return os.stat(path).st_size
    except OSError:
        return 0


def resolve_files(key: str, pattern: str) -> tuple[str, ...]:
    """The files that ``pattern`` (a path or glob; ``~`` and ``**`` allowed) names, sorted.

    Sorting fixes the document order, and with it the train/val split, whatever
    order the file system lists files in.
    """
    matches = glob.glob(os.path.expanduser(pattern), recursive=True)
    files = tuple(sorted(os.path.abspath(m) for m in matches if os.path.isfile(m)))
    if not files:
        raise ConfigError(key, pattern, "no file matches this path or glob")
    return files


def _builder_for_suffixes(files: tuple[str, ...], pattern: str) -> str:
    suffixes = sorted({Path(f).suffix.lower() for f in files})
    builders = {_BUILDER_BY_SUFFIX.get(s) for s in suffixes}
    if len(builders) != 1 or None in builders:
        raise ConfigError(
            "data.val_path",
            pattern,
            f"cannot tell the file format from the suffixes {suffixes}; "
            f"use one of {sorted(_BUILDER_BY_SUFFIX)}",
        )
    return builders.pop()
