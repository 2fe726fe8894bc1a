"""A measured guard for the rule that speculation must never make a user slower.

The cost policy *predicts* whether drafting pays, from profiled costs and pooled acceptance.
Predictions can be wrong where the model is incomplete: inside vLLM the step cost of verify
rows, the rejection sampler and our proposal time all grow with the batch, and a server's
mix changes. :class:`ThroughputGuard` checks the prediction against what happened: it
keeps, per batch-size class, the measured tokens per second of steps that drafted and of
steps that did not (wall time from one proposal to the next, so the proposal itself counts),
and lets a step draft only while drafting steps measure at least as fast. Rates are
time-weighted (tokens over seconds), and a mode counts as measured after ``min_samples``
steps or as much time as that many steps of the other mode: in a busy batch one drafting
step can take as long as ten plain ones, and it decides as much.

Whichever mode is losing is re-measured now and then, so the guard follows a changing load
and a changing request mix. A losing plain mode is probed after ``probe_every`` of the
winner's steps (or a quarter of ``probe_every`` of its own where those are longer): plain
decoding's rate depends only on the batch's shape, which the size class fixes. A losing
drafting mode is probed as often as that costs at most ``probe_cost`` of the time: one
drafting step forgoes ``seconds * (1 - its rate / plain's)`` of plain's tokens. A near tie
(drafting at 0.9× plain after a request the drafter handled badly) is re-measured within a
few steps, so the next request, which may draft well, is not decoded plainly on the word of
the last one; a clear loss (sampling at T = 0.7) is probed rarely. A probe of drafting weighs
``probe_weight`` (half) in its mode's average, where a step of the running mode weighs
``smoothing``: probes are rare, and the text they re-measure has moved on since the last
(this small target's outputs often turn repetitive halfway, and drafts that lost at the
start of a request then pay; measured on Spec-Bench at batch 1, docs/architecture.md §6). (A probe also pays for
the drafter's cache catching up on what the plain steps wrote: leaving that step out and
measuring the next one instead was tried, and cost 10% on MT-Bench, where probes then came
half as often.)

In our engine the plain rate starts from a prior, the profiled plain round (``plain_prior``),
so no plain steps are forced while drafting wins; a prior never decides by time alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable


@dataclass
class _Rate:
    """Tokens and seconds per step of one mode, averaged (a plain mean for the first samples,
    then an exponential moving average): the rate is their ratio, so a long step weighs as
    much as the time it took."""

    tokens: float = 0.0
    seconds: float = 0.0
    samples: int = 0   # steps averaged in, a prior's included
    measured: int = 0  # steps measured (not a prior's)

    def add(self, tokens: float, seconds: float, smoothing: float) -> None:
        self.samples += 1
        self.measured += 1
        weight = max(1.0 / self.samples, smoothing)
        self.tokens += weight * (tokens - self.tokens)
        self.seconds += weight * (seconds - self.seconds)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


@dataclass
class ThroughputGuard:
    min_samples: int = 8      # steps of each mode measured before the guard decides...
    margin: float = 0.02      # drafting must not measure more than this fraction slower
    probe_every: int = 64     # re-measure the losing mode at least after this many of the winner's steps (see allow)
    probe_cost: float = 0.02  # ...and as often as that costs at most this fraction of the time
    smoothing: float = 0.1    # EMA weight of a new step
    probe_weight: float = 0.5  # ...and of a drafting step while drafting loses (a probe)
    rates: dict[tuple[int, bool], _Rate] = field(default_factory=dict)
    steps: dict[int, int] = field(default_factory=dict)
    forced_plain: int = 0     # steps the guard kept from drafting
    # Predicted seconds of a plain step of ``rows`` rows (the profiled verify pass of one token
    # a row), or None: a class's plain rate then starts from it, counted as min_samples steps,
    # instead of from plain steps forced while drafting may be winning (probes still correct it).
    plain_prior: Callable[[int], float] | None = None
    _since: dict[int, float] = field(default_factory=dict)  # per class: seconds since the losing mode last ran
    _pending: tuple[int, bool] | None = None

    @staticmethod
    def applies(config) -> bool:
        """Whether a :class:`~diffuspec.config.DiffuSpecConfig` asks for the guard: on, for
        the "auto" and "cost" policies ("paper" and "fixed" run as written)."""
        return config.throughput_guard and config.adl.policy in ("auto", "cost")

    @staticmethod
    def size_class(rows: int) -> int:
        """Batch sizes 1, 2-3, 4-7, 8-15, ...: steps compare within a class."""
        return max(1, rows).bit_length()

    def _learnt(self, rate: _Rate | None, other: _Rate | None) -> bool:
        """Enough of a mode measured: ``min_samples`` steps, or (...or as much time as
        ``min_samples`` steps of the other mode take): one drafting step of a busy batch that
        takes many plain steps' time is a sample that costs enough to decide on."""
        if rate is None:
            return False
        if rate.samples >= self.min_samples:
            return True
        return other is not None and other.measured >= self.min_samples and \
            rate.samples * rate.seconds >= self.min_samples * other.seconds

    def allow(self, rows: int) -> bool:
        """May a step of ``rows`` rows draft?"""
        c = self.size_class(rows)
        n = self.steps[c] = self.steps.get(c, 0) + 1
        if (c, False) not in self.rates and self.plain_prior is not None:
            self.rates[(c, False)] = _Rate(float(rows), self.plain_prior(rows), self.min_samples)
        spec, plain = self.rates.get((c, True)), self.rates.get((c, False))
        if not self._learnt(spec, plain):
            return True                                   # learn what drafting gives first
        if not self._learnt(plain, spec):
            return n % 4 != 0                             # then measure plain steps, one in four
        pays = spec.tokens_per_s >= (1.0 - self.margin) * plain.tokens_per_s
        winner, loser = (spec, plain) if pays else (plain, spec)
        probe = self._since.get(c, 0.0) >= self.probe_wait(winner, loser, loser_drafts=not pays)
        allowed = pays != probe
        self.forced_plain += not allowed
        return allowed

    def probe_wait(self, winner: _Rate, loser: _Rate, loser_drafts: bool) -> float:
        """Seconds of the winner's steps before the loser runs again: ``probe_every`` winner
        steps (or a quarter of ``probe_every`` loser steps, where those are longer). A losing
        *drafting* mode runs sooner, as often as a probe costs at most ``probe_cost`` of the
        time (one step forgoes ``1 - ratio`` of its seconds), but after no fewer than four
        winner steps: drafting's rate changes with what is being written, while plain
        decoding's depends only on the batch's shape, which its size class fixes."""
        wait = self.probe_every * max(winner.seconds, loser.seconds / 4)
        if not loser_drafts or winner.tokens_per_s <= 0:
            return wait
        ratio = loser.tokens_per_s / winner.tokens_per_s
        return min(wait, max(loser.seconds * (1.0 - ratio) / self.probe_cost, 4 * winner.seconds))

    def started(self, rows: int, drafted: bool) -> None:
        """A step of ``rows`` rows begins, drafting or not; its outcome comes to :meth:`finished`."""
        self._pending = (self.size_class(rows), drafted)

    def finished(self, tokens: int, seconds: float) -> None:
        """The last step emitted ``tokens`` tokens in ``seconds`` (proposal included)."""
        key, self._pending = self._pending, None
        if key is None or seconds <= 0:
            return
        c, drafted = key
        spec, plain = self.rates.get((c, True)), self.rates.get((c, False))
        # a probe of losing drafting weighs more than a step of the running mode: probes are
        # rare, and what they re-measure (drafting on the text being written now) changes
        # between them (plain decoding's rate does not: its probes weigh as any step)
        probe = drafted and spec is not None and plain is not None and self._losing(spec, plain)
        self.rates.setdefault(key, _Rate()).add(tokens, seconds, self.probe_weight if probe else self.smoothing)
        spec, plain = self.rates.get((c, True)), self.rates.get((c, False))
        if spec is not None and plain is not None:
            losing = self._losing(spec, plain)
            self._since[c] = 0.0 if drafted == losing else self._since.get(c, 0.0) + seconds

    def _losing(self, spec: _Rate, plain: _Rate) -> bool:
        """Whether drafting measures slower than plain decoding (beyond the margin)."""
        return spec.tokens_per_s < (1.0 - self.margin) * plain.tokens_per_s

    def discard(self) -> None:
        """The last step cannot be compared (a prefill ran in it, or requests came or went)."""
        self._pending = None


