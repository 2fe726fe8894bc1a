"""Triton kernels for CUDA tensors: the lattice build and the path search, batched.

On a GPU the torch references launch hundreds of tiny kernels a round (the search: ~30 per
lattice position), which would cost more than a 7B drafter's pass. Here each stage is one
launch (the lattice: two, the second a per-row pass over k positions):

- ``_lattice_kernel``, one program per (row, position): the top ``m`` of V log-probs without
  a sort — a block of the vocabulary is searched only when its maximum beats the current
  m-th best, so most of a 152k vocabulary costs one max per block — then the mass cut in
  the reference's order, and EOS kept above its threshold. ``_lattice_finish_kernel``, one
  program per row: the cut after the first EOS position, L_gen, validity.
- ``_cps_kernel``, one program per row: the whole beam search. Beams and candidates are a
  [W, M] tile; the proxy's Witten-Bell scores come from binary searches in the device copy
  of the n-gram tables (all orders and candidates at once); the `width` best are taken
  by repeated max with ties to the lower flat index, as the reference's stable sort does;
  each beam's path and proxy context stay in registers, gathered from their parents.

Both follow the references operation by operation in float32; they run under
``TRITON_INTERPRET=1`` on CPU tensors, which is how the tests check them on machines without
a GPU (tests/test_kernels.py).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch
import triton
import triton.language as tl

from diffuspec.config import CPSConfig, LatticeConfig
from diffuspec.lattice import Lattice
from diffuspec.proxy import FlatNGram

from . import ProxyInputs, _Kernels

_MULT = 1_000_003  # diffuspec.proxy's rolling-hash multiplier
_BIG = tl.constexpr(1 << 30)  # an index no real entry has (a constexpr: compiled Triton reads no other globals)


def _pow2(n: int) -> int:
    return max(1, 1 << max(0, math.ceil(math.log2(max(n, 1)))))


# ---------------------------------------------------------------------------- lattice
@triton.jit
def _lattice_kernel(logq_ptr, tok_ptr, out_ptr, keep_ptr, eos_here_ptr, k_ptr, K, V, eos, mass, eos_min_prob,
                    M: tl.constexpr, M_P: tl.constexpr, WIDTH: tl.constexpr, HAS_EOS: tl.constexpr,
                    BLOCK: tl.constexpr):
    pid = tl.program_id(0)          # row * K + position
    b = pid // K
    i = pid % K
    row = logq_ptr + pid.to(tl.int64) * V
    slot = tl.arange(0, M_P)
    best_v = tl.full([M_P], float("-inf"), tl.float32)
    best_i = tl.full([M_P], _BIG, tl.int64)
    offs = tl.arange(0, BLOCK)
    for start in range(0, V, BLOCK):
        idx = start + offs
        x = tl.load(row + idx, mask=idx < V, other=float("-inf"))
        held = tl.sum(((slot < M) & (best_i < _BIG)).to(tl.int32), axis=0)
        floor = tl.min(tl.where(slot < M, best_v, float("inf")), axis=0)    # the m-th best so far
        if (held < M) | (tl.max(x, axis=0) > floor):
            taken = idx >= V
            for _ in tl.static_range(M):
                xm = tl.where(taken, float("-inf"), x)
                top = tl.max(xm, axis=0)
                at = tl.min(tl.where((xm == top) & ~taken, idx, _BIG), axis=0)
                taken = taken | (idx == at)
                # after every held entry >= top: an equal one held came from a lower index
                pos = tl.sum(((slot < M) & (best_i < _BIG) & (best_v >= top)).to(tl.int32), axis=0)
                put = (pos < M) & (at < V)
                best_v = tl.where(put & (slot == pos), top, tl.where(put & (slot > pos), _shift(best_v, slot), best_v))
                best_i = tl.where(put & (slot == pos), at, tl.where(put & (slot > pos), _shift(best_i, slot), best_i))
    # mass cut in the reference's order: keep j when (p_0 + .. + p_j) - p_j < mass
    total = 0.0
    keep = slot == 0
    eos_kept = tl.zeros([], tl.int32)
    for j in tl.static_range(M):
        v = tl.sum(tl.where(slot == j, best_v, 0.0), axis=0)
        t = tl.sum(tl.where(slot == j, best_i, 0), axis=0)
        p = tl.exp(v)
        total = total + p
        kj = (j == 0) | ((total - p) < mass)
        keep = tl.where(slot == j, kj, keep)
        eos_kept = eos_kept | (kj & (t == eos)).to(tl.int32)
    base = pid.to(tl.int64) * WIDTH
    tl.store(tok_ptr + base + slot, best_i, mask=slot < M)
    tl.store(out_ptr + base + slot, best_v, mask=slot < M)
    tl.store(keep_ptr + base + slot, keep.to(tl.int8), mask=slot < M)
    if HAS_EOS:
        e = tl.load(row + eos)
        add = (tl.exp(e) >= eos_min_prob) & (eos_kept == 0)
        tl.store(tok_ptr + base + M, eos.to(tl.int64))
        tl.store(out_ptr + base + M, e)
        tl.store(keep_ptr + base + M, add.to(tl.int8))
        k_b = tl.load(k_ptr + b)
        tl.store(eos_here_ptr + pid, (((eos_kept != 0) | add) & (i < k_b)).to(tl.int8))


@triton.jit
def _shift(v, slot):
    """v moved one slot to the right (slot j takes v[j - 1]; slot 0 keeps its value)."""
    return tl.sum(tl.where(slot[:, None] - 1 == slot[None, :], v[None, :], 0), axis=1)


@triton.jit
def _lattice_finish_kernel(tok_ptr, out_ptr, keep_ptr, eos_here_ptr, k_ptr, length_ptr, gen_len_ptr, K, eos,
                           WIDTH: tl.constexpr, W_P: tl.constexpr, K_P: tl.constexpr, HAS_EOS: tl.constexpr):
    b = tl.program_id(0)
    pos = tl.arange(0, K_P)
    k_b = tl.load(k_ptr + b)
    length = k_b
    gen_len = k_b
    if HAS_EOS:
        here = tl.load(eos_here_ptr + b * K + pos, mask=pos < K, other=0)
        first = tl.min(tl.where(here != 0, pos, K_P + K), axis=0)
        length = tl.minimum(k_b, first + 1)
        top = tl.load(tok_ptr + (b * K + pos).to(tl.int64) * WIDTH, mask=pos < K, other=-1)
        first_top = tl.min(tl.where(top == eos, pos, K_P + K), axis=0)
        gen_len = tl.minimum(k_b, first_top)
    tl.store(length_ptr + b, length)
    tl.store(gen_len_ptr + b, gen_len)
    col = tl.arange(0, W_P)
    at = (b * K + pos[:, None]).to(tl.int64) * WIDTH + col[None, :]
    inside = (pos[:, None] < K) & (col[None, :] < WIDTH)
    keep = tl.load(keep_ptr + at, mask=inside, other=0)
    ok = (keep != 0) & (pos[:, None] < length)
    tl.store(keep_ptr + at, ok.to(tl.int8), mask=inside)
    v = tl.load(out_ptr + at, mask=inside, other=0.0)
    tl.store(out_ptr + at, tl.where(ok, v, float("-inf")), mask=inside)


# ---------------------------------------------------------------------------- CPS
@triton.jit
def _find(keys_ptr, lo, hi, q, n_iter):
    """Per element: the index of q in the sorted keys[lo:hi] (vectorised binary search),
    and whether it is there."""
    end = hi
    for _ in range(n_iter):
        active = lo < hi
        mid = (lo + hi) >> 1
        kv = tl.load(keys_ptr + mid, mask=active, other=0)
        go_right = active & (kv < q)
        lo = tl.where(go_right, mid + 1, lo)
        hi = tl.where(active & ~go_right, mid, hi)
    found = lo < end
    kv = tl.load(keys_ptr + lo, mask=found, other=0)
    return lo, found & (kv == q)


@triton.jit
def _query(h, COMPACT: tl.constexpr):
    if COMPACT:  # typed int64 constants: a bare 0xFFFFFFFF would be a uint32
        return (h & tl.full([], 0xFFFFFFFF, tl.int64)) - tl.full([], 2147483648, tl.int64)
    return h


@triton.jit
def _witten_bell(keys, counts, ctx_keys, ctx_counts, ctx_types, k0, k1, c0, c1, n_iter, hashes_w, usable,
                 cand, uniform, ORDER: tl.constexpr, N_ORDERS: tl.constexpr, COMPACT: tl.constexpr,
                 W_P: tl.constexpr, M_P: tl.constexpr, O_P: tl.constexpr):
    """p(cand | context) [W, M] of one model; hashes_w [W, O] the context hash of each order,
    usable [W] how many orders each beam may use."""
    o = tl.arange(0, O_P)
    p = tl.full([W_P, M_P], 1.0, tl.float32) * uniform
    for j in tl.static_range(N_ORDERS):
        if j < ORDER:
            h = tl.sum(tl.where(o[None, :] == j, hashes_w, 0), axis=1)                       # [W]
            lo = tl.zeros([W_P], tl.int64) + c0
            hi = tl.zeros([W_P], tl.int64) + c1
            at, found = _find(ctx_keys, lo, hi, _query(h, COMPACT), n_iter)
            c_h = tl.load(ctx_counts + at, mask=found, other=0.0)
            t_h = tl.load(ctx_types + at, mask=found, other=0.0)
            seen = (c_h > 0) & (j < usable)
            inv = 1.0 / tl.maximum(c_h + t_h, 1.0)
            full = h[:, None] * 1000003 + (cand[None, :] + 1)
            lo2 = tl.zeros([W_P, M_P], tl.int64) + k0
            hi2 = tl.zeros([W_P, M_P], tl.int64) + k1
            at2, found2 = _find(keys, lo2, hi2, _query(full, COMPACT), n_iter)
            c_hw = tl.load(counts + at2, mask=found2, other=0.0)
            p = tl.where(seen[:, None], c_hw * inv[:, None] + (t_h * inv)[:, None] * p, p)
    return p


@triton.jit
def _gather_rows(x, parent, W_P: tl.constexpr):
    """x[parent[w], :] for each w (a register gather, as a one-hot reduction)."""
    src = tl.arange(0, W_P)
    pick = parent[:, None, None] == src[None, :, None]
    return tl.sum(tl.where(pick, x[None, :, :], 0), axis=1)


@triton.jit
def _cps_kernel(tok_ptr, logq_ptr, valid_ptr, length_ptr, tail_ptr, path_ptr, score_ptr, K, lam, rest,
                o_keys, o_counts, o_ctx_keys, o_ctx_counts, o_ctx_types, o_key_off, o_ctx_off, o_iter, o_uniform,
                c_keys, c_counts, c_ctx_keys, c_ctx_counts, c_ctx_types, c_key_off, c_ctx_off, c_iter, c_uniform,
                w_c, w_o,
                M: tl.constexpr, M_P: tl.constexpr, WIDTH: tl.constexpr, W_P: tl.constexpr, H: tl.constexpr,
                H_P: tl.constexpr, K_P: tl.constexpr, O_P: tl.constexpr,
                O_ORDER: tl.constexpr, O_PER_ROW: tl.constexpr, O_KEYED: tl.constexpr, O_COMPACT: tl.constexpr,
                HAS_CORPUS: tl.constexpr, C_ORDER: tl.constexpr, C_PER_ROW: tl.constexpr,
                C_KEYED: tl.constexpr, C_COMPACT: tl.constexpr):
    b = tl.program_id(0)
    w = tl.arange(0, W_P)
    c = tl.arange(0, M_P)
    t = tl.arange(0, H_P)
    o = tl.arange(0, O_P)
    col = tl.arange(0, K_P)
    N_ORDERS: tl.constexpr = H + 1
    o_seg = b if O_PER_ROW else 0
    c_seg = b if C_PER_ROW else 0
    ok0 = tl.load(o_key_off + o_seg)
    ok1 = tl.load(o_key_off + o_seg + 1)
    oc0 = tl.load(o_ctx_off + o_seg)
    oc1 = tl.load(o_ctx_off + o_seg + 1)
    ck0 = tl.load(c_key_off + c_seg)
    ck1 = tl.load(c_key_off + c_seg + 1)
    cc0 = tl.load(c_ctx_off + c_seg)
    cc1 = tl.load(c_ctx_off + c_seg + 1)
    tail = tl.load(tail_ptr + b * H + t, mask=t < H, other=-1)                                 # [H]
    ctx = tl.zeros([W_P, H_P], tl.int64) + tail[None, :]                                       # [W, H]
    known = tl.zeros([W_P], tl.int32) + tl.sum((tail >= 0).to(tl.int32), axis=0)
    scores = tl.where(w == 0, 0.0, float("-inf"))
    paths = tl.zeros([W_P, K_P], tl.int64)
    steps = tl.minimum(tl.load(length_ptr + b), K)
    flat = w[:, None] * M + c[None, :]                                                          # [W, M]
    real = (w[:, None] < WIDTH) & (c[None, :] < M)
    for i in range(0, steps):
        base = (b * K + i).to(tl.int64) * M
        cand = tl.load(tok_ptr + base + c, mask=c < M, other=0)
        lq = tl.load(logq_ptr + base + c, mask=c < M, other=float("-inf"))
        ok = tl.load(valid_ptr + base + c, mask=c < M, other=0) != 0
        # context hashes per beam and order: (seed, j, the last j - 1 tokens, oldest first)
        usable = tl.minimum(known + 1, N_ORDERS)
        o_hash = tl.zeros([W_P, O_P], tl.int64)
        c_hash = tl.zeros([W_P, O_P], tl.int64)
        for j in tl.static_range(1, N_ORDERS + 1):
            ho = tl.zeros([W_P], tl.int64) + ((b + 1) * O_KEYED) * 1000003 + j
            hc = tl.zeros([W_P], tl.int64) + ((b + 1) * C_KEYED) * 1000003 + j
            for s in tl.static_range(H - (j - 1), H):
                tok = tl.sum(tl.where(t[None, :] == s, ctx, 0), axis=1) + 1
                ho = ho * 1000003 + tok
                hc = hc * 1000003 + tok
            o_hash = tl.where(o[None, :] == j - 1, ho[:, None], o_hash)
            c_hash = tl.where(o[None, :] == j - 1, hc[:, None], c_hash)
        p = _witten_bell(o_keys, o_counts, o_ctx_keys, o_ctx_counts, o_ctx_types, ok0, ok1, oc0, oc1, o_iter,
                         o_hash, usable, cand, o_uniform, O_ORDER, N_ORDERS, O_COMPACT, W_P, M_P, O_P)
        if HAS_CORPUS:
            pc = _witten_bell(c_keys, c_counts, c_ctx_keys, c_ctx_counts, c_ctx_types, ck0, ck1, cc0, cc1, c_iter,
                              c_hash, usable, cand, c_uniform, C_ORDER, N_ORDERS, C_COMPACT, W_P, M_P, O_P)
            p = w_c * pc + w_o * p
        step = lam * lq[None, :] + rest * tl.log(p)
        alive = (scores > float("-inf"))[:, None] & ok[None, :] & real
        total = tl.where(alive, scores[:, None] + step, float("-inf"))
        # the `width` best, best first; equal scores in flat-index order (the stable sort)
        taken = ~real
        new_scores = tl.full([W_P], float("-inf"), tl.float32)
        sel = tl.zeros([W_P], tl.int32)
        for r in tl.static_range(WIDTH):
            avail = tl.where(taken, float("-inf"), total)
            top = tl.max(tl.max(avail, axis=1), axis=0)
            hit = (avail == top) & ~taken
            at = tl.min(tl.min(tl.where(hit, flat, _BIG), axis=1), axis=0)
            taken = taken | (flat == at)
            new_scores = tl.where(w == r, top, new_scores)
            sel = tl.where(w == r, at, sel)
        parent = sel // M
        choice = sel % M
        token = tl.sum(tl.where(choice[:, None] == c[None, :], cand[None, :], 0), axis=1)          # [W]
        paths = _gather_rows(paths, parent, W_P)
        paths = tl.where(col[None, :] == i, token[:, None], paths)
        ctx = _gather_rows(ctx, parent, W_P)
        ctx = tl.where(t[None, :] == H - 1, token[:, None],
                       tl.sum(tl.where(t[None, :, None] + 1 == t[None, None, :], ctx[:, None, :], 0), axis=2))
        known = tl.minimum(tl.sum(tl.where(parent[:, None] == w[None, :], known[None, :], 0), axis=1) + 1, H)
        scores = new_scores
    best = tl.sum(tl.where(w[:, None] == 0, paths, 0), axis=0)                                  # [K]
    # positions past the lattice hold its best token
    top_tok = tl.load(tok_ptr + (b * K + col).to(tl.int64) * M, mask=col < K, other=0)
    tl.store(path_ptr + b * K + col, tl.where(col < steps, best, top_tok), mask=col < K)
    tl.store(score_ptr + b, tl.sum(tl.where(w == 0, scores, 0.0), axis=0))


# ---------------------------------------------------------------------------- wrapper
class TritonKernels(_Kernels):
    """The Triton path (CUDA tensors; CPU tensors under TRITON_INTERPRET=1)."""

    name = "triton"

    def __init__(self, device: torch.device | None = None) -> None:
        if device is None:
            if not torch.cuda.is_available():
                raise RuntimeError("no CUDA device")
            device = torch.device("cuda")
            major, _ = torch.cuda.get_device_capability(device)
            if major < 7:
                raise RuntimeError(f"compute capability {major}.x is below what Triton supports (7.0)")
        self.device = device
        self.add_ngrams = self.context_continuations = None
        try:  # the online proxy's counts and the retrieval scan run on the host: compiled when numba is there
            from .cpu import add_ngrams, context_continuations
            self.add_ngrams, self.context_continuations = add_ngrams, context_continuations
        except Exception:
            pass

    def prepare_table(self, table: FlatNGram, device: torch.device) -> dict:
        arrays = table.to(device)
        largest = int(np.diff(table.key_off).max(initial=0)), int(np.diff(table.ctx_off).max(initial=0))
        return {"arrays": arrays, "iter": max(1, math.ceil(math.log2(max(largest) + 1))), "order": table.order,
                "uniform": 1.0 / table.vocab_size, "per_row": table.per_row, "keyed": table.keyed,
                "compact": table.compact}

    def build_lattice(self, logq: torch.Tensor, k: torch.Tensor, eos_token_id: int | None,
                      cfg: LatticeConfig) -> Lattice:
        b, kmax, vocab = logq.shape
        dev = logq.device
        m = min(cfg.max_candidates, vocab)
        has_eos = eos_token_id is not None
        width = m + 1 if has_eos else m
        logq = logq.detach().float().contiguous()
        k = k.to(dev, torch.int64).contiguous()
        tokens = torch.empty(b, kmax, width, dtype=torch.int64, device=dev)
        out = torch.empty(b, kmax, width, dtype=torch.float32, device=dev)
        keep = torch.empty(b, kmax, width, dtype=torch.int8, device=dev)
        eos_here = torch.zeros(b, kmax, dtype=torch.int8, device=dev)
        length = torch.empty(b, dtype=torch.int64, device=dev)
        gen_len = torch.empty(b, dtype=torch.int64, device=dev)
        if b * kmax:
            eos = int(eos_token_id) if has_eos else -1
            _lattice_kernel[(b * kmax,)](logq, tokens, out, keep, eos_here, k, kmax, vocab, eos, cfg.mass,
                                         cfg.eos_min_prob, M=m, M_P=_pow2(m), WIDTH=width, HAS_EOS=has_eos,
                                         BLOCK=min(2048, _pow2(vocab)))
        if b:
            _lattice_finish_kernel[(b,)](tokens, out, keep, eos_here, k, length, gen_len, kmax,
                                         int(eos_token_id) if has_eos else -1, WIDTH=width, W_P=_pow2(width),
                                         K_P=_pow2(kmax), HAS_EOS=has_eos)
        return Lattice(tokens=tokens, logq=out, valid=keep.bool(), length=length, gen_len=gen_len)

    def search_path(self, lattice: Lattice, proxy: ProxyInputs, tail: torch.Tensor, cfg: CPSConfig,
                    return_scores: bool = False):
        b, kmax, m = lattice.tokens.shape
        dev = self.device  # a lattice built elsewhere (on the host, by the reference) is moved here
        lattice = Lattice(**{f.name: getattr(lattice, f.name).to(dev) for f in dataclasses.fields(lattice)})
        path = torch.zeros(b, kmax, dtype=torch.int64, device=dev)
        score = torch.zeros(b, dtype=torch.float32, device=dev)
        h = tail.shape[1]
        on = proxy.online if isinstance(proxy.online, dict) else self.prepare_table(proxy.online, dev)
        co = proxy.corpus
        if co is not None and not isinstance(co, dict):
            co = self.prepare_table(co, dev)
        corpus = co if co is not None else on   # a placeholder the kernel does not read
        if b and kmax:
            oa, ca = on["arrays"], corpus["arrays"]
            _cps_kernel[(b,)](
                lattice.tokens.contiguous(), lattice.logq.detach().float().contiguous(),
                lattice.valid.to(torch.int8).contiguous(), lattice.length.to(dev).contiguous(),
                tail.to(dev, torch.int64).contiguous(), path, score, kmax, cfg.lam, 1.0 - cfg.lam,
                oa["keys"], oa["counts"], oa["ctx_keys"], oa["ctx_counts"], oa["ctx_types"], oa["key_off"],
                oa["ctx_off"], on["iter"], on["uniform"],
                ca["keys"], ca["counts"], ca["ctx_keys"], ca["ctx_counts"], ca["ctx_types"], ca["key_off"],
                ca["ctx_off"], corpus["iter"], corpus["uniform"],
                proxy.corpus_weight, 1.0 - proxy.corpus_weight,
                M=m, M_P=_pow2(m), WIDTH=cfg.beam_width, W_P=_pow2(cfg.beam_width), H=h, H_P=_pow2(h),
                K_P=_pow2(kmax), O_P=_pow2(h + 1),
                O_ORDER=on["order"], O_PER_ROW=int(on["per_row"]), O_KEYED=int(on["keyed"]),
                O_COMPACT=int(on["compact"]), HAS_CORPUS=int(co is not None), C_ORDER=corpus["order"],
                C_PER_ROW=int(corpus["per_row"]), C_KEYED=int(corpus["keyed"]), C_COMPACT=int(corpus["compact"]))
        return (path, score) if return_scores else path
