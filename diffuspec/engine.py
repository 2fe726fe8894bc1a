"""The engine: rounds of draft → lattice → CPS → verify → accept, batched over requests.

State per batch (device tensors): ``tokens [B, cap]`` holds each row's prompt + generated
ids, ``lengths [B]`` how many are valid. The target's KV cache holds every token but the last
one, which is fed again at the head of the next verify pass together with the path.

One round::

    k        = ADL per row (0 for finished rows; never more than the remaining budget - 1),
               capped so the batch verifies at most verify_budget tokens
    q        = drafter.draft(tokens, lengths, k)             [B, kmax, V]   one DLM pass
    lattice  = build_lattice(log q)                          [B, kmax, M]
    path     = search_path(lattice, proxy)                   [B, kmax]
    logits   = target([last, path])                          [B, kmax+1, V] one AR pass
                 (the first round feeds [prompt, path]: the prefill rides along)
    n, next  = accept(logits, path)                          [B], [B]
    emitted  = path[:n] + next ──▶ host (the round's one sync) ──▶ stop checks, stats

With ``speculate=False`` the same loop runs with k = 0: plain AR decoding, one token a round.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from .adl import AdaptiveDraftLength, cap_for_batch, verify_budget
from .config import DiffuSpecConfig, SamplingParams
from .drafters.base import DiffusionDrafter
from .propose import PathProposer
from .proxy import NGramModel
from .target import TargetRunner
from .verify import accept_greedy, accept_sampling


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
    accepted_at: list[int] = field(default_factory=list)    # [i]: rounds whose path position i was accepted
    drafted_at: list[int] = field(default_factory=list)     # [i]: rounds whose path had a position i
    time_draft: float = 0.0
    time_search: float = 0.0
    time_verify: float = 0.0
    time_other: float = 0.0
    wall_time: float = 0.0

    @property
    def tau(self) -> float:
        """Tokens emitted per round, bonus token included (plain AR = 1.0)."""
        return self.new_tokens / self.rounds if self.rounds else 0.0

    @property
    def acceptance_per_position(self) -> list[float]:
        return [a / d if d else 0.0 for a, d in zip(self.accepted_at, self.drafted_at)]

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.wall_time if self.wall_time > 0 else 0.0

    def as_dict(self) -> dict:
        d = {k: v for k, v in self.__dict__.items()}
        d.update(tau=self.tau, acceptance_per_position=self.acceptance_per_position,
                 tokens_per_second=self.tokens_per_second)
        return d


@dataclass
class RequestOutput:
    token_ids: list[int]
    finish_reason: str  # "eos", "length" or "stop"
    stats: GenerationStats
    stop_text_end: int | None = None  # set when a stop string ended the request


class StopChecker:
    """Finds stop strings in a row's decoded generated text."""

    def __init__(self, stop: tuple[str, ...], decode) -> None:
        self.stop = stop
        self.decode = decode

    def find(self, token_ids: list[int]) -> tuple[int, int] | None:
        """(tokens to keep, characters of text to keep) at the earliest stop string, or None.

        The kept tokens are the fewest whose text contains the stop string; the kept text
        ends where the stop string begins."""
        text = self.decode(token_ids)
        hits = [text.find(s) for s in self.stop if s in text]
        if not hits:
            return None
        at = min(hits)
        lo, hi = 1, len(token_ids)  # binary search: decoded prefixes grow monotonically
        while lo < hi:
            mid = (lo + hi) // 2
            if any(s in self.decode(token_ids[:mid]) for s in self.stop):
                hi = mid
            else:
                lo = mid + 1
        return lo, at


