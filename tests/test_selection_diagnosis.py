"""The selection diagnosis (``nsa-lab eval selection``): where the needle's digits are,
which blocks a layer selects, and the oracle that puts the needle's blocks into every
selection."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from nsa_lab.attention import build_attention
from nsa_lab.attention.rope import rope_tables
from nsa_lab.cli import main
from nsa_lab.config import ConfigError, load_config
from nsa_lab.data.needle import NeedleFact, build_sample, encode
from nsa_lab.evaluation import needle as needle_eval
from nsa_lab.evaluation.needle import cell_needles, greedy_answers, make_grid
from nsa_lab.evaluation.selection import (
    blocks_of,
    diagnose_cell,
    diagnose_run,
    layer_inputs,
    reference_op,
    selecting_layers,
    selection_sharing,
    selection_table,
    teacher_forced_correct,
    value_span,
)
from nsa_lab.kernels.nsa import torch_ops
from nsa_lab.kernels.nsa.spec import NSAParams
from nsa_lab.training.module import LanguageModel
from tests.test_attention_layers import SMALL as LAYER_SMALL
from tests.test_needle import CPU, FullLogits, letters_haystack, long_context_model, text_of

SMALL = [*LAYER_SMALL, "attn.n=4", "attn.impl=torch"]
T = 45  # 6 selection blocks of 8, n = 4: one free pick besides the 3 forced ones


@pytest.mark.parametrize("length, depth", [(128, 0.0), (200, 0.37), (256, 1.0)])
def test_value_span_holds_the_digits_and_blocks_of_covers_it(length, depth):
    fact = NeedleFact("Bakodi", "004217")
    sample = build_sample(letters_haystack(400), fact, depth, length)
    span = value_span(length, depth, fact.value_offset)
    assert text_of(sample.tokens[span.start : span.stop]) == "004217"
    blocks = blocks_of(span, 8)
    assert blocks[0] == span.start // 8 and blocks[-1] == (span.stop - 1) // 8
    assert blocks_of(range(30, 36), 32) == (0, 1)  # digits straddling two blocks


def test_oracle_ranks_the_blocks_right_after_the_forced_ones_from_the_first_query_on():
    torch.manual_seed(0)
    params = NSAParams(l=8, d=4, l_sel=8, n=4, w=12)
    q, kc = torch.randn(2, T, 4, 8), torch.randn(2, (T - 8) // 4 + 1, 2, 8)
    plain = torch_ops.selected_blocks(q, kc, params)
    with torch_ops.preferring_blocks([1], first_query=30):
        oracle = torch_ops.selected_blocks(q, kc, params)
    torch.testing.assert_close(oracle[:, :30], plain[:, :30], rtol=0, atol=0)
    assert (oracle[:, 30:, :, 3] == 1).all()  # ranks 0-2 are block 0 and the local two
    assert (plain[:, 30:, :, 3] != 1).any()  # ... where the scores alone often pick another
    torch.testing.assert_close(torch_ops.selected_blocks(q, kc, params), plain, rtol=0, atol=0)


def _layer(name: str = "nsa"):
    cfg = load_config(overrides=[f"attn.name={name}", *SMALL])
    return build_attention(cfg.model, cfg.attn).double()


def test_layer_selection_indices_are_the_blocks_its_op_attends(monkeypatch):
    torch.manual_seed(1)
    layer = _layer()
    x = torch.randn(2, T, 32, dtype=torch.float64)
    cos, sin = rope_tables(8, T, 10000.0, x.device, x.dtype)
    attended = []
    real = torch_ops.selection_attention

    def spy(q, k, v, indices, l_sel, scale=None):
        attended.append(indices)
        return real(q, k, v, indices, l_sel, scale)

    monkeypatch.setattr(torch_ops, "selection_attention", spy)
    out = layer(x, cos, sin)
    assert torch.equal(layer.selection_indices(x, cos, sin), attended[0])
    with torch_ops.preferring_blocks([1], first_query=30):
        oracle_out = layer(x, cos, sin)
        assert (layer.selection_indices(x, cos, sin)[:, 30:] == 1).any(-1).all()
    torch.testing.assert_close(oracle_out[:, :30], out[:, :30], rtol=0, atol=0)
    assert not torch.allclose(oracle_out[:, 30:], out[:, 30:])
    with pytest.raises(ValueError, match="no selection"):
        _layer("nsa_no_slc").selection_indices(x, cos, sin)


def _model(name: str, *extra: str) -> LanguageModel:
    cfg = load_config(
        overrides=[
            f"attn.name={name}",
            *SMALL,
            "attn.impl=auto",
            "model.n_layers=2",
            "model.max_seq_len=256",
            *extra,
        ]
    )
    return LanguageModel(OmegaConf.to_container(cfg, resolve=True), 257)


def test_a_cell_counts_answers_oracle_answers_and_hits_per_layer(monkeypatch):
    torch.manual_seed(2)
    model = _model("nsa", "attn.n=6").model.double().eval()  # 3 free picks: room for 2 value blocks
    layers = selecting_layers(model)
    assert len(layers) == 2
    haystack = letters_haystack(3000)
    grid = make_grid(256, 256, lengths=[256], depths=[0.5], trials=4)
    own_op = layers[0].nsa_op
    with reference_op(layers):
        assert layers[0].nsa_op is torch_ops.nsa_attention
        cell = diagnose_cell(model, layers, haystack, 256, 0.5, grid, torch.device("cpu"))
        # The hits are measured on the layers' real inputs: the oracle makes them all 1.
        prompt = torch.from_numpy(np.stack([encode("x" * 200)]))
        with layer_inputs(layers) as seen, torch_ops.preferring_blocks(cell.blocks, 190):
            model(prompt)
            held = [
                layer.selection_indices(*args)[:, -1]
                for layer, args in zip(layers, seen, strict=True)
            ]
    assert all(((indices == b).any(-1)).all() for indices in held for b in cell.blocks)
    assert (cell.length, cell.depth, cell.trials) == (256, 0.5, 4)
    assert 0 <= cell.correct <= 4 and 0 <= cell.oracle_correct <= 4
    assert len(cell.hits) == 2 and all(0.0 <= h <= 1.0 for h in cell.hits)
    assert layers[0].nsa_op is own_op  # restored after the diagnosis
    monkeypatch.setattr(needle_eval, "TOKENS_PER_BATCH", 256)  # one needle per batch: same cell
    with reference_op(layers):
        assert diagnose_cell(model, layers, haystack, 256, 0.5, grid, torch.device("cpu")) == cell
    table = selection_table([cell], "t")
    assert "| 256 | 0.5 |" in table and "hit % L1" in table and "oracle" in table


def test_teacher_forcing_accepts_exactly_the_greedy_answers():
    """The diagnosis reads logits at the answer positions only; they agree with the greedy
    answers of ``eval needle`` and with the logits of every position."""
    model = long_context_model(256, "nsa")
    prompts, _ = cell_needles(letters_haystack(1000), 256, 0.5, trials=2, seed=0)
    tokens = torch.cat([torch.from_numpy(prompts), greedy_answers(model, prompts, CPU)], dim=1)
    prompt_len = prompts.shape[1]
    assert teacher_forced_correct(model, tokens, prompt_len).tolist() == [True, True]
    wrong = tokens.clone()
    wrong[0, -3] = (wrong[0, -3] + 1) % 256
    assert teacher_forced_correct(model, wrong, prompt_len).tolist() == [False, True]
    assert teacher_forced_correct(FullLogits(model), wrong, prompt_len).tolist() == [False, True]


def test_a_cell_short_enough_for_dense_selection_always_hits():
    model = _model("nsa", "attn.n=16").model.eval()
    layers = selecting_layers(model)
    grid = make_grid(128, 256, lengths=[128], depths=[0.0, 1.0], trials=2)
    with reference_op(layers):
        cells = [
            diagnose_cell(model, layers, letters_haystack(3000), 128, d, grid, torch.device("cpu"))
            for d in grid.depths
        ]
    assert all(h == 1.0 for c in cells for h in c.hits)


def _checkpoint(tmp_path: Path, name: str) -> Path:
    module = _model(name, "data.source=builtin")
    path = tmp_path / f"{name}.ckpt"
    torch.save({"hyper_parameters": dict(module.hparams), "state_dict": module.state_dict()}, path)
    return path


def test_cli_prints_and_writes_the_table_and_rejects_variants_without_selection(
    tmp_path: Path, capsys
):
    args = ["--lengths", "100", "--depths", "0,1", "--trials", "2", "--device", "cpu"]
    out = tmp_path / "out"
    assert (
        main(["eval", "selection", str(_checkpoint(tmp_path, "nsa")), *args, "--out", str(out)])
        == 0
    )
    printed = capsys.readouterr().out
    assert "| 100 | 0 |" in printed and "| 100 | 1 |" in printed
    assert (out / "needle_selection.md").read_text() == printed
    assert main(["eval", "selection", str(_checkpoint(tmp_path, "full")), *args]) == 2
    assert "has no NSA selection branch" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="nsa_no_slc"):
        diagnose_run(str(_checkpoint(tmp_path, "nsa_no_slc")), [100], [0.0], 1, device="cpu")


def test_selection_sharing_counts_blocks_per_position_and_tile_unions():
    """Per selecting layer: the blocks a position reads and, per tile of k consecutive
    positions, the distinct blocks they read together, as sets of the layer's choices."""
    torch.manual_seed(5)
    model = _model("nsa").model.eval()
    tokens = torch.randint(0, 257, (2, T))
    sharing = selection_sharing(model, tokens, (1, 2, 4))
    layers = selecting_layers(model)
    with torch.no_grad(), layer_inputs(layers) as seen:
        model(tokens)
    assert [s.layer for s in sharing] == [0, 1]
    for shared, layer, args in zip(sharing, layers, seen, strict=True):
        chosen = layer.selection_indices(*args)  # [B, T, G, n]
        assert shared.blocks == pytest.approx((chosen >= 0).sum(-1).float().mean())
        for k, union in shared.unions.items():
            sizes = [
                len({b for b in chosen[batch, start : start + k, g].flatten().tolist() if b >= 0})
                for batch in range(2)
                for start in range(0, T, k)
                for g in range(chosen.shape[2])
            ]
            assert union == pytest.approx(sum(sizes) / len(sizes))
        assert shared.unions[1] == pytest.approx(shared.blocks) and shared.unions[4] > shared.blocks
