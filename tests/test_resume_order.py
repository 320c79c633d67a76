"""Resumable data order: a resumed run trains on exactly the batches an uninterrupted one
would have (issue 13), in plain and mixed training, with and without workers, per process
under DDP; and gradient accumulation keeps the curriculum's length in optimizer steps."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig, OmegaConf

from nsa_lab.config import DataConfig, load_config
from nsa_lab.data import NSADataModule
from nsa_lab.data.mix import EpochShuffle, ResumePoint, TrainingMix
from nsa_lab.data.order import ResumableLoader
from nsa_lab.training.run import TrainResult, train
from tests.conftest import REPO, SMOKE

BATCH = 4


def write_corpus(folder: Path, words: int) -> Path:
    """A deterministic text file of about ``7 * words`` bytes."""
    path = folder / "corpus.txt"
    path.write_text(" ".join(f"w{i % 97}x{i % 13}" for i in range(words)) + "\n")
    return path


# --- unit: loader state --------------------------------------------------------------------

PLAIN = {"seq_len": 256}
# Needles in every epoch, and a curriculum whose first step is short, so that a resume
# shows in the shapes as well as in the needles where it starts the order anew.
MIXED = {"seq_len": 256, "needle_fraction": 0.5, "curriculum_seq_len": 128, "curriculum_steps": 1}


def datamodule(tmp_path: Path, workers: int, accumulate: int = 1, **options: Any) -> NSADataModule:
    cfg = OmegaConf.structured(DataConfig)
    cfg.merge_with(
        {
            "source": "text",
            "path": str(write_corpus(tmp_path, 2000)),
            "cache_dir": str(tmp_path / "cache"),
            "batch_size": BATCH,
            "num_workers": workers,
            **options,
        }
    )
    data = NSADataModule(cfg, seed=3, accumulate=accumulate)
    data.setup("fit")
    return data


def first_epoch(loader: ResumableLoader, number: int) -> list[Any]:
    """Epoch ``number``'s batches as Lightning gets them right after set-up or a restore: the
    loader is iterated before ``set_epoch`` (with workers, indices are drawn on ``iter``)."""
    batches = iter(loader)
    loader.sampler.set_epoch(number)
    return list(batches)


def next_epoch(loader: ResumableLoader, number: int) -> list[Any]:
    """Epoch ``number``'s batches as Lightning gets them in later epochs."""
    loader.sampler.set_epoch(number)
    return list(loader)


def train_on(loader: ResumableLoader, first: int, last: int) -> list[Any]:
    """Batches ``first`` to ``last - 1`` of epoch 0 (the loader resumed at ``first``), with
    the loader told, as a trainer would tell it, how many it has trained on."""
    trained = first
    loader.batches_done = lambda: trained
    batches = iter(loader)
    loader.sampler.set_epoch(0)
    seen = []
    while trained < last:
        seen.append(next(batches))  # with workers, more are fetched than trained on
        trained += 1
    return seen


def same_batches(got: list[Any], expected: list[Any]) -> bool:
    return len(got) == len(expected) and all(
        torch.equal(g[0], e[0]) and torch.equal(g[1], e[1])
        for g, e in zip(got, expected, strict=True)
    )


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("options", [PLAIN, MIXED], ids=["plain", "mixed"])
def test_restored_loader_yields_the_rest_of_the_epoch_then_the_next(tmp_path, workers, options):
    data = datamodule(tmp_path, workers, **options)
    straight = data.train_dataloader()
    expected = first_epoch(straight, 0) + next_epoch(straight, 1)
    n_batches = len(straight)
    assert len(expected) == 2 * n_batches and n_batches >= 6
    if options is MIXED:
        assert expected[0][0].shape == (BATCH, 2, 128)
        assert expected[-1][0].shape == (BATCH, 256)

    for k in (2, n_batches):  # mid-epoch, and after the epoch's last batch
        killed = data.train_dataloader()
        seen = train_on(killed, 0, k)
        state = killed.state_dict()
        assert state == {"epoch": 0, "position": k * BATCH, "batches": k}

        resumed = data.train_dataloader()
        resumed.load_state_dict(state)
        if k < n_batches:
            seen += first_epoch(resumed, 0) + next_epoch(resumed, 1)
        else:  # Lightning goes on to epoch 1 after a complete epoch 0
            seen += first_epoch(resumed, 1)
        assert same_batches(seen, expected)


