"""scripts/multi_gpu.py without GPUs: its plan, command lines, scheduling and tables."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

spec = importlib.util.spec_from_file_location("multi_gpu", REPO / "scripts" / "multi_gpu.py")
mg = importlib.util.module_from_spec(spec)
sys.modules["multi_gpu"] = mg  # dataclasses look their module up
spec.loader.exec_module(mg)


def test_the_plan_runs_every_combination_most_gpus_first_and_extra_seeds_last():
    jobs = mg.scaling_jobs(["small"], ["full", "nsa"], ["ddp", "fsdp"], [1, 2, 4], [0, 1, 2], 50)
    scaling, noise = jobs[:12], jobs[12:]
    # Row by row: a row's runs (with its 1-GPU baselines) before the next row's.
    assert [j.variant for j in scaling] == ["full"] * 6 + ["nsa"] * 6
    assert [j.gpus for j in scaling] == [4, 4, 2, 2, 1, 1] * 2
    assert {(j.variant, j.strategy) for j in scaling if j.gpus == 2} == {
        ("full", "ddp"),
        ("full", "fsdp"),
        ("nsa", "ddp"),
        ("nsa", "fsdp"),
    }
    assert [(j.gpus, j.strategy, j.seed) for j in noise] == [(1, "ddp", 1)] * 2 + [
        (1, "ddp", 2)
    ] * 2
    assert len({j.run_name for j in jobs}) == len(jobs)


def test_every_gpu_count_trains_the_same_global_batch(tmp_path: Path):
    settings = mg.Settings(tmp_path, "corpus.txt")
    for gpus in (1, 2, 4):
        command = mg.train_command(mg.Job("small-4k", "nsa", "fsdp", gpus, steps=30), settings)
        args = dict(a.split("=", 1) for a in command if "=" in a)
        assert int(args["data.batch_size"]) * gpus == mg.MODELS["small-4k"].global_batch
        assert args["train.devices"] == str(gpus) and args["train.strategy"] == "fsdp"
        assert args["data.seq_len"] == "4096" and args["data.path"] == "corpus.txt"
        assert args["train.max_steps"] == args["train.val_every"] == "30"
    with pytest.raises(ValueError, match="global batch"):
        mg.train_command(mg.Job("small", "nsa", "ddp", 3), settings)


class FakeRun:
    """A process that ends after ``polls`` polls."""

    def __init__(self, polls: int, code: int = 0) -> None:
        self.polls, self.code, self.killed = polls, code, False

    def poll(self) -> int | None:
        self.polls -= 1
        return self.code if self.polls < 0 else None

    def kill(self) -> None:
        self.killed = True


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def test_the_pool_shares_out_the_gpus_and_stops_starting_runs_near_the_deadline():
    clock, busy, peak = Clock(), [0], [0]
    started: list[tuple[str, list[int]]] = []

    def launch(job, gpus):
        started.append((job.run_name, gpus))
        busy[0] += job.gpus
        peak[0] = max(peak[0], busy[0])
        run = FakeRun(polls=3)
        real_poll = run.poll

        def poll():
            code = real_poll()
            if code is not None:
                busy[0] -= job.gpus
            return code

        run.poll = poll
        return run

    jobs = mg.scaling_jobs(["small"], ["full", "nsa"], ["ddp"], [1, 2, 4], [0, 1], 10)
    done = mg.run_pool(
        jobs, 4, launch, deadline=100.0, job_reserve_s=1.0, clock=clock, sleep=clock.sleep
    )
    assert peak[0] == 4 and all(code == 0 for code, _ in done.values())
    assert [name for name, _ in started][:2] == [jobs[0].run_name, jobs[1].run_name]
    assert all(len(gpus) == len(set(gpus)) for _, gpus in started)

    clock = Clock()
    done = mg.run_pool(
        jobs, 4, launch, deadline=3.0, job_reserve_s=1.0, clock=clock, sleep=clock.sleep
    )
    ran = [job for job, (code, _) in done.items() if code is not None]
    assert ran and len(ran) < len(jobs)  # the budget left the rest unstarted


def result(gpus: int, strategy: str, tokens: float, loss: float, seed: int = 0):
    job = mg.Job("small", "nsa", strategy, gpus, seed=seed)
    return mg.Result(job, 0, 1.0, tokens_per_s=tokens, peak_mem_gib=1.5, val_loss=loss)


def test_the_tables_give_scaling_efficiency_and_the_loss_against_the_seed_spread():
    results = [
        result(1, "ddp", 1000, 3.00),
        result(2, "ddp", 1800, 3.01),
        result(4, "ddp", 3000, 3.03),
        result(1, "ddp", 1000, 3.10, seed=1),
        result(1, "fsdp", 900, 3.00),
        result(2, "fsdp", 1500, 3.00),
    ]
    table = mg.scaling_tables(results, [1, 2, 4])
    assert "| nsa | ddp | 1,000 | 1,800 | 3,000 | 0.90 | 0.75 |" in table
    assert "| nsa | fsdp | 900 | 1,500 | - | 0.83 | - |" in table
    assert "spread 0.1000" in table and "|k-GPU - 1-GPU| (seed 0, same strategy): 0.0300" in table


def test_an_uninterrupted_run_logs_at_these_steps():
    assert mg.expected_log_steps(40, 10) == [9, 19, 29, 39]


def test_resume_chains_cross_gpu_counts_and_on_a_cpu_leave_fsdp_out():
    chains = mg.resume_chains("gpu", "small", "nsa", 20)
    assert [(j.gpus, j.strategy, j.steps, j.resume) for j in chains["fsdp-2to1"]] == [
        (2, "fsdp", 20, False),
        (1, "auto", 40, True),
    ]
    assert {j.run_name for j in chains["1to2-ddp"]} == {"resume-1to2-ddp"}
    cpu = mg.resume_chains("cpu", "small", "nsa", 20)
    assert all(j.strategy != "fsdp" for legs in cpu.values() for j in legs)
