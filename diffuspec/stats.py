"""Per-request statistics, recorded round by round: the data benchmarks and users read.

A *round* drafts up to k tokens, proposes a path of ``drafted`` of them, and the target
accepts the first ``accepted``; it emits ``accepted + 1`` tokens (the bonus or corrected
token), so τ, tokens per round, is 1.00 for plain decoding.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Sequence


def acceptance_rates(drafted: Sequence[int], accepted: Sequence[int]) -> list[float]:
    """P(path position i accepted | the path had a position i), from per-round path lengths
    and accepted counts (rounds of any number of requests pooled)."""
    width = max(drafted, default=0)
    return [a / d if d else 0.0 for a, d in zip(position_counts(accepted, width), position_counts(drafted, width))]


def position_counts(lengths: Sequence[int], width: int) -> list[int]:
    """[i]: how many of ``lengths`` exceed i, for i < width (rounds that reached position i)."""
    counts = [0] * (width + 1)
    for n in lengths:
        counts[min(n, width)] += 1
    out, running = [], len(lengths)
    for i in range(width):
        running -= counts[i]
        out.append(running)
    return out


@dataclass
class GenerationStats:
    """Per-request statistics. Times are the batch's wall time for the rounds this request
    took part in (a batched round is shared by its requests). The prompt's prefill is in
    ``time_verify`` when the first round's verify pass runs it (prompts of one length), in
    ``time_other`` when a separate prefill pass does."""

    rounds: int = 0
    prompt_tokens: int = 0
    new_tokens: int = 0
    draft_lengths: list[int] = field(default_factory=list)  # k chosen per round
    drafted: list[int] = field(default_factory=list)        # path length proposed per round
    accepted: list[int] = field(default_factory=list)       # path tokens accepted per round
    time_draft: float = 0.0
    time_search: float = 0.0
    time_verify: float = 0.0
    time_other: float = 0.0
    wall_time: float = 0.0
    # placement="ray" with pipelined=True: drafting rounds whose path was pre-drafted while
    # the previous round verified (ready at once), and those drafted anew
    predraft_hits: int = 0
    predraft_misses: int = 0
    # rounds whose draft was copied from the request's own context (no drafter pass; the
    # engine's copy rounds, diffuspec.engine.SpeculativeEngine._copies)
    copied_rounds: int = 0

    def observe_round(self, k: int, drafted: int, accepted: int, time_draft: float, time_search: float,
                      time_verify: float, time_other: float) -> None:
        """Record one round this request took part in."""
        self.rounds += 1
        self.draft_lengths.append(k)
        self.drafted.append(drafted)
        self.accepted.append(accepted)
        self.time_draft += time_draft
        self.time_search += time_search
        self.time_verify += time_verify
        self.time_other += time_other
        self.wall_time = self.time_draft + self.time_search + self.time_verify + self.time_other

    @property
    def drafted_at(self) -> list[int]:
        """[i]: rounds whose path had a position i."""
        return position_counts(self.drafted, max(self.drafted, default=0))

    @property
    def accepted_at(self) -> list[int]:
        """[i]: rounds whose path position i was accepted."""
        return position_counts(self.accepted, max(self.drafted, default=0))

    @property
    def tau(self) -> float:
        """Tokens emitted per round, bonus token included (plain AR = 1.0)."""
        return self.new_tokens / self.rounds if self.rounds else 0.0

    @property
    def acceptance_per_position(self) -> list[float]:
        return acceptance_rates(self.drafted, self.accepted)

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.wall_time if self.wall_time > 0 else 0.0

    def as_dict(self) -> dict:
        d = dict(self.__dict__)
        d.update(tau=self.tau, acceptance_per_position=self.acceptance_per_position,
                 tokens_per_second=self.tokens_per_second, drafted_at=self.drafted_at, accepted_at=self.accepted_at)
        return d


def pooled_acceptance(stats: Iterable[GenerationStats]) -> list[float]:
    """Acceptance per position over many requests' rounds (the benchmark's figure)."""
    drafted: list[int] = []
    accepted: list[int] = []
    for s in stats:
        drafted += s.drafted
        accepted += s.accepted
    return acceptance_rates(drafted, accepted)