def test_a_second_interruption_in_the_same_epoch_resumes_from_the_right_place(tmp_path):
    data = datamodule(tmp_path, 0, **PLAIN)
    expected = first_epoch(data.train_dataloader(), 0)
    first = data.train_dataloader()
    seen = train_on(first, 0, 2)
    second = data.train_dataloader()
    second.load_state_dict(first.state_dict())
    seen += train_on(second, 2, 5)  # the trainer's count goes on from the resumed batch
    assert second.state_dict() == {"epoch": 0, "position": 5 * BATCH, "batches": 5}
    third = data.train_dataloader()
    third.load_state_dict(second.state_dict())
    seen += first_epoch(third, 0)
    assert same_batches(seen, expected)


def shares(n: int, replicas: int, point: ResumePoint | None = None) -> list[list[int]]:
    """Every process's indices of epoch 0, resumed at ``point`` if given."""
    samplers = [
        EpochShuffle(n, seed=5, replicas=replicas, rank=r, tag_epoch=False) for r in range(replicas)
    ]
    for sampler in samplers:
        if point is not None:
            sampler.resume(point, BATCH)
    return [list(s) for s in samplers]


def test_each_process_resumes_at_its_own_next_batch():
    n, replicas, done = 50, 2, 3
    straight = shares(n, replicas)
    assert all(len(share) == 25 for share in straight)  # padded as DistributedSampler pads
    assert set(straight[0]) | set(straight[1]) == set(range(n))
    point = EpochShuffle(n, seed=5, replicas=replicas, rank=1, tag_epoch=False).reached(done, BATCH)
    assert point == ResumePoint(epoch=0, position=done * BATCH * replicas, batches=done)
    resumed = shares(n, replicas, point)
    for rank in range(replicas):
        assert resumed[rank] == straight[rank][done * BATCH :]


def test_a_resume_on_fewer_processes_continues_the_same_order():
    n = 50
    point = ResumePoint(epoch=0, position=3 * BATCH * 2, batches=3)  # 3 batches on 2 processes
    two = shares(n, 2)
    consumed = {i for share in two for i in share[: 3 * BATCH]}
    (one,) = shares(n, 1, point)
    assert len(one) == n - 3 * BATCH * 2
    assert set(one) == set(range(n)) - consumed


# --- unit: accumulation --------------------------------------------------------------------


def test_datamodule_curriculum_lasts_its_optimizer_steps_under_accumulation(tmp_path):
    short = {"seq_len": 64, "curriculum_seq_len": 32, "curriculum_steps": 3}
    for accumulate in (1, 4):
        data = datamodule(tmp_path, 0, accumulate, **short)
        loader = data.train_dataloader()
        assert isinstance(data.train_set, TrainingMix)
        rows = [batch[0].dim() == 3 for _, batch in zip(range(16), loader, strict=False)]
        assert rows == [i < 3 * accumulate for i in range(16)]


# --- end to end ----------------------------------------------------------------------------


class Kill(RuntimeError):
    pass


class KillAt(L.Callback):
    """Raises at batch ``step`` of training: before its step (the batch was fetched, not
    trained on) or after it."""

    def __init__(self, step: int, hook: str) -> None:
        self.step, self.hook = step, hook

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        if self.hook == "start" and trainer.global_step == self.step:
            raise Kill(f"killed before step {self.step}")

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if self.hook == "end" and trainer.global_step == self.step + 1:
            raise Kill(f"killed after step {self.step}")


class RecordBatches(L.Callback):
    """Digests of the input ids of every batch whose training step ran to its end."""

    def __init__(self) -> None:
        self.seen: list[str] = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.seen.append(hashlib.sha1(batch[0].numpy().tobytes()).hexdigest())


