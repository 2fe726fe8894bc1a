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
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

_MULT = 1_000_003  # odd multiplier of the rolling hash (larger than any vocabulary we meet)


def _hash_step(h: torch.Tensor, tok: torch.Tensor) -> torch.Tensor:
    # int64 arithmetic wraps on overflow, which is what a rolling hash wants.
    return h * _MULT + (tok + 1)


def _compact(h):
    """The low 32 bits of a hash as int32: half the bytes of a key, for saved tables."""
    if isinstance(h, np.ndarray):
        return ((h & 0xFFFFFFFF) - 2**31).astype(np.int32)
    return ((h & 0xFFFFFFFF) - 2**31).to(torch.int32)


def _lookup(keys: torch.Tensor, values: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
    """values[key == query], 0 where the query is not a key (torch)."""
    if keys.dtype == torch.int32:
        query = _compact(query)
    if keys.shape[0] == 0:
        return torch.zeros(query.shape, device=query.device)
    idx = torch.searchsorted(keys, query.reshape(-1)).clamp(max=keys.shape[0] - 1).reshape(query.shape)
    return torch.where(keys[idx] == query, values[idx], torch.zeros((), dtype=values.dtype, device=values.device)).float()


def _lookup_np(keys: np.ndarray, query: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(index, found) of each query in sorted ``keys`` (numpy)."""
    if keys.dtype == np.int32:
        query = _compact(query)
    if keys.shape[0] == 0:
        return np.zeros(query.shape, np.int64), np.zeros(query.shape, bool)
    idx = np.searchsorted(keys, query)
    np.minimum(idx, keys.shape[0] - 1, out=idx)
    return idx, keys[idx] == query


def _context_hash(seed: torch.Tensor, order: int, tokens: torch.Tensor) -> torch.Tensor:
    """Hash of (row seed, n-gram order, context tokens): contexts of different orders never
    share a key, so every order lives in one sorted table."""
    h = seed * _MULT + order
    for i in range(tokens.shape[-1]):
        h = _hash_step(h, tokens[..., i])
    return h


class NGramModel:
    """An order-n Witten-Bell n-gram model over token ids, optionally keyed per batch row.

    All orders share two sorted tables, so scoring is two ``searchsorted`` calls:
    ``keys``/``counts`` hold c(h, w) and ``ctx_keys``/``ctx_counts``/``ctx_types`` hold
    c(h) and T(h)."""

    def __init__(self, order: int, vocab_size: int, keys, counts, ctx_keys, ctx_counts, ctx_types,
                 keyed_by_row: bool) -> None:
        self.order = order
        self.vocab_size = vocab_size
        self.keys, self.counts = keys, counts                                   # [N] int64, [N] float
        self.ctx_keys, self.ctx_counts, self.ctx_types = ctx_keys, ctx_counts, ctx_types  # [C] ...
        self.keyed_by_row = keyed_by_row
        self.info: dict = {}
        self._np: tuple | None = None                     # numpy views of the tables (CPU scoring)
        self._mixture: _NumpyMixture | None = None

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
        lengths = lengths.to(device)
        seed = (torch.arange(b, device=device, dtype=torch.int64) + 1) if keyed_by_row else \
            torch.zeros(b, dtype=torch.int64, device=device)
        all_keys, all_counts, all_ctx = [], [], []
        for j in range(1, min(order, t) + 1):
            windows = tokens.unfold(1, j, 1)                                  # [B, T-j+1, j]
            ok = (torch.arange(t - j + 1, device=device)[None, :] + j) <= lengths[:, None]
            ctx = _context_hash(seed[:, None].expand(b, t - j + 1), j, windows[..., : j - 1])[ok]
            full = _hash_step(ctx, windows[..., j - 1][ok])
            keys, inverse, counts = torch.unique(full, return_inverse=True, return_counts=True)
            first = torch.zeros_like(keys).scatter_(0, inverse, ctx)  # each key has one context
            counts = counts.to(torch.float32)
            if min_count > 1 and j >= 2:
                keep = counts >= min_count
                keys, counts, first = keys[keep], counts[keep], first[keep]
            all_keys.append(keys)
            all_counts.append(counts)
            all_ctx.append(first)
        keys, counts, ctx = (torch.cat(x) if x else torch.zeros(0, device=device) for x in (all_keys, all_counts, all_ctx))
        keys, ctx = keys.long(), ctx.long()
        order_idx = keys.argsort()
        keys, counts, ctx = keys[order_idx], counts[order_idx], ctx[order_idx]
        ctx_keys, ctx_inv = torch.unique(ctx, return_inverse=True)
        ctx_counts = torch.zeros(ctx_keys.numel(), device=device).scatter_add_(0, ctx_inv, counts)
        ctx_types = torch.zeros(ctx_keys.numel(), device=device).scatter_add_(0, ctx_inv, torch.ones_like(counts))
        return cls(order, vocab_size, keys, counts, ctx_keys, ctx_counts, ctx_types, keyed_by_row)

    @classmethod
    def from_corpus(cls, sequences: list[list[int]], order: int, vocab_size: int, min_count: int = 1,
                    chunk: int = 4096) -> "NGramModel":
        """Pool n-gram counts over token sequences (documents), cut into chunks of ``chunk``
        tokens that overlap by order-1, so no n-gram spans two documents or is lost."""
        rows = []
        for seq in sequences:
            for s in range(0, max(len(seq), 1), chunk - order + 1):
                rows.append(seq[s:s + chunk])
                if s + chunk >= len(seq):
                    break
        width = max((len(r) for r in rows), default=1)
        tokens = torch.zeros(len(rows) or 1, width, dtype=torch.int64)
        lengths = torch.zeros(len(rows) or 1, dtype=torch.int64)
        for i, r in enumerate(rows):
            tokens[i, :len(r)] = torch.tensor(r, dtype=torch.int64)
            lengths[i] = len(r)
        # overlapping chunks count their shared n-grams twice; only long documents have them
        return cls.fit(tokens, lengths, order, vocab_size, keyed_by_row=False, min_count=min_count)

    # ---------------------------------------------------------------- scoring
    def logprob(
        self,
        rows: torch.Tensor,     # [N] int64: batch row of each query (ignored if not keyed)
        context: torch.Tensor,  # [N, c] int64: preceding tokens, oldest first; -1 = none
        cand: torch.Tensor,     # [N, M] int64: candidate next tokens
    ) -> torch.Tensor:          # [N, M] float32 log p(cand | context)
        if cand.device.type == "cpu":  # small, latency-bound work: numpy has less overhead per call
            return torch.from_numpy(self.logprob_numpy(rows.numpy(), context.numpy(), cand.numpy()))
        return self._logprob_torch(rows, context, cand)

    def _orders(self, c: int) -> range:
        return range(1, min(self.order, c + 1) + 1)

    def _logprob_torch(self, rows, context, cand):
        n, m = cand.shape
        c = context.shape[1]
        seed = rows + 1 if self.keyed_by_row else rows * 0
        orders = self._orders(c)
        ctx = torch.stack([_context_hash(seed, j, context[:, c - j + 1:]) for j in orders], 1)       # [N, J]
        usable = torch.stack([(context[:, c - j + 1:] >= 0).all(1) for j in orders], 1)             # [N, J]
        c_h = _lookup(self.ctx_keys, self.ctx_counts, ctx)
        t_h = _lookup(self.ctx_keys, self.ctx_types, ctx)
        c_hw = _lookup(self.keys, self.counts, _hash_step(ctx[:, :, None], cand[:, None, :]))        # [N, J, M]
        p = torch.full((n, m), 1.0 / self.vocab_size, device=cand.device)
        seen = (c_h > 0) & usable
        denom = torch.where(seen, c_h + t_h, 1.0)
        for j in range(c_h.shape[1]):  # from order 1 up: p_j = (c(h,w) + T(h) p_{j-1}) / (c(h) + T(h))
            p = torch.where(seen[:, j, None], (c_hw[:, j] + t_h[:, j, None] * p) / denom[:, j, None], p)
        return p.log()

    def logprob_numpy(self, rows: np.ndarray, context: np.ndarray, cand: np.ndarray) -> np.ndarray:
        """:meth:`logprob` on numpy arrays (see :class:`_NumpyMixture`)."""
        if self._mixture is None:
            self._mixture = _NumpyMixture((self,), [1.0])
        return self._mixture(rows, context, cand)

    def _numpy_tables(self):
        """The tables as numpy arrays, counts as float32 (numpy's float16 arithmetic is slow)."""
        if self._np is None:
            arrays = [getattr(self, n).cpu().numpy() for n in self._TENSORS]  # the tables may live on a GPU
            self._np = tuple(a.astype(np.float32) if a.dtype.kind == "f" else a for a in arrays)
        return self._np

    # ---------------------------------------------------------------- files
    _TENSORS = ("keys", "counts", "ctx_keys", "ctx_counts", "ctx_types")

    def save(self, path: str | Path, metadata: dict | None = None, compact: bool = True) -> None:
        """``compact``: 32-bit keys and float16 counts (6 bytes an n-gram instead of 12);
        rare 32-bit collisions only blur the proxy, which cannot change outputs."""
        meta = {"order": str(self.order), "vocab_size": str(self.vocab_size), "keyed_by_row": str(self.keyed_by_row),
                "info": json.dumps(metadata or {})}
        tensors = {name: getattr(self, name).contiguous().cpu() for name in self._TENSORS}
        if compact:
            for keys, values in (("keys", ("counts",)), ("ctx_keys", ("ctx_counts", "ctx_types"))):
                small = _compact(tensors[keys])
                order = small.argsort()
                tensors[keys] = small[order]
                for v in values:
                    tensors[v] = tensors[v][order].clamp(max=65504).half()
        save_file(tensors, str(path), metadata=meta)

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> "NGramModel":
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"proxy table {str(path)!r} does not exist; build one with `diffuspec build-proxy`")
        from safetensors import safe_open
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
            state = load_file(str(path), device=str(device))
        except Exception as exc:  # a truncated or foreign file
            raise ValueError(f"proxy table {str(path)!r} cannot be read ({type(exc).__name__}: {exc}); rebuild it with "
                             "`diffuspec build-proxy`") from None
        if "order" not in meta:
            raise ValueError(f"{str(path)!r} is not a diffuspec proxy table (no 'order' metadata)")
        for name in cls._TENSORS:
            if name not in state or state[name].dim() != 1:
                raise ValueError(f"proxy table {str(path)!r}: tensor {name!r} is missing or not 1-D; rebuild it with "
                                 "`diffuspec build-proxy`")
        for keys, values in (("keys", ("counts",)), ("ctx_keys", ("ctx_counts", "ctx_types"))):
            if state[keys].is_floating_point():
                raise ValueError(f"proxy table {str(path)!r}: tensor {keys!r} has dtype {state[keys].dtype}, expected "
                                 "integer hash keys")
            for v in values:
                if len(state[v]) != len(state[keys]):
                    raise ValueError(f"proxy table {str(path)!r}: tensor {v!r} has {len(state[v])} entries for "
                                     f"{len(state[keys])} keys; rebuild it with `diffuspec build-proxy`")
        model = cls(int(meta["order"]), int(meta["vocab_size"]), *(state[name] for name in cls._TENSORS),
                    keyed_by_row=meta.get("keyed_by_row") == "True")
        model.info = json.loads(meta.get("info", "{}"))
        return model


class CausalProxy:
    """What CPS calls: the request's online model, mixed with a corpus table when given."""

    def __init__(self, online: NGramModel | None, corpus: NGramModel | None, corpus_weight: float) -> None:
        if online is None and corpus is None:
            raise ValueError("CausalProxy needs an online model, a corpus table, or both")
        self.online, self.corpus, self.corpus_weight = online, corpus, corpus_weight
        self.order = max(m.order for m in (online, corpus) if m is not None)
        self._mixture: _NumpyMixture | None = None
        self._log_w = (math.log(corpus_weight) if corpus_weight > 0 else -1e4,
                       math.log(1 - corpus_weight) if corpus_weight < 1 else -1e4)

    def logprob(self, rows, context, cand):
        if cand.device.type == "cpu":
            return torch.from_numpy(self.logprob_numpy(rows.numpy(), context.numpy(), cand.numpy()))
        if self.corpus is None or self.online is None:
            return (self.online or self.corpus)._logprob_torch(rows, context, cand)
        return torch.logaddexp(self.corpus._logprob_torch(rows, context, cand) + self._log_w[0],
                               self.online._logprob_torch(rows, context, cand) + self._log_w[1])

    def logprob_numpy(self, rows, context, cand):
        if self._mixture is None:
            both = self.online is not None and self.corpus is not None
            self._mixture = _NumpyMixture([m for m in (self.corpus, self.online) if m is not None],
                                          [self.corpus_weight, 1.0 - self.corpus_weight] if both else [1.0])
        return self._mixture(rows, context, cand)


class _NumpyMixture:
    """log Σ_k w_k p_k(cand | context) for Witten-Bell models p_k, on numpy arrays.

    CPS on a CPU calls this once per lattice position with a few dozen candidates, so the
    cost is the number of array operations, not arithmetic: the models share every step but
    the table searches (hashing, interpolation and mixing run once, on arrays stacked over
    models), and what does not depend on the query is computed here, once."""

    def __init__(self, models, weights) -> None:
        self.models = tuple(models)
        self.tables = [model._numpy_tables() for model in self.models]
        self.weights = np.asarray(weights, np.float32)
        self.keyed = np.array([[model.keyed_by_row] for model in self.models], np.int64)         # [K, 1]
        self.model_order = np.array([[model.order] for model in self.models])                    # [K, 1]
        self.max_order = int(self.model_order.max())
        self.uniform = np.array([1.0 / model.vocab_size for model in self.models], np.float32)[:, None, None]

    def __call__(self, rows: np.ndarray, context: np.ndarray, cand: np.ndarray) -> np.ndarray:
        c = context.shape[1]
        n_orders = min(self.max_order, c + 1)
        orders = np.arange(1, n_orders + 1)
        # Context hashes, [K, N, J]: order j hashes (seed, j, its last j - 1 tokens, oldest first).
        h = (self.keyed * (rows + 1) * _MULT)[:, :, None] + orders
        for back in range(n_orders - 1, 0, -1):  # the token `back` places before the end
            h[:, :, back:] = h[:, :, back:] * _MULT + (context[:, c - back] + 1)[None, :, None]
        allowed = (orders <= self.model_order)[:, None, :]                                        # [K, 1, J]
        if context.min() < 0:  # -1 pads the oldest end: order j needs j - 1 known tokens
            allowed = allowed & (orders - 1 <= (context >= 0).sum(1)[:, None])[None]              # [K, N, J]
        full = h[..., None] * _MULT + (cand[None, :, None, :] + 1)                                # [K, N, J, M]
        c_h = np.empty(h.shape, np.float32)
        t_h = np.empty(h.shape, np.float32)
        c_hw = np.empty(full.shape, np.float32)
        for k, (keys, counts, ctx_keys, ctx_counts, ctx_types) in enumerate(self.tables):
            idx, found = _lookup_np(ctx_keys, h[k])
            c_h[k] = np.where(found, ctx_counts[idx], np.float32(0))
            t_h[k] = np.where(found, ctx_types[idx], np.float32(0))
            idx, found = _lookup_np(keys, full[k])
            c_hw[k] = np.where(found, counts[idx], np.float32(0))
        seen = (c_h > 0) & allowed
        inv = seen / np.maximum(c_h + t_h, np.float32(1))             # 1 / (c(h) + T(h)); 0 where unseen
        lam = (np.float32(1) - seen) + t_h * inv                      # weight of the order below
        add = c_hw * inv[..., None]                                   # c(h, w) / (c(h) + T(h))
        p = self.uniform                                              # order 0
        for j in range(n_orders):
            p = add[:, :, j] + lam[:, :, j, None] * p
        return np.log(self.weights @ p.reshape(len(self.models), -1)).reshape(cand.shape)


# ---------------------------------------------------------------------- incremental online model
def columns_between(tokens: torch.Tensor, start: list[int], end: list[int]) -> np.ndarray:
    """Row b's tokens ``start[b] .. end[b]`` of ``tokens`` [B, T] (any device) in one host
    copy: [B, max span] int64, each row's first end[b] - start[b] entries valid."""
    span = max((e - s for s, e in zip(start, end)), default=0)
    cols = (torch.tensor(start, dtype=torch.int64)[:, None] + torch.arange(max(span, 0))[None, :]).clamp(
        max=tokens.shape[1] - 1)
    return tokens.gather(1, cols.to(tokens.device)).cpu().numpy()


class _RowCounts:
    """One request's n-gram counts (hashed with seed 0, as an unkeyed table), kept sorted and
    grown by the tokens appended since the last update."""

    __slots__ = ("keys", "counts", "ctx_keys", "ctx_counts", "ctx_types", "seen", "tail")

    def __init__(self) -> None:
        self.keys = np.zeros(0, np.int64)
        self.counts = np.zeros(0, np.float32)
        self.ctx_keys = np.zeros(0, np.int64)
        self.ctx_counts = np.zeros(0, np.float32)
        self.ctx_types = np.zeros(0, np.float32)
        self.seen = 0                       # prefix tokens counted
        self.tail = np.zeros(0, np.int64)   # the last order-1 of them

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.keys, self.counts, self.ctx_keys, self.ctx_counts, self.ctx_types))

    def copy(self) -> "_RowCounts":
        out = _RowCounts()
        for name in self.__slots__:
            value = getattr(self, name)
            setattr(out, name, value.copy() if isinstance(value, np.ndarray) else value)
        return out

    def add(self, new: np.ndarray, order: int, compiled=None) -> None:
        """Count the n-grams (n = 1..order) that end at the ``new`` tokens (``compiled``: the
        same update compiled, diffuspec_kernels.cpu.add_ngrams)."""
        seq = np.concatenate([self.tail, new])
        start = len(self.tail)
        self.seen += len(new)
        self.tail = seq[len(seq) - min(order - 1, len(seq)):]
        if compiled is not None:
            tables = compiled(self.keys, self.counts, self.ctx_keys, self.ctx_counts, self.ctx_types,
                              seq[:start], new, order)
            self.keys, self.counts, self.ctx_keys, self.ctx_counts, self.ctx_types = tables
            return
        full_parts, ctx_parts = [], []
        for j in range(1, order + 1):
            first_end = max(start, j - 1)          # the first new position with j - 1 tokens before it
            if first_end >= len(seq):
                continue
            windows = np.lib.stride_tricks.sliding_window_view(seq, j)[first_end - j + 1:]   # [n, j]
            h = np.full(len(windows), j, np.int64)  # _context_hash with seed 0
            for t in range(j - 1):
                h = h * _MULT + (windows[:, t] + 1)
            ctx_parts.append(h)
            full_parts.append(h * _MULT + (windows[:, j - 1] + 1))
        if not full_parts:
            return
        full, ctx = np.concatenate(full_parts), np.concatenate(ctx_parts)
        keys, first, cnt = np.unique(full, return_index=True, return_counts=True)
        ctx, cnt = ctx[first], cnt.astype(np.float32)   # each key has one context
        pos = np.searchsorted(self.keys, keys)
        known = pos < len(self.keys)
        known[known] = self.keys[pos[known]] == keys[known]
        self.counts[pos[known]] += cnt[known]
        fresh = ~known
        self.keys = np.insert(self.keys, pos[fresh], keys[fresh])
        self.counts = np.insert(self.counts, pos[fresh], cnt[fresh])
        # c(h) grows by every new n-gram after h, T(h) by every new distinct one.
        ctx_u, inv = np.unique(ctx, return_inverse=True)
        add_c = np.bincount(inv, weights=cnt, minlength=len(ctx_u)).astype(np.float32)
        add_t = np.bincount(inv, weights=fresh, minlength=len(ctx_u)).astype(np.float32)
        pos = np.searchsorted(self.ctx_keys, ctx_u)
        known = pos < len(self.ctx_keys)
        known[known] = self.ctx_keys[pos[known]] == ctx_u[known]
        self.ctx_counts[pos[known]] += add_c[known]
        self.ctx_types[pos[known]] += add_t[known]
        fresh = ~known
        self.ctx_keys = np.insert(self.ctx_keys, pos[fresh], ctx_u[fresh])
        self.ctx_counts = np.insert(self.ctx_counts, pos[fresh], add_c[fresh])
        self.ctx_types = np.insert(self.ctx_types, pos[fresh], add_t[fresh])


