"""A measured guard for the rule that speculation must never make a user slower.

The cost policy *predicts* whether drafting pays, from profiled costs and pooled acceptance.
Predictions can be wrong where the model is incomplete: inside vLLM the step cost of verify
rows, the rejection sampler and our proposal time all grow with the batch, and a server's
mix changes. :class:`ThroughputGuard` checks the prediction against what happened: it
keeps, per batch-size class, the measured tokens per second of steps that drafted and of
steps that did not (wall time from one proposal to the next, so the proposal itself counts),
and lets a step draft only while drafting steps measure at least as fast. Whichever mode is
losing is re-measured now and then (one step in ``probe_every``), so the guard follows a
changing load.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class _Rate:
    tokens_per_s: float = 0.0
    samples: int = 0

    def add(self, value: float, smoothing: float) -> None:
        # a plain mean for the first samples, then an exponential moving average
        self.samples += 1
        weight = max(1.0 / self.samples, smoothing)
        self.tokens_per_s += weight * (value - self.tokens_per_s)


@dataclass
class ThroughputGuard:
    min_samples: int = 8      # steps of each mode measured before the guard decides
    margin: float = 0.02      # drafting must not measure more than this fraction slower
    probe_every: int = 64     # re-measure the losing mode once in this many steps
    smoothing: float = 0.1    # EMA weight of a new step
    rates: dict[tuple[int, bool], _Rate] = field(default_factory=dict)
    steps: dict[int, int] = field(default_factory=dict)
    forced_plain: int = 0     # steps the guard kept from drafting
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

    def allow(self, rows: int) -> bool:
        """May a step of ``rows`` rows draft?"""
        c = self.size_class(rows)
        n = self.steps[c] = self.steps.get(c, 0) + 1
        spec, plain = self.rates.get((c, True)), self.rates.get((c, False))
        if spec is None or spec.samples < self.min_samples:
            return True                                   # learn what drafting gives first
        if plain is None or plain.samples < self.min_samples:
            return n % 4 != 0                             # then measure plain steps, one in four
        pays = spec.tokens_per_s >= (1.0 - self.margin) * plain.tokens_per_s
        allowed = n % self.probe_every != 0 if pays else n % self.probe_every == 0
        self.forced_plain += not allowed
        return allowed

    def started(self, rows: int, drafted: bool) -> None:
        """A step of ``rows`` rows begins, drafting or not; its outcome comes to :meth:`finished`."""
        self._pending = (self.size_class(rows), drafted)

    def finished(self, tokens: int, seconds: float) -> None:
        """The last step emitted ``tokens`` tokens in ``seconds`` (proposal included)."""
        key, self._pending = self._pending, None
        if key is not None and seconds > 0:
            self.rates.setdefault(key, _Rate()).add(tokens / seconds, self.smoothing)

    def discard(self) -> None:
        """The last step cannot be compared (a prefill ran in it, or requests came or went)."""
        self._pending = None
