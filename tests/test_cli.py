"""The CLI surface: help texts, variant listing, config printing."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from nsa_lab.attention import list_variants
from nsa_lab.cli import main

EXPECTED_VARIANTS = {
    "full",
    "nsa",
    "nsa_no_cmp",
    "nsa_no_slc",
    "nsa_no_win",
    "nsa_shared_kv",
    "window",
    "topk",
}


def test_variants_lists_every_registered_name_with_a_description(capsys):
    assert main(["variants"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    names = {line.split()[0] for line in lines}
    assert names == {v.name for v in list_variants()}
    assert names >= EXPECTED_VARIANTS
    assert all(len(line.split(maxsplit=1)) == 2 for line in lines)


@pytest.mark.parametrize("argv", [[], ["train"], ["config"], ["variants"], ["ui"]])
def test_help_says_what_and_shows_an_example(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "example: nsa-lab" in out


def test_config_prints_the_resolved_yaml(capsys):
    assert main(["config", "attn.name=nsa_no_win", "attn.l=16"]) == 0
    cfg = OmegaConf.create(capsys.readouterr().out)
    assert cfg.attn.l == 16
    assert list(cfg.attn.branches) == ["cmp", "slc"]


@pytest.mark.parametrize(
    ("argv", "dest", "expected"),
    [
        (
            ["sweep", "sweeps/smoke.yaml", "--trials", "4", "tracking.uri=sqlite:///s.db"],
            "overrides",
            ["tracking.uri=sqlite:///s.db"],
        ),
        (
            ["sweep", "s.yaml", "a.b=1", "--trials", "4", "c.d=2", "--workers", "2"],
            "overrides",
            ["a.b=1", "c.d=2"],
        ),
        (
            ["ui", "--port", "5001", "x.yaml", "tracking.uri=u"],
            "args",
            ["x.yaml", "tracking.uri=u"],
        ),
        (
            ["report", "abl", "--out", "d", "tracking.uri=u", "--step", "3"],
            "args",
            ["tracking.uri=u"],
        ),
        (["train", "x.yaml", "attn.l=8"], "args", ["x.yaml", "attn.l=8"]),
    ],
)
def test_options_and_config_arguments_mix_in_any_order(argv, dest, expected):
    from nsa_lab.cli import build_parser, parse_args

    assert getattr(parse_args(build_parser(), argv), dest) == expected


@pytest.mark.parametrize(
    "argv",
    [
        ["sweep", "s.yaml", "--trials", "4", "other.yaml"],  # a sweep takes one spec
        ["train", "--bogus"],
        ["variants", "a.b=1"],
        ["bench", "train", "a.b=1"],  # bench takes overrides through --set
    ],
)
def test_anything_else_left_over_is_a_usage_error(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert "unrecognized arguments" in capsys.readouterr().err


def test_sweep_checks_an_override_given_after_an_option(capsys):
    code = main(["sweep", "sweeps/smoke.yaml", "--trials", "4", "tracking.uri=ftp://host/x"])
    assert code == 2
    assert "tracking.uri" in capsys.readouterr().err
