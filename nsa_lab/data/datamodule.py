"""Packed next-token examples and the Lightning data module that serves them.

A corpus is one token stream (documents joined by EOS), a memory-mapped file of the
token cache (:mod:`nsa_lab.data.cache`). Training examples are windows of
``seq_len + 1`` tokens taken with stride ``seq_len``: inputs are the first
``seq_len`` tokens, targets the last ``seq_len``, and consecutive windows share
one token, so every token of the stream is predicted exactly once. A window is read
from the file when it is indexed, so packing costs no memory and no pass over the
tokens, and a process's memory does not grow with the corpus.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from lightning import LightningDataModule
from omegaconf import DictConfig
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from nsa_lab.config import ConfigError, DataConfig
from nsa_lab.data.cache import (
    CorpusStats,
    TokenFile,
    cache_dir_for,
    cached_bpe,
    cached_tokens,
    check_cache_dir,
)
from nsa_lab.data.corpus import DocumentSource, corpus_sources
from nsa_lab.data.mix import EpochShuffle, TrainingMix
from nsa_lab.data.needle import OVERHEAD_TOKENS
from nsa_lab.data.order import ResumableLoader, batches_trained, data_parallel_share
from nsa_lab.data.tokenizer import ByteTokenizer, Tokenizer


class PackedExamples(Dataset[tuple[Tensor, Tensor]]):
    """``(input_ids, targets)`` windows of a token stream, ``seq_len`` long each.

    Example ``i`` covers stream tokens ``[i*seq_len, (i+1)*seq_len]``; the last
    fewer than ``seq_len`` tokens that do not fill a window are left out. ``tokens``
    is kept as given (a memory map of the token cache): indexing reads one window.
    """

    def __init__(self, tokens: np.ndarray, seq_len: int) -> None:
        self.tokens = tokens
        self.seq_len = seq_len

    def __len__(self) -> int:
        return max(0, (len(self.tokens) - 1) // self.seq_len)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        if not 0 <= index < len(self):
            raise IndexError(f"example {index} out of range for {len(self)} examples")
        start = index * self.seq_len
        window = torch.from_numpy(self.tokens[start : start + self.seq_len + 1].astype(np.int64))
        return window[:-1], window[1:]

    @property
    def n_target_tokens(self) -> int:
        """Tokens predicted in one pass over the examples (what an epoch trains on)."""
        return len(self) * self.seq_len


def split_tail(
    tokens: np.ndarray, seq_len: int, val_fraction: float
) -> tuple[np.ndarray, np.ndarray]:
    """Split a stream into a training head and a validation tail that share no token.

    The tail holds ``max(1, round(val_fraction * n))`` whole examples, ``n`` being
    how many the stream packs into. Being contiguous, it cannot repeat text seen
    in training (unless the corpus itself repeats), and it is the same on every
    run. Raises :class:`ConfigError` when the head cannot hold one example.
    """
    n_examples = max(0, (len(tokens) - 1) // seq_len)
    n_val = max(1, round(val_fraction * n_examples))
    val_len = n_val * seq_len + 1
    if len(tokens) - val_len < seq_len + 1:
        raise ConfigError(
            "data.seq_len",
            seq_len,
            f"the corpus has {len(tokens)} tokens, too few for one training and one validation "
            f"example of seq_len+1 tokens; use a smaller seq_len or a larger corpus",
        )
    return tokens[:-val_len], tokens[-val_len:]


def _check_needles_in_byte_space(cfg: DictConfig | DataConfig, needle_haystack: bool) -> None:
    """Needle samples and the needle evaluation are built from byte tokens (the fact,
    question and answer are encoded byte by byte, and haystack text is cut at token
    positions), so they cannot use a BPE corpus."""
    uses = [f"data.needle_fraction={cfg.needle_fraction}"] if cfg.needle_fraction > 0 else []
    if needle_haystack:
        uses.append("the needle evaluation (train.eval_needle, nsa-lab eval)")
    if cfg.tokenizer != "byte" and uses:
        raise ConfigError(
            "data.tokenizer",
            cfg.tokenizer,
            f"needle samples are built in byte-token space, so {' and '.join(uses)} "
            "needs data.tokenizer=byte",
        )


class NSADataModule(LightningDataModule):
    """Train/val loaders of packed token examples for one data config.

    Construction only resolves the sources and checks the cache directory (so a wrong
    path fails before any work); :meth:`prepare_data` tokenises into the token cache
    (and trains the BPE), once for all processes; :meth:`setup` opens the cached
    tokens (building them first if no process has) and packs them. Batches are
    ``(input_ids, targets)``, both ``LongTensor[batch_size, seq_len]``.

    ``cache_dir`` defaults to ``data.cache_dir`` or ``./token_cache`` (``nsa-lab train``
    passes :func:`~nsa_lab.data.cache.cache_dir_for` the run's store).
    ``needle_haystack`` says that the validation split will serve as needle haystack
    (``train.eval_needle``, ``nsa-lab eval``), which needs byte tokens.
    """

    def __init__(
        self,
        data_cfg: DictConfig | DataConfig,
        seed: int,
        accumulate: int = 1,
        cache_dir: str | Path | None = None,
        needle_haystack: bool = False,
    ) -> None:
        super().__init__()
        self.cfg = data_cfg
        self.seed = seed
        self.accumulate = accumulate  # training batches per optimizer step (train.accumulate)
        _check_needles_in_byte_space(data_cfg, needle_haystack)
        self.train_source, self.val_source = corpus_sources(data_cfg)
        self.cache_dir = check_cache_dir(Path(cache_dir or cache_dir_for(data_cfg)))
        byte = data_cfg.tokenizer == "byte"
        self._tokenizer: Tokenizer | None = ByteTokenizer() if byte else None  # else a BPE
        self._token_files: list[TokenFile] | None = None
        self.train_set: PackedExamples | TrainingMix | None = None
        self.val_set: PackedExamples | None = None

    @property
    def tokenizer(self) -> Tokenizer:
        """The corpus's tokenizer (a BPE is ready after :meth:`prepare_data` or :meth:`setup`)."""
        if self._tokenizer is None:
            raise RuntimeError("call NSADataModule.prepare_data() or setup() first")
        return self._tokenizer

    def prepare_tokenizer(self) -> Tokenizer:
        """The corpus's tokenizer without tokenising the corpus: a BPE comes from the token
        cache (learnt from the training text first if the cache does not hold it)."""
        if self._tokenizer is None:
            self._tokenizer = cached_bpe(
                self.train_source,
                1.0 if self.val_source is not None else 1.0 - self.cfg.val_fraction,
                self.cfg.vocab_size,
                self.cache_dir,
            )
        return self._tokenizer

    @property
    def token_files(self) -> list[TokenFile]:
        """The cache entries: training, then validation unless it is the training tail."""
        if self._token_files is None:
            raise RuntimeError("call NSADataModule.prepare_data() or setup() first")
        return self._token_files

    @property
    def corpus_stats(self) -> CorpusStats:
        """Size, files, documents and digest of the whole corpus (both splits)."""
        return CorpusStats.combine(f.stats for f in self.token_files)

    def summary(self) -> str:
        """The corpus, tokenizer, cache entries and examples, for people (after :meth:`setup`)."""
        stats = self.corpus_stats
        lines = [
            f"corpus: {self.train_source.label}: {stats.n_documents} documents, "
            f"{stats.n_files} files, {stats.n_bytes / 1e6:.1f} MB, digest {stats.digest}",
            f"  {stats.non_utf8_files} files not valid UTF-8, "
            f"{stats.skipped_files} unreadable files skipped",
            f"tokenizer: {self.cfg.tokenizer}, {self.tokenizer.vocab_size} ids",
        ]
        for split, entry in zip(("train", "val"), self.token_files, strict=False):
            how = f"built in {entry.seconds:.1f} s" if entry.built else "reused"
            lines.append(
                f"token cache ({split}): {entry.folder}: {entry.stats.n_tokens} tokens ({how})"
            )
        train, val = self._built(self.train_set), self._built(self.val_set)
        lines.append(
            f"examples of data.seq_len+1={self.cfg.seq_len + 1} tokens: "
            f"{len(train)} training, {len(val)} validation"
        )
        return "\n".join(lines)

    def prepare_data(self) -> None:
        """Tokenise into the token cache (training the BPE first, if asked), once per node:
        Lightning calls this on one process, and the file lock covers the others."""
        if self._token_files is not None:
            return
        self.prepare_tokenizer()
        sources = [s for s in (self.train_source, self.val_source) if s is not None]
        self._token_files = [cached_tokens(s, self._tokenizer, self.cache_dir) for s in sources]

    def setup(self, stage: str | None = None) -> None:
        """Build the train and val examples; later calls (one per stage) reuse them."""
        if self.train_set is not None:
            return
        self.prepare_data()
        train_file, *val_file = self.token_files
        train_tokens = train_file.tokens()
        if not val_file:
            train_tokens, val_tokens = split_tail(
                train_tokens, self.cfg.seq_len, self.cfg.val_fraction
            )
        else:
            val_tokens = val_file[0].tokens()
        self.train_set = self._training_set(self._examples(train_tokens, self.train_source))
        self.val_set = self._examples(val_tokens, self.val_source or self.train_source)
        if len(self.train_set) < self.cfg.batch_size:
            # drop_last would leave no training batch at all, and Lightning would not say why.
            raise ConfigError(
                "data.batch_size",
                self.cfg.batch_size,
                f"exceeds the {len(self.train_set)} training examples of this corpus",
            )

    def _examples(self, tokens: np.ndarray, source: DocumentSource) -> PackedExamples:
        examples = PackedExamples(tokens, self.cfg.seq_len)
        if len(examples) == 0:
            raise ConfigError(
                source.key,
                source.path or source.kind,
                f"has {len(tokens)} tokens, too few for one example of "
                f"data.seq_len+1={self.cfg.seq_len + 1} tokens",
            )
        return examples

    def _training_set(self, examples: PackedExamples) -> PackedExamples | TrainingMix:
        """The training examples, served short at first and with needles mixed in, if asked.

        Validation stays ordinary full-length text, so validation loss stays comparable
        across runs.
        """
        if self.cfg.needle_fraction == 0 and self.cfg.curriculum_seq_len == 0:
            return examples
        if self.cfg.needle_fraction > 0:
            served = {
                "seq_len": self.cfg.seq_len,
                "curriculum_seq_len": self.cfg.curriculum_seq_len,
            }
            for key, length in served.items():
                if 0 < length < OVERHEAD_TOKENS:
                    raise ConfigError(
                        f"data.{key}",
                        length,
                        f"must be >= {OVERHEAD_TOKENS} to hold a needle sample "
                        f"(data.needle_fraction={self.cfg.needle_fraction})",
                    )
        return TrainingMix(
            examples, self.cfg.needle_fraction, self.seed, self.cfg.curriculum_seq_len
        )

    def train_dataloader(self) -> ResumableLoader:
        """Shuffled in an order fixed by ``seed``, split between processes, resumable mid-epoch.

        The order is :class:`EpochShuffle`'s, which also tells the mix which epoch it serves
        (each epoch draws new needles) and whether the curriculum still lasts (its first
        ``data.curriculum_steps`` optimizer steps); the checkpoint keeps where in it training
        stands, so ``train.resume`` goes on with the very next batch. Incomplete last batches
        are dropped.
        """
        examples = self._built(self.train_set)
        replicas, rank = data_parallel_share(self.trainer)
        # An optimizer step takes `accumulate` batches per process.
        short_batches = self.cfg.curriculum_steps * self.accumulate
        order = EpochShuffle(
            len(examples),
            self.seed,
            replicas,
            rank,
            tag_epoch=isinstance(examples, TrainingMix),
            batch_size=self.cfg.batch_size,
            short_batches=short_batches,
        )
        return ResumableLoader(
            examples,
            order,
            self.cfg.batch_size,
            batches_done=lambda: batches_trained(self.trainer),
            num_workers=self.cfg.num_workers,
            persistent_workers=self.cfg.num_workers > 0,
            pin_memory=self._feeds_a_gpu(),
        )

    def _feeds_a_gpu(self) -> bool:
        """Whether batches go to a CUDA device: then they are pinned, because a copy from
        pageable memory waits for the GPU to finish all queued work, one host-GPU
        synchronisation per step."""
        trainer = self.trainer
        return trainer is not None and trainer.strategy.root_device.type == "cuda"

    def val_dataloader(self) -> DataLoader:
        """In stream order, every example, so validation loss is comparable across runs."""
        return DataLoader(
            self._built(self.val_set),
            batch_size=self.cfg.batch_size,
            shuffle=False,
            num_workers=self.cfg.num_workers,
            persistent_workers=self.cfg.num_workers > 0,
            pin_memory=self._feeds_a_gpu(),
        )

    @property
    def n_train_tokens(self) -> int:
        """Target tokens in one epoch of training examples (after :meth:`setup`)."""
        return self._built(self.train_set).n_target_tokens

    @property
    def n_val_tokens(self) -> int:
        """Target tokens in the validation examples (after :meth:`setup`)."""
        return self._built(self.val_set).n_target_tokens

    @staticmethod
    def _built(examples: PackedExamples | TrainingMix | None) -> PackedExamples | TrainingMix:
        if examples is None:
            raise RuntimeError("call NSADataModule.setup() first")
        return examples
