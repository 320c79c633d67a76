"""``nsa-lab sweep --gpus``: parsing, worker counts, and each spawned worker's pinning.

No GPU is needed: the device count is mocked, and the pinned workers are stand-ins that
record the environment they started with.
"""

from __future__ import annotations

import os

import pytest
import torch

from nsa_lab.cli import main
from nsa_lab.config import ConfigError
from nsa_lab.sweeps.gpus import parse_gpus, visible_gpus
from nsa_lab.sweeps.runner import start_workers
from nsa_lab.sweeps.spec import load_spec
from tests.gpu_worker_probe import record_visible_gpus
from tests.test_sweep_spec import write_spec


@pytest.fixture
def four_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch sees four GPUs (and none is ever touched)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)


def test_indices_become_the_visible_device_of_each_gpu(four_gpus, monkeypatch):
    assert parse_gpus("0,1,2,3", visible_gpus()) == ("0", "1", "2", "3")
    assert parse_gpus(" 3, 1", visible_gpus()) == ("3", "1")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6,7")  # indices count visible GPUs
    assert parse_gpus("1,3", visible_gpus()) == ("5", "7")


def test_without_cuda_indices_cannot_be_checked_and_pass_as_given(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert visible_gpus() is None
    assert parse_gpus("0,6", None) == ("0", "6")


@pytest.mark.parametrize(
    ("text", "rule"),
    [
        ("a,b", "GPU indices"),
        ("0,-1", "GPU indices"),
        ("", "GPU indices"),
        ("0,1,0", "twice"),
        ("1,4", "GPU 4 does not exist"),
    ],
)
def test_bad_gpu_lists_are_refused_naming_the_option(four_gpus, text, rule):
    with pytest.raises(ConfigError) as info:
        parse_gpus(text, visible_gpus())
    assert info.value.key == "--gpus" and rule in str(info.value)


def test_one_worker_per_gpu_or_workers_per_gpu(four_gpus, tmp_path):
    path = write_spec(tmp_path, workers=3)
    spec = load_spec(path, gpus="0,2")
    assert spec.workers == 2  # the spec's workers field does not apply
    assert [spec.gpu_of(i) for i in range(2)] == ["0", "2"]
    spec = load_spec(path, workers=2, gpus="1,2,3")
    assert spec.workers == 6
    assert [spec.gpu_of(i) for i in range(6)] == ["1", "2", "3", "1", "2", "3"]
    assert load_spec(path).gpu_of(0) is None
    with pytest.raises(ConfigError, match="--workers"):
        load_spec(path, workers=0, gpus="0")


def test_each_spawned_worker_starts_pinned_to_its_gpu(tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3")
    outs = [tmp_path / f"worker{i}" for i in range(3)]
    procs = start_workers(record_visible_gpus, [(out,) for out in outs], ["2", "3", None])
    for proc in procs:
        proc.join(60)
    assert [proc.exitcode for proc in procs] == [0, 0, 0]
    assert [out.read_text() for out in outs] == ["2", "3", "0,1,2,3"]
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "0,1,2,3"  # the coordinator's own is back


def test_cli_refuses_bad_gpus_before_any_store_exists(four_gpus, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = write_spec(tmp_path, trials=2)
    uri = f"tracking.uri=sqlite:///{tmp_path}/mlflow.db"
    for bad in ("a,b", "0,0", "4"):
        assert main(["sweep", str(path), uri, "--gpus", bad]) == 2
        assert "--gpus" in capsys.readouterr().err
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "optuna.db").exists()
