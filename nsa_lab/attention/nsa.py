"""``nsa`` and its ablations: Native Sparse Attention as a layer (see ``docs/nsa.md``).

Per active branch the layer owns key/value projections ``W_k^c, W_v^c`` (or one shared
pair with ``attn.shared_kv``), compression MLPs ``phi_K, phi_V`` and a sigmoid gate per
query head and branch; the attention itself is an op from ``nsa_lab.kernels.nsa``,
picked once by :func:`~nsa_lab.attention.impl.op_for`.

RoPE choice: queries and every branch's keys are rotated *before* compression and
attention. Selection and window attention then see ordinary rotary keys, and the
compressed keys are built from rotated keys, so ``phi_K`` learns to summarise a block
whose members already carry their absolute positions (together with its own
intra-block position embedding).

Removing ``cmp`` drops its output but keeps ``W_k^cmp`` and ``phi_K`` to score the
selection, as the spec says. Because selection is a discrete choice, those weights then
get no gradient and score with their initial values; ``W_v^cmp`` and ``phi_V`` are not
created at all.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from nsa_lab.attention.base import AttentionBase, cache_dtype
from nsa_lab.attention.cache import GrowingBuffer, KVBuffer, LayerCache
from nsa_lab.attention.impl import op_for
from nsa_lab.attention.registry import register
from nsa_lab.attention.rope import apply_rope
from nsa_lab.kernels.nsa.spec import BRANCHES, NSAParams
from nsa_lab.kernels.nsa.torch_decode import nsa_decode_step
from nsa_lab.kernels.nsa.torch_ops import nsa_attention, selected_blocks

# Hidden width of the compression MLP, in multiples of head_dim: a bottleneck between
# the flattened block (l * head_dim) and the compressed token (head_dim).
PHI_HIDDEN_MULT = 4


class BlockCompressor(nn.Module):
    """``phi``: sequence ``[B,T,G,D]`` -> one token per compression block ``[B,Nc,G,D]``.

    Block ``i`` is positions ``[i*d, i*d + l)``, ``Nc = floor((T-l)/d) + 1`` (0 if ``T < l``).
    Exactly: ``phi(block) = W2 GELU(W1 flatten(block + E) + b1) + b2`` with a learnable
    intra-block position embedding ``E [l, D]``, ``W1: l*D -> PHI_HIDDEN_MULT*D`` and
    ``W2: -> D``. The same MLP serves every kv head.
    """

    def __init__(self, l: int, d: int, head_dim: int) -> None:
        super().__init__()
        self.l, self.d = l, d
        self.pos_emb = nn.Parameter(torch.randn(l, head_dim) * 0.02)
        hidden = PHI_HIDDEN_MULT * head_dim
        self.mlp = nn.Sequential(
            nn.Linear(l * head_dim, hidden), nn.GELU(), nn.Linear(hidden, head_dim)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t_len = x.shape[1]
        n_blocks = max(0, (t_len - self.l) // self.d + 1)
        offsets = torch.arange(self.l, device=x.device)
        positions = torch.arange(n_blocks, device=x.device)[:, None] * self.d + offsets
        blocks = x[:, positions] + self.pos_emb[:, None, :]  # [B, Nc, l, G, D]
        return self.mlp(blocks.transpose(2, 3).flatten(-2))


class NSAAttention(AttentionBase):
    """NSA over ``attn.branches`` (any non-empty subset of cmp/slc/win)."""

    def __init__(self, model_cfg: Any, attn_cfg: Any) -> None:
        super().__init__(model_cfg)
        self.params = NSAParams.from_attn_cfg(attn_cfg)
        self.nsa_op = op_for(attn_cfg.impl, nsa_attention, "nsa_attention_triton")
        self.decode_op = op_for(attn_cfg.impl, nsa_decode_step, "nsa_decode_step_triton")
        branches = self.params.branches
        self.kv_source = {c: "shared" if attn_cfg.shared_kv else c for c in BRANCHES}
        key_branches = [c for c in branches if c != "cmp"]
        if self.params.scores_selection:
            key_branches.append("cmp")
        self.k_proj = self._projections(key_branches)
        self.v_proj = self._projections(branches)
        if self.params.scores_selection:
            self.phi_k = BlockCompressor(attn_cfg.l, attn_cfg.d, self.head_dim)
        if "cmp" in branches:
            self.phi_v = BlockCompressor(attn_cfg.l, attn_cfg.d, self.head_dim)
        self.gate = nn.Linear(self.d_model, self.n_heads * len(branches))
        self._gate_means: torch.Tensor | None = None

    def _projections(self, branches: Iterable[str]) -> nn.ModuleDict:
        """One projection per distinct source (a branch's own, or the shared one)."""
        sources = dict.fromkeys(self.kv_source[c] for c in branches)
        return nn.ModuleDict({source: self.kv_linear() for source in sources})

    @property
    def last_gate_means(self) -> dict[str, float]:
        """Mean gate per branch in the last forward (read lazily: no device sync per step)."""
        if self._gate_means is None:
            return {}
        return dict(zip(self.params.branches, self._gate_means.tolist(), strict=True))

    def attend(
        self, x: torch.Tensor, q: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> torch.Tensor:
        keys, values = self._projected(x, cos, sin)
        return self.nsa_op(q, self._gates(x), self.params, **self._branch_tensors(keys, values))

    def _projected(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Rotated keys and values per source (a branch's own projection, or the shared one).

        All sources go through one GEMM over their stacked weights and one RoPE call:
        up to six ``d_model -> G * head_dim`` projections are each too narrow to use the
        GPU well (and cost six launches forward, twelve backward). The weights stay one
        ``nn.Linear`` per source, so checkpoints keep their names.
        """
        projections = [*self.k_proj.values(), *self.v_proj.values()]
        heads = self.split_heads(F.linear(x, torch.cat([p.weight for p in projections])))
        n_keys = len(self.k_proj) * self.n_kv_heads
        rotated = apply_rope(heads[:, :, :n_keys], cos, sin)
        keys = dict(zip(self.k_proj, rotated.chunk(len(self.k_proj), dim=2), strict=True))
        values = dict(
            zip(self.v_proj, heads[:, :, n_keys:].chunk(len(self.v_proj), dim=2), strict=True)
        )
        return keys, values

    def _gates(self, x: torch.Tensor) -> torch.Tensor:
        gates = torch.sigmoid(self.gate(x)).unflatten(-1, (self.n_heads, len(self.params.branches)))
        self._gate_means = gates.detach().mean(dim=(0, 1, 2))
        return gates

    def _branch_tensors(
        self, keys: dict[str, torch.Tensor], values: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """The op's keyword tensors: compressed blocks, and each branch's keys and values."""
        branches, source = self.params.branches, self.kv_source
        tensors: dict[str, torch.Tensor] = {}
        if self.params.scores_selection:
            tensors["kc"] = self.phi_k(keys[source["cmp"]])
        if "cmp" in branches:
            tensors["vc"] = self.phi_v(values[source["cmp"]])
        for c in ("slc", "win"):
            if c in branches:
                tensors[f"k_{c}"], tensors[f"v_{c}"] = keys[source[c]], values[source[c]]
        return tensors

    def new_cache(self, max_len: int) -> LayerCache:
        """Per source a buffer as long as its branches look back (all positions for
        selection, the window, or the last ``l`` for completing compressed blocks), and
        the compressed blocks finished so far."""
        reach: dict[str, int] = {}
        lookback = {"cmp": self.params.l, "slc": max_len, "win": self.params.w}
        for branch in (*self.params.branches, *(["cmp"] if self.params.scores_selection else [])):
            src = self.kv_source[branch]
            reach[src] = max(reach.get(src, 0), min(lookback[branch], max_len))
        return LayerCache(
            kc=GrowingBuffer(), vc=GrowingBuffer(), **{s: KVBuffer(n) for s, n in reach.items()}
        )

    def attend_cached(
        self,
        x: torch.Tensor,
        q: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: LayerCache,
    ) -> torch.Tensor:
        keys, values = self._projected(x, cos, sin)
        t, buffers = cache.length, cache.buffers
        for src, k in keys.items():
            buffers[src].write(*cache_dtype(k, values.get(src)), t)
        if t == 0:  # the prompt: the training path, keeping its compressed blocks
            tensors = self._branch_tensors(keys, values)
            for name in ("kc", "vc"):
                if name in tensors:
                    buffers[name].append(tensors[name])
            return self.nsa_op(q, self._gates(x), self.params, **tensors)
        self._complete_block(t, buffers)
        return self.decode_op(
            q[:, 0], self._gates(x)[:, 0], self.params, t, **self._step_tensors(t, buffers, q)
        )[:, None]

    def _complete_block(self, t: int, buffers: dict) -> None:
        """Compress the block that position ``t`` completes, if any (``i*d + l - 1 = t``)."""
        l, d = self.params.l, self.params.d
        if not self.params.scores_selection or t + 1 < l or (t + 1 - l) % d:
            return
        raw = buffers[self.kv_source["cmp"]]
        k, v = raw.window(t, l)
        buffers["kc"].append(self.phi_k(k))
        if "cmp" in self.params.branches:
            buffers["vc"].append(self.phi_v(v))

    def _step_tensors(self, t: int, buffers: dict, q: torch.Tensor) -> dict[str, torch.Tensor]:
        """The decode op's keyword tensors at position ``t``, read from the cache."""
        branches, source = self.params.branches, self.kv_source
        shape = (self.n_kv_heads, self.head_dim)
        tensors: dict[str, torch.Tensor] = {}
        if self.params.scores_selection:
            tensors["kc"] = buffers["kc"].all(q, shape)
        if "cmp" in branches:
            tensors["vc"] = buffers["vc"].all(q, shape)
        if "slc" in branches:
            tensors["k_slc"], tensors["v_slc"] = buffers[source["slc"]].upto(t)
        if "win" in branches:
            tensors["k_win"], tensors["v_win"] = buffers[source["win"]].window(t, self.params.w)
        return tensors

    @torch.no_grad()
    def selection_indices(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> torch.Tensor:
        """The blocks the selection branch reads, ``[B,T,G,n]`` (-1: none), for this layer's input.

        For diagnostics (which blocks did a query pick?): recomputed with the PyTorch op's
        scoring, which the Triton kernels match (tested), so it costs a second pass.
        """
        if "slc" not in self.params.branches:
            raise ValueError(f"branches {list(self.params.branches)} have no selection")
        q = self.queries(x, cos, sin)
        kc = self.phi_k(self.keys(self.k_proj[self.kv_source["cmp"]], x, cos, sin))
        return selected_blocks(q, kc, self.params)


_ALL = list(BRANCHES)
register(
    "nsa",
    "NSA: gated compression + selection + sliding window, independent K/V per branch.",
    NSAAttention,
    branches=_ALL,
    shared_kv=False,
)
register(
    "nsa_no_cmp",
    "NSA without the compression output (compressed keys still score the selection).",
    NSAAttention,
    branches=["slc", "win"],
    shared_kv=False,
)
register(
    "nsa_no_slc",
    "NSA without the selection branch (compression + sliding window).",
    NSAAttention,
    branches=["cmp", "win"],
    shared_kv=False,
)
register(
    "nsa_no_win",
    "NSA without the sliding-window branch (compression + selection).",
    NSAAttention,
    branches=["cmp", "slc"],
    shared_kv=False,
)
register(
    "nsa_shared_kv",
    "NSA with one K/V projection shared by all three branches.",
    NSAAttention,
    branches=_ALL,
    shared_kv=True,
)
