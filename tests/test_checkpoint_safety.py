"""Checkpoints of a real (tiny) training: plain contents that load with ``weights_only=True``,
written atomically, and the trainer's helpers around them."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from nsa_lab.config import load_config
from nsa_lab.evaluation.loading import load_run
from nsa_lab.training.callbacks import AtomicCheckpointIO, ProgressBar
from nsa_lab.training.run import resolve_resume, train
from tests.conftest import SMOKE
from tests.test_train_e2e import smoke_args

PLAIN = (dict, list, tuple, str, int, float, bool, type(None), torch.Tensor)


def _plain(value: object) -> bool:
    if isinstance(value, dict):
        return all(isinstance(k, str | int) and _plain(v) for k, v in value.items())
    if isinstance(value, list | tuple):
        return all(_plain(v) for v in value)
    return isinstance(value, PLAIN)


@pytest.mark.slow
def test_a_trained_checkpoint_loads_with_weights_only(workdir: Path):
    args = smoke_args(workdir, "train.max_steps=4", "train.val_every=2")[1:]
    result = train(load_config([SMOKE], args))
    ckpt = torch.load(result.checkpoint, map_location="cpu", weights_only=True)
    config = ckpt["hyper_parameters"]["config"]
    assert type(config) is dict and _plain(config)  # no OmegaConf objects
    assert config["train"]["max_steps"] == 4
    assert ckpt["mlflow_run_id"] == result.run_id
    assert {"optimizer_states", "lr_schedulers", "loops"} <= ckpt.keys()  # resumable
    assert load_run(str(result.checkpoint)).global_step == 4
    leftovers = [p.name for p in result.checkpoint.parent.iterdir() if p.name.startswith(".")]
    assert not leftovers

    resumed = train(load_config([SMOKE], [*args, "train.max_steps=6", "train.resume=true"]))
    assert resumed.global_step == 6 and resumed.run_id == result.run_id


def test_atomic_checkpoint_io_leaves_the_file_whole_or_absent(tmp_path: Path):
    path = tmp_path / "run" / "last.ckpt"
    path.parent.mkdir()
    AtomicCheckpointIO().save_checkpoint({"w": torch.ones(2)}, path)
    assert torch.equal(torch.load(path, weights_only=True)["w"], torch.ones(2))
    with pytest.raises((TypeError, AttributeError)):
        AtomicCheckpointIO().save_checkpoint({"w": lambda: 0}, path)  # cannot be pickled
    assert torch.equal(torch.load(path, weights_only=True)["w"], torch.ones(2))
    assert sorted(os.listdir(path.parent)) == ["last.ckpt"]


def test_resume_true_skips_a_checkpoint_still_being_written(tmp_path: Path):
    run = tmp_path / "ckpt" / "r"
    run.mkdir(parents=True)
    (run / "last.ckpt").write_bytes(b"x")
    partial = run / ".last.tmp.ckpt"
    partial.write_bytes(b"x")
    os.utime(partial, (os.path.getmtime(run / "last.ckpt") + 10,) * 2)
    cfg = load_config(
        overrides=[
            f"train.ckpt_dir={tmp_path / 'ckpt'}",
            "tracking.run_name=r",
            "train.resume=true",
        ]
    )
    assert resolve_resume(cfg) == str(run / "last.ckpt")


def test_the_progress_bar_is_closed_when_training_raises():
    class Bar:
        closed = False

        def close(self) -> None:
            self.closed = True

    progress = ProgressBar()
    progress._train_progress_bar, progress._val_progress_bar = Bar(), Bar()
    progress.on_exception(None, None, RuntimeError())
    assert progress._train_progress_bar.closed and progress._val_progress_bar.closed
