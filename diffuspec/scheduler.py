"""The cost-aware draft-length policy: draft only as far as it pays, per round, for the whole batch.

Each round the policy picks the draft length K that maximises the batch's expected tokens
per second, from two estimates:

- **acceptance**: for each draft position i, the probability ``a_i`` that path token i is
  accepted given that tokens 1..i-1 were, pooled over every request of the same decoding
  regime (:class:`AcceptanceModel`, kept by the engine across calls; greedy and each
  temperature apart, since nothing changes acceptance more). A row drafting k tokens then
  emits in expectation ``E(k) = 1 + Σ_{i ≤ k} Π_{j ≤ i} a_j`` tokens (the 1 is the bonus or
  corrected token). On code the curve rises with the position: drafts that start right tend
  to stay right;
- **cost**: the measured seconds of a round (:class:`diffuspec.cost.CostModel`): verifying
  ``rows × (K + 1)`` tokens (rows are padded to the longest draft) plus proposing K tokens;
  in vLLM, which packs a step's tokens, a step of that many tokens (:class:`diffuspec.cost.StepCost`).

Each request's own draft length is capped by the paper's ADL (:class:`diffuspec.adl.
AdaptiveDraftLength`), which follows the request: its drafter's expected length (an early
EOS) and how much of its drafts the target keeps. So with R active rows and caps ``c_b`` it
takes ``K* = argmax_K Σ_b E(min(K, c_b)) / T(R, K)``, and ``K* = 0`` (plain decoding for every
row) whenever drafting cannot pay, e.g. a busy batch on a compute-bound CPU or sampling at a
temperature where drafts are rarely accepted. After ``explore_every`` rounds of plain
decoding it drafts ``explore_k`` tokens once (waiting twice as long after each exploratory
draft that leaves the choice at plain decoding: at T = 0.7 a draft of 2 often keeps a token,
yet drafting still does not pay), so estimates made under one regime can recover when the text changes:
every row of a padded round, one row of a packed vLLM step (acceptance is pooled, and a busy
step drafting for every row costs several plain steps), and never where drafting could not
pay even if every drafted token were accepted (then the costs, which are measured, decide).

The measured alternatives are in the note of this policy's issue and ``benchmarks/results``:
per-request acceptance curves (log-odds offsets from the pooled curve) chose better at
batch 1 but worse at batch 4..16, where requests that finish last got stuck on pessimistic
estimates. Like every policy it only changes how much is proposed, never the output.
"""

from __future__ import annotations

import numpy as np
import torch

from .adl import AdaptiveDraftLength
from .config import ADLConfig
from .policy import DraftLengthPolicy, RoundOutcome, RoundView


class AcceptanceModel:
    """Conditional acceptance counts per draft position, pooled over requests: the shape of
    the acceptance curve every request starts from. ``reached[i]``: rounds whose path reached position i with
    everything before it accepted; ``accepted[i]``: of those, how many accepted position i.
    Counts decay slowly, so the curve follows a change of text."""

    def __init__(self, width: int, prior: float = 0.5, strength: float = 2.0, decay: float = 0.995,
                 greedy: bool = False) -> None:
        self.width = width
        self.greedy = greedy  # the regime is greedy decoding (vLLM mixes regimes: False)
        self.reached = np.zeros(width)
        self.accepted = np.zeros(width)
        self.prior, self.strength, self.decay = prior, strength, decay
        self._rates: np.ndarray | None = None  # rates(), until the next observation
        self.explore_after = CostAwareDraftLength.explore_every  # plain rounds before an exploratory draft
        self.plain_rounds = 0  # consecutive rounds (or vLLM steps) drafting nothing
        self.exploring = False  # the last draft was exploratory: its outcome sets the next interval
        self.recheck = CostAwareDraftLength.recheck_every  # plain rounds between re-decisions (see skip_round)

    def rates(self) -> np.ndarray:  # [W] float
        """Per position, the pooled rate shrunk towards the rate of the position before it
        (the first towards ``prior``): a position drafts seldom reach inherits its
        neighbour's rate instead of a fixed guess, so long drafts stay reachable."""
        if self._rates is None:
            out, before, m = [], self.prior, self.strength
            for acc, reached in zip(self.accepted.tolist(), self.reached.tolist()):
                before = (acc + m * before) / (reached + m)
                out.append(before)
            self._rates = np.array(out)
        return self._rates

    def observe(self, reached: np.ndarray, accepted: np.ndarray) -> None:  # [B, W] float each
        if reached.shape[0] == 0:
            return
        self.reached = self.reached * self.decay + reached.sum(0)
        self.accepted = self.accepted * self.decay + accepted.sum(0)
        self._rates = None


