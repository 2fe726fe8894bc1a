"""The cost-aware draft-length policy: draft only as far as it pays, per round, for the whole batch.

Each round the policy picks the draft length that maximises the batch's expected tokens per
second, from two estimates:

- **acceptance**: for each request and draft position i, the probability ``a_i`` that path
  token i is accepted given that tokens 1..i-1 were. A request that drafts k tokens then
  emits in expectation ``E(k) = 1 + Σ_{i ≤ k} Π_{j ≤ i} a_j`` tokens (the 1 is the bonus or
  corrected token). The curve's shape is pooled over every request seen so far
  (:class:`AcceptanceModel`, kept by the engine across calls: on code it rises with the
  position, drafts that start right tend to stay right), and each request shifts it by two
  log-odds offsets (first position, the rest) fitted to its own recent rounds;
- **cost**: the measured seconds of a round (:class:`diffuspec.cost.CostModel`): verifying
  ``rows × (K + 1)`` tokens (rows are padded to the longest draft) plus proposing K tokens.

so with R active rows it takes ``K* = argmax_K Σ_b E_b(min(K, room_b)) / T(R, K)``, and
``K* = 0`` (plain decoding for every row) whenever drafting cannot pay, e.g. a busy batch
on a compute-bound CPU, or sampling at a temperature where drafts are rarely accepted. When
it has chosen 0 for ``explore_every`` rounds in a row it drafts ``explore_k`` tokens once, so
estimates made under one regime can recover when the text changes.

Like every policy it only changes how much is proposed, never the output.
"""

from __future__ import annotations

import numpy as np
import torch

from .config import ADLConfig
from .policy import DraftLengthPolicy, RoundOutcome, RoundView


class ConfidenceCalibration:
    """How often a path token is accepted given the drafter's probability q for it (and
    everything before it accepted), in ``bins`` equal bins of q, pooled over requests. Each
    bin starts from its own midpoint (a calibrated drafter) with ``strength`` rounds' weight."""

    def __init__(self, bins: int = 10, strength: float = 4.0) -> None:
        self.bins = bins
        self.reached = np.zeros(bins)
        self.accepted = np.zeros(bins)
        self.prior = (np.arange(bins) + 0.5) / bins
        self.strength = strength

    def bin(self, q: np.ndarray) -> np.ndarray:  # same shape, int64
        return np.clip((q * self.bins).astype(np.int64), 0, self.bins - 1)

    def rates(self, q: np.ndarray) -> np.ndarray:  # [B, K] float → [B, K] float
        per_bin = (self.accepted + self.strength * self.prior) / (self.reached + self.strength)
        return per_bin[self.bin(q)]

    def observe(self, q: np.ndarray, reached: np.ndarray, accepted: np.ndarray) -> None:  # [B, K] each
        index = self.bin(q).ravel()
        np.add.at(self.reached, index, reached.ravel())
        np.add.at(self.accepted, index, accepted.ravel())


class AcceptanceModel:
    """Conditional acceptance counts per draft position, pooled over requests: the shape of
    the acceptance curve every request starts from (and, in ``calibration``, acceptance by
    the drafter's confidence). ``reached[i]``: rounds whose path reached position i with
    everything before it accepted; ``accepted[i]``: of those, how many accepted position i.
    Counts decay slowly, so the curve follows a change of text."""

    def __init__(self, width: int, prior: float = 0.5, strength: float = 2.0, decay: float = 0.995) -> None:
        self.width = width
        self.reached = np.zeros(width)
        self.accepted = np.zeros(width)
        self.prior, self.strength, self.decay = prior, strength, decay
        self._rates: np.ndarray | None = None  # rates(), until the next observation
        self.calibration = ConfidenceCalibration()  # P(accepted | the drafter's confidence)
        self.explore_after = CostAwareDraftLength.explore_every  # plain rounds before an exploratory draft
        self.plain_rounds = 0  # consecutive rounds (or vLLM steps) drafting nothing
        self.exploring = False  # the last draft was exploratory: its outcome sets the next interval

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


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, 1e-4, 1 - 1e-4)
    return np.log(p / (1 - p))


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


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


