"""Causal-consistency path search (CPS): pick one left-to-right path through the lattice.

A DLM fills all masks at once, so the per-position argmax can be incoherent ("the the").
CPS runs a beam search of width B over the lattice, scoring a path π by

    S(π) = Σ_i [ λ · log q_i(π_i) + (1 - λ) · log p_proxy(π_i | prefix, π_<i) ]   (paper eq. 5)

with the causal n-gram proxy. Batched over requests and beams; one tensor step per lattice
position. The lattice ends at its first EOS position, so all surviving hypotheses have the
same length and an EOS hypothesis is finished by construction.
"""

from __future__ import annotations

import torch

from .config import CPSConfig
from .lattice import Lattice
from .proxy import CausalProxy


def search_path(
    lattice: Lattice,
    proxy: CausalProxy,
    prefix_tail: torch.Tensor,  # [B, c] int64: last c prefix tokens, oldest first; -1 = none
    cfg: CPSConfig,
) -> torch.Tensor:              # [B, k] int64: best path (positions >= lattice.length are arbitrary)
    if not cfg.enabled:
        return lattice.argmax_path()
    b, kmax, m = lattice.tokens.shape
    width = cfg.beam_width
    device = lattice.tokens.device
    hist_len = proxy.order - 1
    rows = torch.arange(b, device=device)

    scores = torch.full((b, width), float("-inf"), device=device)
    scores[:, 0] = 0.0
    paths = torch.zeros(b, width, 0, dtype=torch.int64, device=device)
    # Each beam's proxy context: the last hist_len tokens of prefix + path.
    ctx = prefix_tail[:, None, prefix_tail.shape[1] - hist_len:].expand(b, width, hist_len) if hist_len else \
        torch.zeros(b, width, 0, dtype=torch.int64, device=device)

    for i in range(kmax):
        cand = lattice.tokens[:, i]                                           # [B, M]
        logq = lattice.logq[:, i]                                             # [B, M]
        active = i < lattice.length                                           # [B]
        proxy_lp = proxy.logprob(rows.repeat_interleave(width), ctx.reshape(b * width, hist_len),
                                 cand.repeat_interleave(width, dim=0)).view(b, width, m)
        step = cfg.lam * logq[:, None, :] + (1.0 - cfg.lam) * proxy_lp        # [B, W, M]
        step = step.masked_fill(~lattice.valid[:, None, i, :], float("-inf"))
        # Rows past their lattice length keep their beams: one zero-cost continuation each.
        hold = torch.full_like(step, float("-inf"))
        hold[..., 0] = 0.0
        step = torch.where(active[:, None, None], step, hold)
        total = (scores[:, :, None] + step).view(b, width * m)
        scores, flat = total.topk(width, dim=-1)                              # [B, W]
        parent, choice = flat // m, flat % m
        token = cand.gather(1, choice)                                        # [B, W]
        paths = torch.cat([paths.gather(1, parent[..., None].expand(-1, -1, paths.shape[2])), token[..., None]], dim=2)
        if hist_len:
            ctx = torch.cat([ctx.gather(1, parent[..., None].expand(-1, -1, hist_len))[..., 1:], token[..., None]], dim=2)
    return paths[:, 0]  # topk returns the best beam first
