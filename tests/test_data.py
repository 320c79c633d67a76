"""Data pipeline: builtin corpus, byte tokenizer, packing, split, sources and loaders.

Every test runs offline with ``datasets``' cache and the token cache under ``tmp_path``
and with socket connections refused, so passing proves that no step needs the network.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

import datasets
import huggingface_hub.constants
import numpy as np
import pytest
import torch
from omegaconf import DictConfig, OmegaConf

from nsa_lab.config import ConfigError, DataConfig
from nsa_lab.data import (
    ByteTokenizer,
    NSADataModule,
    PackedExamples,
    builtin_documents,
    split_tail,
)

TOK = ByteTokenizer()


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No hub access, no sockets, a throwaway ``datasets`` cache, and a scratch working
    directory (which holds the default ``./token_cache``)."""
    monkeypatch.chdir(tmp_path)
    cache = tmp_path / "hf"
    for var, value in {
        "HF_HOME": str(cache),
        "HF_DATASETS_CACHE": str(cache / "datasets"),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
    }.items():
        monkeypatch.setenv(var, value)
    # datasets and huggingface_hub read these at import time, so set the parsed values too.
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache / "datasets")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise OSError("network access attempted in an offline test")

    monkeypatch.setattr(socket.socket, "connect", refuse)


def data_cfg(**overrides: Any) -> DictConfig:
    cfg = OmegaConf.structured(DataConfig)
    cfg.merge_with(overrides)
    return cfg


def built(seed: int = 0, **overrides: Any) -> NSADataModule:
    dm = NSADataModule(data_cfg(**overrides), seed=seed)
    dm.setup()
    return dm


def encoded(*documents: str) -> list[int]:
    return [t for doc in documents for t in [*TOK.encode(doc), TOK.eos_id]]


def full_stream(dm: NSADataModule) -> list[int]:
    assert dm.train_set is not None and dm.val_set is not None
    return dm.train_set.tokens.tolist() + dm.val_set.tokens.tolist()


# --- builtin corpus ---------------------------------------------------------------


def test_builtin_corpus_is_real_english_of_sensible_size() -> None:
    docs = builtin_documents()
    text = "".join(docs)
    words = text.lower().split()
    assert 50 <= len(docs) <= 500
    assert 200_000 <= len(text) <= 2_000_000
    assert words.count("the") > 0.02 * len(words)  # English function words dominate
    assert {"statement", "function", "object", "value"} <= set(words)
    assert builtin_documents() == docs  # fixed order, so the split is stable


def test_builtin_datamodule_loads_offline_and_batches() -> None:
    dm = built(seq_len=64, batch_size=4)
    stream = full_stream(dm)
    assert stream.count(TOK.eos_id) == len(builtin_documents())
    assert dm.n_train_tokens == len(dm.train_set) * 64 > 300_000
    assert dm.n_val_tokens == len(dm.val_set) * 64 > 0
    inputs, targets = next(iter(dm.train_dataloader()))
    assert inputs.shape == targets.shape == (4, 64)
    assert inputs.dtype == targets.dtype == torch.long
    assert torch.equal(inputs[:, 1:], targets[:, :-1])


# --- tokenizer --------------------------------------------------------------------


def test_tokenizer_round_trips_unicode() -> None:
    text = "Grüße, naïve café — 世界 🙂\n\ttabs & <tags>"
    ids = TOK.encode(text)
    assert TOK.vocab_size == 257 and TOK.eos_id == 256
    assert all(0 <= i < 256 for i in ids)
    assert len(ids) == len(text.encode("utf-8"))
    assert TOK.decode(ids) == text


def test_tokenizer_decode_tolerates_eos_and_broken_characters() -> None:
    euro = TOK.encode("€")  # three bytes
    assert TOK.decode([*TOK.encode("a"), TOK.eos_id, *TOK.encode("b")]) == "ab"
    assert TOK.decode([*euro[:2], *TOK.encode("x")]) == "\ufffdx"


# --- tokenising and packing ---------------------------------------------------------


def test_documents_are_joined_with_eos_and_empty_ones_skipped(tmp_path: Path) -> None:
    lines = [json.dumps({"text": t}) for t in ["ab " * 20, "", "ü" * 30]]
    (tmp_path / "docs.jsonl").write_text("\n".join(lines), encoding="utf-8")
    dm = built(source="json", path=str(tmp_path / "docs.jsonl"), seq_len=8, batch_size=2)
    assert full_stream(dm) == encoded("ab " * 20, "ü" * 30)
    assert dm.corpus_stats.n_documents == 2


