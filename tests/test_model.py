"""The GQA transformer around every registered attention variant."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from nsa_lab.attention import list_variants
from nsa_lab.config import load_config
from nsa_lab.models import GQATransformer
from nsa_lab.training.module import LanguageModel, next_token_loss, warmup_cosine
from tests.conftest import SMOKE

VOCAB = 257
VARIANTS = [v.name for v in list_variants()]


def tiny_model(name: str) -> GQATransformer:
    cfg = load_config([SMOKE], [f"attn.name={name}", "attn.w=8"])
    torch.manual_seed(0)
    return GQATransformer(cfg.model, cfg.attn, VOCAB)


@pytest.mark.parametrize("name", VARIANTS)
def test_logits_at_t_ignore_tokens_after_t(name):
    """Causality through the whole model, at a length that is a multiple of no block size."""
    model = tiny_model(name).eval()
    T, t = 45, 29
    idx = torch.randint(0, VOCAB, (2, T))
    changed = idx.clone()
    changed[:, t + 1 :] = torch.randint(0, VOCAB, (2, T - t - 1))
    with torch.no_grad():
        a, b = model(idx), model(changed)
    torch.testing.assert_close(a[:, : t + 1], b[:, : t + 1], rtol=0, atol=1e-5)
    assert not torch.allclose(a[:, t + 1 :], b[:, t + 1 :])


def test_head_is_tied_to_the_embedding():
    model = tiny_model("full")
    assert model.head.weight is model.embed.weight


def test_rejects_sequences_longer_than_max_seq_len():
    with pytest.raises(ValueError, match="max_seq_len=64"):
        tiny_model("full")(torch.zeros(1, 65, dtype=torch.long))


def test_nsa_reports_gate_means_per_layer_and_branch():
    model = tiny_model("nsa")
    model(torch.randint(0, VOCAB, (1, 40)))
    gates = model.gate_means()
    assert set(gates) == {f"layer{i}/{b}" for i in range(2) for b in ("cmp", "slc", "win")}
    assert all(0.0 < v < 1.0 for v in gates.values())
    assert tiny_model("full").gate_means() == {}


@pytest.mark.parametrize("name", ["full", "nsa"])
def test_a_few_steps_overfit_one_batch(name):
    cfg = load_config([SMOKE], [f"attn.name={name}", "train.warmup_steps=0", "train.max_steps=40"])
    torch.manual_seed(0)
    module = LanguageModel(dict(cfg), VOCAB)
    opt = module.configure_optimizers()["optimizer"]
    idx = torch.randint(0, VOCAB, (4, 33))
    inputs, targets = idx[:, :-1], idx[:, 1:]
    losses = []
    for _ in range(40):
        loss = next_token_loss(module(inputs), targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_warmup_then_cosine_to_the_floor():
    assert warmup_cosine(0, 10, 100, 0.1) == pytest.approx(0.1)
    assert warmup_cosine(9, 10, 100, 0.1) == pytest.approx(1.0)
    assert warmup_cosine(10, 10, 100, 0.1) == pytest.approx(1.0)
    assert warmup_cosine(55, 10, 100, 0.1) == pytest.approx(0.55)
    assert warmup_cosine(100, 10, 100, 0.1) == pytest.approx(0.1)
    assert warmup_cosine(500, 10, 100, 0.1) == pytest.approx(0.1)


@pytest.mark.parametrize(("precision", "fused"), [("bf16-mixed", True), ("16-mixed", False)])
def test_adamw_is_fused_unless_gradients_are_scaled_and_fused_steps_are_clipped(
    precision, fused, tmp_path
):
    """A fused AdamW Lightning would refuse to clip; the module clips it itself."""
    cfg = load_config([SMOKE], [f"train.precision={precision}", "train.grad_clip=0.001"])
    module = LanguageModel(dict(cfg), VOCAB)
    assert module.configure_optimizers()["optimizer"].defaults["fused"] is fused
    if not fused:
        return  # 16-mixed needs a GPU; Lightning's own clipping serves it
    idx = torch.randint(0, VOCAB, (2, 17))
    batches = torch.utils.data.DataLoader([(idx[0, :-1], idx[0, 1:])] * 2, batch_size=2)
    trainer = L.Trainer(
        max_steps=1, gradient_clip_val=0.001, accelerator="cpu", precision=precision, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.fit(module, train_dataloaders=batches)
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    assert grads
    assert torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])) <= 0.001 + 1e-6


def test_rotary_tables_are_built_once_and_stay_out_of_checkpoints():
    """The tables are buffers (they move and cast with the model) that checkpoints from
    before them, and after, neither hold nor expect."""
    model = tiny_model("full")
    assert not [key for key in model.state_dict() if "rope" in key]
    model.load_state_dict(model.state_dict(), strict=True)
    assert model.double().rope_cos.dtype == torch.float64
