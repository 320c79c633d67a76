"""Sweep specs: the shipped ones load, bad ones are refused before any trial exists."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from nsa_lab.cli import main
from nsa_lab.config import ConfigError, load_config
from nsa_lab.sweeps.constraints import context_rules, parse_constraint
from nsa_lab.sweeps.plan import plan_sweep, trial_config
from nsa_lab.sweeps.spec import config_keys, load_spec
from nsa_lab.sweeps.study import make_storage, open_study

REPO = Path(__file__).resolve().parents[1]
SWEEPS = REPO / "sweeps"
SMOKE_BASE = str(REPO / "experiments" / "smoke.yaml")


def write_spec(folder: Path, **fields) -> Path:
    """A spec over the smoke experiment; ``fields`` replace or add top-level entries."""
    spec = {
        "name": "t",
        "base": [SMOKE_BASE],
        "space": {"attn.w": [16, 32]},
        "sampler": "grid",
        **fields,
    }
    path = folder / "spec.yaml"
    path.write_text(OmegaConf.to_yaml(OmegaConf.create(spec)))
    return path


def refused(path: Path, *overrides: str) -> str:
    """Load and plan the spec; return the ConfigError's message (fails if none)."""
    with pytest.raises(ConfigError) as info:
        plan_sweep(load_spec(path, overrides))
    return str(info.value)


def test_ablations_grid_is_every_variant_twice():
    plan = plan_sweep(load_spec(SWEEPS / "ablations.yaml"))
    names = [p["attn.name"] for p in plan.grid_points]
    assert plan.n_trials == 14 and not plan.skipped
    assert sorted(set(names)) == sorted(
        ["full", "nsa", "nsa_no_cmp", "nsa_no_slc", "nsa_no_win", "nsa_shared_kv", "window"]
    )
    assert all(names.count(n) == 2 for n in names)
    assert {p["train.seed"] for p in plan.grid_points} == {0, 1}


def test_nsa_blocks_and_smoke_specs_plan():
    blocks = load_spec(SWEEPS / "nsa_blocks.yaml")
    assert [p.key for p in blocks.space] == ["attn.l", "attn.d", "attn.l_sel", "attn.n", "attn.w"]
    assert blocks.sampler["type"] == "tpe" and blocks.pruner["type"] == "hyperband"
    assert plan_sweep(blocks).n_trials == 40
    smoke = plan_sweep(load_spec(SWEEPS / "smoke.yaml", trials=3))
    assert smoke.n_trials == 3 and smoke.grid_points is None


def test_study_name_follows_cli_overrides():
    plain = load_spec(SWEEPS / "smoke.yaml")
    a = load_spec(SWEEPS / "smoke.yaml", ["train.lr=0.01"])
    b = load_spec(SWEEPS / "smoke.yaml", ["train.lr=0.02"])
    assert plain.study_name == "smoke"
    assert a.study_name.startswith("smoke-") and a.study_name != b.study_name
    assert a.study_name == load_spec(SWEEPS / "smoke.yaml", ["train.lr=0.01"]).study_name
    assert a.fingerprint() != b.fingerprint()
    assert load_spec(SWEEPS / "smoke.yaml", trials=9).fingerprint() == plain.fingerprint()


