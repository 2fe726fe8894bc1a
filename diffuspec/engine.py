"""The engine: rounds of draft → lattice → CPS → verify → accept, batched over requests.

A generation's state is a :class:`Batch`: on the target's device ``tokens [B, cap]`` holds
each row's prompt + emitted ids and ``lengths [B]`` how many are valid; host mirrors of the
lengths and of which rows are still active; the target's KV cache, which holds every token
of a row but its newest one (fed again at the head of the next verify pass); the draft
length policy and the proposer's per-generation state; per request, its output and stats.

One round, step by step (:meth:`SpeculativeEngine.generate`)::

    k        = policy.next_k(view)                     [B]            draft lengths (0: plain step)
    proposal = proposer.propose(tokens, lengths, k)    [B, kmax]      one DLM pass + lattice + CPS
    logits   = target([newest token, path])            [B, kmax+1, V] one AR pass
                 (the first round feeds [prompt, path] when the prompts have one length)
    n, next  = accept(logits, path)                    [B], [B]
    commit:    tokens[b, lengths[b]:] = path[b, :n[b]] + [next[b]] ──▶ host (the round's one sync)
    record:    stats, EOS / length / stop strings, policy.observe(outcome)

With ``speculate=False`` (or no drafter) the same loop runs with k = 0: plain AR decoding,
one token a round.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import torch

from .config import DiffuSpecConfig, SamplingParams
from .detokenize import Decode, StopFinder
from .drafters.base import DiffusionDrafter
from .guard import CopyAndDraftGuards, ThroughputGuard
from .kvcache import RaggedKVCache
from .cost import CostModel
from .policy import DraftLengthPolicy, RoundOutcome, RoundView, make_policy
from .lattice import copied_drafts
from .propose import PathProposer, Proposal
from .proxy import NGramModel
from .scheduler import AcceptanceModel, CopyLengths
from .stats import GenerationStats
from .target import PASS_TOKENS, TargetRunner, prefill_passes

logger = logging.getLogger(__name__)
from .verify import accept_greedy, accept_sampling, accept_tree, position_uniforms


@dataclass
class RequestOutput:
    token_ids: list[int]
    finish_reason: str | None  # "eos", "length" or "stop" once finished
    stats: GenerationStats
    stop_text_end: int | None = None  # set when a stop string ended the request
    stops: StopFinder | None = field(default=None, repr=False)
    index: int | None = None  # the prompt's position in the generate() call


@dataclass
class Batch:
    """The rows in flight of one ``generate`` call, on the target's device unless noted.

    Continuous batching: rows that finish leave (:meth:`SpeculativeEngine._retire`), and
    waiting prompts take their place (:meth:`SpeculativeEngine._admit`), up to
    ``max_batch_size`` rows. Every row has room for ``capacity`` tokens."""

    params: SamplingParams
    capacity: int               # columns per row: the longest prompt + max_new_tokens + k_max + 2
    tokens: torch.Tensor        # [B, cap] int64: prompt + emitted ids per row
    lengths: torch.Tensor       # [B] int64: valid columns of `tokens` per row
    lengths_cpu: torch.Tensor   # [B] int64 (CPU): host mirror of `lengths`
    active_cpu: torch.Tensor    # [B] bool (CPU): rows still generating
    runner: TargetRunner        # the target's KV cache: each row's tokens but its newest one
    policy: DraftLengthPolicy | None
    guard: CopyAndDraftGuards | None  # the measured checks on drafting and copying (kept by the engine per regime)
    copies: CopyLengths | None  # how much of each row's copy from its context to verify (None: no copy rounds)
    draft_state: object | None  # the proposer's per-generation state (drafter prefix cache)
    prefill: int                # prompt columns the next verify pass feeds first (0: none)
    prefilled: bool             # whether the last verify pass carried a prefill
    seed: int                   # the uniforms of sampled tokens: position_uniforms(seed, prompt index, position)
    requests: list[RequestOutput]  # per row
    waiting: list[int]          # prompt indices not admitted yet, in order
    copying: bool = False       # the last round verified copies (the next one is not held plain)

    @property
    def rows(self) -> int:
        return self.tokens.shape[0]


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
        proposer=None,
    ) -> None:
        """``proposer``: the proposal half when it is not a local PathProposer over ``drafter``
        (diffuspec.remote.RemoteProposer: the drafter in a Ray actor)."""
        self.target = target_model
        self.drafter = drafter
        self.config = config
        self.eos_token_id = eos_token_id
        self.emit_vocab = emit_vocab  # ids >= this are never drafted (the target cannot emit them)
        self.proxy_table = proxy_table
        self.device = next(target_model.parameters()).device
        if proposer is None and drafter is not None:
            proposer = PathProposer(drafter, config, eos_token_id, emit_vocab, proxy_table)
        self.proposer = proposer
        self.target_batch_sizes: list[int] = []  # rows of each verify pass of the last generate()
        self.guards: dict[tuple, CopyAndDraftGuards] = {}  # per decoding regime, see _guard
        self.copy_lengths: dict[tuple, CopyLengths] = {}  # per decoding regime, see _copies
        self.drafter_failures = 0  # proposals that raised, catch-up passes included (each round decoded without drafts)
        self.costs = None  # the cost model of the "cost" policy, built when first needed
        # Conditional acceptance per draft position, pooled over every request this engine
        # ran, per decoding regime (greedy, or a temperature / top-k / top-p): how often a
        # draft is accepted depends on it more than on anything else.
        self.acceptance: dict[tuple, AcceptanceModel] = {}

    def new_policy(self, rows: int, params: SamplingParams) -> DraftLengthPolicy | None:
        """The configured draft-length policy for ``rows`` rows (None when not drafting)."""
        if not self.speculating:
            return None
        if self.config.adl.policy in ("cost", "auto") and self.costs is None:
            self.costs = CostModel(self.target, self.proposer, self.config.cost_table)
        regime = (round(params.temperature, 2), params.top_k, params.top_p)
        acceptance = self.acceptance.setdefault(regime, AcceptanceModel(self.config.adl.k_max, greedy=params.greedy))
        return make_policy(rows, self.config.adl, self.device, costs=self.costs, acceptance=acceptance)

    @property
    def speculating(self) -> bool:
        return self.config.speculate and self.proposer is not None

    def generate(self, prompts: list[list[int]], params: SamplingParams, decode: Decode | None = None
                 ) -> list[RequestOutput]:
        """Generate for token-id prompts; one output per prompt, in order. ``decode`` (ids →
        text) is needed only for stop strings. At most ``config.max_batch_size`` prompts are
        in flight; the others wait for a finished row's place."""
        outputs: list[RequestOutput] = []
        for outputs, _ in self.rounds(prompts, params, decode):
            pass
        return outputs

    def rounds(self, prompts: list[list[int]], params: SamplingParams, decode: Decode | None = None
               ) -> Iterator[tuple[list[RequestOutput], list[int]]]:
        """Generate round by round: after each round, yield every prompt's output so far (in
        prompt order) and the indices of the prompts whose output grew in that round (a
        round can add several tokens to a request: that is the point). Outputs only grow,
        except that a stop string removes what follows it in the round that finds it."""
        outputs = [RequestOutput([], None, GenerationStats(prompt_tokens=len(p)),
                                 stops=StopFinder(params.stop, decode) if params.stop else None) for p in prompts]
        if params.stop and decode is None:
            raise ValueError("stop strings need a decode function (ids → text)")
        self.target_batch_sizes = []
        batch = self._start(prompts, params)
        while batch.rows or batch.waiting:
            with torch.inference_mode():  # per round: the caller's code between rounds runs as it would
                self._admit(batch, prompts, outputs)
                t0, profiled = time.perf_counter(), self._profile_seconds()
                k, held = self._draft_lengths(batch)
                proposal = self._propose(batch, k, held)
                t_verify = time.perf_counter()
                n_acc, next_token, accepted_path = self._verify(batch, proposal)
                host = self._commit(batch, accepted_path, proposal, n_acc, next_token)
                t_verify = time.perf_counter() - t_verify
                self._record(batch, k, proposal, host, t_verify, t0, self._profile_seconds() - profiled)
                grew = [r.index for r in batch.requests]
                self._retire(batch)
            yield outputs, grew

    # ------------------------------------------------------------------ rows in and out
    def _start(self, prompts: list[list[int]], params: SamplingParams) -> Batch:
        """An empty batch with every prompt waiting."""
        dev = self.device
        kcap = self.config.adl.k_max if self.speculating else 0
        if self.speculating and self.config.tree.enabled:  # a tree's pass writes its extra nodes after the spine
            kcap += self.config.tree.extra_nodes
        capacity = max(map(len, prompts)) + params.max_new_tokens + kcap + 2
        seed = params.seed if params.seed is not None else int(torch.randint(0, 2**62, (1,)))
        empty = torch.zeros(0, dtype=torch.int64)
        policy = self.new_policy(0, params)
        return Batch(params=params, capacity=capacity, tokens=torch.zeros(0, capacity, dtype=torch.int64, device=dev),
                     lengths=empty.to(dev), lengths_cpu=empty, active_cpu=torch.zeros(0, dtype=torch.bool),
                     runner=TargetRunner(self.target, 0, capacity),
                     policy=policy, guard=self._guard(params, policy), copies=self._copy_lengths(params),
                     draft_state=self.proposer.new_state(0, capacity) if self.speculating else None,
                     prefill=0, prefilled=False, seed=seed, requests=[], waiting=list(range(len(prompts))))

    def _admit(self, batch: Batch, prompts: list[list[int]], outputs: list[RequestOutput]) -> None:
        """Move waiting prompts into free rows and put all but their last token in the
        target's cache. When the batch starts with prompts of one length (a single prompt
        included), that prefill rides in the first round's verify pass instead. New rows
        take their places in order of length, and are prefilled in passes of similar
        lengths (:func:`~diffuspec.target.prefill_passes`): a pass pads each row to its
        longest, and one pass over a 50-token and a 400-token prompt computes 800 tokens.
        A row's place in the batch changes nothing in its output."""
        limit = self.config.max_batch_size or len(prompts)
        n = min(limit - batch.rows, len(batch.waiting))
        if n <= 0:
            return
        t0 = time.perf_counter()
        index, batch.waiting = sorted(batch.waiting[:n], key=lambda i: len(prompts[i])), batch.waiting[n:]
        new = [prompts[i] for i in index]
        lengths_cpu = torch.tensor([len(p) for p in new], dtype=torch.int64)
        tokens = torch.zeros(n, batch.capacity, dtype=torch.int64)
        for j, p in enumerate(new):
            tokens[j, : len(p)] = torch.tensor(p, dtype=torch.int64)
        tokens = tokens.to(self.device)
        longest = int(lengths_cpu.max())
        if batch.rows == 0 and longest > 1 and bool((lengths_cpu == longest).all()):
            batch.prefill = longest - 1
            batch.runner.cache.extend(RaggedKVCache(n, batch.capacity))  # filled by that first pass
        else:  # prefill passes over all but each new row's last token
            cache = RaggedKVCache(0, batch.capacity)
            pass_tokens = PASS_TOKENS.get(self.device.type, PASS_TOKENS["cuda"])
            for a, b in prefill_passes([len(p) - 1 for p in new], pass_tokens):
                runner = TargetRunner(self.target, b - a, batch.capacity)
                width = int(lengths_cpu[b - 1]) - 1
                if width > 0:
                    runner.forward(tokens[a:b, :width], torch.zeros(b - a, dtype=torch.int64), keep=1)
                cache.extend(runner.cache)
            batch.runner.cache.extend(cache)
        batch.tokens = torch.cat([batch.tokens, tokens])
        batch.lengths = torch.cat([batch.lengths, lengths_cpu.to(self.device)])
        batch.lengths_cpu = torch.cat([batch.lengths_cpu, lengths_cpu])
        batch.active_cpu = torch.cat([batch.active_cpu, torch.ones(n, dtype=torch.bool)])
        if batch.policy is not None:
            batch.policy.extend(n)
        if batch.draft_state is not None:  # their prompts reach the drafter's cache when they first draft
            batch.draft_state.extend(n)
        for i in index:
            outputs[i].index = i
        batch.requests += [outputs[i] for i in index]
        elapsed = time.perf_counter() - t0  # counted in the new requests' time_other
        for i in index:
            outputs[i].stats.time_other += elapsed

    def _retire(self, batch: Batch) -> None:
        """Drop finished rows: their tokens, cache rows, policy and drafter state."""
        if bool(batch.active_cpu.all()):
            return
        # Rows that stay keep their places; the places of finished rows are taken by the
        # staying rows from the end of the batch (a row's place changes nothing in its
        # output), so the caches move a few rows, not the batch (RaggedKVCache.select).
        active = batch.active_cpu
        keep = torch.arange(int(active.sum()))                                           # [R] int64 (CPU)
        keep[~active[: len(keep)]] = torch.nonzero(active[len(keep):]).flatten() + len(keep)
        keep_dev = keep.to(self.device)
        batch.tokens = batch.tokens.index_select(0, keep_dev)
        batch.lengths = batch.lengths.index_select(0, keep_dev)
        batch.lengths_cpu = batch.lengths_cpu.index_select(0, keep)
        batch.active_cpu = batch.active_cpu.index_select(0, keep)
        batch.runner.cache.select(keep)
        if batch.policy is not None:
            batch.policy.select(keep)
        if batch.draft_state is not None:
            batch.draft_state.select(keep)
        batch.requests = [batch.requests[i] for i in keep.tolist()]

    # ------------------------------------------------------------------ the round's steps
    def _guard(self, params: SamplingParams, policy: DraftLengthPolicy | None) -> CopyAndDraftGuards | None:
        """The measured checks on the policy for this decoding regime (greedy, or each
        temperature / top-k / top-p): rounds with a drafter pass must measure at least as
        many tokens per second as plain rounds, and rounds that verify copies at least as
        many as plain ones too (diffuspec.guard). Kept across calls."""
        if policy is None or not ThroughputGuard.applies(self.config):
            return None
        regime = ("greedy",) if params.greedy else (params.temperature, params.top_k, params.top_p)
        if regime not in self.guards:
            self.guards[regime] = CopyAndDraftGuards(drafter=ThroughputGuard(plain_prior=self._plain_step_time),
                                                     copies=ThroughputGuard(plain_prior=self._plain_step_time),
                                                     copies_replace_drafter=False)
        return self.guards[regime]

    def _copy_lengths(self, params: SamplingParams) -> CopyLengths | None:
        """The copies' acceptance and length rule for this decoding regime (kept across
        calls), where rounds may copy: retrieval and its copy rounds on, a local proposer
        (it holds the compiled context search) and the cost model (it prices a copy)."""
        r = self.config.retrieval
        if not (self.speculating and r.enabled and r.copy_rounds and self.costs is not None
                and isinstance(self.proposer, PathProposer)):
            return None
        regime = (round(params.temperature, 2), params.top_k, params.top_p)
        return self.copy_lengths.setdefault(regime, CopyLengths(self.config.adl.k_max))

    def _profile_seconds(self) -> float:
        """Seconds the cost model has spent profiling: a round that profiled is timed without them."""
        return 0.0 if self.costs is None else self.costs.profile_seconds

    def _plain_step_time(self, rows: int) -> float:
        """Profiled seconds of a round without drafts over ``rows`` rows (the guard's prior)."""
        self.costs.ensure(rows)
        return self.costs.round_time(rows, 0)

    def _draft_lengths(self, batch: Batch) -> tuple[torch.Tensor, bool]:  # [B] int64 (CPU), held
        """Each row's k: the policy's choice, at most the tokens the row may still emit − 1;
        none where the throughput guard measured drafter rounds slower than plain rounds.
        ``held``: a plain round the policy decided in advance (no copies either)."""
        zeros = torch.zeros(batch.rows, dtype=torch.int64)
        if batch.policy is None or (not batch.copying and batch.policy.holds_plain()):
            # Plain decoding, held by the policy between its decisions: as cheap as a round
            # without a drafter (not a guard sample; the guard has plain's rate already).
            return zeros, True
        guard = batch.guard
        if guard is not None and not guard.drafter.allow(batch.rows):
            # Measured slower than plain rounds here: no drafter pass (the policy is
            # not consulted and learns nothing from it); the round may still copy.
            return zeros, False
        return batch.policy.next_k(RoundView(active=batch.active_cpu, room=self._room(batch))), False

    @staticmethod
    def _room(batch: Batch) -> torch.Tensor:  # [B] int64 (CPU)
        """Draft tokens each row may still verify: what it may emit, less the bonus token."""
        emitted = torch.tensor([len(r.token_ids) for r in batch.requests])
        return batch.params.max_new_tokens - emitted - 1

    def _propose(self, batch: Batch, k: torch.Tensor, held: bool) -> Proposal:
        """The drafter's proposal for rows with k > 0; where no row drafts and the round is
        not held plain, copies from the rows' contexts (:meth:`_copies`), if any pay."""
        drafter = int(k.max()) > 0
        proposal = self._draft(batch, k) if drafter else self._copies(batch) if not held else None
        batch.copying = proposal is not None and proposal.copied
        if batch.guard is not None and not held:
            batch.guard.started(batch.rows, drafter=drafter, copies=batch.copying)
        return proposal if proposal is not None else Proposal.empty(batch.rows, self.device)

    def _copies(self, batch: Batch) -> Proposal | None:
        """A round that verifies copies instead of decoding plainly: each row's prompt-lookup
        draft (what followed the latest earlier occurrence of its last tokens,
        :func:`~diffuspec.lattice.copied_drafts`; a compiled scan of the context, no pass),
        cut to the length that pays by the copies' own acceptance and the verify cost
        (:class:`~diffuspec.scheduler.CopyLengths`), while the guard measures such rounds at
        least as fast as plain ones. Where the drafter does not pay (prose it drafts badly, a
        batch too busy for its pass), copying still can: the text repeats itself. None when
        no row has a copy that pays."""
        if batch.copies is None:
            return None
        t0 = time.perf_counter()
        rows, width = batch.rows, batch.copies.acceptance.width
        room = self._room(batch).clamp(0, width).numpy()
        if batch.policy.budget is not None:  # an explicit verify budget holds for copies too
            room = np.minimum(room, max(batch.policy.budget // rows - 1, 0))
        lengths = batch.lengths_cpu.numpy()
        host = batch.tokens[:, : int(lengths.max())].cpu().numpy()
        copies = copied_drafts(self.proposer.continuations(host, lengths, width), room)
        have = np.array([len(c) for c in copies], dtype=np.int64)
        if not have.any():
            return None
        self.costs.ensure(rows)
        keep = batch.copies.cut(have, lambda kmax: self.costs.round_times(rows, kmax, propose=False), packed=False)
        if not keep.any() or (batch.guard is not None and not batch.guard.copies.allow(rows)):
            return None
        path = np.zeros((rows, int(keep.max())), np.int64)
        for j, (copy, n) in enumerate(zip(copies, keep.tolist())):
            path[j, :n] = copy[:n]
        path_len = torch.from_numpy(keep).to(self.device)
        return Proposal(torch.from_numpy(path).clamp(0, self.emit_vocab - 1).to(self.device), path_len,
                        torch.zeros_like(path_len), 0.0, time.perf_counter() - t0, copied=True)

    def _draft(self, batch: Batch, k: torch.Tensor) -> Proposal:
        """The drafter's proposal; with a local drafter that keeps a prefix cache, rows new
        to it (or far behind it) first have their prefixes encoded in a pass of their own
        (:meth:`PathProposer.catch_up`), timed apart from the round's."""
        try:
            caught_up = 0.0
            if isinstance(self.proposer, PathProposer):  # (a remote drafter keeps its caches itself)
                # one round adds at most k_max + 1 tokens: a row further ahead of its cache
                # went without a drafter pass for a while
                caught_up = self.proposer.catch_up(batch.tokens, batch.lengths_cpu, batch.draft_state,
                                                   behind=self.config.adl.k_max + 1)
            proposal = self.proposer.propose(batch.tokens, batch.lengths_cpu, k, batch.draft_state)
            proposal.time_catch_up = caught_up
            return proposal
        except Exception:  # a drafter fault costs this round's drafts, never the requests
            self.drafter_failures += 1
            if self.drafter_failures == 1:
                logger.error("the drafter failed; this round decodes without drafts (further failures are counted "
                             "in SpeculativeEngine.drafter_failures, not logged)", exc_info=True)
            return Proposal.empty(batch.rows, self.device)

    def _uniforms(self, batch: Batch, width: int) -> torch.Tensor:  # [B, width] float64 (device)
        """The uniforms of each row's next ``width`` sampled output positions: fixed by (seed,
        prompt, output position), so the output is the same whatever the drafts, and the same
        as plain decoding with this seed."""
        request = torch.tensor([r.index for r in batch.requests], dtype=torch.int64, device=self.device)
        emitted = torch.tensor([len(r.token_ids) for r in batch.requests], dtype=torch.int64, device=self.device)
        position = emitted[:, None] + torch.arange(width, device=self.device)[None, :]
        return position_uniforms(batch.seed, request, position)

    def _verify(self, batch: Batch, proposal: Proposal) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One target pass over each row's ``[newest token, path]`` (with the prompt in front
        on a first round that carries the prefill); returns accepted counts and next tokens,
        [B] int64 each (device), and the path they count in (the proposal's path, or the
        accepted branch of its draft tree)."""
        if proposal.tree is not None:
            return self._verify_tree(batch, proposal)
        path, b = proposal.path, batch.rows
        self.target_batch_sizes.append(b)
        last = batch.tokens.gather(1, (batch.lengths - 1)[:, None])                        # [B, 1]
        batch.prefilled = bool(batch.prefill)
        if batch.prefill:  # the first round: the whole prompt, then the path, from column 0
            inputs = torch.cat([batch.tokens[:, : batch.prefill], last, path], dim=1)
            logits = batch.runner.forward(inputs, torch.zeros(b, dtype=torch.int64), keep=path.shape[1] + 1)
            batch.prefill = 0
        else:
            logits = batch.runner.forward(torch.cat([last, path], dim=1), batch.lengths_cpu - 1)
        logits = logits[..., : self.emit_vocab]                                             # [B, kmax+1, V]
        params = batch.params
        if params.greedy:
            return (*accept_greedy(logits, path, proposal.path_len), path)
        uniforms = self._uniforms(batch, path.shape[1] + 1)
        return (*accept_sampling(logits, path, proposal.path_len, params.temperature, params.top_k, params.top_p,
                                 uniforms), path)

    def _verify_tree(self, batch: Batch, proposal: Proposal) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """:meth:`_verify` for a draft tree (diffuspec.tree): one pass over ``[newest token,
        nodes]`` with tree attention, the walk down the tree, and the accepted branch's
        keys/values moved to the columns after the row's prefix."""
        tree, b = proposal.tree, batch.rows
        self.target_batch_sizes.append(b)
        last = batch.tokens.gather(1, (batch.lengths - 1)[:, None])                        # [B, 1]
        start = batch.lengths_cpu - 1                                                       # the newest token's column
        batch.prefilled = bool(batch.prefill)
        if batch.prefill:  # the first round: the prompt first, then the tree from its last token
            batch.runner.forward(batch.tokens[:, : batch.prefill], torch.zeros(b, dtype=torch.int64), keep=1)
            batch.prefill = 0
        logits = batch.runner.forward(torch.cat([last, tree.tokens], dim=1), start, tree=(tree.parent, tree.depth))
        logits = logits[..., : self.emit_vocab]                                             # [B, N+1, V]
        p = batch.params
        levels = int(tree.depth.max())
        sampling = None if p.greedy else (p.temperature, p.top_k, p.top_p, self._uniforms(batch, levels + 1))
        n_acc, next_token, nodes = accept_tree(logits, tree.tokens, tree.parent, tree.valid, tree.depth, sampling)
        ok = nodes >= 0                                                                     # [B, D]
        first = start.to(self.device)[:, None] + 1
        dst = first + torch.arange(nodes.shape[1], device=self.device)[None, :]
        batch.runner.cache.move(torch.where(ok, first + nodes, dst), dst)  # node j was written at start + 1 + j
        path = torch.where(ok, tree.tokens.gather(1, nodes.clamp(min=0)), torch.zeros_like(nodes))
        return n_acc, next_token, path

    def _commit(self, batch: Batch, path: torch.Tensor, proposal: Proposal, n_acc: torch.Tensor,
                next_token: torch.Tensor) -> torch.Tensor:
        """Append each row's accepted path tokens and its next token to ``tokens``; return
        the round's one host copy, ``[B, 3 + kmax + 1]``: n_acc, path length, L_gen, then the
        emitted tokens.

        Worked example, one row: path ``[a b c d]``, n_acc 2, next x → emitted
        ``[a b x · ·]`` (columns past n_acc are not kept), written at ``lengths[b] ..
        lengths[b] + 2``; the row's length grows by n_acc + 1 = 3."""
        b, dev = batch.rows, self.device
        kmax = path.shape[1]
        emitted = torch.cat([path, path.new_zeros(b, 1)], dim=1)
        emitted.scatter_(1, n_acc[:, None], next_token[:, None])                          # [B, kmax+1]
        cols = torch.arange(kmax + 1, device=dev)[None, :]
        write = (batch.lengths[:, None] + cols).clamp(max=batch.capacity - 1)              # [B, kmax+1]
        keep = cols <= n_acc[:, None]
        batch.tokens.scatter_(1, write, torch.where(keep, emitted, batch.tokens.gather(1, write)))
        batch.lengths = batch.lengths + n_acc + 1
        return torch.cat([n_acc[:, None], proposal.path_len[:, None], proposal.gen_len[:, None], emitted], dim=1).cpu()

    def _record(self, batch: Batch, k: torch.Tensor, proposal: Proposal, host: torch.Tensor, t_verify: float,
                t0: float, profiled: float = 0.0) -> None:
        """Host bookkeeping: lengths, the policy's observation, per-request stats and stops;
        rows that finish are marked inactive (and leave the batch after the round).
        ``profiled``: seconds of the round the cost model spent measuring (not the round's own)."""
        n_cpu, path_len, gen_len = host[:, 0], host[:, 1], host[:, 2]
        rows = host.tolist()
        guard = batch.guard
        if guard is not None and batch.prefilled:
            guard.discard()  # a prefill rode in this round: not comparable
        elif guard is not None:  # every row is active here (finished rows left after the last round)
            # without the pass that caught rows up with the drafter's cache (a new request's
            # prompt, or a gap left by rounds without drafts): like a prefill, not the round's rate
            guard.finished(sum(row[0] for row in rows) + len(rows),
                           time.perf_counter() - t0 - profiled - proposal.time_catch_up)
        batch.lengths_cpu = batch.lengths_cpu + n_cpu + 1
        t_draft, t_search = proposal.time_draft, proposal.time_search
        if proposal.copied:  # copies teach the drafter's policy nothing: their own acceptance
            batch.copies.observe(path_len.numpy(), n_cpu.numpy())
        if batch.policy is not None and int(k.max()) > 0:  # a plain round teaches a policy nothing
            batch.policy.observe(RoundOutcome(k=k, generated=gen_len, drafted=path_len, accepted=n_cpu,
                                              time_propose=t_draft + t_search,
                                              # a tree's pass is wider than rows × (k + 1): not a verify sample
                                              time_verify=0.0 if batch.prefilled or proposal.tree is not None
                                              else t_verify))
        t_other = time.perf_counter() - t0 - t_draft - t_search - t_verify
        hit = proposal.predraft_hit
        for i, (row, ki) in enumerate(zip(rows, k.tolist())):
            req = batch.requests[i]
            n = row[0]
            req.stats.observe_round(row[1] if proposal.copied else ki, row[1], n, t_draft, t_search, t_verify, t_other)
            req.stats.copied_rounds += int(proposal.copied and row[1] > 0)
            if hit is not None and ki > 0:
                req.stats.predraft_hits += int(hit[i])
                req.stats.predraft_misses += 1 - int(hit[i])
            if self._append(req, row[3: 3 + n + 1], batch.params):
                batch.active_cpu[i] = False

    def _append(self, req: RequestOutput, new: list[int], params: SamplingParams) -> bool:
        """Append a round's tokens to one request; return whether it finished."""
        out = req.token_ids
        out.extend(new)
        if self.eos_token_id is not None and self.eos_token_id in new:
            del out[len(out) - len(new) + new.index(self.eos_token_id) + 1:]
            req.finish_reason = "eos"
        if len(out) >= params.max_new_tokens:
            del out[params.max_new_tokens:]
            req.finish_reason = req.finish_reason or "length"
        kept_new = len(out) - req.stats.new_tokens
        req.stats.new_tokens = len(out)
        if req.stops is not None and kept_new > 0:
            hit = req.stops.find(out, kept_new)
            if hit is not None:
                del out[hit[0]:]
                req.stats.new_tokens = len(out)
                req.finish_reason, req.stop_text_end = "stop", hit[1]
        return req.finish_reason is not None