def expected_tokens(rates: np.ndarray) -> np.ndarray:  # [B, W] → [B, W + 1]
    """E(k) = 1 + Σ_{i ≤ k} Π_{j ≤ i} a_j for k = 0..W, from conditional rates a."""
    out = np.ones((rates.shape[0], rates.shape[1] + 1))
    out[:, 1:] += np.cumprod(rates, axis=1).cumsum(axis=1)
    return out


def best_length(gain: np.ndarray, room: np.ndarray, times: np.ndarray) -> int:
    """The K maximising expected tokens per second when every row verifies min(K, room_b)
    tokens: ``gain [B, W+1]`` expected tokens by length (rows that take no part: room 0 and
    gain left out by the caller), ``times [K+1]`` the round's seconds by K (rows padded to
    the longest). The shortest of equal rates wins."""
    top = times.shape[0] - 1
    ks = np.minimum(room[:, None], np.arange(top + 1)[None, :])                               # [B, K+1]
    tokens = np.take_along_axis(gain, ks, axis=1).sum(0)                                       # [K+1]
    return int(np.argmax(tokens / times))


def best_allocation(survive: np.ndarray, room: np.ndarray, times, start_cost: np.ndarray | None = None
                    ) -> np.ndarray:
    """Per-row draft lengths maximising expected tokens per second when a step's cost grows
    with its total tokens (vLLM packs the rows of a step; no padding): ``survive [R, W]``
    the probability that a row's first i+1 draft tokens are all accepted, ``room [R]`` each
    row's limit, ``times(tokens [N], kmax [N], drafting [N]) -> [N]`` seconds of a step of
    ``tokens`` tokens whose longest draft is ``kmax``, ``drafting`` of its rows drafting, and
    ``start_cost [R]`` seconds a row adds to the proposal when it drafts at all (its drafter
    prefix is not cached: the pass encodes it first; default 0).

    Draft tokens are added one at a time in one of two orders, and the best prefix of either
    is kept: most likely first (within a row the survival falls with the position, so each
    row gets a prefix: confident rows get long drafts, doubtful ones none), or row by row
    (rows cheapest to start first, then most likely first token): where each drafting row
    costs the proposal something, a few long drafts beat many short ones.

    Example: two rows, survive [[.9, .8], [.2, .1]], a step costing 1 + 0.5·tokens: the
    candidates in order are .9, .8, .2, .1; rates (2 + gains) / (1 + 0.5·(2 + n)) for n = 0..4
    are 1.0, 1.16, 1.23, 1.11, 1.0, so n = 2: k = [2, 0]."""
    rows, width = survive.shape
    start_cost = np.zeros(rows) if start_cost is None else np.asarray(start_cost, dtype=np.float64)
    pos = np.broadcast_to(np.arange(width), (rows, width))
    ok = pos < room[:, None]
    cand_row = np.broadcast_to(np.arange(rows)[:, None], (rows, width))[ok]
    cand_pos, gain = pos[ok], survive[ok]
    if len(gain) == 0:
        return np.zeros(rows, np.int64)
    # ties keep row-major order: a row's earlier position first
    by_gain = np.lexsort((start_cost[cand_row], -gain))
    by_row = np.lexsort((cand_pos, -survive[cand_row, 0], start_cost[cand_row]))
    best_rate, best = -1.0, by_gain[:0]
    for order in (by_gain, by_row):
        first = cand_pos[order] == 0                           # the candidate starts its row's draft
        tokens = rows + np.arange(len(order) + 1)
        expected = rows + np.concatenate([[0.0], np.cumsum(gain[order])])
        kmax = np.concatenate([[0], np.maximum.accumulate(cand_pos[order] + 1)])
        drafting = np.concatenate([[0], np.cumsum(first)])
        started = np.concatenate([[0.0], np.cumsum(np.where(first, start_cost[cand_row[order]], 0.0))])
        rate = expected / (times(tokens, kmax, drafting) + started)
        n = int(np.argmax(rate))
        if rate[n] > best_rate:
            best_rate, best = float(rate[n]), order[:n]
    return np.bincount(cand_row[best], minlength=rows)


