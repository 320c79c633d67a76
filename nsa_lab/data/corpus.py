"""Where training text comes from, and how it becomes one stream of token ids.

Every source is read into a Hugging Face :class:`datasets.Dataset` with a single
``text`` column, one document per row, so that tokenising is the same code for
all of them:

* ``builtin``: the Python reference manual's topic texts, which ship with every
  Python install (see :func:`builtin_documents`), so a fresh checkout trains
  with no download;
* ``text``: local plain-text files, each file one document, read verbatim
  (line breaks kept, so the model sees the text as written);
* ``json`` / ``parquet``: local files, each row one document, the text in the
  column ``data.text_field``;
* ``hub``: a Hugging Face Hub dataset ``data.path`` (configuration
  ``data.name``, split ``data.split``), each row one document; it loads online
  or from the local cache.

Sources are resolved (globs expanded, files checked) by :func:`corpus_sources`
before anything is loaded, so a wrong path fails at once with a
:class:`~nsa_lab.config.ConfigError` naming the key and its value.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.compute as pc
from datasets import Dataset, Features, List, Value, load_dataset
from omegaconf import DictConfig

from nsa_lab.config import ConfigError, DataConfig
from nsa_lab.data.tokenizer import ByteTokenizer

TEXT = "text"
FILE_SOURCES = ("text", "json", "parquet")
_BUILDER_BY_SUFFIX = {".txt": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
# A text file is one document, read whole: the default (one row per line, line
# breaks stripped) would both lose the line breaks and end a "document" at every line.
_BUILDER_OPTIONS: dict[str, dict[str, Any]] = {"text": {"sample_by": "document"}}


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
class DocumentSource:
    """A checked place to read documents from; :meth:`load` reads them.

    ``key`` is the config key that named the source, so that errors found while
    loading (a missing column, an unreachable hub dataset) name it too.
    """

    kind: str  # builtin | text | json | parquet | hub
    key: str
    path: str | None = None
    files: tuple[str, ...] = ()
    name: str | None = None
    split: str = "train"
    text_field: str = TEXT

    def load(self) -> Dataset:
        """The documents as a dataset with a single ``text`` column."""
        if self.kind == "builtin":
            return Dataset.from_dict({TEXT: builtin_documents()})
        if self.kind == "hub":
            return self._only_text_column(self._load_hub())
        raw = load_dataset(
            self.kind,
            data_files=list(self.files),
            split="train",
            **_BUILDER_OPTIONS.get(self.kind, {}),
        )
        return self._only_text_column(raw)

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
        field = TEXT if self.kind == "text" else self.text_field
        if field not in raw.column_names:
            raise ConfigError(
                "data.text_field",
                field,
                f"is not a column of {self.key}={self.path!r}; its columns are {raw.column_names}",
            )
        documents = raw.select_columns([field])
        return documents if field == TEXT else documents.rename_column(field, TEXT)


def corpus_sources(cfg: DictConfig | DataConfig) -> tuple[DocumentSource, DocumentSource | None]:
    """The training source and, if ``data.val_path`` is set, the validation source.

    Local files are globbed here, so that a missing file is reported before any
    work starts. A validation file is read with the same builder as the training
    files, or, when those do not come from local files, by its suffix.
    """
    train = _main_source(cfg)
    if cfg.val_path is None:
        return train, None
    files = resolve_files("data.val_path", cfg.val_path)
    kind = cfg.source if cfg.source in FILE_SOURCES else _builder_for_suffixes(files, cfg.val_path)
    val = DocumentSource(kind, "data.val_path", cfg.val_path, files, text_field=cfg.text_field)
    return train, val


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
    return DocumentSource(cfg.source, "data.path", cfg.path, files, text_field=cfg.text_field)


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


def token_stream(documents: Dataset, tokenizer: ByteTokenizer) -> np.ndarray:
    """All documents' tokens end to end in corpus order, each document followed by EOS.

    Tokenising is a batched ``Dataset.map`` so that, for file and hub sources,
    ``datasets`` caches the result next to the raw data and a rerun skips it.
    Empty (or null) documents are dropped rather than left as a lone EOS. The
    result is a flat, writable ``int32`` array, which packing slices without copying.
    """
    eos = [tokenizer.eos_id]

    def encode_batch(batch: dict[str, list[str | None]]) -> dict[str, list[list[int]]]:
        return {"ids": [tokenizer.encode(text) + eos for text in batch[TEXT] if text]}

    tokenized = documents.map(
        encode_batch,
        batched=True,
        remove_columns=documents.column_names,
        features=Features({"ids": List(Value("int32"))}),
        desc="Tokenising",
    )
    ids = tokenized.with_format("arrow")[:]["ids"]
    # A copy, because Arrow's buffers are read-only and torch warns on wrapping them.
    return np.array(pc.list_flatten(ids).to_numpy(), dtype=np.int32)