def test_packing_tiles_the_stream_with_stride_seq_len() -> None:
    stream = np.arange(23, dtype=np.int32)
    examples = PackedExamples(stream, seq_len=5)
    assert len(examples) == 4  # (23 - 1) // 5; tokens 21 and 22 fill no window
    for i in range(len(examples)):
        inputs, targets = examples[i]
        assert inputs.shape == targets.shape == (5,)
        assert inputs.tolist() == stream[5 * i : 5 * i + 5].tolist()
        assert targets.tolist() == stream[5 * i + 1 : 5 * i + 6].tolist()
    tiled = [t for i in range(len(examples)) for t in examples[i][0].tolist()]
    assert tiled + [examples[3][1][-1].item()] == stream[:21].tolist()  # nothing skipped
    with pytest.raises(IndexError):
        examples[4]


# --- train/val split ------------------------------------------------------------------


def test_split_is_deterministic_and_disjoint() -> None:
    first, second = built(seq_len=128), built(seq_len=128, batch_size=8)
    assert np.array_equal(first.train_set.tokens, second.train_set.tokens)
    assert np.array_equal(first.val_set.tokens, second.val_set.tokens)
    whole = encoded(*builtin_documents())
    # Train is a head and val the tail of the stream: every stream position lies in exactly
    # one of them, so no text is both trained on and validated on.
    assert full_stream(first) == whole
    n_val_tokens = len(first.val_set.tokens)
    assert n_val_tokens == len(first.val_set) * 128 + 1  # whole val examples only
    assert first.val_set.tokens.tolist() == whole[-n_val_tokens:]
    share = len(first.val_set) / (len(first.train_set) + len(first.val_set))
    assert 0.04 < share < 0.06  # val_fraction=0.05


def test_split_keeps_one_val_example_and_rejects_tiny_corpora() -> None:
    train, val = split_tail(np.arange(100, dtype=np.int32), seq_len=10, val_fraction=0.001)
    assert len(val) == 11 and len(train) == 89
    with pytest.raises(ConfigError, match=r"data\.seq_len=10: the corpus has 20 tokens"):
        split_tail(np.arange(20, dtype=np.int32), seq_len=10, val_fraction=0.5)


# --- local file sources ---------------------------------------------------------------

DOCS = [
    f"Document {i}: the quick brown fox jumps over the lazy dog.\nLine two of {i}.\n"
    for i in range(6)
]


def write_text(tmp_path: Path) -> dict[str, Any]:
    for i, doc in enumerate(DOCS):
        (tmp_path / f"doc{i}.txt").write_text(doc, encoding="utf-8")
    return {"source": "text", "path": str(tmp_path / "*.txt")}


def write_json(tmp_path: Path) -> dict[str, Any]:
    lines = [json.dumps({"id": i, "body": doc}) for i, doc in enumerate(DOCS)]
    (tmp_path / "docs.jsonl").write_text("\n".join(lines), encoding="utf-8")
    return {"source": "json", "path": str(tmp_path / "docs.jsonl"), "text_field": "body"}


def write_parquet(tmp_path: Path) -> dict[str, Any]:
    datasets.Dataset.from_dict({"content": DOCS, "n": list(range(6))}).to_parquet(
        tmp_path / "docs.parquet"
    )
    return {"source": "parquet", "path": str(tmp_path / "docs.parquet"), "text_field": "content"}


@pytest.mark.parametrize("write", [write_text, write_json, write_parquet])
def test_local_file_sources_read_every_document_verbatim(write: Any, tmp_path: Path) -> None:
    dm = built(**write(tmp_path), seq_len=16, batch_size=2)
    assert full_stream(dm) == encoded(*DOCS)
    inputs, targets = next(iter(dm.train_dataloader()))
    assert inputs.shape == targets.shape == (2, 16)