def position_outcomes(drafted: np.ndarray, accepted: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row, which positions a round reached and accepted ([B, W] float each): positions
    before the accepted count were reached and accepted; the first rejected one was reached.

    Example: drafted 5, accepted 2 → reached [1 1 1 0 0 ...], accepted [1 1 0 0 0 ...]."""
    pos = np.arange(width)[None, :]
    acc = (pos < accepted[:, None]).astype(np.float64)
    reached = (pos < np.minimum(accepted + 1, drafted)[:, None]).astype(np.float64)
    return reached, acc


class CostAwareDraftLength(DraftLengthPolicy):
    """Draft lengths that maximise expected tokens per second (see the module docstring).
    Its arithmetic runs on numpy: a few dozen numbers a round, where per-call overhead is
    what costs."""

    explore_every = 16   # rounds of plain decoding before one exploratory draft (doubling while drafting still does not pay)
    explore_k = 2
    recheck_every = 8    # while decoding plainly, re-decide only every few rounds (nothing new is learnt)
    paper_rows = (0, 0)  # adl="auto": greedy rounds of [lo, hi) rows take the paper's ADL under paper_budget
    paper_budget: int | None = None

    def __init__(self, rows: int, cfg: ADLConfig, budget: int | None = None, *, costs=None,
                 acceptance: AcceptanceModel | None = None) -> None:
        if costs is None:
            raise ValueError("the cost-aware draft-length policy needs a cost model")
        self.costs = costs
        self.width = cfg.k_max
        self.acceptance = acceptance if acceptance is not None else AcceptanceModel(cfg.k_max)
        super().__init__(rows, cfg, budget)

    def reset(self, rows: int) -> None:
        super().reset(rows)
        self.caps = AdaptiveDraftLength(rows, self.cfg)  # each request's ADL: its own longest draft

    @classmethod
    def skip_round(cls, pooled: AcceptanceModel) -> bool:
        """Count one more round of plain decoding without deciding again, where the last
        decision was plain decoding and no draft has taught anything since: until the next
        re-check (every ``pooled.recheck`` rounds: ``recheck_every``, which the vLLM proposer
        lengthens while its re-checks keep finding nothing to draft or copy) or exploration.
        Returns whether it did; a caller that knows the outcome in advance (the vLLM proposer)
        may then skip the round's bookkeeping too."""
        n = pooled.plain_rounds
        if n and n % pooled.recheck and n < pooled.explore_after:
            pooled.plain_rounds += 1
            return True
        return False

    def holds_plain(self) -> bool:
        return self.skip_round(self.acceptance)

    def choose(self, view: RoundView) -> torch.Tensor:  # [B] int64
        pooled = self.acceptance
        if self.skip_round(pooled):
            return torch.zeros(self.rows, dtype=torch.int64)
        active = view.active.numpy()
        rows = int(np.count_nonzero(active))
        if rows == 0:
            return torch.zeros(self.rows, dtype=torch.int64)
        room = np.where(active, np.minimum(np.clip(view.room.numpy(), 0, self.width), self.caps.wanted().numpy()), 0)
        paper = pooled.greedy and self.paper_rows[0] <= rows < self.paper_rows[1]
        budget = self.paper_budget if paper else self.budget
        if budget is not None:  # the verify budget: an explicit one, or the paper's rule of adl="auto"
            room = np.minimum(room, max(budget // rows - 1, 0))
        if paper:  # adl="auto": where the paper's ADL measured best
            return torch.from_numpy(room.astype(np.int64))
        self.costs.ensure(rows)
        start = None if view.start_cost is None else view.start_cost.numpy()
        if not self.costs.ready:  # no measurements yet (vLLM learns its step cost as it serves): the ADL's k
            if self.costs.packed:  # ...for one row a step: see cold_row
                room = np.where(np.arange(self.rows) == self.cold_row(room, start), room, 0)
            return torch.from_numpy(room.astype(np.int64))
        k = self._best(pooled.rates(), room, active, rows, start)
        if int(k.max()) == 0:
            if pooled.exploring:  # what the exploratory draft taught did not make drafting pay
                pooled.explore_after = min(pooled.explore_after * 2, 1024)
                pooled.exploring = False
            pooled.plain_rounds += 1
            # An exploratory draft, when the rates may be stale; not when drafting could not pay
            # even if every token were accepted (a busy batch: the costs decide, and they are measured).
            if pooled.plain_rounds > pooled.explore_after:
                if int(self._best(np.ones(self.width), room, active, rows, start).max()) == 0:
                    pooled.plain_rounds = 1  # not even perfect drafts would pay: hold on (not a re-decision next round)
                else:
                    pooled.plain_rounds = 0
                    pooled.exploring = True
                    k = np.minimum(room, self.explore_k)
                    if self.costs.packed:  # vLLM: one row explores (the pooled rates learn from it as
                        # from any row; in a busy step a draft for every row costs a long step)
                        k[np.arange(self.rows) != int(np.argmax(room > 0))] = 0
        else:
            pooled.plain_rounds = 0
            pooled.exploring = False
            pooled.explore_after = self.explore_every
        return torch.from_numpy(k.astype(np.int64))

    def cold_row(self, room: np.ndarray, start: np.ndarray | None) -> int:
        """The one row that drafts in a packed step while the step cost is not learnt (-1:
        none can): of the rows with room, the one whose draft costs least to start (the
        drafter has its context cached: after its first draft, the same row again), the
        first such. One row's draft gives the step-cost fit steps of different sizes as well
        as every row's would, for one short pass. Measured on a vLLM server started cold at
        16 MT-Bench requests: every row drafting, 0.80x of plain (drafting off 0.98x); one
        row in turn, each new one encoding its prompt first, 0.89x, its drafting steps ~50 ms
        against ~13 ms for a plain one."""
        can = np.flatnonzero(room > 0)
        if not len(can):
            return -1
        return int(can[np.argmin(start[can])]) if start is not None else int(can[0])

    def _best(self, rates: np.ndarray, room: np.ndarray, active: np.ndarray, rows: int,
              start: np.ndarray | None) -> np.ndarray:  # [B] int64
        """Each row's k for conditional acceptance ``rates [W]`` (pooled): the best
        allocation for packed steps (``start``: each row's start cost, see RoundView), the
        best common length for padded rounds."""
        rates = np.broadcast_to(rates[None, : self.width], (rows, self.width))
        if self.costs.packed:
            k = np.zeros(self.rows, np.int64)
            k[active] = best_allocation(rates.cumprod(1), room[active], self.costs.step_times,
                                        None if start is None else start[active])
            return k
        best = best_length(expected_tokens(rates), room[active], self.costs.round_times(rows, int(room.max())))
        return np.minimum(room, best)

    def wanted(self) -> torch.Tensor:
        return self.choose(RoundView(torch.ones(self.rows, dtype=torch.bool),
                                     torch.full((self.rows,), self.width, dtype=torch.int64)))

    def next_k(self, view: RoundView | None = None) -> torch.Tensor:
        return self.wanted() if view is None else self.choose(view)

    def observe(self, outcome: RoundOutcome) -> None:
        self.caps.observe(outcome)
        drafted = outcome.k > 0
        if not bool(drafted.any()):
            return
        pooled = self.acceptance
        mask = drafted.numpy()[:, None]
        reached, accepted = position_outcomes(outcome.drafted.numpy(), outcome.accepted.numpy(), self.width)
        pooled.observe(reached * mask, accepted * mask)
        rows, kmax = len(outcome.k), int(outcome.k.max())
        if outcome.time_verify > 0:
            self.costs.calibrate("verify", rows, kmax + 1, outcome.time_verify)
        if outcome.time_propose > 0:
            self.costs.calibrate("propose", rows, kmax, outcome.time_propose)

    def export_rows(self) -> list[dict]:
        return self.caps.export_rows()

    def load_rows(self, rows: list[dict | None]) -> None:
        self.caps.load_rows(rows)


class CopyLengths:
    """How much of each row's copy from its own context to verify (a prompt-lookup draft:
    :func:`~diffuspec.lattice.copied_drafts`, no drafter pass): the length that maximises
    the round's expected tokens per second, from the copies' own pooled acceptance per
    position (kept apart from the drafter's: how often a copy is kept depends on the text
    far more than a draft does) and the measured cost of verifying them. Shared by the
    engine, whose rounds pad rows to the longest draft (one length K, each copy cut to it:
    :func:`best_length`), and the vLLM proposer, whose steps are packed (per-row lengths:
    :func:`best_allocation`). Where nothing is kept ``explore_every`` calls in a row, yet
    perfect copies would pay, one row copies ``explore_k`` tokens, so the estimate follows
    a change of text."""

    def __init__(self, width: int) -> None:
        self.acceptance = AcceptanceModel(width)
        self.idle = 0  # calls since copies were last given any token

    def cut(self, have: np.ndarray, times, packed: bool) -> np.ndarray:  # [R] int64
        """Tokens to verify of each row's copy of ``have [R]`` tokens (0: none). ``times``:
        packed, ``times(tokens [N], kmax [N], drafting [N]) -> [N]`` seconds of a step (see
        :func:`best_allocation`); padded, ``times(kmax) -> [kmax + 1]`` seconds of a round
        verifying 0..kmax tokens a row."""
        keep = self._best(self.acceptance.rates(), have, times, packed)
        if keep.any():
            self.idle = 0
            return keep
        self.idle += 1
        if self.idle >= CostAwareDraftLength.explore_every and \
                self._best(np.ones(self.acceptance.width), have, times, packed).any():
            self.idle = 0
            j = int(np.argmax(have))
            keep[j] = min(int(have[j]), CostAwareDraftLength.explore_k)
        return keep

    def _best(self, rates: np.ndarray, have: np.ndarray, times, packed: bool) -> np.ndarray:
        width = self.acceptance.width
        have = np.minimum(have, width)
        rates = np.broadcast_to(rates[None, :width], (len(have), width))
        if packed:
            return best_allocation(rates.cumprod(1), have, times)
        k = best_length(expected_tokens(rates), have, times(int(have.max())))
        return np.minimum(have, k).astype(np.int64)

    def observe(self, copied: np.ndarray, accepted: np.ndarray) -> None:  # [R] each
        """A round's copies (``copied`` tokens a row, 0: none) and how many were accepted."""
        if not copied.any():
            return
        reached, acc = position_outcomes(copied, np.minimum(accepted, copied), self.acceptance.width)
        mask = (copied > 0)[:, None]
        self.acceptance.observe(reached * mask, acc * mask)
