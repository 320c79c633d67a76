"""Efficiency settings: FLOPs per token by hand, MFU, gradient accumulation, throughput,
and ``train.compile``."""

from __future__ import annotations

import copy

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import Logger
from torch.utils.data import DataLoader, TensorDataset

from nsa_lab.config import ConfigError, load_config
from nsa_lab.models.flops import AttnShape, attended_tokens_per_query, training_flops_per_token
from nsa_lab.models.transformer import GQATransformer
from nsa_lab.training import callbacks as callbacks_lib
from nsa_lab.training.callbacks import TokenThroughput
from nsa_lab.training.efficiency import (
    check_compile,
    compile_model,
    device_peak_flops,
    model_flops_utilization,
    peak_flops,
)
from nsa_lab.training.module import LanguageModel, StepLossMean
from tests.conftest import SMOKE, assert_no_host_sync

VOCAB = 256


def smoke(*overrides: str):
    return load_config([SMOKE], list(overrides))


def test_flops_per_token_of_full_attention_by_hand():
    """Smoke model: 2 layers, d_model 64, 4 heads of 16 in 2 kv groups, SwiGLU 192, T=64."""
    cfg = smoke("attn.name=full")
    model = GQATransformer(cfg.model, cfg.attn, VOCAB)
    q, k, v, o = 64 * 64, 64 * 32, 64 * 32, 64 * 64
    mlp = 64 * 2 * 192 + 192 * 64
    head = 64 * VOCAB  # tied to the embedding: one product, counted once
    weights = 2 * (q + k + v + o + mlp) + head
    attention = 2 * 2 * 3 * 2 * 4 * 16 * 32.5  # mean causal keys at T=64: 32.5
    assert training_flops_per_token(model, cfg.attn, 64) == 6 * weights + attention


def test_flops_per_token_of_nsa_by_hand():
    """NSA adds per-branch K/V projections, the gates, and phi at its per-block share."""
    cfg = smoke("attn.name=nsa")  # l=8, d=4, three branches, own K/V each
    model = GQATransformer(cfg.model, cfg.attn, VOCAB)
    q, o, kv = 64 * 64, 64 * 64, 64 * 32
    gates = 64 * 4 * 3
    mlp = 64 * 2 * 192 + 192 * 64
    phi = (8 * 16) * (4 * 16) + (4 * 16) * 16  # l*head_dim -> 4 head_dim -> head_dim
    blocks = (64 - 8) // 4 + 1  # 15 compressed blocks of a 64-token sequence
    phi_per_token = 2 * phi * 2 * blocks / 64  # phi_k and phi_v, over 2 kv heads
    weights = 2 * (q + o + 6 * kv + gates + mlp + phi_per_token) + 64 * VOCAB
    keys = attended_tokens_per_query(AttnShape.from_config(cfg.attn), 64)
    expected = 6 * weights + 2 * 2 * 3 * 2 * 4 * 16 * keys
    assert training_flops_per_token(model, cfg.attn, 64) == pytest.approx(expected, rel=1e-12)


def test_peak_flops_by_gpu_name():
    assert peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops("NVIDIA H100 PCIe") == 756e12
    assert peak_flops("NVIDIA H200") == 989e12
    assert peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_flops("NVIDIA GeForce GTX 1080") is None
    assert device_peak_flops(torch.device("cpu")) is None


def test_mfu_is_achieved_model_flops_over_the_peak_of_all_devices():
    # 4 GPUs of 1e15 FLOP/s, 1e6 tokens/s of a 1e9-FLOP-per-token model: 1e15 of 4e15.
    assert model_flops_utilization(1e9, 1e6, 1e15, 4) == pytest.approx(0.25)


def test_step_loss_is_the_mean_of_the_steps_micro_batches():
    mean = StepLossMean()
    assert mean.add(0, torch.tensor(2.0)).item() == 2.0
    assert mean.add(0, torch.tensor(4.0)).item() == 3.0
    assert mean.add(1, torch.tensor(5.0)).item() == 5.0  # a new step starts afresh


def test_compile_is_refused_with_fsdp():
    with pytest.raises(ConfigError) as info:
        check_compile(True, "fsdp")
    assert info.value.key == "train.compile"
    check_compile(True, "ddp")
    check_compile(False, "fsdp")


class RecordingLogger(Logger):
    """Keeps what Lightning writes, as ``{metric: [(step, value), ...]}``."""

    def __init__(self) -> None:
        super().__init__()
        self.metrics: dict[str, list[tuple[int, float]]] = {}

    @property
    def name(self) -> str:
        return "recording"

    @property
    def version(self) -> str:
        return "0"

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass

    def log_metrics(self, metrics, step=None) -> None:
        for key, value in metrics.items():
            self.metrics.setdefault(key, []).append((step, float(value)))


class BatchCounter(L.Callback):
    def __init__(self) -> None:
        self.batches = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.batches += 1


