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