@dataclass
class FlatNGram:
    """An n-gram table as the kernels read it: ``S`` segments of sorted hash keys, segment
    ``s`` being ``keys[key_off[s]:key_off[s + 1]]`` (and ``ctx_keys[ctx_off[s]:...]``).
    The online model has one segment per batch row; a corpus table has one for all rows.
    ``compact``: the keys are 32-bit (:func:`_compact`), so a query is compacted first;
    ``keyed``: contexts were hashed with seed row + 1 (a table fitted per row); ``per_row``:
    row b reads segment b (else every row reads segment 0)."""

    keys: np.ndarray        # [N] int64, sorted within each segment
    counts: np.ndarray      # [N] float32: c(h, w)
    ctx_keys: np.ndarray    # [C] int64, sorted within each segment
    ctx_counts: np.ndarray  # [C] float32: c(h)
    ctx_types: np.ndarray   # [C] float32: T(h)
    key_off: np.ndarray     # [S + 1] int64
    ctx_off: np.ndarray     # [S + 1] int64
    order: int
    vocab_size: int
    compact: bool = False
    keyed: bool = False
    per_row: bool = False

    @classmethod
    def from_model(cls, model: NGramModel) -> "FlatNGram":
        keys, counts, ctx_keys, ctx_counts, ctx_types = model._numpy_tables()
        return cls(keys.astype(np.int64), counts, ctx_keys.astype(np.int64), ctx_counts, ctx_types,
                   np.array([0, len(keys)], np.int64), np.array([0, len(ctx_keys)], np.int64),
                   model.order, model.vocab_size, compact=keys.dtype == np.int32, keyed=model.keyed_by_row)

    def to(self, device) -> dict[str, torch.Tensor]:
        """The arrays as tensors on ``device`` (for the Triton kernels)."""
        names = ("keys", "counts", "ctx_keys", "ctx_counts", "ctx_types", "key_off", "ctx_off")
        return {n: torch.from_numpy(np.ascontiguousarray(getattr(self, n))).to(device) for n in names}


