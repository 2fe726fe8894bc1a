"""The causal proxy: an n-gram language model with Witten-Bell interpolation, on tensors.

CPS scores every lattice candidate with a cheap left-to-right model so that a path reads
coherently. The paper uses a KenLM 3-gram; ours is our own, stored as sorted hash tables so
that scoring a whole beam × candidate grid is a few ``searchsorted`` calls (no Python per
token). Two uses, one class:

- the *online* model, fitted per request on its prompt + generated text, rebuilt each round
  (rows are keyed by request, so one table serves the whole batch);
- the *corpus* table, built once from a corpus (``diffuspec build-proxy``) and loaded from
  a small safetensors file.

Witten-Bell: ``p_j(w | h) = (c(h, w) + T(h) · p_{j-1}(w | h')) / (c(h) + T(h))`` where
``T(h)`` is the number of distinct words seen after ``h`` and ``h'`` drops the oldest word;
``p_0`` is uniform over the vocabulary. Unseen contexts fall through to the shorter order.
Hash collisions are possible and harmless: the proxy can only change which path is proposed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

_MULT = 1_000_003  # odd multiplier of the rolling hash (larger than any vocabulary we meet)


def _hash_step(h: torch.Tensor, tok: torch.Tensor) -> torch.Tensor:
    # int64 arithmetic wraps on overflow, which is what a rolling hash wants.
    return h * _MULT + (tok + 1)


@dataclass
class _OrderTable:
    keys: torch.Tensor        # [N] int64 sorted hashes of (row, context, word)
    counts: torch.Tensor      # [N] float c(h, w)
    ctx_keys: torch.Tensor    # [C] int64 sorted hashes of (row, context)
    ctx_counts: torch.Tensor  # [C] float c(h)
    ctx_types: torch.Tensor   # [C] float T(h)


def _lookup(keys: torch.Tensor, values: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
    if keys.numel() == 0:
        return torch.zeros(query.shape, dtype=values.dtype, device=query.device)
    idx = torch.searchsorted(keys, query).clamp(max=keys.numel() - 1)
    return torch.where(keys[idx] == query, values[idx], torch.zeros((), dtype=values.dtype, device=query.device))


class NGramModel:
    """An order-n Witten-Bell n-gram model over token ids, optionally keyed per batch row."""

    def __init__(self, order: int, vocab_size: int, tables: list[_OrderTable], keyed_by_row: bool) -> None:
        assert len(tables) == order
        self.order = order
        self.vocab_size = vocab_size
        self.tables = tables
        self.keyed_by_row = keyed_by_row

    # ---------------------------------------------------------------- building
    @classmethod
    def fit(
        cls,
        tokens: torch.Tensor,   # [B, T] int64
        lengths: torch.Tensor,  # [B] int64: row b uses tokens[b, :lengths[b]]
        order: int,
        vocab_size: int,
        keyed_by_row: bool = True,
        min_count: int = 1,
    ) -> "NGramModel":
        """Count every n-gram (n = 1..order) of every row. ``keyed_by_row=False`` pools rows
        (a corpus); ``min_count`` drops rarer n-grams of order >= 2 (a smaller table)."""
        b, t = tokens.shape
        device = tokens.device
        row_seed = (torch.arange(b, device=device, dtype=torch.int64) + 1) if keyed_by_row else torch.zeros(b, dtype=torch.int64, device=device)
        tables = []
        for j in range(1, order + 1):
            if t < j:
                tables.append(_empty_table(device))
                continue
            windows = tokens.unfold(1, j, 1)                                  # [B, T-j+1, j]
            ok = (torch.arange(t - j + 1, device=device)[None, :] + j) <= lengths[:, None]
            h = row_seed[:, None].expand(b, t - j + 1)
            for i in range(j - 1):
                h = _hash_step(h, windows[..., i])
            ctx = h[ok]
            full = _hash_step(h, windows[..., j - 1])[ok]
            keys, counts = torch.unique(full, return_counts=True)
            # the context of each unique key: recompute from one representative occurrence
            first = torch.zeros_like(keys)
            inverse = torch.searchsorted(keys, full)
            first.scatter_(0, inverse, ctx)  # every occurrence of a key has the same context hash
            counts = counts.to(torch.float32)
            if min_count > 1 and j >= 2:
                keep = counts >= min_count
                keys, counts, first = keys[keep], counts[keep], first[keep]
            ctx_keys, ctx_inv = torch.unique(first, return_inverse=True)
            ctx_counts = torch.zeros(ctx_keys.numel(), device=device).scatter_add_(0, ctx_inv, counts)
            ctx_types = torch.zeros(ctx_keys.numel(), device=device).scatter_add_(0, ctx_inv, torch.ones_like(counts))
            tables.append(_OrderTable(keys, counts, ctx_keys, ctx_counts, ctx_types))
        return cls(order, vocab_size, tables, keyed_by_row)

    @classmethod
    def from_corpus(cls, sequences: list[list[int]], order: int, vocab_size: int, min_count: int = 1,
                    chunk: int = 4096) -> "NGramModel":
        """Pool n-gram counts over token sequences (documents). Each sequence is cut into
        chunks of ``chunk`` tokens, so n-grams never span two documents."""
        rows = []
        for seq in sequences:
            for s in range(0, len(seq), chunk - order + 1):
                piece = seq[s:s + chunk]
                if len(piece) >= 1:
                    rows.append(piece)
                if s + chunk >= len(seq):
                    break
        width = max((len(r) for r in rows), default=1)
        tokens = torch.zeros(len(rows) or 1, width, dtype=torch.int64)
        lengths = torch.zeros(len(rows) or 1, dtype=torch.int64)
        for i, r in enumerate(rows):
            tokens[i, :len(r)] = torch.tensor(r, dtype=torch.int64)
            lengths[i] = len(r)
        return cls.fit(tokens, lengths, order, vocab_size, keyed_by_row=False, min_count=min_count)

    # ---------------------------------------------------------------- scoring
    def logprob(
        self,
        rows: torch.Tensor,     # [N] int64: batch row of each query (ignored if not keyed)
        context: torch.Tensor,  # [N, c] int64: preceding tokens, oldest first; -1 = none
        cand: torch.Tensor,     # [N, M] int64: candidate next tokens
    ) -> torch.Tensor:          # [N, M] float32 log p(cand | context)
        n, m = cand.shape
        p = torch.full((n, m), 1.0 / self.vocab_size, device=cand.device)
        seed = (rows.to(torch.int64) + 1) if self.keyed_by_row else torch.zeros_like(rows, dtype=torch.int64)
        c = context.shape[1]
        for j in range(1, self.order + 1):
            hist = j - 1
            if hist > c:
                break
            h = seed.clone()
            usable = torch.ones(n, dtype=torch.bool, device=cand.device)
            for i in range(c - hist, c):
                usable &= context[:, i] >= 0
                h = _hash_step(h, context[:, i])
            tab = self.tables[j - 1]
            c_h = _lookup(tab.ctx_keys, tab.ctx_counts, h)
            t_h = _lookup(tab.ctx_keys, tab.ctx_types, h)
            c_hw = _lookup(tab.keys, tab.counts, _hash_step(h[:, None], cand))
            seen = (c_h > 0) & usable
            p_j = (c_hw + t_h[:, None] * p) / (c_h + t_h).clamp(min=1.0)[:, None]
            p = torch.where(seen[:, None], p_j, p)
        return p.log()

    # ---------------------------------------------------------------- files
    def save(self, path: str | Path, metadata: dict | None = None) -> None:
        tensors = {}
        for j, tab in enumerate(self.tables, start=1):
            for name in ("keys", "counts", "ctx_keys", "ctx_counts", "ctx_types"):
                tensors[f"order{j}.{name}"] = getattr(tab, name).contiguous().cpu()
        meta = {"order": str(self.order), "vocab_size": str(self.vocab_size), "keyed_by_row": str(self.keyed_by_row),
                "info": json.dumps(metadata or {})}
        save_file(tensors, str(path), metadata=meta)

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> "NGramModel":
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"proxy table {str(path)!r} does not exist; build one with `diffuspec build-proxy`")
        from safetensors import safe_open
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        if "order" not in meta:
            raise ValueError(f"{str(path)!r} is not a diffuspec proxy table (no 'order' metadata)")
        state = load_file(str(path), device=str(device))
        order = int(meta["order"])
        tables = [_OrderTable(*(state[f"order{j}.{name}"] for name in
                                ("keys", "counts", "ctx_keys", "ctx_counts", "ctx_types")))
                  for j in range(1, order + 1)]
        model = cls(order, int(meta["vocab_size"]), tables, meta.get("keyed_by_row") == "True")
        model.info = json.loads(meta.get("info", "{}"))
        return model


def _empty_table(device) -> _OrderTable:
    e = torch.zeros(0, dtype=torch.int64, device=device)
    f = torch.zeros(0, device=device)
    return _OrderTable(e, f, e.clone(), f.clone(), f.clone())


class CausalProxy:
    """What CPS calls: the request's online model, mixed with a corpus table when given."""

    def __init__(self, online: NGramModel | None, corpus: NGramModel | None, corpus_weight: float) -> None:
        if online is None and corpus is None:
            raise ValueError("CausalProxy needs an online model, a corpus table, or both")
        self.online, self.corpus, self.corpus_weight = online, corpus, corpus_weight
        self.order = max(m.order for m in (online, corpus) if m is not None)

    def logprob(self, rows, context, cand):
        if self.corpus is None:
            return self.online.logprob(rows, context, cand)
        if self.online is None:
            return self.corpus.logprob(rows, context, cand)
        w = self.corpus_weight
        return torch.logaddexp(self.corpus.logprob(rows, context, cand) + torch.log(torch.tensor(w)).clamp(min=-1e4),
                               self.online.logprob(rows, context, cand) + torch.log(torch.tensor(1 - w)).clamp(min=-1e4))
