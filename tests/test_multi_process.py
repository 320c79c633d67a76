"""The pieces of multi-process training that need no second process: the strategies a
config builds, FSDP's gradient clipping and weight decay, optimizer states that resume
under any strategy, and the watchdog beside rank 0 (the slow end-to-end runs are in
test_distributed.py)."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace
from unittest.mock import MagicMock

import pytest
import torch
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy
from mlflow.tracking import MlflowClient
from torch import nn
from torch.distributed.fsdp import FullyShardedDataParallel, MixedPrecision

from nsa_lab.config import load_config
from nsa_lab.models.transformer import Block
from nsa_lab.training.module import (
    FSDP_WRAPPED,
    LanguageModel,
    matrix_names,
    optimizer_groups,
    optimizer_state_by_model_position,
)
from nsa_lab.training.rank_watchdog import process_alive
from nsa_lab.training.run import make_strategy, served_lengths
from tests.conftest import SMOKE

VOCAB = 257


def strategy_for(*overrides: str):
    return make_strategy(load_config([SMOKE], list(overrides)).train)


def test_ddp_and_fsdp_wait_train_dist_timeout_s_for_a_silent_rank():
    ddp = strategy_for("train.strategy=ddp", "train.dist_timeout_s=90")
    assert isinstance(ddp, DDPStrategy) and ddp._timeout == timedelta(seconds=90)
    fsdp = strategy_for("train.strategy=fsdp", "train.dist_timeout_s=90")
    assert isinstance(fsdp, FSDPStrategy) and fsdp._timeout == timedelta(seconds=90)
    assert strategy_for("train.strategy=auto") == "auto"


def test_fsdp_shards_each_block_saves_full_checkpoints_and_keeps_float32_weights():
    fsdp = strategy_for("train.strategy=fsdp", "train.precision=bf16-mixed")
    policy = fsdp.kwargs["auto_wrap_policy"]
    assert policy._module_classes == {Block}
    assert fsdp._state_dict_type == "full"
    # bf16-mixed: float32 weights and reductions, half precision by autocast, as under DDP
    assert fsdp.mixed_precision == MixedPrecision()
    assert strategy_for("train.strategy=fsdp", "train.precision=32-true").mixed_precision is None


def flat_shards(model: nn.Module) -> nn.Module:
    """``model`` as FSDP leaves it outside forward: under a wrapper module, every
    parameter a 1-D view of its shard."""
    wrapper = nn.Module()
    setattr(wrapper, FSDP_WRAPPED.rstrip("."), model)
    for p in model.parameters():
        p.data = p.data.flatten()[: max(1, p.numel() // 2)]
    return wrapper


def test_fsdp_shards_decay_as_the_matrices_they_were():
    cfg = load_config([SMOKE])
    module = LanguageModel(dict(cfg), VOCAB)
    whole = [len(g["params"]) for g in optimizer_groups(module, 0.1)]
    matrices = matrix_names(module)
    sharded = flat_shards(module)
    assert [len(g["params"]) for g in optimizer_groups(sharded, 0.1)] == [0, sum(whole)]
    groups = optimizer_groups(sharded, 0.1, matrices)
    assert [len(g["params"]) for g in groups] == whole
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]


def stepped(model: nn.Module) -> torch.optim.Optimizer:
    optimizer = torch.optim.AdamW(optimizer_groups(model, 0.1))
    model(torch.randn(3, 4)).sum().backward()
    optimizer.step()
    return optimizer


def test_optimizer_states_keyed_by_model_position_load_back_onto_their_parameters():
    torch.manual_seed(0)
    # Matrices and vectors interleave: the groups number them in another order.
    model = nn.Sequential(nn.Linear(4, 5), nn.LayerNorm(5), nn.Linear(5, 2))
    optimizer = stepped(model)
    state = optimizer_state_by_model_position(optimizer.state_dict(), optimizer, model)

    params = list(model.parameters())
    assert sorted(state["state"]) == list(range(len(params)))
    for i, p in enumerate(params):
        assert state["state"][i]["exp_avg"].shape == p.shape
    for group in state["param_groups"]:
        assert group["params"] == sorted(group["params"])

    fresh = torch.optim.AdamW(optimizer_groups(model, 0.1))
    fresh.load_state_dict(state)
    for p in params:
        assert torch.equal(fresh.state[p]["exp_avg"], optimizer.state[p]["exp_avg"])


def attached(module: LanguageModel, model: object) -> LanguageModel:
    module.trainer = SimpleNamespace(model=model)
    return module


def test_under_fsdp_gradients_clip_through_the_roots_clip_grad_norm():
    module = LanguageModel(dict(load_config([SMOKE])), VOCAB)
    root = MagicMock(spec=FullyShardedDataParallel)
    attached(module, root).configure_gradient_clipping(MagicMock(), 0.5, "norm")
    root.clip_grad_norm_.assert_called_once_with(0.5)
    root.reset_mock()
    module.configure_gradient_clipping(MagicMock(), 0.0, "norm")  # train.grad_clip=0
    root.clip_grad_norm_.assert_not_called()


def test_elsewhere_gradients_clip_as_lightning_clips_them(monkeypatch):
    module = LanguageModel(dict(load_config([SMOKE])), VOCAB)
    calls = []
    monkeypatch.setattr(module, "clip_gradients", lambda *a, **kw: calls.append((a, kw)))
    optimizer = MagicMock(defaults={"fused": False})  # fused ones: tests/test_model.py
    attached(module, module).configure_gradient_clipping(optimizer, 0.5, "norm")
    assert calls == [((optimizer,), {"gradient_clip_val": 0.5, "gradient_clip_algorithm": "norm"})]


def test_flops_are_counted_for_every_sequence_length_training_serves():
    assert served_lengths(load_config([SMOKE]).data) == [64]
    curriculum = ["data.curriculum_seq_len=16", "data.curriculum_steps=3"]
    assert served_lengths(load_config([SMOKE], curriculum).data) == [64, 16]


RANK_ZERO = textwrap.dedent(
    """
    import sys, time
    from nsa_lab.training import rank_watchdog

    uri, run_id, rank, word = sys.argv[1:5]
    proc = rank_watchdog.start(uri, run_id, [int(rank)])
    print(proc.pid, flush=True)
    if word == "done":
        rank_watchdog.stop(proc)
        print("stopped", flush=True)
    time.sleep(60)
    """
)


@pytest.mark.parametrize("ends", ["killed", "done"])
def test_the_watchdog_acts_only_when_rank_0_vanishes(tmp_path: Path, ends: str):
    """Rank 0 SIGKILLed: the watchdog kills the other rank and marks the run FAILED.
    Rank 0 done: the watchdog exits, and leaves both alone."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    run_id = client.create_run(client.create_experiment("w")).info.run_id
    other_rank = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    script = tmp_path / "rank0.py"
    script.write_text(RANK_ZERO)
    rank0 = subprocess.Popen(
        [sys.executable, str(script), uri, run_id, str(other_rank.pid), ends],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert rank0.stdout is not None
        watchdog = int(rank0.stdout.readline())
        if ends == "done":
            assert rank0.stdout.readline().strip() == "stopped"
            assert not process_alive(watchdog)
            time.sleep(0.5)
            assert rank0.poll() is None and other_rank.poll() is None
            assert client.get_run(run_id).info.status == "RUNNING"
        else:
            rank0.send_signal(signal.SIGKILL)
            other_rank.wait(timeout=10)
            _until(lambda: client.get_run(run_id).info.status == "FAILED", 30)
    finally:
        for proc in (rank0, other_rank):
            proc.kill()
            proc.wait()


def _until(condition, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline
        time.sleep(0.1)
