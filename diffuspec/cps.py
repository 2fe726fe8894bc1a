"""Causal-consistency path search (CPS): pick one left-to-right path through the lattice.

A DLM fills all masks at once, so the per-position argmax can be incoherent ("the the").
CPS runs a beam search of width B over the lattice, scoring a path π by

    S(π) = Σ_i [ λ · log q_i(π_i) + (1 - λ) · log p_proxy(π_i | prefix, π_<i) ]   (paper eq. 5)

with the causal n-gram proxy. Batched over requests and beams; one array step per lattice
position. The lattice ends at its first EOS position, so all surviving hypotheses have the
same length and an EOS hypothesis is finished by construction.

Two implementations of the same search: torch for accelerators, numpy on a CPU, where a
step works on a few dozen numbers and the cost is the number of operations (a numpy call
costs a fraction of a torch call). They agree (tests/test_algorithm.py).
"""

from __future__ import annotations

import numpy as np
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
    search = _search_numpy if lattice.tokens.device.type == "cpu" else _search_torch
    return search(lattice, proxy, prefix_tail, cfg)


def _search_torch(lattice: Lattice, proxy: CausalProxy, prefix_tail: torch.Tensor, cfg: CPSConfig) -> torch.Tensor:
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


def _search_numpy(lattice: Lattice, proxy: CausalProxy, prefix_tail: torch.Tensor, cfg: CPSConfig) -> torch.Tensor:
    """The beam search above on numpy arrays (CPU).

    A beam's proxy context is made of lattice cells, so for a short context the proxy is
    scored once for every context the lattice allows (one call) and each step looks its
    scores up by the beams' cells; otherwise each step scores the beams' contexts."""
    tokens, valid, length = lattice.tokens.numpy(), lattice.valid.numpy(), lattice.length.numpy()
    b, kmax, m = tokens.shape
    width, hist_len, lam = cfg.beam_width, proxy.order - 1, cfg.lam
    rows = np.repeat(np.arange(b), width)
    drafter_term = np.where(valid, lam * lattice.logq.detach().float().numpy(), -np.inf).astype(np.float32)  # [B, k, M]
    scores = np.full((b, width), -np.inf, np.float32)
    scores[:, 0] = 0.0
    paths = np.zeros((b, width, kmax), np.int64)
    tail = prefix_tail.numpy()[:, prefix_tail.shape[1] - hist_len:]
    ctx = np.repeat(tail[:, None, :], width, axis=1)                                # [B, W, h] tokens
    cells = np.zeros((b, width, hist_len), np.int64)  # [B, W, h] their lattice columns (prefix tokens: 0)
    table = _proxy_table(tokens, valid, tail, proxy, max_queries=b * width * kmax * m)
    hold = np.full((width, m), -np.inf, np.float32)  # rows past their lattice keep their beams
    hold[:, 0] = 0.0
    r = np.arange(b)[:, None]  # fancy indexing beats take_along_axis on arrays this small
    for i in range(kmax):
        cand = tokens[:, i]                                                        # [B, M]
        if table is not None:
            ctx_id, table_lp = table
            proxy_lp = table_lp[ctx_id[(r, i) + tuple(cells[..., t] for t in range(hist_len))]]  # [B, W or 1, M]
        else:
            proxy_lp = proxy.logprob_numpy(rows, ctx.reshape(b * width, hist_len), np.repeat(cand, width, axis=0))
        # a new [B, W, M] array (written below where rows are done)
        step = drafter_term[:, i, None, :] + (1.0 - lam) * np.broadcast_to(proxy_lp.reshape(b, -1, m), (b, width, m))
        done = i >= length
        if done.any():
            step[done] = hold
        total = (scores[:, :, None] + step).reshape(b, width * m)
        # the `width` best, best first (a stable sort keeps the earlier of equal scores)
        flat = np.argsort(-total, axis=1, kind="stable")[:, :width]
        scores = total[r, flat]
        parent, choice = flat // m, flat % m
        token = cand[r, choice]                                                    # [B, W]
        paths = paths[r, parent]
        paths[:, :, i] = token
        if hist_len:
            ctx = np.concatenate([ctx[r, parent][..., 1:], token[..., None]], axis=2)
            cells = np.concatenate([cells[r, parent][..., 1:], choice[..., None]], axis=2)
    return torch.from_numpy(paths[:, 0].copy())


def _proxy_table(tokens: np.ndarray, valid: np.ndarray, tail: np.ndarray, proxy: CausalProxy, max_queries: int):
    """Proxy log-probabilities of every lattice candidate under every context the lattice
    allows: ``(ctx_id, lp)`` with ``lp[ctx_id[b, i, c_1, ..., c_h]]`` the [M] scores at
    position i after the cells (columns) c_1..c_h of the h positions before it (a prefix
    position has the one column 0). None when the context is longer than two tokens or the
    lattice allows more than ``max_queries`` (context, candidate) pairs (the stepwise search
    is cheaper then)."""
    b, kmax, m = tokens.shape
    h = tail.shape[1]
    if h > 2:
        return None
    # The lattice behind h prefix positions, each a single cell holding its token.
    tok = np.concatenate([np.broadcast_to(tail[:, :, None], (b, h, m)), tokens], axis=1)       # [B, h+k, M]
    ok = np.concatenate([np.broadcast_to(np.arange(m) == 0, (b, h, m)), valid], axis=1)
    allowed = np.ones((b, kmax) + (m,) * h, bool)                                                # [B, k, M^h]
    for t in range(h):
        shape = [b, kmax] + [1] * h
        shape[2 + t] = m
        allowed &= ok[:, t: t + kmax].reshape(shape)
    where = np.nonzero(allowed)
    row, pos = where[0], where[1]
    # One query per (context, valid candidate): most positions keep one or two candidates.
    q_ctx, q_col = np.nonzero(ok[row, pos + h])
    if len(q_ctx) > max_queries:
        return None
    q_row, q_pos = row[q_ctx], pos[q_ctx]
    context = np.stack([tok[q_row, q_pos + t, where[2 + t][q_ctx]] for t in range(h)], axis=1).reshape(-1, h)
    lp = np.zeros((len(row), m), np.float32)  # invalid candidates: their drafter term is -inf already
    lp[q_ctx, q_col] = proxy.logprob_numpy(q_row, context, tok[q_row, q_pos + h, q_col][:, None])[:, 0]
    ctx_id = np.zeros(allowed.shape, np.int64)  # contexts the lattice forbids: only dead beams read them
    ctx_id[where] = np.arange(len(row))
    return ctx_id, lp
