"""The proposal half of a round: draft → lattice → CPS, for a batch of prefixes.

Shared by the engine and the vLLM adapter, so the algorithm exists once. The caller chooses
each row's draft length (a :mod:`diffuspec.policy`) and verifies the path; what a policy
learns from the proposal (the drafter's raw draft length) rides in the :class:`Proposal`.

The lattice build and the search run on the kernels the config's ``kernels`` key selects
(``diffuspec_kernels``: compiled loops on a CPU, Triton on CUDA) or on the references in
:mod:`diffuspec.lattice` and :mod:`diffuspec.cps`; every choice proposes the same path.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import diffuspec_kernels
import numpy as np
import torch

from .config import DiffuSpecConfig
from .cps import search_path
from .drafters.base import DiffusionDrafter
from .lattice import add_context_candidates, build_lattice, context_continuations
from .proxy import CausalProxy, FlatNGram, NGramModel, OnlineNGram
from .tree import DraftTree, build_tree


# Rows that must encode more context tokens than this (a request's first draft: its prompt)
# are proposed in a pass apart from the rest (see PathProposer.propose_contexts).
COLD_SPAN = 64


@dataclass
class Proposal:
    path: torch.Tensor      # [B, kmax] int64 (device): the path to verify; kmax = max k of the round
    path_len: torch.Tensor  # [B] int64 (device): valid path tokens per row (<= k[b])
    gen_len: torch.Tensor   # [B] int64 (device): L_gen, the raw argmax draft up to its EOS (ADL's input)
    time_draft: float
    time_search: float
    # [B] bool (CPU): rows whose path was pre-drafted while the last round verified (Ray, pipelined)
    predraft_hit: torch.Tensor | None = None
    tree: DraftTree | None = None  # the draft tree around the path, when the config asks for one
    copied: bool = False  # the path was copied from the rows' contexts, not drafted (no drafter pass)
    time_catch_up: float = 0.0  # seconds of the pass putting rows' prefixes in the drafter's cache (catch_up)

    @classmethod
    def empty(cls, rows: int, device: torch.device) -> "Proposal":
        """No row drafts: the round decodes plainly."""
        none = torch.zeros(rows, dtype=torch.int64, device=device)
        return cls(torch.zeros(rows, 0, dtype=torch.int64, device=device), none, none, 0.0, 0.0)


def pad_contexts(contexts: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-id contexts as a batch: tokens [B, longest] int64 (zero-padded), lengths [B] (CPU)."""
    lengths = torch.tensor([len(c) for c in contexts], dtype=torch.int64)
    tokens = np.zeros((len(contexts), int(lengths.max())), np.int64)
    for j, c in enumerate(contexts):
        tokens[j, : len(c)] = c
    return torch.from_numpy(tokens), lengths


class ProposalState:
    """What the proposer carries across the rounds of one generation, per row: the drafter's
    prefix cache (None for a drafter without one) and the online proxy's n-gram counts.
    Rows follow the batch (:meth:`select`, :meth:`extend`)."""

    def __init__(self, drafter, proxy: OnlineNGram) -> None:
        self.drafter = drafter
        self.proxy = proxy

    def select(self, index: torch.Tensor) -> None:
        """Keep only the rows ``index`` ([R] int64, CPU), in that order."""
        if self.drafter is not None:
            self.drafter.select(index)
        self.proxy.select(index)

    def extend(self, rows: int) -> None:
        """Append ``rows`` fresh rows (nothing cached or counted)."""
        if self.drafter is not None:
            self.drafter.extend(rows)
        self.proxy.extend(rows)


