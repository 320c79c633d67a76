"""Byte and BPE tokenizers: round trips, leniency, the cached BPE, and the model's vocabulary."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from omegaconf import DictConfig, OmegaConf

from nsa_lab.config import ConfigError, DataConfig, load_config
from nsa_lab.data import BPETokenizer, ByteTokenizer, NSADataModule
from nsa_lab.data import cache as cache_module
from nsa_lab.data.cache import bpe_sample
from nsa_lab.data.tokenizer import EOS_TOKEN, train_bpe
from nsa_lab.models import GQATransformer
from tests.test_train_e2e import only_run, smoke_args

TEXTS = [
    "def parse(line: str) -> list[str]:\n    return line.split(',')\n" * 20,
    "Grüße aus Köln — naïve café, 世界 🙂\n" * 20,
]


@pytest.fixture(scope="module")
def bpe() -> BPETokenizer:
    return train_bpe(TEXTS, vocab_size=400)


def test_bpe_round_trips_text_and_reads_invalid_utf8_leniently(bpe: BPETokenizer) -> None:
    for text in [*TEXTS, "unseen: Ωμέγα ∑ 🚀\ttabs  and   spaces\n\n", ""]:
        ids = bpe.encode(text)
        assert ids.dtype == np.uint16 and (ids < bpe.vocab_size).all()
        assert bpe.decode(ids) == text
    assert len(bpe.encode(TEXTS[0])) < len(TEXTS[0]) / 2  # merges learnt from it
    assert bpe.decode(bpe.encode(b"ok \xff\xfe end")) == "ok \ufffd\ufffd end"
    assert bpe.encode("ok").tolist() == bpe.encode(b"ok").tolist()


def test_bpe_keeps_eos_to_itself_and_decodes_anything(bpe: BPETokenizer) -> None:
    assert bpe.vocab_size <= 400 and bpe.eos_id == bpe.model.token_to_id(EOS_TOKEN)
    spelled = bpe.encode(f"a{EOS_TOKEN}b")
    assert bpe.eos_id not in spelled.tolist() and bpe.decode(spelled) == f"a{EOS_TOKEN}b"
    euro = bpe.encode("€").tolist()
    assert bpe.decode([*bpe.encode("a").tolist(), bpe.eos_id, 10**6, -1]) == "a"
    assert bpe.decode(euro + [bpe.eos_id]) == "€"


def test_long_documents_are_encoded_in_pieces_with_the_same_tokens(
    bpe: BPETokenizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    document = "".join(TEXTS) * 3 + "tabs\t\tand  \n\n  spaces \u3000 x\n"
    whole = bpe.encode(document)
    monkeypatch.setattr("nsa_lab.data.tokenizer._BPE_PIECE_CHARS", 1)  # cut wherever it may
    assert bpe.encode(document).tolist() == whole.tolist()


def test_byte_tokenizer_takes_raw_bytes_as_they_are() -> None:
    tok = ByteTokenizer()
    assert tok.encode(b"\xff\x00a").tolist() == [255, 0, 97]
    assert tok.encode("é").tolist() == [0xC3, 0xA9]
    assert tok.describe() == {"kind": "byte", "vocab_size": 257}


def test_bpe_sample_reads_the_head_only_and_spreads_over_it() -> None:
    pieces = 1 << 16
    texts = ["a" * pieces * 4, "b" * pieces * 4, "c" * pieces * 2]  # 10 pieces in all
    head = list(bpe_sample(iter(texts), total=10 * pieces, head_fraction=0.8, cap=4 * pieces))
    assert "".join(head).count("c") == 0  # the last document ends past the head
    assert [p[0] for p in head] == ["a", "a", "b", "b"]  # every 2nd of the 8 head pieces
    everything = list(bpe_sample(iter(texts), total=10 * pieces, head_fraction=1.0, cap=10**9))
    assert "".join(everything) == "".join(texts)


# --- data.tokenizer=bpe -------------------------------------------------------------------


def data_cfg(tmp_path: Path, **overrides: Any) -> DictConfig:
    for i, text in enumerate(TEXTS * 3):
        (tmp_path / f"doc{i}.txt").write_text(f"{i}: {text}", encoding="utf-8")
    cfg = OmegaConf.structured(DataConfig)
    cfg.merge_with(
        {
            "source": "text",
            "path": str(tmp_path / "*.txt"),
            "tokenizer": "bpe",
            "vocab_size": 320,
            "seq_len": 16,
            "batch_size": 2,
            **overrides,
        }
    )
    return cfg


def test_bpe_corpus_is_cached_and_the_model_follows_its_vocabulary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = data_cfg(tmp_path)
    dm = NSADataModule(cfg, seed=0, cache_dir=tmp_path / "cache")
    dm.setup()
    vocab = dm.tokenizer.vocab_size
    assert 258 <= vocab <= 320 and len(list((tmp_path / "cache").glob("bpe-*.json"))) == 1
    stream = np.concatenate([dm.train_set.tokens, dm.val_set.tokens])
    assert stream.max() < vocab and (stream == dm.tokenizer.eos_id).sum() == len(TEXTS) * 3
    assert dm.tokenizer.decode(stream).startswith(f"0: {TEXTS[0][:50]}")

    def no_training(*args: Any) -> None:
        raise AssertionError("trained again")

    monkeypatch.setattr(cache_module, "train_bpe", no_training)
    again = NSADataModule(cfg, seed=0, cache_dir=tmp_path / "cache")
    again.setup()
    assert again.tokenizer.describe() == dm.tokenizer.describe()
    assert not again.token_files[0].built

    model_cfg = load_config(overrides=["model.n_layers=1", "model.d_model=32", "attn.name=full"])
    model = GQATransformer(model_cfg.model, model_cfg.attn, dm.tokenizer.vocab_size)
    inputs, _ = next(iter(dm.val_dataloader()))
    assert model(inputs).shape == (*inputs.shape, vocab)


def test_bpe_is_refused_where_needles_need_byte_tokens(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"data\.tokenizer='bpe': needle samples .*needle_frac"):
        NSADataModule(data_cfg(tmp_path, needle_fraction=0.1), seed=0, cache_dir=tmp_path)
    with pytest.raises(ConfigError, match=r"data\.tokenizer='bpe': .*needle evaluation"):
        NSADataModule(data_cfg(tmp_path), seed=0, cache_dir=tmp_path, needle_haystack=True)


def test_bpe_decodes_non_utf8_files_with_replacement(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = data_cfg(tmp_path)
    (tmp_path / "zz_latin.txt").write_bytes("café ".encode("latin-1") * 40)
    dm = NSADataModule(cfg, seed=0, cache_dir=tmp_path / "cache")
    dm.setup()
    assert dm.corpus_stats.non_utf8_files == 1
    assert "not valid UTF-8 (decoded with U+FFFD)" in capsys.readouterr().err
    assert "caf\ufffd " in dm.tokenizer.decode(dm.val_set.tokens)


@pytest.mark.slow
def test_train_with_bpe_sizes_the_model_to_the_tokenizer(workdir: Path) -> None:
    from nsa_lab.cli import main

    args = smoke_args(workdir, "data.tokenizer=bpe", "data.vocab_size=512", "train.max_steps=4")
    assert main(["train", *args]) == 0
    _, run = only_run(workdir)
    params = run.data.params
    cfg = load_config([args[0]])
    bpe_model = GQATransformer(cfg.model, cfg.attn, 512)  # the BPE fills 512 ids on this corpus
    assert int(params["model.n_params"]) == bpe_model.num_params()
    assert int(params["data.corpus_documents"]) > 0 and len(params["data.corpus_digest"]) == 32
    assert torch.isfinite(torch.tensor(run.data.metrics["val/loss"]))
