"""Adaptive draft length (ADL), per request (paper §3.3): a :class:`~diffuspec.policy.DraftLengthPolicy`.

After each round, with ``L_gen`` the length of the drafter's raw argmax draft up to its
first EOS (``k`` when it has none; :attr:`diffuspec.lattice.Lattice.gen_len`) and ``L_acc``
the number of draft tokens the target accepted, two exponential moving averages with rate ρ
are kept:

    Ḡ ← (1-ρ)·Ḡ + ρ·L_gen,     Ā ← (1-ρ)·Ā + ρ·L_acc
    k_next = clip(⌊Ḡ⌋ + δ·[Ā ≥ Ḡ], k_min, k_max)

so a request whose drafts are fully accepted grows its k by δ, and one whose drafter expects
the text to end soon (an early EOS) shrinks it. Both averages start at ``k_init`` (``ADLConfig.first_k``).
"""

from __future__ import annotations

import torch

from .policy import DraftLengthPolicy, RoundOutcome


class AdaptiveDraftLength(DraftLengthPolicy):
    def reset(self, rows: int) -> None:
        super().reset(rows)
        self.gen_ema = torch.full((rows,), float(self.cfg.first_k))  # Ḡ [B] (CPU)
        self.acc_ema = torch.full((rows,), float(self.cfg.first_k))  # Ā [B] (CPU)

    def wanted(self) -> torch.Tensor:  # [B] int64
        c = self.cfg
        k = self.gen_ema.floor() + c.delta * (self.acc_ema >= self.gen_ema).float()
        return k.clamp(c.k_min, c.k_max).to(torch.int64)

    def update(self, gen_len: torch.Tensor, acc_len: torch.Tensor, active: torch.Tensor) -> None:
        """The paper's recurrence. gen_len, acc_len: [B] int64; only rows where ``active``
        (bool [B]) change."""
        rho = self.cfg.rho
        g = (1 - rho) * self.gen_ema + rho * gen_len.float()
        a = (1 - rho) * self.acc_ema + rho * acc_len.float()
        self.gen_ema = torch.where(active, g, self.gen_ema)
        self.acc_ema = torch.where(active, a, self.acc_ema)

    def observe(self, outcome: RoundOutcome) -> None:
        self.update(outcome.generated, outcome.accepted, outcome.k > 0)

    def export_rows(self) -> list[dict[str, float]]:
        return [{"gen_ema": g, "acc_ema": a} for g, a in zip(self.gen_ema.tolist(), self.acc_ema.tolist())]

    def load_rows(self, rows: list[dict[str, float] | None]) -> None:
        known = torch.tensor([r is not None for r in rows], dtype=torch.bool)
        self.gen_ema = torch.where(known, torch.tensor([r["gen_ema"] if r else 0.0 for r in rows]), self.gen_ema)
        self.acc_ema = torch.where(known, torch.tensor([r["acc_ema"] if r else 0.0 for r in rows]), self.acc_ema)
