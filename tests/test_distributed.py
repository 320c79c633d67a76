"""Two-process DDP (gloo, CPU) on the smoke experiment: ranks see different data,
and MLflow gets exactly one run."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from nsa_lab.config import load_config
from nsa_lab.training.run import train
from tests.conftest import SMOKE

pytestmark = pytest.mark.slow

SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    import lightning as L
    from nsa_lab.config import load_config
    from nsa_lab.training.run import train

    class RecordBatches(L.Callback):
        '''Writes the first tokens of every batch this rank trained on.'''
        def __init__(self, out):
            self.out, self.seen = out, []
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            self.seen.append(batch[0][:, :8].tolist())
        def on_train_end(self, trainer, module):
            with open(f"{self.out}/rank{trainer.global_rank}.json", "w") as f:
                json.dump({"world": trainer.world_size, "batches": self.seen}, f)

    out = sys.argv[1]
    cfg = load_config([sys.argv[2]], sys.argv[3:])
    train(cfg, callbacks=[RecordBatches(out)])
    """
)


def test_two_process_ddp_shards_data_and_logs_one_run(workdir: Path):
    script = workdir / "ddp_train.py"
    script.write_text(SCRIPT)
    overrides = [
        f"tracking.uri=sqlite:///{workdir / 'mlflow.db'}",
        f"train.ckpt_dir={workdir / 'ckpt'}",
        "tracking.run_name=ddp",
        "train.accelerator=cpu",
        "train.devices=2",
        "train.strategy=ddp",
        "train.max_steps=6",
        "train.val_every=3",
    ]
    proc = subprocess.run(
        [sys.executable, str(script), str(workdir), str(SMOKE), *overrides],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=workdir,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]

    ranks = [json.loads((workdir / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["world"] == 2 for r in ranks)
    assert len(ranks[0]["batches"]) == len(ranks[1]["batches"]) == 6
    first_tokens = [{tuple(seq) for batch in r["batches"] for seq in batch} for r in ranks]
    assert not first_tokens[0] & first_tokens[1], "both ranks trained on the same sequences"

    client = MlflowClient(tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("smoke").experiment_id])
    assert len(runs) == 1
    assert runs[0].info.status == "FINISHED"
    assert (workdir / "ckpt" / "ddp" / "last.ckpt").is_file()

    # The 2-process checkpoint resumes on one process, into the same run.
    resumed = train(
        load_config(
            [SMOKE],
            [*overrides[:3], "train.max_steps=9", "train.val_every=3", "train.resume=true"],
        )
    )
    assert resumed.global_step == 9
    assert resumed.run_id == runs[0].info.run_id
