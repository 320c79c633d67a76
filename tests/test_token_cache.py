"""The token cache: reuse by digest, memory-mapped windows, DDP shards, concurrent builders,
messy files, the cache directory, and ``nsa-lab prepare``."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DistributedSampler

from nsa_lab.cli import main
from nsa_lab.config import ConfigError, DataConfig
from nsa_lab.data import ByteTokenizer, NSADataModule, PackedExamples, cache_dir_for, cached_tokens
from nsa_lab.data import cache as cache_module

TOK = ByteTokenizer()
LATIN1 = "caf\u00e9 cr\u00e8me, na\u00efve\n".encode("latin-1")  # not valid UTF-8


def data_cfg(**overrides: Any) -> DictConfig:
    cfg = OmegaConf.structured(DataConfig)
    cfg.merge_with(overrides)
    return cfg


def text_corpus(folder: Path, n_files: int = 6, repeat: int = 20) -> dict[str, Any]:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n_files):
        text = f"Document {i}: the quick brown fox jumps over the lazy dog.\n" * repeat
        (folder / f"doc{i}.txt").write_text(text, encoding="utf-8")
    return {"source": "text", "path": str(folder / "*.txt"), "seq_len": 32, "batch_size": 4}


def prepared(cache_dir: Path, **overrides: Any) -> NSADataModule:
    dm = NSADataModule(data_cfg(**overrides), seed=0, cache_dir=cache_dir)
    dm.setup()
    return dm


# --- keys and reuse -------------------------------------------------------------------


def test_a_second_data_module_reuses_the_entry_without_tokenising(
    workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    corpus = text_corpus(workdir / "corpus")
    first = prepared(workdir / "cache", **corpus)
    assert first.token_files[0].built

    def no_tokenising(*args: Any) -> None:
        raise AssertionError("tokenised again")

    monkeypatch.setattr(cache_module.DocumentEncoder, "__call__", no_tokenising)
    second = prepared(workdir / "cache", **corpus)
    assert not second.token_files[0].built
    assert second.token_files[0].folder == first.token_files[0].folder
    assert np.array_equal(second.train_set.tokens, first.train_set.tokens)
    assert second.corpus_stats == first.corpus_stats


def test_a_changed_file_changes_the_digest_and_the_entry(workdir: Path) -> None:
    corpus = text_corpus(workdir / "corpus")
    before = prepared(workdir / "cache", **corpus)
    (workdir / "corpus" / "doc0.txt").write_text("Changed. " * 100, encoding="utf-8")
    after = prepared(workdir / "cache", **corpus)
    assert after.corpus_stats.digest != before.corpus_stats.digest
    assert after.token_files[0].folder != before.token_files[0].folder
    assert after.token_files[0].built
    assert bytes(after.train_set.tokens[:9].tolist()) == b"Changed. "


def test_another_tokenizer_gets_another_entry(workdir: Path) -> None:
    corpus = text_corpus(workdir / "corpus", repeat=60)
    byte = prepared(workdir / "cache", **corpus)
    bpe = prepared(workdir / "cache", **corpus, tokenizer="bpe", vocab_size=300)
    assert bpe.token_files[0].folder != byte.token_files[0].folder
    assert bpe.token_files[0].built
    assert bpe.corpus_stats.digest == byte.corpus_stats.digest  # same text
    assert bpe.corpus_stats.n_tokens < byte.corpus_stats.n_tokens


def test_entry_holds_uint16_tokens_and_its_metadata(workdir: Path) -> None:
    dm = prepared(workdir / "cache", **text_corpus(workdir / "corpus"))
    entry = dm.token_files[0]
    stats = entry.stats
    assert entry.dtype == np.uint16
    assert (entry.folder / "tokens.bin").stat().st_size == 2 * stats.n_tokens
    sizes = [p.stat().st_size for p in (workdir / "corpus").glob("*.txt")]
    assert stats.n_bytes == sum(sizes) and stats.n_files == stats.n_documents == 6
    assert stats.n_tokens == stats.n_bytes + stats.n_documents  # bytes + one EOS a document
    assert not list(entry.folder.glob("*.tmp")) and not list(entry.folder.glob("scratch-*"))


# --- windows from the memory map ------------------------------------------------------------


class RecordingArray:
    """A token array that records which slices are read from it."""

    def __init__(self, tokens: np.ndarray) -> None:
        self.tokens = tokens
        self.reads: list[slice] = []

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, key: slice) -> np.ndarray:
        self.reads.append(key)
        return self.tokens[key]


def test_windows_come_from_the_memory_mapped_token_file_one_at_a_time(workdir: Path) -> None:
    dm = prepared(workdir / "cache", **text_corpus(workdir / "corpus"))
    tokens_file = dm.token_files[0].folder / "tokens.bin"
    for examples in (dm.train_set, dm.val_set):
        assert isinstance(examples.tokens, np.memmap)
        assert Path(examples.tokens.filename) == tokens_file.resolve()
    recording = RecordingArray(dm.train_set.tokens)
    examples = PackedExamples(recording, seq_len=32)
    inputs, targets = examples[3]
    assert [(r.start, r.stop) for r in recording.reads] == [(96, 129)]  # seq_len + 1 tokens
    assert inputs.tolist() == dm.train_set.tokens[96:128].tolist()
    assert targets.tolist() == dm.train_set.tokens[97:129].tolist()


def test_ddp_ranks_get_disjoint_windows(workdir: Path) -> None:
    dm = prepared(workdir / "cache", **text_corpus(workdir / "corpus"))
    shards = [
        list(DistributedSampler(dm.train_set, num_replicas=2, rank=r, shuffle=True, seed=0))
        for r in (0, 1)
    ]
    assert len(shards[0]) == len(shards[1]) >= len(dm.train_set) // 2
    assert not set(shards[0]) & set(shards[1])
    assert set(shards[0]) | set(shards[1]) == set(range(len(dm.train_set)))
    windows = [{tuple(dm.train_set[i][0].tolist()) for i in shard} for shard in shards]
    starts = [{i * 32 for i in shard} for shard in shards]
    assert not starts[0] & starts[1]
    assert len(windows[0]) > 1 and len(windows[1]) > 1


# --- concurrent builders ------------------------------------------------------------------


class SlowByteTokenizer(ByteTokenizer):
    """Byte tokens, slowly: a build that lasts long enough for a second builder to arrive."""

    def encode(self, data: str | bytes) -> np.ndarray:
        time.sleep(0.05)
        return super().encode(data)


def test_concurrent_builders_build_an_entry_once(workdir: Path) -> None:
    dm = NSADataModule(data_cfg(**text_corpus(workdir / "corpus")), seed=0, cache_dir="c")
    start = threading.Barrier(2)
    results = []

    def build() -> None:
        start.wait()
        results.append(cached_tokens(dm.train_source, SlowByteTokenizer(), workdir / "c"))

    threads = [threading.Thread(target=build) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(r.built for r in results) == [False, True]
    assert np.array_equal(results[0].tokens(), results[1].tokens())


# --- messy files ---------------------------------------------------------------------------


def test_messy_text_files_are_read_as_bytes_counted_and_skipped(
    workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    corpus = workdir / "messy"
    corpus.mkdir()
    good = "plain UTF-8 text, gr\u00fc\u00dfe\n" * 10
    (corpus / "a_good.py").write_text(good, encoding="utf-8")
    (corpus / "b_latin1.py").write_bytes(LATIN1 * 10)
    (corpus / "c_empty.py").write_bytes(b"")
    (corpus / "d_vanishes.py").write_text("soon gone\n" * 10)
    dm = NSADataModule(
        data_cfg(source="text", path=str(corpus / "*.py"), seq_len=16, batch_size=2),
        seed=0,
        cache_dir=workdir / "cache",
    )
    (corpus / "d_vanishes.py").unlink()  # listed, then gone before it is read
    dm.setup()
    stats = dm.corpus_stats
    assert (stats.n_files, stats.n_documents) == (4, 2)
    assert (stats.non_utf8_files, stats.skipped_files) == (1, 1)
    assert stats.non_utf8_examples == [str(corpus / "b_latin1.py")]
    assert stats.skipped_examples[0].startswith(str(corpus / "d_vanishes.py"))
    stream = dm.train_set.tokens.tolist() + dm.val_set.tokens.tolist()
    assert stream == [*good.encode(), TOK.eos_id, *LATIN1 * 10, TOK.eos_id]  # raw bytes kept
    err = capsys.readouterr().err
    assert "of 4 files, 1 not valid UTF-8 (kept as raw bytes)" in err
    assert "1 unreadable and skipped" in err and "d_vanishes.py" in err


def test_a_corpus_of_empty_files_is_a_config_error(workdir: Path) -> None:
    (workdir / "empty.txt").write_bytes(b"")
    with pytest.raises(ConfigError, match=r"data\.path=.*empty\.txt.*has no text"):
        NSADataModule(data_cfg(source="text", path=str(workdir / "empty.txt")), seed=0)


# --- the cache directory ------------------------------------------------------------------


def test_cache_dir_defaults_beside_the_sqlite_store(workdir: Path) -> None:
    store = f"sqlite:///{workdir / 'runs' / 'mlflow.db'}"
    assert cache_dir_for(data_cfg(), store) == workdir / "runs" / "token_cache"
    assert cache_dir_for(data_cfg(), "http://mlflow:5000") == Path("token_cache")
    assert cache_dir_for(data_cfg(cache_dir="~/tc"), store) == Path.home() / "tc"


def test_a_cache_dir_that_cannot_be_created_is_a_config_error(workdir: Path) -> None:
    (workdir / "a_file").write_text("x")
    with pytest.raises(ConfigError, match=r"data\.cache_dir=.*a_file/cache.*cannot hold"):
        NSADataModule(data_cfg(cache_dir=str(workdir / "a_file" / "cache")), seed=0)


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write to a read-only directory")
def test_a_read_only_cache_dir_is_a_config_error(workdir: Path) -> None:
    locked = workdir / "locked"
    locked.mkdir(mode=0o500)
    with pytest.raises(ConfigError, match=r"data\.cache_dir=.*locked.*cannot hold"):
        NSADataModule(data_cfg(cache_dir=str(locked)), seed=0)


# --- nsa-lab prepare ----------------------------------------------------------------------


def prepare_args(workdir: Path) -> list[str]:
    corpus = text_corpus(workdir / "corpus")
    return [f"data.{key}={value}" for key, value in corpus.items()] + [
        f"tracking.uri=sqlite:///{workdir / 'mlflow.db'}"
    ]


def test_prepare_builds_the_cache_then_reuses_it(
    workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = prepare_args(workdir)
    assert main(["prepare", *args]) == 0
    out = capsys.readouterr().out
    assert "6 documents, 6 files" in out and "tokenizer: byte, 257 ids" in out
    assert f"token cache (train): {workdir / 'token_cache'}" in out and "built in" in out
    assert main(["prepare", *args]) == 0
    assert "(reused)" in capsys.readouterr().out


def test_prepare_refuses_bad_input_before_any_work(
    workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (workdir / "a_file").write_text("x")
    assert main(["prepare", f"data.cache_dir={workdir / 'a_file'}"]) == 2
    assert "data.cache_dir=" in capsys.readouterr().err
    assert main(["prepare", "data.source=text", f"data.path={workdir / 'none*.txt'}"]) == 2
    assert "data.path=" in capsys.readouterr().err
    assert not (workdir / "token_cache").exists()


@pytest.mark.slow
def test_concurrent_prepare_processes_build_once(workdir: Path) -> None:
    """Two ``nsa-lab prepare`` processes started together: one builds, the other waits and
    reuses what it built."""
    command = [sys.executable, "-m", "nsa_lab", "prepare", *prepare_args(workdir)]
    procs = [
        subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    built = ["built in" in out for out, _ in outputs]
    assert sorted(built) == [False, True]
    assert len(list((workdir / "token_cache").glob("text-*/tokens.bin"))) == 1


def test_prepare_has_help_with_an_example(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["prepare", "--help"])
    assert exit_info.value.code == 0
    assert "example: nsa-lab prepare" in capsys.readouterr().out