def test_grid_drops_invalid_points_and_trains_only_valid(tmp_path):
    path = write_spec(tmp_path, space={"attn.l": [8, 16], "attn.l_sel": [8, 16]})
    plan = plan_sweep(load_spec(path))
    assert {(p["attn.l"], p["attn.l_sel"]) for p in plan.grid_points} == {(8, 8), (8, 16), (16, 16)}
    [(point, why)] = plan.skipped
    assert point == {"attn.l": 16, "attn.l_sel": 8} and "must be <= attn.l_sel=8" in why
    assert plan.n_trials == 3


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"space": {"attn.bogus": [1, 2]}}, "attn.bogus"),
        ({"space": {}}, "space"),
        ({"space": None}, "is empty"),
        ({"colour": "red"}, "unknown sweep spec field"),
        ({"fixed": {"train.nope": 3}}, "train.nope"),
        ({"space": {"tracking.run_name": ["a", "b"]}}, "set by the sweep"),
        ({"space": {"tracking.uri": ["sqlite:///a.db", "sqlite:///b.db"]}}, "use fixed"),
        ({"space": {"attn.n": {"low": 5, "high": 3}}}, "low must be <= high"),
        ({"space": {"attn.n": {"low": 3, "hihg": 5}}}, "unknown field"),
        ({"space": {"attn.l": {"choices": []}}}, "non-empty list"),
        ({"space": {"train.lr": {"low": 0.001, "high": 0.01}}}, "a grid needs choices"),
        ({"sampler": "annealing"}, "sampler.type"),
        ({"sampler": {"type": "tpe", "bogus_arg": 1}, "trials": 2}, "bogus_arg"),
        ({"pruner": "median", "objectives": ["train/loss"]}, "single objective val/loss"),
        ({"objectives": ["val/loss", "attended_tokens_per_query"], "pruner": "median"}, "pruner"),
        ({"objectives": ["accuracy"]}, "must be a logged metric"),
        ({"objectives": ["needle/acc"]}, "train.eval_needle=true"),
        ({"constraints": ["__import__('os').system('true')"]}, "may be called"),
        ({"constraints": ["attn.l.__class__ == 1"]}, "unknown config key"),
        ({"constraints": ["attn.l <"]}, "not a valid expression"),
        ({"constraints": ["attn.w > 1000"]}, "impossible"),
        ({"space": {"attn.d": [3, 5]}}, "impossible"),
        ({"space": {"attn.w": [16, 128]}}, "no valid trial uses this value"),
        ({"sampler": "random", "space": {"attn.l": [8]}}, "trials"),
        ({"fixed": {"train.devices": "2"}}, "one device"),
    ],
)
def test_bad_specs_are_refused_with_the_reason(tmp_path, fields, expected):
    assert expected in refused(write_spec(tmp_path, **fields))


def test_impossible_random_space_is_refused(tmp_path):
    path = write_spec(
        tmp_path,
        sampler={"type": "random"},
        trials=5,
        space={"attn.d": [3, 5], "train.lr": {"low": 1e-4, "high": 1e-2, "log": True}},
    )
    message = refused(path)
    assert "impossible" in message and "attn.d" in message


def test_cli_refuses_bad_spec_before_any_store_exists(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = write_spec(tmp_path, space={"attn.d": [3, 5]})
    code = main(["sweep", str(path), f"tracking.uri=sqlite:///{tmp_path}/mlflow.db"])
    assert code == 2
    assert "impossible" in capsys.readouterr().err
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "optuna.db").exists()
    assert main(["sweep", str(path), "attn.nope=1"]) == 2
    assert "attn.nope" in capsys.readouterr().err


def test_constraint_language():
    keys = config_keys()
    cfg = load_config([SMOKE_BASE])  # l=8 d=4 l_sel=16 n=3 w=16 seq_len=64
    holds = {
        "attn.l * 2 == attn.l_sel": True,
        "attn.l_sel % attn.d == 0 and not attn.n > 3": True,
        "attn.l < attn.l_sel < attn.w": False,
        "attn.l <= attn.l_sel <= data.seq_len": True,
        "attn.name in ['nsa', 'full'] or attn.w > 1000": True,
        "'win' not in attn.branches": False,
        "len(attn.branches) == 3 and max(attn.l, attn.w) // 4 == 4": True,
        "-attn.n + abs(-3) == 0": True,
    }
    for text, expected in holds.items():
        assert parse_constraint(text, keys).holds(cfg) is expected, text
    with pytest.raises(ConfigError, match="Lambda is not allowed"):
        parse_constraint("lambda: 1", keys)


def test_context_rules_reject_window_and_blocks_beyond_context(tmp_path):
    path = write_spec(tmp_path)
    spec = load_spec(path)
    assert [c.text for c in context_rules(config_keys())] == [c.text for c in spec.all_constraints]
    with pytest.raises(ConfigError, match="sliding window must fit the context"):
        trial_config(spec, {"attn.w": 128})
    with pytest.raises(ConfigError, match="selected blocks must fit"):
        trial_config(spec, {"attn.n": 5})  # 5 * 16 > 64
    assert trial_config(spec, {"attn.w": 64}).attn.w == 64


def test_resuming_with_a_changed_spec_is_refused(tmp_path):
    storage = make_storage(f"sqlite:///{tmp_path}/optuna.db")
    first = load_spec(write_spec(tmp_path, space={"attn.w": [16, 32]}))
    open_study(first, storage, create=True)
    open_study(load_spec(write_spec(tmp_path, space={"attn.w": [16, 32]})), storage, create=True)
    changed = load_spec(write_spec(tmp_path, space={"attn.w": [16, 48]}))
    with pytest.raises(ConfigError, match="differs from the one study 't' was started with"):
        open_study(changed, storage, create=True)
