"""Several processes on a CPU (gloo): DDP shards the data, averages validation over ranks
and logs one MLflow run; FSDP clips gradients, decays the right weights and resumes across
device counts; a killed rank stops the run, which ends FAILED and resumes."""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from mlflow.tracking import MlflowClient

from nsa_lab.config import load_config
from nsa_lab.training.rank_watchdog import process_alive
from nsa_lab.training.run import newest_checkpoint, train
from tests.conftest import REPO, SMOKE

pytestmark = pytest.mark.slow

SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    sys.path.insert(0, sys.argv[1])
    import lightning as L
    from nsa_lab.config import load_config
    from nsa_lab.training.run import newest_checkpoint, train

    class RecordBatches(L.Callback):
        '''Writes the first tokens of every batch this rank trained on, and this rank's own
        validation sums (the module's, before it gathers them from all ranks).'''
        def __init__(self, out):
            self.out, self.seen, self.val = out, [], []
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            self.seen.append(batch[0][:, :8].tolist())
        def on_validation_epoch_end(self, trainer, module):  # runs before the module's
            self.val.append([trainer.global_step, float(module._val_sums[0]), module._val_count])
        def on_train_end(self, trainer, module):
            record = {"world": trainer.world_size, "batches": self.seen, "val": self.val}
            with open(f"{self.out}/rank{trainer.global_rank}.json", "w") as f:
                json.dump(record, f)

    out = sys.argv[2]
    cfg = load_config([sys.argv[3]], sys.argv[4:])
    train(cfg, callbacks=[RecordBatches(out)])
    """
)


def run_overrides(workdir: Path, name: str) -> list[str]:
    return [
        f"tracking.uri=sqlite:///{workdir / 'mlflow.db'}",
        f"train.ckpt_dir={workdir / 'ckpt'}",
        f"tracking.run_name={name}",
        "train.accelerator=cpu",
    ]


def smoke_runs(workdir: Path):
    client = MlflowClient(tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}")
    return client, client.search_runs([client.get_experiment_by_name("smoke").experiment_id])


def run_script(workdir: Path, script: str, *args: str) -> None:
    path = workdir / "script.py"
    path.write_text(script)
    proc = subprocess.run(
        [sys.executable, str(path), str(REPO), str(workdir), str(SMOKE), *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=workdir,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_two_process_ddp_shards_data_averages_validation_and_logs_one_run(workdir: Path):
    overrides = [
        *run_overrides(workdir, "ddp"),
        "train.devices=2",
        "train.strategy=ddp",
        "train.max_steps=6",
        "train.val_every=3",
    ]
    run_script(workdir, SCRIPT, *overrides)

    ranks = [json.loads((workdir / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["world"] == 2 for r in ranks)
    assert len(ranks[0]["batches"]) == len(ranks[1]["batches"]) == 6
    first_tokens = [{tuple(seq) for batch in r["batches"] for seq in batch} for r in ranks]
    assert not first_tokens[0] & first_tokens[1], "both ranks trained on the same sequences"

    client, runs = smoke_runs(workdir)
    assert len(runs) == 1
    assert runs[0].info.status == "FINISHED"
    assert (workdir / "ckpt" / "ddp" / "last.ckpt").is_file()

    # val/loss is the sequence-weighted mean of both ranks' shards, not rank 0's own.
    history = client.get_metric_history(runs[0].info.run_id, "val/loss")
    logged = [m.value for m in sorted(history, key=lambda m: m.step)]
    assert [step for step, _, _ in ranks[0]["val"]] == [3, 6]
    for value, (_, sum0, n0), (_, sum1, n1) in zip(
        logged, ranks[0]["val"], ranks[1]["val"], strict=True
    ):
        assert n0 > 0 and n1 > 0
        assert value == pytest.approx((sum0 + sum1) / (n0 + n1), rel=1e-5)
        assert value != pytest.approx(sum0 / n0, rel=1e-5), "rank 0's loss alone"

    # The 2-process checkpoint resumes on one process, into the same run.
    resumed = train(
        load_config(
            [SMOKE],
            [*overrides[:4], "train.max_steps=9", "train.val_every=3", "train.resume=true"],
        )
    )
    assert resumed.global_step == 9
    assert resumed.run_id == runs[0].info.run_id


class Probe(L.Callback):
    """What a rank's training starts from: world size, step, the optimizer's groups, whether
    every restored optimizer state has its parameter's shape, and how many FSDP units."""

    def __init__(self, out: Path | None = None) -> None:
        self.out = out
        self.seen: dict[str, Any] = {}

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # torch's own class: emulate_fsdp_on_a_cpu replaces the package's name only
        from torch.distributed.fsdp.fully_sharded_data_parallel import FullyShardedDataParallel

        optimizer = trainer.optimizers[0]
        groups = optimizer.param_groups
        self.seen = {
            "world": trainer.world_size,
            "start_step": trainer.global_step,
            "groups": [[g["weight_decay"], len(g["params"])] for g in groups],
            "states_fit": all(
                optimizer.state[p]["exp_avg"].shape == p.shape
                for g in groups
                for p in g["params"]
                if p in optimizer.state
            ),
            "restored": sum(p in optimizer.state for g in groups for p in g["params"]),
            "fsdp_units": sum(
                isinstance(m, FullyShardedDataParallel) for m in trainer.model.modules()
            ),
        }

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.out is not None:
            record = {**self.seen, "clips": CLIPS}
            (self.out / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


# (max_norm, total norm) of every FSDP clip_grad_norm_ call in this process.
CLIPS: list[list[float]] = []


def emulate_fsdp_on_a_cpu() -> None:
    """Let Lightning's FSDP strategy run on CPU processes, as it runs on GPUs.

    Three things stand in the way, none of them about this project's code:
    Lightning refuses ``FSDPStrategy`` without a CUDA accelerator (it checks the exact
    class, so a subclass passes); torch's FSDP needs ``device_id`` to say "cpu", where
    Lightning passes the device index (None on a CPU); and Lightning gathers full state
    dicts with ``offload_to_cpu=True``, which on a CPU frees the tensors it returns
    (a segfault when they are saved). The subclass also records every clip.
    """
    import torch.distributed.fsdp as fsdp
    import torch.distributed.fsdp.api as fsdp_api
    from lightning.pytorch.strategies import FSDPStrategy

    from nsa_lab.training import run

    class CpuFSDP(fsdp.FullyShardedDataParallel):
        def __init__(self, module, *args, device_id=None, **kwargs):
            device = torch.device("cpu") if device_id is None else device_id
            super().__init__(module, *args, device_id=device, **kwargs)

        def clip_grad_norm_(self, max_norm, norm_type=2.0):
            norm = super().clip_grad_norm_(max_norm, norm_type)
            CLIPS.append([float(max_norm), float(norm)])
            return norm

    class CpuFSDPStrategy(FSDPStrategy):
        pass

    def no_offload(config):
        return functools.wraps(config)(lambda offload_to_cpu=False, **kw: config(**kw))

    fsdp.FullyShardedDataParallel = CpuFSDP
    fsdp.FullStateDictConfig = no_offload(fsdp.FullStateDictConfig)
    fsdp_api.FullOptimStateDictConfig = no_offload(fsdp_api.FullOptimStateDictConfig)
    run.FSDPStrategy = CpuFSDPStrategy


FSDP_SCRIPT = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    sys.path.insert(0, sys.argv[1])
    from nsa_lab.config import load_config
    from nsa_lab.training import run
    from tests.test_distributed import Probe, emulate_fsdp_on_a_cpu

    emulate_fsdp_on_a_cpu()
    run.train(load_config([sys.argv[3]], sys.argv[4:]), callbacks=[Probe(Path(sys.argv[2]))])
    """
)


def test_fsdp_clips_decays_and_resumes_from_one_process_to_two_and_back(workdir: Path):
    """One process (3 steps) -> two FSDP processes (to step 6) -> one process (to step 9),
    one MLflow run throughout."""
    overrides = [*run_overrides(workdir, "fsdp"), "train.val_every=3"]
    alone = Probe()
    first = train(load_config([SMOKE], [*overrides, "train.max_steps=3"]), callbacks=[alone])
    assert first.global_step == 3 and alone.seen["fsdp_units"] == 0

    fsdp = [*overrides, "train.devices=2", "train.strategy=fsdp", "train.max_steps=6"]
    run_script(workdir, FSDP_SCRIPT, *fsdp, "train.resume=true")
    ranks = [json.loads((workdir / f"rank{r}.json").read_text()) for r in (0, 1)]
    n_layers = load_config([SMOKE]).model.n_layers
    for rank in ranks:
        assert rank["world"] == 2 and rank["start_step"] == 3
        assert rank["fsdp_units"] == n_layers + 1  # every block, and the root
        assert rank["groups"] == alone.seen["groups"]  # FSDP's flat shards decay as matrices
        assert rank["states_fit"] and rank["restored"] > 0  # the 1-process optimizer state
        assert [max_norm for max_norm, _ in rank["clips"]] == [1.0, 1.0, 1.0]  # train.grad_clip
    # The norm clipped is the global one: every rank computes the same from its shards.
    norms = [[norm for _, norm in rank["clips"]] for rank in ranks]
    assert norms[0] == pytest.approx(norms[1], rel=1e-6)

    back = Probe()
    last = train(
        load_config([SMOKE], [*overrides, "train.max_steps=9", "train.resume=true"]),
        callbacks=[back],
    )
    assert last.global_step == 9 and back.seen["start_step"] == 6
    assert back.seen["states_fit"]  # FSDP's full optimizer state, on one process
    assert back.seen["restored"] == sum(n for _, n in alone.seen["groups"])
    client, runs = smoke_runs(workdir)
    assert [r.info.run_id for r in runs] == [first.run_id] == [last.run_id]
    assert runs[0].info.status == "FINISHED"
    val_steps = sorted(m.step for m in client.get_metric_history(first.run_id, "val/loss"))
    assert val_steps == [2, 5, 8]  # Lightning logs a validation at the step before it


def _children(pid: int) -> dict[int, str]:
    """``{pid: command line}`` of the child processes of ``pid`` (Linux)."""
    found = {}
    for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
        with_nul = Path(f"/proc/{child}/cmdline").read_bytes()
        found[int(child)] = with_nul.replace(b"\0", b" ").decode()
    return found


def _wait(condition, timeout: float, what: str) -> float:
    """Polls ``condition`` until true; returns the seconds it took."""
    start = time.monotonic()
    while not condition():
        assert time.monotonic() - start < timeout, f"{what} within {timeout} s"
        time.sleep(0.1)
    return time.monotonic() - start


# Lightning's launcher looks at its child processes every 5 s.
RANK_STOP_S = 15


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_killed_rank_stops_the_run_which_ends_failed_and_resumes(workdir: Path):
    overrides = run_overrides(workdir, "killed")
    ddp = ["train.devices=2", "train.strategy=ddp", "train.max_steps=100000", "train.val_every=2"]
    with open(workdir / "stderr.txt", "w") as stderr:
        rank0 = subprocess.Popen(
            [sys.executable, "-m", "nsa_lab", "train", str(SMOKE), *overrides, *ddp],
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            cwd=workdir,
        )
    try:
        last = workdir / "ckpt" / "killed" / "last.ckpt"
        _wait(lambda: last.is_file() or rank0.poll() is not None, 120, "a checkpoint")
        assert rank0.poll() is None, (workdir / "stderr.txt").read_text()[-3000:]
        children = _children(rank0.pid)
        rank1 = [pid for pid, cmd in children.items() if "rank_watchdog" not in cmd]
        watchdog = [pid for pid, cmd in children.items() if "rank_watchdog" in cmd]
        assert len(rank1) == 1 and len(watchdog) == 1, children
        os.kill(rank1[0], signal.SIGKILL)
        took = _wait(lambda: rank0.poll() is not None, RANK_STOP_S, "rank 0 stops")
    finally:
        rank0.kill()
    print(f"rank 0 stopped {took:.1f} s after rank 1 was killed")

    client, runs = smoke_runs(workdir)
    run_id = runs[0].info.run_id

    def failed() -> bool:
        return client.get_run(run_id).info.status == "FAILED"

    _wait(failed, 30, "the run marked FAILED")
    _wait(lambda: not process_alive(watchdog[0]), 30, "the watchdog exits")

    # Resume takes the newest checkpoint: rank 0's on_exception.ckpt when it finished a
    # step after the last periodic one before it saw rank 1 gone.
    newest = newest_checkpoint(last.parent, "*.ckpt")
    step = torch.load(newest, map_location="cpu", weights_only=True)["global_step"]
    assert step >= 2
    probe = Probe()
    resumed = train(
        load_config(
            [SMOKE],
            [*overrides, ddp[-1], "train.resume=true", f"train.max_steps={step + 2}"],
        ),
        callbacks=[probe],
    )
    assert probe.seen["start_step"] == step and resumed.global_step == step + 2
    assert resumed.run_id == run_id
    assert client.get_run(run_id).info.status == "FINISHED"