def test_val_path_is_the_validation_set(tmp_path: Path) -> None:
    train_text, val_text = "training text. " * 20, "held-out validation text. " * 5
    (tmp_path / "train.txt").write_text(train_text, encoding="utf-8")
    (tmp_path / "val.txt").write_text(val_text, encoding="utf-8")
    dm = built(
        source="text",
        path=str(tmp_path / "train.txt"),
        val_path=str(tmp_path / "val.txt"),
        seq_len=16,
        batch_size=2,
    )
    assert dm.train_set.tokens.tolist() == encoded(train_text)  # no tail held out
    assert dm.val_set.tokens.tolist() == encoded(val_text)


def test_val_path_with_the_builtin_corpus_is_read_by_its_suffix(tmp_path: Path) -> None:
    val_text = "validation " * 30
    (tmp_path / "val.jsonl").write_text(json.dumps({"text": val_text}), encoding="utf-8")
    dm = built(val_path=str(tmp_path / "val.jsonl"), seq_len=32)
    assert dm.train_set.tokens.tolist() == encoded(*builtin_documents())
    assert dm.val_set.tokens.tolist() == encoded(val_text)  # parsed as JSON, not as text


# --- errors -----------------------------------------------------------------------------


def test_missing_file_fails_at_construction_naming_key_and_value(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope" / "*.txt")
    with pytest.raises(ConfigError, match=r"data\.path=.*nope.*no file matches"):
        NSADataModule(data_cfg(source="text", path=missing), seed=0)
    with pytest.raises(ConfigError, match=r"data\.val_path=.*nope.*no file matches"):
        NSADataModule(data_cfg(val_path=missing), seed=0)


def test_unknown_text_field_names_the_columns(tmp_path: Path) -> None:
    cfg = write_json(tmp_path) | {"text_field": "txt"}
    dm = NSADataModule(data_cfg(**cfg), seed=0)
    with pytest.raises(ConfigError, match=r"data\.text_field='txt'.*\['id', 'body'\]"):
        dm.setup()


def test_unreachable_hub_dataset_is_a_config_error() -> None:
    dm = NSADataModule(data_cfg(source="hub", path="nobody/no-such-dataset"), seed=0)
    with pytest.raises(ConfigError, match=r"data\.path='nobody/no-such-dataset': cannot load"):
        dm.setup()


def test_batch_larger_than_training_set_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"data\.batch_size=64: exceeds the \d+ training"):
        built(**write_text(tmp_path), seq_len=16, batch_size=64)


# --- loaders ------------------------------------------------------------------------------


def first_batch_inputs(dm: NSADataModule) -> torch.Tensor:
    return next(iter(dm.train_dataloader()))[0]


def test_train_order_repeats_for_a_seed_and_changes_with_it() -> None:
    seed0, again, seed1 = (built(seed=s, seq_len=64, batch_size=8) for s in (0, 0, 1))
    assert torch.equal(first_batch_inputs(seed0), first_batch_inputs(again))
    assert not torch.equal(first_batch_inputs(seed0), first_batch_inputs(seed1))
    assert len(seed0.train_dataloader()) == len(seed0.train_set) // 8  # drop_last


def test_val_loader_is_in_order_and_complete() -> None:
    dm = built(seq_len=64, batch_size=8)
    batches = list(dm.val_dataloader())
    inputs = torch.cat([b[0] for b in batches])
    expected = torch.stack([dm.val_set[i][0] for i in range(len(dm.val_set))])
    assert torch.equal(inputs, expected)


def test_hub_dataset_is_cached_by_the_version_it_loads(tmp_path: Path) -> None:
    """A hub id may also be a local dataset folder, which loads offline like a cached one."""
    folder = tmp_path / "hub_ds"
    folder.mkdir()
    datasets.Dataset.from_dict({"text": DOCS}).to_parquet(folder / "train.parquet")
    first = built(source="hub", path=str(folder), seq_len=16, batch_size=2)
    assert full_stream(first) == encoded(*DOCS)
    again = built(source="hub", path=str(folder), seq_len=16, batch_size=2)
    assert not again.token_files[0].built
    assert again.corpus_stats.digest == first.corpus_stats.digest
    datasets.Dataset.from_dict({"text": DOCS[::-1]}).to_parquet(folder / "train.parquet")
    changed = built(source="hub", path=str(folder), seq_len=16, batch_size=2)
    assert changed.corpus_stats.digest != first.corpus_stats.digest
    assert full_stream(changed) == encoded(*DOCS[::-1])