E2E_STEPS, E2E_KILL = 12, 5  # over the 7 batches of an epoch: the resume crosses into epoch 1


def e2e_config(workdir: Path, run_name: str, *overrides: str) -> DictConfig:
    """A tiny run on ``workdir/corpus.txt`` (7 batches of 4 x 64 tokens per epoch)."""
    return load_config(
        [SMOKE],
        [
            f"tracking.uri=sqlite:///{workdir / 'mlflow.db'}",
            f"train.ckpt_dir={workdir / 'ckpt'}",
            f"tracking.run_name={run_name}",
            "data.source=text",
            f"data.path={workdir / 'corpus.txt'}",
            f"data.cache_dir={workdir / 'cache'}",
            f"data.batch_size={BATCH}",
            "attn.name=full",
            "model.n_layers=1",
            f"train.max_steps={E2E_STEPS}",
            "train.val_every=4",
            "train.val_batches=1",
            "train.log_every=4",
            *overrides,
        ],
    )


def straight_and_resumed(
    workdir: Path, hook: str, *overrides: str
) -> tuple[list[str], list[str], TrainResult]:
    """The batches this process trained on in an uninterrupted run, and in a run killed at
    step ``E2E_KILL`` plus its resumption (``train.resume=true``), and the resumed result."""
    straight, killed, resumed = RecordBatches(), RecordBatches(), RecordBatches()
    train(e2e_config(workdir, "straight", *overrides), callbacks=[straight])
    with pytest.raises(Kill):
        train(e2e_config(workdir, "killed", *overrides), callbacks=[killed, KillAt(E2E_KILL, hook)])
    assert (workdir / "ckpt" / "killed" / "on_exception.ckpt").is_file()
    result = train(
        e2e_config(workdir, "killed", "train.resume=true", *overrides), callbacks=[resumed]
    )
    return straight.seen, killed.seen + resumed.seen, result


@pytest.mark.slow
@pytest.mark.parametrize(
    ("hook", "extra"),
    [
        ("start", ["data.num_workers=0"]),
        ("end", ["data.num_workers=2", "data.curriculum_seq_len=32", "data.curriculum_steps=3"]),
    ],
    ids=["plain-killed-before-a-step", "mixed-workers-killed-after-a-step"],
)
def test_a_run_killed_mid_epoch_resumes_with_the_very_next_batch(workdir: Path, hook, extra):
    write_corpus(workdir, 320)
    straight, killed_and_resumed, resumed = straight_and_resumed(workdir, hook, *extra)
    assert len(straight) == E2E_STEPS
    assert killed_and_resumed == straight
    assert resumed.global_step == E2E_STEPS
    client = MlflowClient(tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("smoke").experiment_id
    runs = client.search_runs([experiment], "tags.`mlflow.runName` = 'killed'")
    assert [r.info.run_id for r in runs] == [resumed.run_id]


DDP_SCRIPT = """
import json, os, sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from tests.test_resume_order import straight_and_resumed

workdir = Path(sys.argv[2])
straight, resumed, result = straight_and_resumed(workdir, "start", *sys.argv[3:])
rank = os.environ.get("LOCAL_RANK", "0")
record = {"straight": straight, "resumed": resumed, "step": result.global_step}
(workdir / f"rank{rank}.json").write_text(json.dumps(record))
"""


@pytest.mark.slow
def test_each_ddp_process_resumes_at_its_own_next_batch(workdir: Path):
    write_corpus(workdir, 320)
    script = workdir / "ddp_resume.py"
    script.write_text(DDP_SCRIPT)
    ddp = ["train.accelerator=cpu", "train.devices=2", "train.strategy=ddp"]
    proc = subprocess.run(
        [sys.executable, str(script), str(REPO), str(workdir), *ddp],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=workdir,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((workdir / f"rank{r}.json").read_text()) for r in (0, 1)]
    for rank in ranks:
        assert len(rank["straight"]) == E2E_STEPS and rank["step"] == E2E_STEPS
        assert rank["resumed"] == rank["straight"]
    assert not set(ranks[0]["straight"][:3]) & set(ranks[1]["straight"][:3])