class SpeculativeEngine:
    """Drives rounds over a batch. ``drafter=None`` or ``config.speculate=False`` is plain AR.

    Shapes and lengths are host metadata (CPU tensors and ints), data lives on the target's
    device, and each round makes one device→host transfer: the emitted tokens."""

    def __init__(
        self,
        target_model,
        drafter: DiffusionDrafter | None,
        config: DiffuSpecConfig,
        eos_token_id: int | None,
        emit_vocab: int,
        proxy_table: NGramModel | None = None,
    ) -> None:
        self.target = target_model
        self.drafter = drafter
        self.config = config
        self.eos_token_id = eos_token_id
        self.emit_vocab = emit_vocab  # ids >= this are never drafted (the target cannot emit them)
        self.proxy_table = proxy_table
        self.device = next(target_model.parameters()).device
        self.proposer = PathProposer(drafter, config, eos_token_id, emit_vocab, proxy_table) if drafter else None

    @property
    def speculating(self) -> bool:
        return self.config.speculate and self.drafter is not None

    @torch.inference_mode()
    def generate(self, prompts: list[list[int]], params: SamplingParams, decode=None) -> list[RequestOutput]:
        """Generate for a batch of token-id prompts. ``decode`` (ids → text) is needed only
        for stop strings."""
        cfg, dev = self.config, self.device
        b = len(prompts)
        kcap = cfg.adl.k_max if self.speculating else 0
        lengths_cpu = torch.tensor([len(p) for p in prompts], dtype=torch.int64)   # host mirror
        cap = int(lengths_cpu.max()) + params.max_new_tokens + kcap + 2
        tokens_cpu = torch.zeros(b, cap, dtype=torch.int64)
        for i, p in enumerate(prompts):
            tokens_cpu[i, : len(p)] = torch.tensor(p, dtype=torch.int64)
        tokens = tokens_cpu.to(dev)  # [B, cap]: prompt + generated ids per row
        lengths = lengths_cpu.to(dev)
        generator = None
        if not params.greedy:
            generator = torch.Generator(device=dev)
            generator.manual_seed(params.seed if params.seed is not None else int(torch.randint(0, 2**62, (1,))))

        start_wall = time.perf_counter()
        runner = TargetRunner(self.target, b, cap)
        longest = int(lengths_cpu.max())
        # Prompts of one length (a single prompt included) are prefilled by the first round's
        # verify pass; otherwise a prefill pass runs first, over all but each row's last token.
        prefill_in_round = longest > 1 and bool((lengths_cpu == longest).all())
        if longest > 1 and not prefill_in_round:
            runner.forward(tokens[:, : longest - 1], torch.zeros(b, dtype=torch.int64), keep=1)
        adl = AdaptiveDraftLength(b, cfg.adl)  # on the CPU: its state is host metadata
        budget = verify_budget(cfg.adl, dev)
        drafter_state = self.drafter.new_state(b, cap) if self.speculating else None
        stopper = StopChecker(params.stop, decode) if params.stop else None
        prefill = time.perf_counter() - start_wall

        out_ids: list[list[int]] = [[] for _ in range(b)]
        finish: list[str | None] = [None] * b
        stop_end: list[int | None] = [None] * b
        stats = [GenerationStats(prompt_tokens=len(p), time_other=prefill) for p in prompts]
        active_cpu = torch.ones(b, dtype=torch.bool)
        drafted_at = torch.zeros(b, kcap, dtype=torch.int64)
        accepted_at = torch.zeros(b, kcap, dtype=torch.int64)

        while bool(active_cpu.any()):
            t0 = time.perf_counter()
            remaining = torch.tensor([params.max_new_tokens - len(o) for o in out_ids])
            k_cpu = torch.zeros(b, dtype=torch.int64)
            if self.speculating:
                k_cpu = torch.where(active_cpu, torch.minimum(adl.next_k(), remaining - 1).clamp(min=0), k_cpu)
                k_cpu = cap_for_batch(k_cpu, int(active_cpu.sum()), budget)
            kmax = int(k_cpu.max())
            t_draft = t_search = 0.0
            if kmax > 0:
                prop = self.proposer.propose(tokens, lengths_cpu, k_cpu, drafter_state)
                path, path_len, gen_len, t_draft, t_search = (prop.path, prop.path_len, prop.gen_len,
                                                              prop.time_draft, prop.time_search)
            else:
                path = torch.zeros(b, 0, dtype=torch.int64, device=dev)
                path_len = gen_len = torch.zeros(b, dtype=torch.int64, device=dev)

            t2 = time.perf_counter()
            active = active_cpu.to(dev)
            last = tokens.gather(1, (lengths - 1)[:, None])
            if prefill_in_round:  # the first round: the whole prompt, then the path
                prefill_in_round = False
                logits = runner.forward(torch.cat([tokens[:, : longest - 1], last, path], dim=1),
                                        torch.zeros(b, dtype=torch.int64), keep=kmax + 1)
            else:
                logits = runner.forward(torch.cat([last, path], dim=1), lengths_cpu - 1)
            logits = logits[..., : self.emit_vocab]
            if params.greedy:
                n_acc, nxt = accept_greedy(logits, path, path_len)
            else:
                n_acc, nxt = accept_sampling(logits, path, path_len, params.temperature, params.top_k,
                                             params.top_p, generator)
            n_acc = torch.where(active, n_acc, torch.zeros_like(n_acc))
            emitted = torch.cat([path, path.new_zeros(b, 1)], dim=1)
            emitted.scatter_(1, n_acc[:, None], nxt[:, None])                       # [B, kmax+1]
            # Device-side state for the next round: append the emitted tokens.
            cols = torch.arange(kmax + 1, device=dev)[None, :]
            write = (lengths[:, None] + cols).clamp(max=cap - 1)
            keep = (cols <= n_acc[:, None]) & active[:, None]
            tokens.scatter_(1, write, torch.where(keep, emitted, tokens.gather(1, write)))
            lengths = lengths + torch.where(active, n_acc + 1, torch.zeros_like(n_acc))
            t_verify = time.perf_counter() - t2

            # The round's one device→host transfer.
            host = torch.cat([n_acc[:, None], path_len[:, None], gen_len[:, None], emitted], dim=1).cpu()
            n_cpu, plen_cpu, glen_cpu = host[:, 0], host[:, 1], host[:, 2]
            lengths_cpu = lengths_cpu + torch.where(active_cpu, n_cpu + 1, torch.zeros_like(n_cpu))
            if self.speculating:
                adl.update(glen_cpu, n_cpu, active_cpu & (k_cpu > 0))
                pos = torch.arange(kcap)[None, :]
                drafted_at += (pos < plen_cpu[:, None]) & active_cpu[:, None]
                accepted_at += (pos < n_cpu[:, None]) & active_cpu[:, None]
            round_time = time.perf_counter() - t0
            rows = host.tolist()
            for i in range(b):
                if not active_cpu[i]:
                    continue
                n, plen = rows[i][0], rows[i][1]
                st = stats[i]
                st.rounds += 1
                st.draft_lengths.append(int(k_cpu[i]))
                st.drafted.append(plen)
                st.accepted.append(n)
                st.time_draft += t_draft
                st.time_search += t_search
                st.time_verify += t_verify
                st.time_other += round_time - t_draft - t_search - t_verify
                finish[i], stop_end[i] = self._append(out_ids[i], rows[i][3: 3 + n + 1], params, stopper)
                if finish[i] is not None:
                    active_cpu[i] = False

        for i, st in enumerate(stats):
            st.new_tokens = len(out_ids[i])
            st.wall_time = st.time_draft + st.time_search + st.time_verify + st.time_other
            used = max(st.drafted, default=0)
            st.drafted_at = drafted_at[i, :used].tolist()
            st.accepted_at = accepted_at[i, :used].tolist()
        return [RequestOutput(out_ids[i], finish[i], stats[i], stop_end[i]) for i in range(b)]

    def _append(self, out: list[int], new: list[int], params: SamplingParams, stopper: StopChecker | None):
        """Append a round's tokens to one request; return (finish reason or None, stop text end)."""
        reason = None
        out.extend(new)
        if self.eos_token_id is not None and self.eos_token_id in new:
            del out[len(out) - len(new) + new.index(self.eos_token_id) + 1:]
            reason = "eos"
        if len(out) >= params.max_new_tokens:
            del out[params.max_new_tokens:]
            reason = reason or "length"
        if stopper is not None:
            hit = stopper.find(out)
            if hit is not None:
                del out[hit[0]:]
                return "stop", hit[1]
        return reason, None

