"""``nsa-lab bench decode``: the keys-per-step count against the paper, and the generation
timing path (run on the CPU at a tiny size; speed itself is measured on a GPU)."""

from __future__ import annotations

import pytest

from nsa_lab.benchmarks.decode import (
    PAPER_TABLE_4,
    generation_speed,
    keys_table,
    nsa_keys_per_step,
    paper_formula,
)
from nsa_lab.benchmarks.kernels import PAPER_PARAMS
from nsa_lab.kernels.nsa.spec import NSAParams
from tests.test_bench_train import TINY


@pytest.mark.parametrize("t_len", sorted(PAPER_TABLE_4))
def test_paper_formula_reproduces_table_4(t_len):
    assert paper_formula(t_len, PAPER_PARAMS) == PAPER_TABLE_4[t_len]
    # Exactly: (T - l) / d + 1 finished compressed blocks, one fewer than T / d.
    assert nsa_keys_per_step(t_len, PAPER_PARAMS) == PAPER_TABLE_4[t_len] - 1


def test_short_contexts_count_the_visible_blocks_and_window():
    """Selected blocks count l' keys each, the own partial block included (it is loaded
    whole and masked), so at short contexts the count can exceed T."""
    params = NSAParams(l=32, d=16, l_sel=64, n=16, w=512)
    # t = 99: blocks ending at 31, 47, 63, 79, 95 -> 5; selection blocks 0 and 1; window 100.
    assert nsa_keys_per_step(100, params) == 5 + 2 * 64 + 100
    assert nsa_keys_per_step(10, params) == 0 + 64 + 10


def test_keys_table_rows():
    rows = keys_table([8192, 65536], PAPER_PARAMS)
    assert rows[2].split("|")[1:6] == [" 8k ", " 8192 ", " 2047 ", " 2048 ", " 2048 "]
    assert rows[3].strip().endswith("| 11.6x |")


@pytest.mark.parametrize("variant", ["full", "nsa"])
def test_generation_speed_runs_cached_steps_and_reports_cache_bytes(variant):
    result = generation_speed(variant, 64, batch=2, steps=3, device="cpu", overrides=TINY)
    assert result.tokens_per_s > 0
    # full at 64 positions: 1 layer x (K + V) x 64 x 2 groups x 16 dims x 4 bytes
    full_mib = 2 * 64 * 2 * 16 * 4 / 2**20
    if variant == "full":
        assert result.cache_mib_per_sequence == pytest.approx(full_mib)
    else:  # selection keeps every position; window, raw-cmp rings and blocks come on top
        assert result.cache_mib_per_sequence > full_mib


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["--batch", "0"], "--batch"),
        (["--batch", "x"], "--batch"),
        (["--steps", "0"], "--steps"),
        (["--lengths", "16", "--steps", "16"], "--lengths"),
    ],
)
def test_bench_decode_refuses_bad_input_before_any_run(argv, named, capsys):
    from nsa_lab.cli import main

    assert main(["bench", "decode", "--device", "cpu", *argv]) == 2
    err = capsys.readouterr().err
    assert named in err and "Traceback" not in err
