"""Validation loss by position: the buckets, their means against a hand computation, and
the module's metrics weighted exactly like ``val/loss``."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
from omegaconf import OmegaConf
from torch.utils.data import DataLoader, TensorDataset

from nsa_lab.config import load_config
from nsa_lab.tracking.loss_by_position import (
    PositionBucket,
    bucket_means,
    logged_losses_by_position,
    position_buckets,
)
from nsa_lab.training.module import LanguageModel
from tests.conftest import SMOKE


def labels(seq_len: int) -> list[str]:
    return [b.label for b in position_buckets(seq_len)]


def test_buckets_double_from_a_sixteenth_of_the_context():
    assert labels(8192) == ["0-512", "512-1k", "1k-2k", "2k-4k", "4k-8k"]
    assert labels(16384) == ["0-1k", "1k-2k", "2k-4k", "4k-8k", "8k-16k"]
    assert labels(256) == ["0-16", "16-32", "32-64", "64-128", "128-256"]
    assert labels(64) == ["0-4", "4-8", "8-16", "16-32", "32-64"]
    assert labels(1000) == ["0-32", "32-64", "64-128", "128-256", "256-512", "512-1000"]
    assert labels(3) == ["0-1", "1-2", "2-3"]
    assert labels(1) == ["0-1"]
    assert position_buckets(8192)[1].metric == "val/loss_pos/512-1k"
    with pytest.raises(ValueError, match="seq_len"):
        position_buckets(0)


@pytest.mark.parametrize("seq_len", [16, 64, 100, 256, 1000, 1536, 4096, 8192, 12288, 16384])
def test_buckets_tile_the_context_in_five_or_six_pieces(seq_len):
    buckets = position_buckets(seq_len)
    assert 5 <= len(buckets) <= 6
    assert buckets[0].start == 0 and buckets[-1].end == seq_len
    assert all(a.end == b.start for a, b in zip(buckets, buckets[1:], strict=False))
    assert sum(b.size for b in buckets) == seq_len


def cross_entropy_by_hand(row: list[float], target: int) -> float:
    return math.log(sum(math.exp(x) for x in row)) - row[target]


def test_bucket_means_match_a_hand_computation():
    logits = torch.tensor(
        [
            [[2.0, 0.0, -1.0], [0.0, 1.0, 0.0], [0.5, 0.5, 3.0], [1.0, -2.0, 0.0]],
            [[0.0, 0.0, 0.0], [-1.0, 2.0, 1.0], [3.0, 1.0, 0.0], [0.0, 0.0, 4.0]],
        ]
    )
    targets = torch.tensor([[0, 2, 2, 1], [1, 1, 0, 2]])
    per_token = [
        [cross_entropy_by_hand(logits[b, t].tolist(), int(targets[b, t])) for t in range(4)]
        for b in range(2)
    ]
    buckets = [PositionBucket(0, 1), PositionBucket(1, 2), PositionBucket(2, 4)]
    losses = torch.nn.functional.cross_entropy(
        logits.flatten(0, 1), targets.flatten(), reduction="none"
    ).view(2, 4)
    expected = [
        (per_token[0][0] + per_token[1][0]) / 2,
        (per_token[0][1] + per_token[1][1]) / 2,
        (per_token[0][2] + per_token[0][3] + per_token[1][2] + per_token[1][3]) / 4,
    ]
    assert bucket_means(losses, buckets).tolist() == pytest.approx(expected, rel=1e-6)


def test_logged_losses_are_read_back_in_position_order_and_others_ignored():
    metrics = {"val/loss_pos/4k-8k": 1.5, "val/loss_pos/0-512": 2.0, "val/loss": 1.7}
    assert logged_losses_by_position(metrics, 8192) == [
        (PositionBucket(0, 512), 2.0),
        (PositionBucket(4096, 8192), 1.5),
    ]


def test_validation_logs_bucket_losses_weighted_like_val_loss():
    """Five sequences in batches of two: the last, partial batch counts once per sequence
    (float64 model; Lightning hands logged values on in float32)."""
    cfg = load_config([SMOKE], ["attn.name=full"])
    torch.manual_seed(0)
    module = LanguageModel(OmegaConf.to_container(cfg, resolve=True), 257).double()
    seq_len = cfg.data.seq_len
    inputs = torch.randint(0, 257, (5, seq_len))
    targets = torch.randint(0, 257, (5, seq_len))
    trainer = L.Trainer(
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.validate(
        module, DataLoader(TensorDataset(inputs, targets), batch_size=2), verbose=False
    )
    logged = {k: float(v) for k, v in trainer.callback_metrics.items()}

    with torch.no_grad():
        logits = module.model(inputs)
    log_probs = torch.log_softmax(logits, dim=-1)
    per_token = -log_probs.gather(-1, targets[..., None])[..., 0]  # [5, seq_len]
    buckets = position_buckets(seq_len)
    for bucket in buckets:
        expected = per_token[:, bucket.start : bucket.end].mean().item()
        assert logged[bucket.metric] == pytest.approx(expected, rel=1e-6)
    assert logged["val/loss"] == pytest.approx(per_token.mean().item(), rel=1e-6)
    by_size = sum(b.size * logged[b.metric] for b in buckets) / seq_len
    assert by_size == pytest.approx(logged["val/loss"], rel=1e-6)
    assert {k for k in logged if k.startswith("val/loss_pos/")} == {b.metric for b in buckets}