class OnlineNGram:
    """The per-request online proxy, updated with each round's new tokens instead of refit
    from the whole context: the same counts as :meth:`NGramModel.fit` over each row's
    prefix, hence the same scores (tests/test_kernels.py). Rows follow the batch
    (:meth:`select`, :meth:`extend`), like the drafter's prefix cache."""

    def __init__(self, order: int, vocab_size: int, rows: int = 0) -> None:
        self.order, self.vocab_size = order, vocab_size
        self.rows: list[_RowCounts] = [_RowCounts() for _ in range(rows)]

    def select(self, index: torch.Tensor) -> None:
        self.rows = [self.rows[i] for i in index.tolist()]

    def extend(self, rows: int) -> None:
        """Append ``rows`` rows with nothing counted."""
        self.rows += [_RowCounts() for _ in range(rows)]

    def load_rows(self, rows: list) -> None:
        """Start row j from ``rows[j]`` (a row of an earlier state, or None: nothing counted),
        for callers whose batches change between rounds (vLLM keeps each request's row)."""
        self.rows = [r if r is not None else _RowCounts() for r in rows]

    def update(self, tokens: torch.Tensor, lengths_cpu: torch.Tensor, compiled=None) -> None:
        """Count each row's tokens ``seen .. lengths[b]`` of ``tokens`` [B, T] (any device):
        one host copy of the new columns. A row whose prefix got shorter than what was
        counted (a caller reusing rows) starts over. ``compiled``: see :meth:`_RowCounts.add`."""
        lengths = lengths_cpu.tolist()
        for b, row in enumerate(self.rows):
            if row.seen > lengths[b]:
                self.rows[b] = _RowCounts()
        seen = [r.seen for r in self.rows]
        if all(n <= s for n, s in zip(lengths, seen)):
            return
        new = columns_between(tokens, seen, lengths)                                     # [B, span]
        for b, row in enumerate(self.rows):
            if lengths[b] > seen[b]:
                row.add(new[b, : lengths[b] - seen[b]], self.order, compiled)

    def flat(self) -> FlatNGram:
        """All rows as one segmented table (segment b = row b)."""
        rows = self.rows
        def cat(name, dtype):
            return np.concatenate([getattr(r, name) for r in rows]) if rows else np.zeros(0, dtype)
        key_off = np.zeros(len(rows) + 1, np.int64)
        ctx_off = np.zeros(len(rows) + 1, np.int64)
        np.cumsum([len(r.keys) for r in rows], out=key_off[1:])
        np.cumsum([len(r.ctx_keys) for r in rows], out=ctx_off[1:])
        return FlatNGram(cat("keys", np.int64), cat("counts", np.float32), cat("ctx_keys", np.int64),
                         cat("ctx_counts", np.float32), cat("ctx_types", np.float32), key_off, ctx_off,
                         self.order, self.vocab_size, per_row=True)
