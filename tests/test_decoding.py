"""Decoding with KV caches is exact: prefill + one-token steps give the full forward's logits.

Every registered variant, on CPU in float64, with prompt and generated lengths that
cross compression-block (l=8, stride 4), selection-block (l'=8) and window (w=12)
boundaries, a prompt shorter than ``l``, and rings that wrap (the window's, and the
last ``l`` raw positions NSA keeps to compress the next block).
"""

from __future__ import annotations

import pytest
import torch

from nsa_lab.attention import list_variants
from nsa_lab.attention.base import AttentionBase
from nsa_lab.attention.cache import KVBuffer
from nsa_lab.config import load_config
from nsa_lab.models import GQATransformer
from nsa_lab.models.sampling import next_token

VOCAB = 50
TOTAL = 48
SHAPE = (
    "model.n_layers=2",
    "model.d_model=32",
    "model.n_heads=4",
    "model.n_kv_heads=2",
    "model.head_dim=8",
    f"model.max_seq_len={TOTAL}",
    f"data.seq_len={TOTAL}",
    "attn.l=8",
    "attn.d=4",
    "attn.l_sel=8",
    "attn.n=4",
    "attn.w=12",
    "attn.impl=torch",
)
# Every registered variant, and shared K/V with a branch subset.
CASES = [(v.name,) for v in list_variants()] + [
    ("nsa", "attn.shared_kv=true", "attn.branches=[cmp,win]"),
    ("nsa", "attn.shared_kv=true", "attn.branches=[slc]"),
]


def model_for(name: str, *overrides: str) -> GQATransformer:
    cfg = load_config(overrides=[*SHAPE, f"attn.name={name}", *overrides])
    torch.manual_seed(0)
    model = GQATransformer(cfg.model, cfg.attn, VOCAB).double().eval()
    for p in model.parameters():  # livelier than the 0.02 init: selection scores differ
        p.data.normal_(0.0, 0.3)
    return model


@pytest.mark.parametrize("case", CASES, ids=["+".join(c) for c in CASES])
@pytest.mark.parametrize("prompt_len", [5, 13, 30])
def test_prefill_then_steps_give_the_full_forward_logits(case, prompt_len):
    model = model_for(*case)
    tokens = torch.randint(0, VOCAB, (2, TOTAL), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(tokens)
        cache = model.new_cache(TOTAL, "cpu", torch.float64)
        logits = [model(tokens[:, :prompt_len], cache=cache)]
        for t in range(prompt_len, TOTAL):
            logits.append(model(tokens[:, t : t + 1], cache=cache))
    cached = torch.cat(logits, dim=1)
    assert cache.length == TOTAL
    torch.testing.assert_close(cached, full, rtol=1e-9, atol=1e-9)


def test_generate_greedy_continues_as_argmax_of_full_forwards():
    model = model_for("nsa")
    prompt = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(2))
    tokens = torch.stack(list(model.generate(prompt, 12)), dim=1)
    sequence = prompt
    for i in range(12):  # the slow way: a whole forward per token
        with torch.no_grad():
            expected = model(sequence)[:, -1].argmax(-1)
        assert torch.equal(tokens[:, i], expected)
        sequence = torch.cat([sequence, expected[:, None]], dim=1)


def test_sampling_is_reproducible_and_respects_top_k():
    logits = torch.tensor([[0.0, 5.0, 4.0, -1.0]]).repeat(200, 1)
    draws = next_token(logits, 1.0, top_k=2, generator=torch.Generator().manual_seed(0))
    again = next_token(logits, 1.0, top_k=2, generator=torch.Generator().manual_seed(0))
    assert torch.equal(draws, again)
    assert set(draws.tolist()) == {1, 2}  # only the two largest logits are ever drawn
    assert torch.equal(next_token(logits, 0.0), torch.ones(200, dtype=torch.long))


def test_window_cache_is_a_ring_of_w_positions():
    model = model_for("window")
    cache = model.new_cache(TOTAL, "cpu", torch.float64)
    with torch.no_grad():
        model(torch.zeros(1, 30, dtype=torch.long), cache=cache)
    keys = cache.layers[0].buffers["kv"].keys
    assert keys.shape[1] == 12  # w, not all positions
    full = model_for("full").new_cache(TOTAL, "cpu", torch.float64)
    with torch.no_grad():
        model_for("full")(torch.zeros(1, 30, dtype=torch.long), cache=full)
    assert cache.nbytes() * TOTAL == full.nbytes() * 12


def test_ring_buffer_returns_the_window_in_position_order():
    ring = KVBuffer(4)
    positions = torch.arange(10, dtype=torch.float64).view(1, 10, 1, 1)
    ring.write(positions[:, :7], positions[:, :7], 0)
    for t in range(7, 10):
        ring.write(positions[:, t : t + 1], positions[:, t : t + 1], t)
        keys, _ = ring.window(t, 3)
        assert keys.flatten().tolist() == [t - 2, t - 1, t]
    with pytest.raises(ValueError, match="not kept"):
        ring.window(9, 5)


def test_a_variant_without_a_cache_says_so():
    cfg = load_config(overrides=list(SHAPE))
    with pytest.raises(NotImplementedError, match="AttentionBase has no KV cache"):
        AttentionBase(cfg.model).new_cache(8)


def test_steps_after_the_prompt_take_one_position_and_stay_in_the_cache():
    model = model_for("full")
    cache = model.new_cache(10, "cpu", torch.float64)
    with torch.no_grad():
        model(torch.zeros(1, 8, dtype=torch.long), cache=cache)
        with pytest.raises(ValueError, match="one position per step"):
            model(torch.zeros(1, 2, dtype=torch.long), cache=cache)
    fresh = model.new_cache(10, "cpu", torch.float64)
    with torch.no_grad(), pytest.raises(ValueError, match="exceed"):
        model(torch.zeros(1, 11, dtype=torch.long).clamp(max=0)[:, :10], cache=fresh)
        model(torch.zeros(1, 1, dtype=torch.long), cache=fresh)
