"""Adaptive draft length (ADL), per request (paper §3.3).

After each round, with ``L_gen`` the length of the drafter's raw argmax draft up to its
first EOS (``k`` when it has none) and ``L_acc`` the number of draft tokens the target
accepted, two exponential moving averages with rate ρ are kept:

    Ḡ ← (1-ρ)·Ḡ + ρ·L_gen,     Ā ← (1-ρ)·Ā + ρ·L_acc
    k_next = clip(⌊Ḡ⌋ + δ·[Ā ≥ Ḡ], k_min, k_max)

so a request whose drafts are fully accepted grows its k by δ, and one whose drafter expects
the text to end soon (an early EOS) shrinks it. Beyond the paper, :func:`cap_for_batch`
bounds a round's verified tokens over the batch (``verify_budget``).
"""

from __future__ import annotations

import torch

from .config import ADLConfig


class AdaptiveDraftLength:
    def __init__(self, batch: int, cfg: ADLConfig, device: str | torch.device = "cpu") -> None:
        self.cfg = cfg
        self.gen_ema = torch.full((batch,), float(cfg.k_init), device=device)  # Ḡ
        self.acc_ema = torch.full((batch,), float(cfg.k_init), device=device)  # Ā

    def next_k(self) -> torch.Tensor:  # [B] int64
        c = self.cfg
        if not c.enabled:
            return torch.full_like(self.gen_ema, c.k_init, dtype=torch.int64)
        k = self.gen_ema.floor() + c.delta * (self.acc_ema >= self.gen_ema).float()
        return k.clamp(c.k_min, c.k_max).to(torch.int64)

    def update(self, gen_len: torch.Tensor, acc_len: torch.Tensor, active: torch.Tensor) -> None:
        """gen_len, acc_len: [B] int64; only rows where ``active`` (bool [B]) change."""
        rho = self.cfg.rho
        g = (1 - rho) * self.gen_ema + rho * gen_len.float()
        a = (1 - rho) * self.acc_ema + rho * acc_len.float()
        self.gen_ema = torch.where(active, g, self.gen_ema)
        self.acc_ema = torch.where(active, a, self.acc_ema)


def generated_length(
    argmax: torch.Tensor,  # [B, k] int64: the drafter's raw argmax draft
    k: torch.Tensor,       # [B] int64
    eos_token_id: int | None,
) -> torch.Tensor:         # [B] int64: L_gen = min(first-EOS index, k)
    if eos_token_id is None:
        return k.clone()
    kmax = argmax.shape[1]
    idx = torch.arange(kmax, device=argmax.device).expand_as(argmax)
    first = torch.where(argmax == eos_token_id, idx, torch.full_like(idx, kmax)).min(-1).values
    return torch.minimum(first, k)


CPU_VERIFY_BUDGET = 48  # tokens a CPU round verifies over the batch, by default (see ADLConfig)


def verify_budget(cfg: ADLConfig, device: torch.device | str) -> int | None:
    """The configured verify budget, with "auto" resolved for the device."""
    if cfg.verify_budget == "auto":
        return CPU_VERIFY_BUDGET if torch.device(device).type == "cpu" else None
    return cfg.verify_budget


def cap_for_batch(k: torch.Tensor, active_rows: int, budget: int | None) -> torch.Tensor:
    """k [B] int64 capped so that active_rows · (k + 1) <= budget (0 where it cannot fit)."""
    if budget is None or active_rows == 0:
        return k
    return k.clamp(max=max(budget // active_rows - 1, 0))
