"""scripts/sm90_compile_report.py: every Triton kernel of NSA's training op compiles for
Hopper (sm_90, through ptxas) on a machine without a GPU, as CI is."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.slow

TRAINING_KERNELS = {
    "_fwd_kernel",  # range attention: cmp and win
    "_dq_kernel",
    "_dkdv_kernel",
    "_score_kernel",  # block choice
    "_top_n_kernel",
    "_selection_fwd_kernel",
    "_selection_dq_kernel",
    "_selection_dkdv_kernel",
    "_gated_sum_fwd_kernel",
    "_gated_sum_bwd_kernel",
}


def test_every_training_kernel_compiles_for_sm90_and_reports_its_registers(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)  # compile here, not from an earlier run's cache
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "sm90_compile_report.py"), "--shape",
         "research", "--length", "1024"],
        capture_output=True, text=True, env=env, timeout=600, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    rows = re.findall(r"^\| (_\w+) \| (\d+) \| (\d+) \| (.*) \|$", result.stdout, re.M)
    assert {name for name, *_ in rows} == TRAINING_KERNELS
    assert all(0 < int(regs) <= 255 for _, regs, _, _ in rows)
    # The fused backward's variants: gated branch kernels, and dq added up over branches.
    options = [opts for name, _, _, opts in rows if name in ("_dq_kernel", "_selection_dq_kernel")]
    assert any("GATED=True" in o and "ACCUMULATE=True" in o for o in options)
    assert list(tmp_path.iterdir())  # it compiled into the fresh cache
