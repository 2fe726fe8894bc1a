"""Token lattice: per draft position, the entropy-adaptive top set of the drafter's tokens.

Per position i the drafter's log-probabilities ``log q_i`` are sorted; the set keeps the
smallest top prefix whose cumulative mass reaches ``mass`` (so a confident position keeps 1
token, an uncertain one up to ``max_candidates``). EOS is kept whenever
``q_i(EOS) >= eos_min_prob``, and the lattice ends after the first position whose set
contains EOS: every path then has the same length, so path scores compare fairly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import LatticeConfig


@dataclass
class Lattice:
    tokens: torch.Tensor  # [B, k, M] int64 candidate tokens, best first
    logq: torch.Tensor    # [B, k, M] float drafter log-probabilities (-inf where not valid)
    valid: torch.Tensor   # [B, k, M] bool
    length: torch.Tensor  # [B] int64 positions in use per row (<= k[b], cut after EOS)

    def argmax_path(self) -> torch.Tensor:  # [B, k] int64
        return self.tokens[:, :, 0]


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
        # First EOS position + 1, or k when no position holds EOS.
        idx = torch.arange(kmax, device=logq.device).expand(b, kmax)
        first_eos = torch.where(has_eos, idx, torch.full_like(idx, kmax)).min(-1).values
        length = torch.minimum(k, first_eos + 1)
    else:
        length = k.clone()

    valid = keep & (torch.arange(kmax, device=logq.device)[None, :, None] < length[:, None, None])
    top_logq = top_logq.masked_fill(~valid, float("-inf"))
    return Lattice(tokens=top_tok, logq=top_logq, valid=valid, length=length)