@dataclass
class CopyAndDraftGuards:
    """The guard for a proposer that drafts two ways (vLLM's): some rows copy a continuation
    from their own context (no pass), others take the drafter's draft. One guard measures
    steps with a drafter pass against steps without one (plain and copy-only steps alike:
    what the server gets without the drafter); the other, copy-only steps against plain
    ones. Kept as one guard, a copy step's rate hid the drafter's: on a vLLM server at 16
    MT-Bench requests, copy-only steps measured 1108 tokens/s, steps with a drafter pass 916
    and plain ones 1063–1537, and the joint "drafting" rate (1443) let the drafter run."""

    drafter: ThroughputGuard = field(default_factory=ThroughputGuard)
    copies: ThroughputGuard = field(default_factory=ThroughputGuard)
    # Whether copy-only steps count as the drafter's alternative (vLLM: a step's rows copy
    # wherever they have a copy, so steps without the pass are what the server gets without
    # the drafter). Our engine copies only in rounds where no row drafts, which come where
    # the text repeats: there a copy round's rate says nothing of the rounds the drafter
    # would take. Off, the drafter's rounds are compared with plain rounds only. (Counted
    # in, MT-Bench-20 at batch 1 measured 1.68-1.72x of plain decoding in later repeats
    # against 1.82-1.91x without copy rounds; but the paper's ADL at one row, the default
    # then, later fell so in a run with this setting off too, so that figure is not its cause.)
    copies_replace_drafter: bool = True

    @property
    def forced_plain(self) -> int:
        return self.drafter.forced_plain + self.copies.forced_plain

    def started(self, rows: int, drafter: bool, copies: bool) -> None:
        """A step begins: with a drafter pass, or copies only, or neither."""
        if copies and not drafter and not self.copies_replace_drafter:
            self.drafter.discard()  # (not a step the drafter's guard compares)
        else:
            self.drafter.started(rows, drafted=drafter)
        if drafter:
            self.copies.discard()  # (not a step the copy guard compares)
        else:
            self.copies.started(rows, drafted=copies)

    def finished(self, tokens: int, seconds: float) -> None:
        self.drafter.finished(tokens, seconds)
        self.copies.finished(tokens, seconds)

    def discard(self) -> None:
        self.drafter.discard()
        self.copies.discard()
