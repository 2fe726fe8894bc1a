"""Token lattice: per draft position, the entropy-adaptive top set of the drafter's tokens.

Per position i the drafter's log-probabilities ``log q_i`` are sorted; the set keeps the
smallest top prefix whose cumulative mass reaches ``mass`` (so a confident position keeps 1
token, an uncertain one up to ``max_candidates``). EOS is kept whenever
``q_i(EOS) >= eos_min_prob``, and the lattice ends after the first position whose set
contains EOS: every path then has the same length, so path scores compare fairly.

The lattice also carries the drafter's raw draft length ``gen_len`` (its argmax draft up
to the first EOS, ``L_gen`` of the paper's ADL), so draft-length policies read it from the
proposal instead of reaching into the drafter's output.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .config import LatticeConfig


@dataclass
class Lattice:
    tokens: torch.Tensor  # [B, k, M] int64 candidate tokens, best first
    logq: torch.Tensor    # [B, k, M] float drafter log-probabilities (-inf where not valid)
    valid: torch.Tensor   # [B, k, M] bool
    length: torch.Tensor  # [B] int64 positions in use per row (<= k[b], cut after EOS)
    gen_len: torch.Tensor  # [B] int64 L_gen: the raw argmax draft's length up to its first EOS (<= k[b])

    def argmax_path(self) -> torch.Tensor:  # [B, k] int64
        return self.tokens[:, :, 0]


def first_index(hit: torch.Tensor) -> torch.Tensor:
    """[B, k] bool → [B] int64: the first column where ``hit`` holds, k where it never does."""
    kmax = hit.shape[1]
    idx = torch.arange(kmax, device=hit.device).expand_as(hit)
    return torch.where(hit, idx, torch.full_like(idx, kmax)).min(-1).values


def generated_length(
    argmax: torch.Tensor,  # [B, k] int64: the drafter's raw argmax draft
    k: torch.Tensor,       # [B] int64
    eos_token_id: int | None,
) -> torch.Tensor:         # [B] int64: L_gen = min(first-EOS index, k)
    if eos_token_id is None:
        return k.clone()
    return torch.minimum(first_index(argmax == eos_token_id), k)


def build_lattice(
    logq: torch.Tensor,       # [B, k, V] float: drafter log-probabilities (already normalised)
    k: torch.Tensor,          # [B] int64: positions valid per row
    eos_token_id: int | None,
    cfg: LatticeConfig,
) -> Lattice:
    b, kmax, vocab = logq.shape
    m = min(cfg.max_candidates, vocab)
    top_logq, top_tok = logq.topk(m, dim=-1)                                   # [B, k, m]
    probs = top_logq.exp()
    mass_before = probs.cumsum(-1) - probs
    keep = mass_before < cfg.mass
    keep[..., 0] = True
    position_ok = torch.arange(kmax, device=logq.device)[None, :] < k[:, None]  # [B, k]

    if eos_token_id is not None:
        eos_logq = logq[..., eos_token_id]                                     # [B, k]
        eos_kept = ((top_tok == eos_token_id) & keep).any(-1)
        add_eos = (eos_logq.exp() >= cfg.eos_min_prob) & ~eos_kept
        top_tok = torch.cat([top_tok, torch.full_like(top_tok[..., :1], eos_token_id)], dim=-1)
        top_logq = torch.cat([top_logq, eos_logq[..., None]], dim=-1)
        keep = torch.cat([keep, add_eos[..., None]], dim=-1)
        has_eos = (eos_kept | add_eos) & position_ok
        length = torch.minimum(k, first_index(has_eos) + 1)  # first EOS position + 1, or k
    else:
        length = k.clone()
    gen_len = generated_length(top_tok[..., 0], k, eos_token_id)

    valid = keep & (torch.arange(kmax, device=logq.device)[None, :, None] < length[:, None, None])
    top_logq = top_logq.masked_fill(~valid, float("-inf"))
    return Lattice(tokens=top_tok, logq=top_logq, valid=valid, length=length, gen_len=gen_len)


def context_continuations(tokens: np.ndarray, length: int, k: int, min_match: int, max_match: int) -> np.ndarray:
    """Prompt-lookup candidates of one row: for each match length n = max_match..min_match,
    the k tokens that followed the latest earlier occurrence of the row's last n tokens
    (-1 where there is none, or where the context ends first). Returns [R, k] int64,
    R = max_match - min_match + 1. (The compiled version: diffuspec_kernels.cpu.)"""
    out = np.full((max_match - min_match + 1, k), -1, np.int64)
    for r, n in enumerate(range(max_match, min_match - 1, -1)):
        if length <= n:
            continue
        pattern = tokens[length - n: length]
        windows = np.lib.stride_tricks.sliding_window_view(tokens[: length - 1], n)   # starts 0 .. length-1-n
        hits = np.flatnonzero((windows == pattern).all(1))
        if len(hits):
            start = hits[-1] + n
            cont = tokens[start: min(start + k, length)]
            out[r, : len(cont)] = cont
    return out


def copied_drafts(candidates: np.ndarray, room: np.ndarray) -> list[list[int]]:
    """Prompt-lookup drafts from :func:`context_continuations`' ``candidates [B, R, k]``
    (match lengths longest first): per row, the continuation of its longest match that has
    one, at most ``room[b]`` tokens; [] where nothing matched. A continuation that stops
    short (-1 from position g on) ran into the end of the context: the match lies g tokens
    back, so the text is repeating with period g, and the draft goes on repeating it to k
    tokens (a small model's outputs often loop so).

    Example: candidates [[[-1, -1, -1], [7, 8, -1]]], room [5] → [[7, 8, 7]] (no 5-token
    match; the 4-token match lies 2 tokens back, where the context continued 7, 8)."""
    out: list[list[int]] = []
    for rows, limit in zip(candidates.tolist(), np.asarray(room).tolist()):
        draft: list[int] = []
        for cont in rows:
            if cont[0] >= 0:
                period = cont.index(-1) if -1 in cont else len(cont)
                draft = [cont[i % period] for i in range(len(cont))]
                break
        out.append(draft[: max(int(limit), 0)])
    return out


def add_context_candidates(
    lattice: Lattice,
    candidates: torch.Tensor,  # [B, R, k] int64: copied continuations (-1: none), see context_continuations
    prior: float,
) -> Lattice:
    """The lattice with copied tokens as candidates at the positions they cover (only where
    the lattice has a position: before its length). A copied token the drafter already
    proposes keeps the larger log q; a new one enters with log(prior) in a new column."""
    b, kmax, m = lattice.tokens.shape
    r = candidates.shape[1]
    cand = candidates[..., :kmax].to(lattice.tokens.device)
    if cand.shape[-1] < kmax:
        cand = torch.cat([cand, cand.new_full((b, r, kmax - cand.shape[-1]), -1)], dim=-1)
    cand = cand.transpose(1, 2)                                                             # [B, k, R]
    inside = torch.arange(kmax, device=cand.device)[None, :, None] < lattice.length[:, None, None]
    cand = torch.where(inside, cand, torch.full_like(cand, -1))
    same = (cand[..., :, None] == lattice.tokens[..., None, :]) & lattice.valid[..., None, :]  # [B, k, R, M]
    log_prior = torch.tensor(prior, dtype=lattice.logq.dtype, device=cand.device).log()
    boosted = torch.where(same.any(2) & (lattice.logq < log_prior), log_prior, lattice.logq)
    # a new column per copied continuation; duplicates of a drafter token or of an earlier copy are left out
    earlier = torch.triu(torch.ones(r, r, dtype=torch.bool, device=cand.device), diagonal=1)   # [R', R]: R' < R
    repeat = ((cand[..., :, None] == cand[..., None, :]) & earlier.T).any(-1)               # [B, k, R]
    new = (cand >= 0) & ~same.any(-1) & ~repeat
    tokens = torch.cat([lattice.tokens, cand.clamp(min=0)], dim=-1)
    logq = torch.cat([boosted, torch.where(new, log_prior, torch.full_like(cand, float("-inf"),
                                                                          dtype=lattice.logq.dtype))], dim=-1)
    valid = torch.cat([lattice.valid, new], dim=-1)
    return Lattice(tokens=tokens, logq=logq, valid=valid, length=lattice.length, gen_len=lattice.gen_len)