def fit(batch_size: int, accumulate: int, callbacks=(), steps: int = 2):
    """Train the smoke model (full attention, float64) on the same 8 fixed sequences."""
    cfg = smoke("attn.name=full", "model.n_layers=1", f"train.max_steps={steps}")
    cfg.train.warmup_steps, cfg.train.log_every = 1, 1
    tokens = torch.randint(0, VOCAB, (8, 17), generator=torch.Generator().manual_seed(0))
    data = DataLoader(TensorDataset(tokens[:, :-1], tokens[:, 1:]), batch_size=batch_size)
    torch.manual_seed(0)
    module = LanguageModel(dict(cfg), VOCAB)
    logger, counter = RecordingLogger(), BatchCounter()
    trainer = L.Trainer(
        max_steps=steps,
        accumulate_grad_batches=accumulate,
        precision="64-true",
        accelerator="cpu",
        devices=1,
        logger=logger,
        log_every_n_steps=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[counter, *callbacks],
    )
    trainer.fit(module, train_dataloaders=data)
    return module, trainer, logger, counter


def test_accumulating_two_half_batches_equals_one_whole_batch():
    """Two optimizer steps of 2 x 2 sequences give the weights of two steps of 4."""
    half, half_trainer, half_log, half_count = fit(batch_size=2, accumulate=2)
    whole, whole_trainer, whole_log, _ = fit(batch_size=4, accumulate=1)
    assert half_trainer.global_step == whole_trainer.global_step == 2
    assert half_count.batches == 4  # accumulate x max_steps micro-batches
    schedule = half_trainer.lr_scheduler_configs[0].scheduler
    assert schedule.last_epoch == 2  # the LR moved once per optimizer step
    for (name, a), b in zip(half.named_parameters(), whole.parameters(), strict=True):
        assert torch.allclose(a, b, rtol=0, atol=1e-12), name
    # train/loss of a step is the mean of its micro-batches: the whole batch's loss
    assert [s for s, _ in half_log.metrics["train/loss"]] == [0, 1]
    for (_, a), (_, b) in zip(
        half_log.metrics["train/loss"], whole_log.metrics["train/loss"], strict=True
    ):
        assert a == pytest.approx(b, rel=1e-6)  # losses are taken in float32


def test_throughput_counts_every_micro_batch(monkeypatch):
    """With a clock that ticks 1 s per batch end, each micro-batch of 2 x 16 tokens takes 1 s:
    32 tokens/s when every micro-batch counts (16 if only a step's last did). The window
    opens at the end of the first micro-batch (warm-up). MFU needs a known GPU, so none
    is logged on a CPU."""
    clock = iter(range(1000))
    monkeypatch.setattr(callbacks_lib.time, "perf_counter", lambda: float(next(clock)))
    throughput = TokenThroughput(log_every=1, flops_per_token=lambda seq_len: 1e6)
    _, _, log, _ = fit(batch_size=2, accumulate=2, callbacks=[throughput], steps=3)
    rates = [value for _, value in log.metrics["train/tokens_per_s"]]
    assert rates == [32.0] * 3
    assert "train/mfu" not in log.metrics and "train/peak_mem_gib" not in log.metrics


def test_throughput_logs_mfu_against_the_devices_peak(monkeypatch):
    clock = iter(range(1000))
    monkeypatch.setattr(callbacks_lib.time, "perf_counter", lambda: float(next(clock)))
    monkeypatch.setattr(callbacks_lib, "device_peak_flops", lambda device: 64e6)
    throughput = TokenThroughput(log_every=1, flops_per_token=lambda seq_len: 1e6 * seq_len)
    _, _, log, _ = fit(batch_size=2, accumulate=1, callbacks=[throughput], steps=3)
    # 32 tokens/s x 16e6 FLOPs per token over a 64e6 FLOP/s device
    assert [value for _, value in log.metrics["train/mfu"]] == [pytest.approx(8.0)] * 2


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["full", "nsa"])
def test_compiled_blocks_give_the_eager_logits_and_gradients(variant):
    """Graph capture of every block, forward and backward, around the eager attention op."""
    cfg = smoke(f"attn.name={variant}", "model.n_layers=1", "attn.impl=torch")
    torch.manual_seed(0)
    eager = GQATransformer(cfg.model, cfg.attn, VOCAB)
    compiled = copy.deepcopy(eager)
    compile_model(compiled, backend="aot_eager")
    idx = torch.randint(0, VOCAB, (2, 64), generator=torch.Generator().manual_seed(1))
    for model in (eager, compiled):
        logits = model(idx)
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), idx.flatten()).backward()
    assert torch.allclose(compiled(idx), eager(idx), atol=1e-5)
    assert set(compiled.state_dict()) == set(eager.state_dict())  # checkpoints unchanged
    for (name, a), b in zip(compiled.named_parameters(), eager.parameters(), strict=True):
        assert torch.allclose(a.grad, b.grad, atol=1e-5), name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="host synchronisation is a GPU matter")
@pytest.mark.parametrize("variant", ["full", "window", "nsa"])
def test_a_training_step_never_waits_for_the_gpu(variant):
    """Forward, loss and backward queue their work without reading anything back: a
    synchronisation drains the GPU's queue every step (and breaks CUDA-graph capture).
    The first step runs unchecked: autotuning times its candidates."""
    cfg = smoke(f"attn.name={variant}", "attn.impl=auto")
    model = GQATransformer(cfg.model, cfg.attn, VOCAB).cuda()
    idx = torch.randint(0, VOCAB, (2, cfg.data.seq_len + 1), device="cuda")

    def step() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model(idx[:, :-1])
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), idx[:, 1:].flatten()).backward()

    assert_no_host_sync(step)
