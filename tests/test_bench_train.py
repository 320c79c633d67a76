"""``nsa-lab bench train``: its table, its per-variant processes and its input checks.

Speed itself is measured on a GPU by the command; here it runs on the CPU at a tiny
size, which exercises the same code path end to end (fresh process per row, model
build, timed steps, FLOP count) without asserting any timing.
"""

from __future__ import annotations

import pytest

from nsa_lab.benchmarks.training import StepBench, measure, train_table
from nsa_lab.cli import main

TINY = (
    "model.n_layers=1",
    "model.d_model=64",
    "model.n_heads=4",
    "model.n_kv_heads=2",
    "model.head_dim=16",
    "attn.l=8",
    "attn.d=4",
    "attn.l_sel=8",
    "attn.n=3",
    "attn.w=16",
)


def test_measure_trains_the_configured_model_and_reports_its_step():
    bench = StepBench("nsa", 64, batch=2, steps=2, warmup=1, compile_mode=None, overrides=TINY,
                      device="cpu")  # fmt: skip
    result = measure(bench)
    assert result.params > 0
    assert result.ms_per_step > 0
    assert result.tokens_per_s == pytest.approx(2 * 64 / result.ms_per_step * 1000)
    assert result.first_step_s > 0
    assert result.mfu is None and result.peak_gib is None  # no GPU peak on a CPU


def test_table_compares_each_variant_with_full_at_its_length():
    results = [measure(StepBench(v, 32, 1, 1, 1, False, TINY, "cpu")) for v in ("full", "window")]
    rows = train_table(results)
    assert rows[0].startswith("| variant | T |")
    full_row, window_row = rows[2].split("|"), rows[3].split("|")
    assert full_row[1].strip() == "full" and full_row[7].strip() == "1.00"
    expected = results[1].tokens_per_s / results[0].tokens_per_s
    assert float(window_row[7]) == pytest.approx(expected, abs=0.006)


@pytest.mark.slow
def test_bench_train_command_runs_every_variant_in_its_own_process(tmp_path, capsys):
    out = tmp_path / "bench.md"
    argv = ["bench", "train", "--device", "cpu", "--lengths", "64", "--variants",
            "full,nsa_shared_kv", "--batch", "1", "--steps", "1", "--warmup", "1",
            "--out", str(out), "--set", *TINY]  # fmt: skip
    assert main(argv) == 0
    report = out.read_text()
    assert "model.d_model=64" in report  # the override reached the header
    rows = [line for line in report.splitlines() if line.startswith("| ") and "|---" not in line]
    assert [row.split("|")[1].strip() for row in rows[1:]] == ["full", "nsa_shared_kv"]


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["--variants", "full,dense"], "--variants"),
        (["--lengths", "8k,abc"], "--lengths"),
        (["--steps", "0"], "--steps"),
        (["--batch", "-1"], "--batch"),
        (["--set", "attn.l=7"], "attn.l"),
        (["--profile"], "--profile"),
    ],
)
def test_bad_input_is_refused_before_any_run(argv, named, capsys):
    assert main(["bench", "train", "--device", "cpu", *argv]) == 2
    err = capsys.readouterr().err
    assert named in err and "Traceback" not in err


@pytest.mark.parametrize(
    ("flags", "mode"),
    [
        ([], None),
        (["--compile"], "default"),
        (["--compile-mode", "reduce-overhead"], "reduce-overhead"),  # implies --compile
        (["--compile", "--compile-mode", "max-autotune"], "max-autotune"),
    ],
)
def test_compile_flags_reach_the_bench(flags, mode, monkeypatch):
    import nsa_lab.benchmarks.training as training

    seen = {}
    monkeypatch.setattr(training, "run_train_bench", lambda *a, **kw: seen.update(kw) or "")
    argv = ["bench", "train", "--device", "cpu", "--lengths", "64", "--variants", "full"]
    assert main([*argv, *flags]) == 0
    assert seen["compile_mode"] == mode