def best_allocation(survive: np.ndarray, room: np.ndarray, times) -> np.ndarray:
    """Per-row draft lengths maximising expected tokens per second when a step's cost grows
    with its total tokens (vLLM packs the rows of a step; no padding): ``survive [R, W]``
    the probability that a row's first i+1 draft tokens are all accepted, ``room [R]`` each
    row's limit, ``times(tokens [N], kmax [N]) -> [N]`` seconds of a step of ``tokens``
    tokens whose longest draft is ``kmax``. The extra draft tokens are taken most likely
    first (within a row the survival falls with the position, so each row gets a prefix),
    and the best number of them is kept: confident rows get long drafts, doubtful ones none.

    Example: two rows, survive [[.9, .8], [.2, .1]], a step costing 1 + 0.5·tokens: the
    candidates in order are .9, .8, .2, .1; rates (2 + gains) / (1 + 0.5·(2 + n)) for n = 0..4
    are 1.0, 1.16, 1.23, 1.11, 1.0, so n = 2: k = [2, 0]."""
    rows, width = survive.shape
    pos = np.broadcast_to(np.arange(width), (rows, width))
    ok = pos < room[:, None]
    cand_row = np.broadcast_to(np.arange(rows)[:, None], (rows, width))[ok]
    cand_pos, gain = pos[ok], survive[ok]
    order = np.argsort(-gain, kind="stable")  # ties keep row-major order: a row's earlier position first
    tokens = rows + np.arange(len(order) + 1)
    expected = rows + np.concatenate([[0.0], np.cumsum(gain[order])])
    kmax = np.concatenate([[0], np.maximum.accumulate(cand_pos[order] + 1)]) if len(order) else np.zeros(1, np.int64)
    best = int(np.argmax(expected / times(tokens, kmax)))
    return np.bincount(cand_row[order[:best]], minlength=rows)


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

    decay = 0.9          # weight of a request's older rounds in its own counts, per round
    offset_var = 4.0     # prior variance of a request's log-odds offsets from the pooled curve
    explore_every = 16   # rounds of plain decoding before one exploratory draft (doubling while they fail)
    explore_k = 2
    recheck_every = 8    # while decoding plainly, re-estimate only every few rounds (nothing new is learnt)
    trims = True

    def __init__(self, rows: int, cfg: ADLConfig, budget: int | None = None, *, costs=None,
                 acceptance: AcceptanceModel | None = None) -> None:
        if costs is None:
            raise ValueError("the cost-aware draft-length policy needs a cost model")
        self.costs = costs
        self.width = cfg.k_max
        self.acceptance = acceptance if acceptance is not None else AcceptanceModel(cfg.k_max)
        self._round: dict = {}     # what this round computed: rates, confidences, verify width
        super().__init__(rows, cfg, budget)

    def reset(self, rows: int) -> None:
        super().reset(rows)
        self.reached = np.zeros((rows, self.width))   # [B, W] decayed counts, this request's own
        self.accepted = np.zeros((rows, self.width))
        self._aging = 0     # plain rounds whose decay is not applied to the counts yet
        self._round = {}

    def _age(self) -> None:
        """Apply the decay of the plain rounds since the counts last changed."""
        if self._aging:
            factor = self.decay ** self._aging
            self.reached *= factor
            self.accepted *= factor
            self._aging = 0

    def rates(self) -> np.ndarray:  # [B, W] conditional acceptance per position
        """The pooled curve shifted per request on the log-odds scale, by one offset for the
        first draft position and one for the rest: ``logit a_b,i = logit a_i + δ_b,[i > 0]``.
        Each offset is the maximum a posteriori value given the request's own (decayed)
        counts and a N(0, offset_var) prior (three Newton steps). Two offsets because
        acceptance is bursty: a request whose drafts often miss their first token can still
        keep most of a draft that starts right."""
        if "rates" in self._round:
            return self._round["rates"]
        self._age()
        logit = _logit(self.acceptance.rates()[: self.width])[None, :]                         # [1, W]
        d0 = np.zeros((self.rows, 1))
        d1 = np.zeros((self.rows, 1))
        for _ in range(3):
            p = _sigmoid(logit + np.concatenate([d0, np.repeat(d1, self.width - 1, axis=1)], axis=1))
            resid = self.accepted - self.reached * p
            curv = self.reached * p * (1 - p)
            d0 = d0 + (resid[:, :1] - d0 / self.offset_var) / (curv[:, :1] + 1 / self.offset_var)
            d1 = d1 + (resid[:, 1:].sum(1, keepdims=True) - d1 / self.offset_var) / (
                curv[:, 1:].sum(1, keepdims=True) + 1 / self.offset_var)
        rates = _sigmoid(logit + np.concatenate([d0, np.repeat(d1, self.width - 1, axis=1)], axis=1))
        self._round["rates"] = rates
        return rates

    def expected_tokens(self) -> np.ndarray:  # [B, W + 1]: E_b(k) for k = 0..W
        return expected_tokens(self.rates())

    def wanted(self) -> torch.Tensor:
        return self.choose(RoundView(torch.ones(self.rows, dtype=torch.bool),
                                     torch.full((self.rows,), self.width, dtype=torch.int64)))

    def choose(self, view: RoundView) -> torch.Tensor:  # [B] int64
        pooled = self.acceptance
        if pooled.plain_rounds and pooled.plain_rounds % self.recheck_every and pooled.plain_rounds < pooled.explore_after:
            pooled.plain_rounds += 1  # decoding plainly, and no draft has taught anything new since
            return torch.zeros(self.rows, dtype=torch.int64)
        active = view.active.numpy()
        rows = int(np.count_nonzero(active))
        if rows == 0:
            return torch.zeros(self.rows, dtype=torch.int64)
        self.costs.ensure(rows)
        room = np.where(active, np.clip(view.room.numpy(), 0, self.width), 0)
        if self.budget is not None:  # an explicit verify budget still holds
            room = np.minimum(room, max(self.budget // rows - 1, 0))
        if not self.costs.ready:  # no measurements yet (vLLM learns its step cost as it serves)
            return torch.from_numpy(np.minimum(room, self.cfg.k_init).astype(np.int64))
        if self.costs.packed:
            k = np.zeros(self.rows, np.int64)
            k[active] = best_allocation(self.rates()[active].cumprod(1), room[active],
                                        lambda tokens, kmax: self.costs.step_times(tokens, rows, kmax))
            best = int(k.max())
        else:
            gain = self.expected_tokens()[active]
            best = best_length(gain, room[active], self.costs.round_times(rows, int(room.max())))
            k = np.minimum(room, best)
        if best == 0:
            pooled.plain_rounds += 1
            if pooled.plain_rounds > pooled.explore_after:  # an exploratory draft
                pooled.plain_rounds, pooled.exploring = 0, True
                k = np.minimum(room, self.explore_k)
        else:
            pooled.plain_rounds = 0
        self._round["width"] = int(k.max()) + 1
        return torch.from_numpy(k.astype(np.int64))

    def next_k(self, view: RoundView | None = None) -> torch.Tensor:
        return self.wanted() if view is None else self.choose(view)

    def trim(self, view: RoundView, confidence: torch.Tensor, path_len: torch.Tensor) -> torch.Tensor:
        """Verify only as much of each drafted path as pays, now that the drafter's
        confidence in each token is known: the history estimate of each position and the
        calibrated confidence of its token are combined on the log-odds scale (naive Bayes:
        ``logit a = logit a_history + logit a_confidence − logit a_pooled``), and the verify
        length K maximises expected tokens per second of the verify pass alone."""
        conf = confidence.numpy()
        width = conf.shape[1]
        self._round["confidence"] = conf
        if width == 0:
            return path_len
        active = view.active.numpy()
        rows = int(np.count_nonzero(active))
        pooled = self.acceptance.rates()[:width][None, :]
        a = _sigmoid(_logit(self.rates()[:, :width]) + _logit(self.acceptance.calibration.rates(conf)) - _logit(pooled))
        room = np.where(active, path_len.numpy(), 0)
        if self.costs.packed:
            cut = np.zeros(self.rows, np.int64)
            cut[active] = best_allocation(a[active].cumprod(1), room[active],
                                          lambda tokens, kmax: self.costs.step_times(tokens, rows, 0 * kmax))
        else:
            best = best_length(expected_tokens(a)[active], room[active],
                               self.costs.round_times(rows, width, propose=False))
            cut = np.full(self.rows, best, np.int64)
        self._round["width"] = int(cut.max()) + 1
        return torch.from_numpy(cut)

    def observe(self, outcome: RoundOutcome) -> None:
        pooled = self.acceptance
        if pooled.exploring and bool(outcome.k.any()):  # an exploratory draft that fails waits twice as long next time
            failed = int(outcome.accepted.sum()) == 0
            pooled.explore_after = min(pooled.explore_after * 2, 1024) if failed else self.explore_every
            pooled.exploring = False
        if not bool(outcome.k.any()):  # a plain round: the evidence only ages (applied lazily)
            self._aging += 1
            self._round = {}
            return
        self._age()
        drafted = (outcome.k > 0).numpy()[:, None]
        reached, accepted = position_outcomes(outcome.drafted.numpy(), outcome.accepted.numpy(), self.width)
        reached, accepted = reached * drafted, accepted * drafted
        # Every round, drafted or not, ages a request's evidence: after rounds of plain
        # decoding the text has moved on, and its estimate drifts back to the pooled curve.
        self.reached = self.reached * self.decay + reached
        self.accepted = self.accepted * self.decay + accepted
        self.acceptance.observe(reached, accepted)
        conf = outcome.confidence if outcome.confidence is not None else self._round.get("confidence")
        if conf is not None and conf.shape[0] == reached.shape[0]:
            width = min(conf.shape[1], self.width)
            self.acceptance.calibration.observe(conf[:, :width], reached[:, :width], accepted[:, :width])
        rows, kmax = len(outcome.k), int(outcome.k.max()) if len(outcome.k) else 0
        if outcome.time_verify > 0:
            self.costs.calibrate("verify", rows, self._round.get("width", kmax + 1), outcome.time_verify)
        if outcome.time_propose > 0 and kmax > 0:
            self.costs.calibrate("propose", rows, kmax, outcome.time_propose)
        self._round = {}

    def export_rows(self) -> list[dict]:
        self._age()
        return [{"reached": r, "accepted": a} for r, a in zip(self.reached.tolist(), self.accepted.tolist())]

    def load_rows(self, rows: list[dict | None]) -> None:
        for j, row in enumerate(rows):
            if row is not None:
                self.reached[j] = row["reached"]
                self.accepted[j] = row["accepted"]
