"""Config: defaults, files, overrides, variant presets, and every rejection rule."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from nsa_lab.cli import main
from nsa_lab.config import ConfigError, flatten, load_config
from tests.conftest import SMOKE


def test_defaults_resolve_and_validate():
    cfg = load_config()
    assert cfg.attn.name == "nsa"
    assert list(cfg.attn.branches) == ["cmp", "slc", "win"]
    assert cfg.attn.shared_kv is False


@pytest.mark.parametrize(
    ("name", "branches", "shared_kv"),
    [
        ("nsa_no_cmp", ["slc", "win"], False),
        ("nsa_no_slc", ["cmp", "win"], False),
        ("nsa_no_win", ["cmp", "slc"], False),
        ("nsa_shared_kv", ["cmp", "slc", "win"], True),
    ],
)
def test_variant_presets_fill_unset_keys(name, branches, shared_kv):
    cfg = load_config(overrides=[f"attn.name={name}"])
    assert list(cfg.attn.branches) == branches
    assert cfg.attn.shared_kv is shared_kv


def test_explicit_branches_override_the_preset():
    cfg = load_config(overrides=["attn.name=nsa", "attn.branches=[cmp]", "attn.shared_kv=true"])
    assert list(cfg.attn.branches) == ["cmp"]
    assert cfg.attn.shared_kv is True


def test_files_merge_left_to_right_then_overrides(tmp_path: Path):
    extra = tmp_path / "extra.yaml"
    extra.write_text("attn:\n  w: 8\ntrain:\n  max_steps: 7\n")
    cfg = load_config([SMOKE, extra], ["train.max_steps=9"])
    assert cfg.model.d_model == 64  # from smoke.yaml
    assert cfg.attn.w == 8  # extra.yaml wins over smoke.yaml
    assert cfg.train.max_steps == 9  # the command line wins over both


def test_flatten_gives_dotted_scalar_params():
    flat = flatten(load_config())
    assert flat["attn.l"] == 32
    assert flat["attn.branches"] == "cmp,slc,win"
    assert all(not isinstance(v, dict | list) for v in flat.values())


INVALID = [
    (["attn.foo=1"], "attn.foo", "unknown key"),
    (["bogus.key=1"], "bogus", "unknown key"),
    (["attn.l=abc"], "attn.l='abc'", "could not be converted"),
    (["attn.l=32", "attn.d=5"], "attn.d=5", "must divide attn.l=32"),
    (["attn.l=32", "attn.d=16", "attn.l_sel=40"], "attn.d=16", "must divide attn.l_sel=40"),
    (["attn.l=64", "attn.d=16", "attn.l_sel=32"], "attn.l=64", "must be <= attn.l_sel=32"),
    (["attn.n=2"], "attn.n=2", "must be >= 3 when force_init_local=true"),
    (
        ["model.n_heads=6", "model.n_kv_heads=4"],
        "model.n_heads=6",
        "multiple of model.n_kv_heads=4",
    ),
    (["attn.branches=[]"], "attn.branches=[]", "non-empty subset"),
    (["attn.branches=[cmp,foo]"], "attn.branches=['cmp', 'foo']", "unknown branch 'foo'"),
    (["attn.name=sparse"], "attn.name='sparse'", "unknown variant"),
    (["attn.impl=cuda"], "attn.impl='cuda'", "must be one of"),
    (["data.seq_len=4096"], "data.seq_len=4096", "must be <= model.max_seq_len"),
    (["attn.w=0"], "attn.w=0", "must be >= 1"),
    (
        ["data.curriculum_seq_len=96", "data.curriculum_steps=10"],
        "data.curriculum_seq_len=96",
        "must be shorter than data.seq_len=256 and divide it",
    ),
    (["data.curriculum_seq_len=64"], "data.curriculum_steps=0", "must be > 0"),
    (["data.curriculum_steps=10"], "data.curriculum_steps=10", "needs data.curriculum_seq_len"),
]


@pytest.mark.parametrize(("overrides", "names", "rule"), INVALID)
def test_invalid_input_exits_2_naming_key_value_and_rule(overrides, names, rule, capsys):
    assert main(["config", *overrides]) == 2
    err = capsys.readouterr().err
    assert names in err
    assert rule in err


def test_n_below_3_is_fine_without_forced_blocks():
    cfg = load_config(overrides=["attn.n=1", "attn.force_init_local=false"])
    assert cfg.attn.n == 1


def test_unknown_key_in_a_yaml_file_names_the_key(tmp_path: Path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("attn:\n  lsel: 64\n")
    with pytest.raises(ConfigError, match=r"attn\.lsel.*unknown key"):
        load_config([bad])


def test_missing_config_file_is_rejected(tmp_path: Path):
    with pytest.raises(ConfigError, match="no such file"):
        load_config([tmp_path / "nope.yaml"])


def test_train_rejects_bad_config_before_any_work(workdir: Path, capsys):
    db = workdir / "runs.db"
    code = main(["train", str(SMOKE), "attn.d=5", f"tracking.uri=sqlite:///{db}"])
    assert code == 2
    assert "attn.d=5" in capsys.readouterr().err
    assert not db.exists()
    assert not (workdir / "checkpoints").exists()


def test_console_exit_code_is_2():
    proc = subprocess.run(
        [sys.executable, "-m", "nsa_lab", "config", "attn.l=32", "attn.d=5"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert "attn.d=5: must divide attn.l=32" in proc.stderr