class PathProposer:
    def __init__(self, drafter: DiffusionDrafter, config: DiffuSpecConfig, eos_token_id: int | None,
                 emit_vocab: int, proxy_table: NGramModel | None = None) -> None:
        self.drafter = drafter
        self.config = config
        self.eos_token_id = eos_token_id
        self.emit_vocab = emit_vocab  # ids >= this are never drafted (the target cannot emit them)
        self.proxy_table = proxy_table
        self._bias: torch.Tensor | None = None
        self._kernels: dict[str, object] = {}  # per device type: the selected kernels (None: reference)
        self._corpus: dict[str, object] = {}   # per kernel path: the corpus table as it reads it
        # whether the drafter keeps each row's prefix between passes (a pass then encodes only
        # what is new since the row's last one)
        self.caches_prefixes = drafter.new_state(0, 1) is not None
        # Chosen now, for the drafter's device: loading (compiling, or reading numba's cache)
        # takes a moment that must not land in a measured round.
        param = next(iter(drafter.parameters()), None)
        self.kernels(param.device if param is not None else torch.device("cpu"))

    def new_state(self, rows: int, capacity: int) -> ProposalState:
        """Per-generation state carried across rounds (see :class:`ProposalState`)."""
        return ProposalState(self.drafter.new_state(rows, capacity),
                             OnlineNGram(self.config.proxy.order, self.emit_vocab, rows))

    @torch.inference_mode()
    def catch_up(self, tokens: torch.Tensor, lengths_cpu: torch.Tensor, state: ProposalState | None,
                 behind: int) -> float:
        """Before a round's drafter pass: put into the drafter's prefix cache, in a pass over
        those rows alone, the prefixes of rows that never had a pass (a request just
        admitted) or are more than ``behind`` tokens ahead of their cache (after a stretch of
        rounds without a drafter pass). Every prefix token but the newest is encoded: the
        round's pass feeds that one again, as a shifted drafter reads its first mask's
        logits there. Returns the pass's seconds (0.0: no row needed one).

        Without it, the round's pass is as wide as its widest row for every row (one
        150-token prompt among 16 warm rows: a ~40 ms pass instead of ~6 ms, measured on the
        embedded pair), and that pass's time reads as the drafter's cost. Done here, when a
        row first drafts, rather than at admission: rows the policy never drafts for (a
        temperature where drafts are rarely accepted) never pay for the pass."""
        if state is None or state.drafter is None:
            return 0.0
        cached = state.drafter.cached
        prefix = lengths_cpu - 1
        cold = ((cached == 0) | (lengths_cpu - cached > behind)) & (self.drafter.cacheable(prefix) > cached)
        if not bool(cold.any()):
            return 0.0
        t0 = time.perf_counter()
        index = cold.nonzero().squeeze(1)
        part = state.drafter.take(index)
        self.drafter.draft(tokens.index_select(0, index.to(tokens.device)), prefix[index],
                           torch.ones_like(index), self._context(1), part)  # its one-token draft unused
        state.drafter.put(index, part)
        return time.perf_counter() - t0

    def _context(self, kmax: int) -> int:
        """Prefix tokens a drafter pass of ``kmax`` masks may see: its position limit less the
        masks, or the configured ``drafter_context`` if smaller."""
        room = self.drafter.max_positions - kmax
        return room if self.config.drafter_context is None else min(self.config.drafter_context, room)

    def kernels(self, device: torch.device):
        """The kernels for tensors on ``device`` (None: the reference), chosen once."""
        if device.type not in self._kernels:
            self._kernels[device.type] = diffuspec_kernels.select(self.config.kernels, device)
        return self._kernels[device.type]

    def _corpus_for(self, kernels, device: torch.device):
        if self.proxy_table is None:
            return None
        if kernels.name not in self._corpus:
            self._corpus[kernels.name] = kernels.prepare_table(FlatNGram.from_model(self.proxy_table), device)
        return self._corpus[kernels.name]

    def _logprobs(self, logits: torch.Tensor) -> torch.Tensor:
        """Mask ids the target cannot emit, and the mask token itself; normalise."""
        vocab = logits.shape[-1]
        if self._bias is None or self._bias.shape[0] != vocab or self._bias.device != logits.device:
            bias = torch.zeros(vocab, device=logits.device)
            bias[min(self.emit_vocab, vocab):] = float("-inf")
            bias[self.drafter.mask_token_id] = float("-inf")
            self._bias = bias
        # A faulty drafter's NaN scores become "impossible" (a row of them then drafts garbage
        # the target rejects, never an id it cannot take).
        return (logits.float().nan_to_num(nan=float("-inf")) + self._bias).log_softmax(-1).nan_to_num(nan=float("-inf"))

    @torch.inference_mode()
    def propose(
        self,
        tokens: torch.Tensor,       # [B, T] int64 (device): row b's prefix is tokens[b, :lengths[b]]
        lengths_cpu: torch.Tensor,  # [B] int64 (CPU)
        k_cpu: torch.Tensor,        # [B] int64 (CPU), max >= 1; rows with 0 propose nothing
        state: ProposalState | None = None,  # new_state(...) of this generation, or None (nothing kept)
    ) -> Proposal:
        cfg, dev = self.config, tokens.device
        t0 = time.perf_counter()
        kmax = int(k_cpu.max())
        logq = self._logprobs(self.drafter.draft(tokens, lengths_cpu, k_cpu, self._context(kmax),
                                                 state.drafter if state is not None else None))  # [B, kmax, V]
        t1 = time.perf_counter()
        kernels = self.kernels(logq.device)
        build = build_lattice if kernels is None else kernels.build_lattice
        lattice = build(logq, k_cpu.to(dev), self.eos_token_id, cfg.lattice)
        if cfg.retrieval.enabled:
            lattice = add_context_candidates(lattice, self._retrieve(tokens, lengths_cpu, kmax, kernels),
                                             cfg.retrieval.prior)
        if cfg.cps.enabled:
            lengths = lengths_cpu.to(dev)
            # The proxy's context for each row: its last order-1 prefix tokens, -1 before the start.
            hist = max(cfg.proxy.order, self.proxy_table.order if self.proxy_table is not None else 0) - 1
            tail_idx = lengths[:, None] - hist + torch.arange(hist, device=dev)[None, :]       # [B, hist]
            tail = torch.where(tail_idx >= 0, tokens.gather(1, tail_idx.clamp(min=0)), torch.full_like(tail_idx, -1))
            if kernels is None:  # the reference: the online model refit from each row's whole prefix
                proxy = CausalProxy(NGramModel.fit(tokens, lengths, cfg.proxy.order, self.emit_vocab),
                                    self.proxy_table, cfg.proxy.corpus_weight)
                path = search_path(lattice, proxy, tail, cfg.cps)
            else:  # the online model grows by the tokens each row gained since the last round
                online = state.proxy if state is not None else OnlineNGram(cfg.proxy.order, self.emit_vocab,
                                                                            tokens.shape[0])
                online.update(tokens, lengths_cpu, kernels.add_ngrams)
                proxy_in = diffuspec_kernels.ProxyInputs(kernels.prepare_table(online.flat(), dev),
                                                         self._corpus_for(kernels, dev), cfg.proxy.corpus_weight)
                path = kernels.search_path(lattice, proxy_in, tail, cfg.cps)
        else:
            path = lattice.argmax_path()
        path = path.clamp(0, self.emit_vocab - 1)  # whatever the drafter produced, the target can take it
        tree = None
        if cfg.tree.enabled:
            tree = build_tree(lattice, path, cfg.tree.extra_nodes, self.eos_token_id)
            tree.tokens = tree.tokens.clamp(0, self.emit_vocab - 1)
        return Proposal(path, lattice.length, lattice.gen_len, t1 - t0, time.perf_counter() - t1, tree=tree)

    def _retrieve(self, tokens: torch.Tensor, lengths_cpu: torch.Tensor, kmax: int, kernels) -> torch.Tensor:
        """[B, R, kmax] int64: each row's continuations copied from its own context (-1: none)."""
        return torch.from_numpy(self.continuations(tokens.cpu().numpy(), lengths_cpu.numpy(), kmax, kernels))

    def continuations(self, host: np.ndarray, lengths: np.ndarray, kmax: int, kernels=None) -> np.ndarray:
        """[B, R, kmax] int64: :func:`~diffuspec.lattice.context_continuations` of each row of
        ``host [B, T]`` (row b's context is ``host[b, :lengths[b]]``), for the match lengths
        of the retrieval config; compiled where the CPU kernels are (``kernels``: None looks
        them up)."""
        r = self.config.retrieval
        kernels = self.kernels(torch.device("cpu")) if kernels is None else kernels
        compiled = getattr(kernels, "context_continuations", None)
        if compiled is not None:
            return compiled(np.ascontiguousarray(host, dtype=np.int64), lengths.astype(np.int64), kmax, r.min_match,
                            r.max_match)
        return np.stack([context_continuations(host[b], int(lengths[b]), kmax, r.min_match, r.max_match)
                         for b in range(len(lengths))])

    def propose_contexts(self, contexts: list[np.ndarray], k: torch.Tensor, carry: list[tuple]
                         ) -> tuple[Proposal, list[tuple]]:
        """:meth:`propose` for callers whose batches change between calls (the vLLM proposer,
        the Ray drafter actor): row j is the token-id context ``contexts[j]`` with draft
        length ``k[j]`` (> 0), and ``carry[j]`` what that request kept from its last call —
        (the drafter's prefix cache rows or None, the online proxy's row or None). Returns the
        proposal (on the drafter's device) and each row's carry after it.

        A drafter pass is as wide as its widest row: a request's first draft encodes its whole
        prompt, and in one pass with requests that feed only their last few tokens it would
        make every row that wide (one cold row among 16 warm ones: 10x the pass, measured on
        the embedded pair). Rows with more than ``COLD_SPAN`` tokens to encode are proposed in
        a pass of their own."""
        kv = [c[0] if c[0] is not None and c[0].length < len(ctx) else None  # a cache must leave the newest token
              for c, ctx in zip(carry, contexts)]
        if self.caches_prefixes and not self.config.tree.enabled:
            span = np.array([len(ctx) - (c.length if c is not None else 0) for c, ctx in zip(kv, contexts)])
            cold = span > COLD_SPAN
            if cold.any() and not cold.all():
                return self._propose_groups(contexts, k, carry, [np.flatnonzero(~cold), np.flatnonzero(cold)])
        device = next(self.drafter.parameters()).device
        tokens, lengths = pad_contexts(contexts)
        state = self.new_state(len(contexts), tokens.shape[1] + int(k.max()) + 1)
        if state.drafter is not None:  # a drafter with a prefix cache
            state.drafter.load_rows(kv)
        state.proxy.load_rows([ngrams for _, ngrams in carry])
        proposal = self.propose(tokens.to(device), lengths, k, state)
        after = [(state.drafter.row(j) if state.drafter is not None else None, state.proxy.rows[j])
                 for j in range(len(contexts))]
        return proposal, after

    def _propose_groups(self, contexts, k, carry, groups: list[np.ndarray]) -> tuple[Proposal, list[tuple]]:
        """:meth:`propose_contexts` over each group of rows apart, put back in row order."""
        rows, kmax = len(contexts), int(k.max())
        parts = [(g, *self.propose_contexts([contexts[j] for j in g], k[torch.from_numpy(g)],
                                            [carry[j] for j in g])) for g in groups]
        device = parts[0][1].path.device
        path = torch.zeros(rows, kmax, dtype=torch.int64, device=device)
        path_len = torch.zeros(rows, dtype=torch.int64, device=device)
        gen_len = torch.zeros(rows, dtype=torch.int64, device=device)
        after: list[tuple] = [(None, None)] * rows
        for g, prop, part_after in parts:
            index = torch.from_numpy(g).to(device)
            path[index, : prop.path.shape[1]] = prop.path
            path_len[index], gen_len[index] = prop.path_len, prop.gen_len
            for j, a in zip(g.tolist(), part_after):
                after[j] = a
        return Proposal(path, path_len, gen_len, sum(p.time_draft for _, p, _ in parts),
                        sum(p.time_search for _, p, _ in parts)), after
