"""Draft-length policies: how many tokens each row of a batch drafts in a round.

A policy is one object per batch of rows, holding whatever per-row state it learns from.
The engine and the vLLM proposer use it the same way, once a round::

    k = policy.next_k(view)       # [B] int64: draft length per row (0: that row decodes plainly)
    ... propose, verify ...
    policy.observe(outcome)       # what the round gave: k, L_gen, path length, accepted

and a caller whose rows move between steps (vLLM) carries each request's row state with
``export_rows()`` / ``load_rows()``. Implementations:

- :class:`FixedDraftLength`, the null object: ``k_init`` every round, nothing learnt;
- :class:`diffuspec.adl.AdaptiveDraftLength`, the paper's ADL;
- :class:`diffuspec.scheduler.CostAwareDraftLength`, expected tokens per second from measured
  round costs and per-request acceptance estimates.

Every policy is bounded the same way by :meth:`DraftLengthPolicy.next_k`: a row drafts no
more than its ``room`` (tokens it may still emit − 1, context left), inactive rows draft
nothing, and the batch verifies at most ``verify_budget`` tokens a round.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import torch

from .config import ADLConfig

CPU_VERIFY_BUDGET = 48  # tokens a CPU round verifies over the batch, by default (see ADLConfig.verify_budget)
# adl="auto": greedy batches of AUTO_PAPER_ROWS up to fewer than AUTO_COST_ROWS rows take the
# paper's ADL (with the verify budget), the rest (one row, big batches, sampling) the cost
# model; measured on the 2-core EPYC (docs/architecture.md §6).
AUTO_PAPER_ROWS = 2
AUTO_COST_ROWS = 16


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


@dataclass
class RoundView:
    """What a policy may read when it chooses a round's draft lengths (host tensors)."""

    active: torch.Tensor  # [B] bool: rows still generating (the others draft nothing)
    room: torch.Tensor    # [B] int64: the longest draft each row may take this round (>= 0)
    # [B] float64: seconds a row adds to the proposal if it drafts at all, beyond the profiled
    # (prefix-cached) cost: encoding the part of its context the drafter has not cached. vLLM
    # only (a request's first draft there encodes its whole prompt); None: 0.
    start_cost: torch.Tensor | None = None


@dataclass
class RoundOutcome:
    """What a round gave, per row (host tensors). Rows with ``k == 0`` drafted nothing."""

    k: torch.Tensor          # [B] int64: the draft length chosen
    generated: torch.Tensor  # [B] int64: L_gen, the raw argmax draft's length up to its first EOS
    drafted: torch.Tensor    # [B] int64: path tokens proposed
    accepted: torch.Tensor   # [B] int64: path tokens the target accepted
    time_propose: float = 0.0  # seconds the round spent proposing (0: not measured)
    time_verify: float = 0.0   # seconds of its verify pass (0: not measured, e.g. it carried a prefill)


class DraftLengthPolicy(ABC):
    """Base of every draft-length policy: per-row state for ``rows`` rows."""

    def __init__(self, rows: int, cfg: ADLConfig, budget: int | None = None) -> None:
        self.cfg = cfg
        self.budget = budget  # tokens a round verifies over the batch (None: no cap)
        self.reset(rows)

    def reset(self, rows: int) -> None:
        """Fresh state for ``rows`` new requests (subclasses with state extend this)."""
        self.rows = rows

    def select(self, index: torch.Tensor) -> None:
        """Keep only the rows ``index`` ([R] int64), in that order (finished rows leave)."""
        rows = self.export_rows()
        self.reset(len(index))
        self.load_rows([rows[i] for i in index.tolist()])

    def extend(self, rows: int) -> None:
        """Append ``rows`` rows for new requests."""
        kept = self.export_rows()
        self.reset(self.rows + rows)
        self.load_rows(kept + [None] * rows)

    @abstractmethod
    def wanted(self) -> torch.Tensor:  # [B] int64
        """The draft length each row would take, before the round's limits."""

    def next_k(self, view: RoundView | None = None) -> torch.Tensor:  # [B] int64
        """This round's draft lengths: :meth:`wanted` within each row's room and the batch's
        verify budget (without a view: :meth:`wanted` as it is)."""
        k = self.wanted()
        if view is None:
            return k
        k = torch.where(view.active, torch.minimum(k, view.room).clamp(min=0), torch.zeros_like(k))
        return cap_for_batch(k, int(view.active.sum()), self.budget)

    def holds_plain(self) -> bool:
        """Whether this round decodes plainly without the policy deciding again (it counts the
        round as such): the caller may then skip the round's bookkeeping, views and timing."""
        return False

    def observe(self, outcome: RoundOutcome) -> None:
        """Learn from a round (rows with k == 0 drafted nothing and stay as they were)."""

    def export_rows(self) -> list[dict[str, Any]]:
        """Each row's state as plain numbers (to carry a request to another batch row)."""
        return [{} for _ in range(self.rows)]

    def load_rows(self, rows: list[dict[str, Any] | None]) -> None:
        """Set rows from :meth:`export_rows` output of earlier batches (None: a new request)."""


class FixedDraftLength(DraftLengthPolicy):
    """``k_init`` tokens every round: the null policy (and the fixed-k baseline)."""

    def wanted(self) -> torch.Tensor:
        return torch.full((self.rows,), self.cfg.first_k, dtype=torch.int64)


def make_policy(rows: int, cfg: ADLConfig, device: torch.device | str = "cpu", *, costs=None,
                acceptance=None) -> DraftLengthPolicy:
    """The policy ``cfg.policy`` names, for ``rows`` rows, its verify budget resolved for
    ``device`` (where the target verifies). The cost-aware policy takes the cost model and
    the pooled acceptance estimates (:mod:`diffuspec.scheduler`) and no static budget."""
    from .adl import AdaptiveDraftLength
    from .scheduler import CostAwareDraftLength

    if cfg.policy in ("cost", "auto"):
        budget = cfg.verify_budget if isinstance(cfg.verify_budget, int) else None
        policy = CostAwareDraftLength(rows, cfg, budget, costs=costs, acceptance=acceptance)
        if cfg.policy == "auto":  # the paper's ADL under the static budget where it measured best
            policy.paper_rows = (AUTO_PAPER_ROWS, AUTO_COST_ROWS)
            policy.paper_budget = verify_budget(cfg, device)
        return policy
    policies: dict[str, type[DraftLengthPolicy]] = {"paper": AdaptiveDraftLength, "fixed": FixedDraftLength}
    return policies[cfg.policy](rows, cfg, verify_budget(cfg, device))
