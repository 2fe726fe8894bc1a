"""Property tests (hypothesis) of the round's small pure stages, against rules written here.

Each test states a property that a wrong implementation breaks, over random inputs:

- lattice: per position the candidate set is sorted, holds the argmax, is the smallest top set
  reaching the mass (or the size cap), keeps EOS by its rule, and nothing follows the first EOS;
- proxy: Witten-Bell probabilities sum to one over the vocabulary (numpy and torch alike);
- CPS: the path stays inside the lattice, is the per-position argmax at λ = 1, and is the
  best-scoring path when the beam is wide enough to hold every path;
- acceptance: greedy keeps the longest prefix equal to the target's argmax; sampling emits the
  target's own draws; over many rounds, with any drafts, the output equals plain decoding;
- text: incremental detokenizing, stop strings and the streamed text, with a byte-level
  tokenizer whose tokens split multi-byte characters at any byte;
- the ragged KV cache keeps each row's keys/values through select/extend/update;
- draft-length policies respect each row's room, inactive rows and the verify budget.

Runs are derandomized (the same examples every run) and kept small: the file takes seconds.
Tests marked ``xfail(strict=True)`` pin a bug found here, with its minimal example.
"""

from __future__ import annotations

import dataclasses
import itertools
from contextlib import nullcontext
from dataclasses import dataclass
from unittest import mock

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from diffuspec import cps
from diffuspec.config import ProxyConfig, DRAFT_LENGTH_POLICIES, ADLConfig, CPSConfig, LatticeConfig
from diffuspec.cps import _search_numpy, _search_torch, search_path
from diffuspec.detokenize import IncrementalText, StopFinder, TextStream
from diffuspec.kvcache import RaggedKVCache
from diffuspec.lattice import build_lattice
from diffuspec.policy import RoundOutcome, RoundView, make_policy, verify_budget
from diffuspec.proxy import CausalProxy, NGramModel
from diffuspec.scheduler import AcceptanceModel
from diffuspec.verify import accept_greedy, accept_sampling, position_uniforms, sample_at, warp_logits


def _settings(examples: int) -> settings:
    # derandomize: CI sees the same examples every run; no database: nothing written to the tree.
    return settings(max_examples=examples, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])


INF = float("inf")
# Logits from a coarse grid as well as the reals: ties and near-ties are where orderings break.
LOGIT = st.floats(-4, 4, width=32) | st.sampled_from([0.0, 1.0, -1.0])


@st.composite
def float_arrays(draw, shape: tuple[int, ...]) -> np.ndarray:
    """float32 ``shape``: either hypothesis's own values (ties, repeats, grid values: what
    shrinks to a readable example) or a seeded normal draw (all distinct: the typical input,
    which hypothesis's repetitive arrays seldom produce)."""
    if draw(st.booleans()):
        return draw(hnp.arrays(np.float32, shape, elements=LOGIT))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    return (rng.standard_normal(shape) * draw(st.sampled_from([0.5, 2.0]))).astype(np.float32)


# ====================================================================== lattice
@st.composite
def drafter_outputs(draw, max_rows=3, max_k=6, max_vocab=12, max_candidates=None, mass=None, eos_min_prob=None,
                    scales=(0.25, 1.0, 6.0), long=False):
    """(logq [B, k, V] normalised, k [B], eos id or None, LatticeConfig). Some ids may be
    impossible (-inf: the proposer masks the mask token and ids the target cannot emit).
    ``long``: rows tend to draft the full k, and EOS is rarer (lattices with several
    ambiguous positions, for the path search)."""
    rows, vocab = draw(st.integers(1, max_rows)), draw(st.integers(2, max_vocab))
    kmax = draw(st.integers(3, max_k) if long else st.integers(1, max_k))
    logits = draw(float_arrays((rows, kmax, vocab)))
    scale = draw(st.sampled_from(scales))  # flat, moderate and sharp positions
    masked = draw(hnp.arrays(np.bool_, (rows, kmax, vocab))) if draw(st.booleans()) else np.zeros_like(logits, bool)
    masked &= ~masked.all(-1, keepdims=True)  # at least one possible token per position
    logq = torch.from_numpy(np.where(masked, -np.inf, logits * scale).astype(np.float32)).log_softmax(-1)
    k = draw(st.lists(st.just(kmax) | st.integers(0, kmax) if long else st.integers(0, kmax), min_size=rows,
                      max_size=rows))
    if max(k) == 0:  # the proposer's contract: some row drafts (a round where none does proposes nothing)
        k[draw(st.integers(0, rows - 1))] = draw(st.integers(1, kmax))
    k = torch.tensor(k, dtype=torch.int64)
    eos = draw(st.none() | st.integers(0, vocab - 1))
    if long and draw(st.booleans()):
        eos = None
    mass = mass if mass is not None else st.floats(0.05, 1.0) | st.just(1.0)
    eos_min_prob = eos_min_prob if eos_min_prob is not None else st.floats(0.0, 1.0) | st.just(0.05)
    cap = st.integers(2 if long else 1, max_candidates or vocab + 1)
    cfg = LatticeConfig(mass=draw(mass), max_candidates=draw(cap), eos_min_prob=draw(eos_min_prob))
    return logq, k, eos, cfg


def _valid_tokens(lat, b: int, i: int) -> list[int]:
    return lat.tokens[b, i][lat.valid[b, i]].tolist()


@_settings(120)
@given(drafter_outputs())
def test_lattice_sets_follow_the_mass_cap_and_eos_rules(case):
    logq, k, eos, cfg = case
    lat = build_lattice(logq, k, eos, cfg)
    rows, kmax, vocab = logq.shape
    m = min(cfg.max_candidates, vocab)  # the columns of the mass/cap set; an EOS column may follow
    assert torch.equal(lat.argmax_path(), lat.tokens[:, :, 0])
    for b in range(rows):
        n = int(lat.length[b])
        assert 0 <= n <= int(k[b]), "a path never exceeds its row's draft length"
        assert not lat.valid[b, n:].any(), f"row {b}: candidates after the lattice's end {n}"
        for i in range(n):
            valid, toks = lat.valid[b, i], lat.tokens[b, i]
            kept = _valid_tokens(lat, b, i)
            q = logq[b, i]
            assert len(set(kept)) == len(kept), f"duplicate candidates {kept}"
            assert torch.equal(lat.logq[b, i][valid], q[toks[valid]]), "candidates carry the drafter's log q"
            assert bool(torch.isneginf(lat.logq[b, i][~valid]).all())
            # sorted best first, the argmax first
            assert valid[0] and q[toks[0]] == q.max()
            kept_logq = lat.logq[b, i][valid]
            assert bool((kept_logq[:-1] >= kept_logq[1:]).all()), f"not sorted: {kept_logq.tolist()}"
            # the mass/cap set: a prefix of the top-m columns, the smallest reaching `mass`
            top = valid[:m]
            size = int(top.sum())
            assert bool(top[:size].all()), f"mass set is not a top prefix: {top.tolist()}"
            p = q[toks[:size]].double().exp()
            if size < m:
                assert float(p.sum()) >= cfg.mass - 1e-5, (p.tolist(), cfg.mass)
            assert float(p[:-1].sum()) < cfg.mass + 1e-5, f"not the smallest set: {p.tolist()} for mass {cfg.mass}"
            if eos is None:
                continue
            # EOS: kept when in the mass set or when q(EOS) reaches eos_min_prob
            p_eos = float(q[eos].double().exp())
            in_mass, has_eos = eos in toks[:m][top].tolist(), eos in kept
            if p_eos >= cfg.eos_min_prob + 1e-6:
                assert has_eos, f"q(EOS)={p_eos} >= {cfg.eos_min_prob} but EOS is not kept"
            if p_eos < cfg.eos_min_prob - 1e-6 and not in_mass:
                assert not has_eos
            if i < n - 1:
                assert not has_eos, f"row {b}: EOS at {i}, but the lattice goes on to {n}"
        if eos is not None and n < int(k[b]):
            assert eos in _valid_tokens(lat, b, n - 1), f"row {b} cut at {n} without an EOS there"
        # L_gen: the raw argmax draft up to its first EOS
        g = int(lat.gen_len[b])
        assert 0 <= g <= int(k[b])
        if eos is not None:
            assert eos not in lat.tokens[b, :g, 0].tolist()
            if g < int(k[b]):
                assert int(lat.tokens[b, g, 0]) == eos and logq[b, g, eos] == logq[b, g].max()
        else:
            assert g == int(k[b])


@pytest.mark.xfail(strict=True, reason="BUG: with mass=1.0 the float32 cumulative mass of the possible tokens "
                   "rounds below 1.0, so build_lattice also keeps impossible tokens (q = 0, log q = -inf, e.g. "
                   "the masked mask token); with CPS lam=0 the torch search then takes one (0·-inf = NaN, which "
                   "topk ranks first). Minimal: logits [0, 0, 0, -inf], mass=1.0, max_candidates=4 keeps token 3.")
@_settings(60)
@given(drafter_outputs(max_rows=1, max_k=2, max_vocab=8, mass=st.just(1.0), eos_min_prob=st.just(0.5)))
@example((torch.tensor([[[0.0, 0.0, 0.0, -INF]]]).log_softmax(-1), torch.tensor([1]), None,
          LatticeConfig(mass=1.0, max_candidates=4)))
def test_lattice_keeps_only_possible_tokens(case):
    logq, k, eos, cfg = case
    lat = build_lattice(logq, k, eos, cfg)
    kept = lat.logq[lat.valid]
    assert bool(torch.isfinite(kept).all()), f"a kept candidate has q = 0: {lat.tokens[lat.valid].tolist()}"


# ====================================================================== proxy
@st.composite
def proxies(draw, rows: int, vocab: int, min_order: int = 2):
    """(CausalProxy, prefix tail [rows, order-1] with -1 before the start): an online model
    fitted on random short prefixes over a small alphabet (so it has opinions), sometimes
    mixed with a pooled corpus table of another order. The proxy's order is at least 2 (an
    order-1 proxy fails on a CPU: see the xfail below)."""
    order = draw(st.integers(min_order, 4))
    t = draw(st.sampled_from([32, 16]) | st.integers(1, 32))  # long prefixes: contexts with counts
    # A repeated motif, some of it replaced by random tokens: the n-gram counts favour some
    # continuations strongly, and contexts differ.
    motif = draw(st.lists(st.integers(0, vocab - 1), min_size=1, max_size=4))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    noisy = rng.random((rows, t)) < draw(st.sampled_from([1.0, 0.3, 0.0]))
    repeated = np.resize(np.array(motif), t)[None, :]
    prefix = torch.from_numpy(np.where(noisy, rng.integers(0, vocab, (rows, t)), repeated))
    lengths = torch.tensor(draw(st.lists(st.just(t) | st.integers(1, t), min_size=rows, max_size=rows)),
                           dtype=torch.int64)
    online = NGramModel.fit(prefix, lengths, order, vocab)
    corpus = None
    if draw(st.booleans()):
        corpus = NGramModel.from_corpus(prefix.tolist(), order=draw(st.integers(1, 4)), vocab_size=vocab)
    proxy = CausalProxy(online, corpus, draw(st.sampled_from([0.0, 0.3, 1.0])) if corpus else 0.5)
    hist = proxy.order - 1
    idx = lengths[:, None] - hist + torch.arange(hist)[None, :]  # as diffuspec.propose builds it
    tail = torch.where(idx >= 0, prefix.gather(1, idx.clamp(min=0)), torch.full_like(idx, -1))
    return proxy, tail


@_settings(60)
@given(st.data())
def test_proxy_is_a_distribution_over_the_vocabulary(data):
    """Witten-Bell interpolation is normalised: Σ_w p(w | context) = 1 for every row and
    context, seen or not, short or padded with -1; the numpy and torch scorers agree."""
    rows, vocab = data.draw(st.integers(1, 3)), data.draw(st.integers(2, 9))
    proxy, _ = data.draw(proxies(rows, vocab))
    c = data.draw(st.integers(1, 4))
    known = data.draw(st.lists(st.integers(0, c), min_size=rows, max_size=rows))  # -1 pads the oldest end only
    ctx = torch.tensor(data.draw(hnp.arrays(np.int64, (rows, c), elements=st.integers(0, vocab - 1))))
    ctx = torch.where(torch.arange(c)[None, :] < c - torch.tensor(known)[:, None], -1, ctx)
    cand = torch.arange(vocab).expand(rows, vocab)
    lp = proxy.logprob(torch.arange(rows), ctx, cand)  # CPU: the numpy scorer
    assert torch.allclose(lp.exp().sum(-1), torch.ones(rows), atol=1e-4), lp.exp().sum(-1)
    for model in (proxy.online, proxy.corpus):
        if model is not None:
            via_torch = model._logprob_torch(torch.arange(rows), ctx, cand)
            assert torch.allclose(model.logprob(torch.arange(rows), ctx, cand), via_torch, atol=1e-5)


def test_a_unigram_proxy_is_refused_with_the_valid_orders():
    """An order-1 proxy has no context (its CPU scorer cannot run on one): the config
    refuses it, naming the valid range."""
    with pytest.raises(ValueError, match="must be in 2..5"):
        ProxyConfig(order=1)


# ====================================================================== CPS
# At λ = 0 the CPU search multiplies the -inf of invalid lattice cells by 0 before masking
# them (cps.py, drafter_term): numpy warns; the NaNs are masked away.
_LAM_ZERO_NAN = pytest.mark.filterwarnings("ignore:invalid value encountered in multiply:RuntimeWarning")


def _path_scores(lat, proxy, tail, lam: float, b: int, cols: np.ndarray) -> np.ndarray:
    """S(π) of eq. 5 for paths given as lattice columns ``cols [P, n]`` of row b, scored here
    path by path (IEEE arithmetic: 0·(-inf) is NaN, as in the search)."""
    p, n = cols.shape
    hist = proxy.order - 1
    tokens = lat.tokens[b].numpy()[np.arange(n), cols]                                  # [P, n]
    seq = np.concatenate([np.broadcast_to(tail[b].numpy()[tail.shape[1] - hist:], (p, hist)), tokens], axis=1)
    score = np.zeros(p)
    with np.errstate(invalid="ignore"):
        for i in range(n):
            proxy_lp = proxy.logprob_numpy(np.full(p, b), seq[:, i: i + hist], tokens[:, i: i + 1])[:, 0]
            score += lam * lat.logq[b].numpy()[i, cols[:, i]].astype(np.float64) + (1 - lam) * proxy_lp
    return score


@st.composite
def cps_cases(draw, max_rows=3, max_k=5, max_vocab=9, max_candidates=4, min_order=2):
    # eos_min_prob > 0 and mass < 1: every kept candidate is possible (see the xfail above).
    logq, k, eos, lcfg = draw(drafter_outputs(max_rows=max_rows, max_k=max_k, max_vocab=max_vocab,
                                              max_candidates=max_candidates,
                                              mass=st.floats(0.8, 0.99), eos_min_prob=st.floats(0.01, 1.0),
                                              scales=(0.25, 1.0), long=True))
    proxy, tail = draw(proxies(logq.shape[0], logq.shape[2], min_order))
    return build_lattice(logq, k, eos, lcfg), proxy, tail


@_LAM_ZERO_NAN
@_settings(50)
@given(cps_cases(), st.integers(1, 4), st.sampled_from([0.0, 0.3, 0.5, 1.0]))
def test_cps_path_stays_in_the_lattice(case, width, lam):
    lat, proxy, tail = case
    cfg = CPSConfig(beam_width=width, lam=lam)
    for search in (_search_numpy, _search_torch):
        path = search(lat, proxy, tail, cfg)
        assert path.shape == lat.tokens.shape[:2]
        for b in range(path.shape[0]):
            for i in range(int(lat.length[b])):
                assert int(path[b, i]) in _valid_tokens(lat, b, i), (search.__name__, b, i)


@_settings(50)
@given(cps_cases(), st.integers(1, 4))
def test_cps_with_lambda_one_is_the_argmax_path(case, width):
    """λ = 1 scores the drafter alone, position by position: the best path is the per-position
    argmax. The CPU search keeps the earlier of equal scores, so it returns column 0 exactly;
    the torch search may break a tie the other way, so it is held to the argmax's score."""
    lat, proxy, tail = case
    cfg = CPSConfig(beam_width=width, lam=1.0)
    cpu, dev = search_path(lat, proxy, tail, cfg), _search_torch(lat, proxy, tail, cfg)
    assert torch.equal(search_path(lat, proxy, tail, CPSConfig(enabled=False)), lat.argmax_path())
    for b in range(cpu.shape[0]):
        n = int(lat.length[b])
        assert cpu[b, :n].tolist() == lat.tokens[b, :n, 0].tolist()
        hit = (lat.tokens[b, :n] == dev[b, :n, None]) & lat.valid[b, :n]                    # [n, M]
        got = lat.logq[b, :n].masked_fill(~hit, -INF).max(-1).values
        assert torch.equal(got, lat.logq[b, :n, 0]), (dev[b, :n].tolist(), lat.tokens[b, :n, 0].tolist())


@_LAM_ZERO_NAN
@_settings(100)
@given(cps_cases(max_rows=2, max_k=5, max_vocab=4, max_candidates=3) | cps_cases(max_rows=1, max_vocab=4, min_order=3),
       st.sampled_from([0.3, 0.5, 0.8, 0.0]), st.booleans())
def test_cps_with_a_wide_beam_finds_the_best_path(case, lam, stepwise):
    """With a beam as wide as the number of paths nothing is pruned: the returned path's score
    S(π) (eq. 5, recomputed here path by path) is the maximum over every path in the lattice.
    ``stepwise``: the CPU search scores each step's beam contexts instead of tabulating the
    proxy over the lattice's contexts (its path for long contexts or big lattices)."""
    lat, proxy, tail = case
    counts = [[int(lat.valid[b, i].sum()) for i in range(int(lat.length[b]))] for b in range(lat.tokens.shape[0])]
    width = max([int(np.prod(c)) for c in counts] + [1])
    cfg = CPSConfig(beam_width=width, lam=lam)
    for search in (_search_numpy, _search_torch):
        with mock.patch.object(cps, "_proxy_table", lambda *args, **kwargs: None) if stepwise else nullcontext():
            path = search(lat, proxy, tail, cfg)
        for b, c in enumerate(counts):
            if not c:
                continue
            options = [torch.nonzero(lat.valid[b, i]).flatten().tolist() for i in range(len(c))]
            every = np.array(list(itertools.product(*options)), np.int64)                    # [P, n] columns
            scores = _path_scores(lat, proxy, tail, lam, b, every)
            chosen = [int(torch.nonzero((lat.tokens[b, i] == path[b, i]) & lat.valid[b, i])[0]) for i in range(len(c))]
            got = _path_scores(lat, proxy, tail, lam, b, np.array([chosen]))[0]
            best = np.nanmax(scores)
            assert got >= best - 1e-3 * (1 + abs(best)), (search.__name__, b, got, best)


@_LAM_ZERO_NAN
@_settings(60)
@given(cps_cases(max_k=4, max_vocab=7, max_candidates=3), st.sampled_from([0.3, 0.5, 0.8, 0.0]))
def test_cps_with_width_one_is_greedy_left_to_right(case, lam):
    """Beam width 1 commits at each position to the candidate with the best step score
    λ·log q + (1-λ)·log p_proxy given the path so far."""
    lat, proxy, tail = case
    cfg = CPSConfig(beam_width=1, lam=lam)
    for search in (_search_numpy, _search_torch):
        path = search(lat, proxy, tail, cfg)
        for b in range(path.shape[0]):
            chosen: list[int] = []
            for i in range(int(lat.length[b])):
                options = torch.nonzero(lat.valid[b, i]).flatten().tolist()
                # score each option as the last step of a path: S(prefix + option) - S(prefix) is its step score
                paths = np.array([chosen + [c] for c in options], np.int64)
                step = _path_scores(lat, proxy, tail, lam, b, paths)
                col = int(torch.nonzero((lat.tokens[b, i] == path[b, i]) & lat.valid[b, i])[0])
                got = step[options.index(col)]
                assert got >= np.nanmax(step) - 1e-4 * (1 + abs(np.nanmax(step))), (search.__name__, b, i)
                chosen.append(col)


# ====================================================================== acceptance
@st.composite
def verify_cases(draw, max_rows=3, max_k=5, max_vocab=8):
    """(target logits [B, k+1, V], path [B, k], path_len [B]); path tokens are either the
    target's argmax (so long accepted prefixes occur) or arbitrary."""
    rows, k, vocab = draw(st.integers(1, max_rows)), draw(st.integers(0, max_k)), draw(st.integers(2, max_vocab))
    logits = torch.from_numpy(draw(float_arrays((rows, k + 1, vocab))))
    other = torch.tensor(draw(hnp.arrays(np.int64, (rows, k), elements=st.integers(0, vocab - 1))))
    agree = torch.tensor(draw(hnp.arrays(np.bool_, (rows, k), elements=st.booleans() | st.just(True))))
    path = torch.where(agree, logits[:, :k].argmax(-1), other)
    path_len = torch.tensor(draw(st.lists(st.integers(0, k), min_size=rows, max_size=rows)), dtype=torch.int64)
    return logits, path, path_len


@_settings(100)
@given(verify_cases())
def test_greedy_acceptance_keeps_the_longest_argmax_prefix(case):
    """Greedy acceptance keeps the longest prefix of the path (within its length) that equals
    the target's argmax, then emits the argmax at the next position (correction or bonus)."""
    logits, path, path_len = case
    n, nxt = accept_greedy(logits, path, path_len)
    best = logits.argmax(-1)
    for b in range(path.shape[0]):
        want = 0
        while want < int(path_len[b]) and path[b, want] == best[b, want]:
            want += 1
        assert int(n[b]) == want
        emitted = path[b, :want].tolist() + [int(nxt[b])]
        assert emitted == best[b, : want + 1].tolist()
        # independently of argmax's tie rule: every emitted token has its position's top logit
        assert all(logits[b, i, t] == logits[b, i].max() for i, t in enumerate(emitted))


WARPS = st.tuples(st.sampled_from([0.3, 0.7, 1.0, 1.5]), st.none() | st.integers(1, 6),
                  st.none() | st.sampled_from([0.5, 0.9, 0.95, 1.0]))
# Uniforms on position_uniforms' grid: multiples of 2^-53 in [0, 1), the ends included.
UNIFORM = st.integers(0, 2**53 - 1).map(lambda m: m / 2**53) | st.sampled_from([0.0, 2**-53, 0.5, 1 - 2**-53])


@_settings(100)
@given(verify_cases(), WARPS, st.data())
def test_sampled_acceptance_emits_the_targets_own_draws(case, warp, data):
    """Each emitted token is the target's inverse-CDF draw at its position, computed here one
    position at a time: the drafts only decide how many positions one round gets through."""
    logits, path, path_len = case
    rows, k1, _ = logits.shape
    u = torch.tensor(data.draw(hnp.arrays(np.float64, (rows, k1), elements=UNIFORM)))
    n, nxt = accept_sampling(logits, path, path_len, *warp, u)
    for b in range(rows):
        own = [int(sample_at(warp_logits(logits[b, i], *warp), u[b, i])) for i in range(k1)]
        nb = int(n[b])
        assert nb <= int(path_len[b])
        assert path[b, :nb].tolist() + [int(nxt[b])] == own[: nb + 1]
        if nb < int(path_len[b]):
            assert int(path[b, nb]) != own[nb], "a draft equal to the target's draw was rejected"


@_settings(150)
@given(st.integers(1, 9).flatmap(lambda v: float_arrays((v,))), WARPS, UNIFORM)
def test_sample_at_is_the_inverse_cdf(logits, warp, u):
    """The drawn token t is where u · total mass falls in the cumulative distribution
    (cdf[t-1] <= u · total <= cdf[t]; which side an exact boundary goes is the code's choice),
    and it has positive probability, at u = 0 too."""
    probs = warp_logits(torch.from_numpy(logits), *warp)
    t = int(sample_at(probs, torch.tensor(u, dtype=torch.float64)))
    assert probs[t] > 0, f"drew token {t} of probability 0 from {probs.tolist()} at u={u}"
    cdf = probs.double().cumsum(0)
    x = u * float(cdf[-1])
    assert (t == 0 or float(cdf[t - 1]) <= x) and x <= float(cdf[t])


@_settings(150)
@given(st.integers(1, 9).flatmap(lambda v: float_arrays((v,))), WARPS)
def test_warp_logits_keeps_the_smallest_top_set_in_proportion(logits, warp):
    """Temperature, top-k, top-p: the result is a distribution over the k best logits, in the
    proportions of softmax(logits / T), cut to the smallest most-probable set whose mass
    (after top-k) reaches top_p (equal probabilities may be cut either way)."""
    temperature, top_k, top_p = warp
    probs = warp_logits(torch.from_numpy(logits), *warp).double()
    x = torch.from_numpy(logits) / temperature                            # float32, as the library scales
    kth = x.sort(descending=True).values[min(top_k or len(x), len(x)) - 1]
    in_top_k = x >= kth
    q = x.masked_fill(~in_top_k, -INF).softmax(-1).double()              # what the top-p cut ranks
    kept = probs > 0
    assert abs(float(probs.sum()) - 1) < 1e-5 and bool(kept.any())
    assert bool(in_top_k[kept].all()), "kept a token outside the top k"
    ref = (x[kept].double() - x[kept].double().max()).exp()
    assert torch.allclose(probs[kept], ref / ref.sum(), rtol=1e-4, atol=1e-7)
    if top_p is None or top_p >= 1.0:
        assert torch.equal(kept, in_top_k)
        return
    if not bool(kept[in_top_k].all()):
        assert q[in_top_k & ~kept].max() <= q[kept].min(), "dropped a more probable token than one kept"
    mass = float(q[kept].sum())
    assert mass >= top_p - 1e-5 or bool(kept[in_top_k].all())
    assert mass - float(q[kept].min()) < top_p + 1e-5, "not the smallest set reaching top_p"


def test_sample_at_never_draws_a_zero_probability_token_at_u_zero():
    """Regression (found by these tests): at u = 0 the draw took token 0 even when top-k/top-p
    had zeroed it, and position_uniforms gave u = 0 for seed 0, request 0, position 0."""
    assert int(sample_at(torch.tensor([0.0, 1.0]), torch.tensor(0.0, dtype=torch.float64))) == 1
    assert int(sample_at(torch.tensor([0.0, 0.0, 0.3, 0.0, 0.7, 0.0]), torch.tensor(0.0, dtype=torch.float64))) == 2


def _splitmix64_uniform(seed: int, request: int, position: int) -> float:
    """position_uniforms' rule on Python integers (unsigned 64-bit arithmetic by masking)."""
    mask = (1 << 64) - 1
    x = (seed * 0xD1B54A32D192ED03 + request * 0x9E3779B97F4A7C15 + position * 0xBF58476D1CE4E5B9
         + 0x2545F4914F6CDD1D) & mask
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & mask
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & mask
    return ((x ^ (x >> 31)) >> 11) / 2**53


@_settings(100)
@given(st.integers(-2**63, 2**64 - 1), hnp.arrays(np.int64, st.integers(1, 4), elements=st.integers(0, 2**40)),
       st.integers(0, 2**40), st.integers(1, 6), st.integers(0, 5))
@example(seed=0, request=np.array([0]), start=0, n=1, cut=0)  # the all-zero key: once u = 0 (the mixer's fixed point)
def test_position_uniforms_are_counter_based(seed, request, start, n, cut):
    """A draw depends on (seed, request, position) only: asking for positions in one call or
    in pieces gives the same uniforms, all in [0, 1), and they are the splitmix64 stream
    computed here on Python integers."""
    request = torch.from_numpy(request)
    pos = start + torch.arange(n)[None, :].expand(len(request), n)
    u = position_uniforms(seed, request, pos)
    assert u.dtype == torch.float64 and bool(((u >= 0) & (u < 1)).all())
    cut = min(cut, n)
    pieces = torch.cat([position_uniforms(seed, request, pos[:, :cut]),
                        position_uniforms(seed, request, pos[:, cut:])], dim=1)
    assert torch.equal(u, pieces)
    one = torch.stack([position_uniforms(seed, request[r: r + 1], pos[r: r + 1])[0] for r in range(len(request))])
    assert torch.equal(u, one)
    # the stream itself: torch's wrapping int64 arithmetic computes the unsigned splitmix64 mix,
    # so a seed gives the same draws on every device and version
    want = [[_splitmix64_uniform(seed, int(r), int(p)) for p in row] for r, row in zip(request, pos)]
    assert u.tolist() == want


@_settings(60)
@given(st.data())
def test_speculative_rounds_reproduce_plain_decoding(data):
    """Exactness over many rounds, at the acceptance level: a bigram target (logits of the next
    token = T[previous token]) decodes B requests plainly, one token a round; then again with
    drafts of random lengths whose tokens are sometimes right and sometimes not, junk past each
    row's path length, and acceptance by the engine's rules (greedy, or sampling with the
    uniforms of (seed, request, output position)). Both give the same tokens."""
    vocab = data.draw(st.integers(2, 8))
    table = torch.from_numpy(data.draw(float_arrays((vocab, vocab)))) * 3
    rows = data.draw(st.integers(1, 3))
    start = data.draw(st.lists(st.integers(0, vocab - 1), min_size=rows, max_size=rows))
    greedy = data.draw(st.booleans())
    warp = data.draw(WARPS)
    seed = data.draw(st.integers(0, 2**62))
    request = torch.tensor(data.draw(st.lists(st.integers(0, 50), min_size=rows, max_size=rows, unique=True)))
    new = 12

    def next_token(prev: int, b: int, pos: int) -> int:  # plain decoding's token at output position pos
        if greedy:
            return int(table[prev].argmax())
        u = position_uniforms(seed, request[b: b + 1], torch.tensor([[pos]]))[0, 0]
        return int(sample_at(warp_logits(table[prev], *warp), u))

    plain = []
    for b in range(rows):
        out = [start[b]]
        for pos in range(new + 8):
            out.append(next_token(out[-1], b, pos))
        plain.append(out[1:])

    spec = [[] for _ in range(rows)]
    while min(map(len, spec)) < new:
        kmax = data.draw(st.integers(0, 5))
        path_len = torch.tensor(data.draw(st.lists(st.integers(0, kmax), min_size=rows, max_size=rows)))
        path = torch.zeros(rows, kmax, dtype=torch.int64)
        for b in range(rows):
            for j in range(kmax):
                right = j < path_len[b] and len(spec[b]) + j < len(plain[b]) and data.draw(st.booleans())
                path[b, j] = plain[b][len(spec[b]) + j] if right else data.draw(st.integers(0, vocab - 1))
        last = torch.tensor([(s[-1] if s else start[b]) for b, s in enumerate(spec)])
        logits = table[torch.cat([last[:, None], path], 1)]                                # [B, kmax+1, V]
        if greedy:
            n, nxt = accept_greedy(logits, path, path_len)
        else:
            emitted = torch.tensor([len(s) for s in spec])
            u = position_uniforms(seed, request, emitted[:, None] + torch.arange(kmax + 1)[None, :])
            n, nxt = accept_sampling(logits, path, path_len, *warp, u)
        for b in range(rows):
            spec[b] += path[b, : int(n[b])].tolist() + [int(nxt[b])]
    for b in range(rows):
        assert spec[b][:new] == plain[b][:new], (b, spec[b], plain[b])


# ====================================================================== text
ALPHABET = "ab x\né日😀"  # characters of 1, 2, 3 and 4 UTF-8 bytes


@dataclass
class TokenStream:
    """A byte-level tokenizer in miniature and a generation through it: token i is the byte
    string ``pieces[i]`` (b"": a special token, which decodes to nothing as under
    skip_special_tokens); ``rounds`` are how many tokens each round adds; ``stops`` the stop
    strings."""

    pieces: list[bytes]
    rounds: list[int]
    stops: tuple[str, ...]

    def decode(self, ids) -> str:  # byte-level BPE decoding: an incomplete character shows as U+FFFD
        return b"".join(self.pieces[i] for i in ids).decode("utf-8", errors="replace")

    def round_ends(self) -> list[int]:
        return list(itertools.accumulate(self.rounds))


def _is_char_boundary(data: bytes) -> bool:
    try:
        data.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


@st.composite
def token_streams(draw, whole_chars_per_round: bool = False, max_stops: int = 3):
    text = draw(st.text(alphabet=ALPHABET, max_size=14))
    data = text.encode()
    cuts = sorted(draw(st.sets(st.integers(1, len(data) - 1), max_size=len(data)))) if len(data) > 1 else []
    pieces = [data[a:b] for a, b in zip([0] + cuts, cuts + [len(data)]) if a < b]
    for _ in range(draw(st.integers(0, 2))):  # special tokens anywhere
        pieces.insert(draw(st.integers(0, len(pieces))), b"")
    if not pieces:
        pieces = [b""]
    rounds, left = [], len(pieces)
    while left:
        rounds.append(draw(st.integers(1, min(left, 4))))
        left -= rounds[-1]
    if whole_chars_per_round:  # merge rounds until each ends on a character boundary
        merged, size = [], 0
        for end, r in zip(itertools.accumulate(rounds), rounds):
            size += r
            if _is_char_boundary(b"".join(pieces[:end])):
                merged.append(size)
                size = 0
        rounds = merged
    some_text = st.text(alphabet=ALPHABET, min_size=1, max_size=3)
    if text:  # stop strings that occur (substrings of the text) as well as ones that may not
        i = draw(st.integers(0, len(text) - 1))
        some_text = some_text | st.just(text[i: draw(st.integers(i + 1, min(len(text), i + 4)))])
    stops = tuple(draw(st.lists(some_text, min_size=1, max_size=max_stops)))
    return TokenStream(pieces, rounds, stops)


def _stop_token_by_token(s: TokenStream, ids: list[int]) -> tuple[int, int] | None:
    """Stop strings as plain decoding meets them, one token a round: the fewest tokens whose
    text holds a stop string, and the text kept before the earliest one in that text."""
    for n in range(1, len(ids) + 1):
        text = s.decode(ids[:n])
        starts = [text.find(stop) for stop in s.stops if stop in text]
        if starts:
            return n, min(starts)
    return None


@_settings(100)
@given(token_streams())
def test_incremental_text_equals_full_decode(s):
    """Pieces emitted round by round are whole characters, each a continuation of the text so
    far, and with the final flush they are exactly the decoded output."""
    inc = IncrementalText(s.decode)
    pieces, ids = [], list(range(len(s.pieces)))
    for a, b in zip([0] + s.round_ends(), s.round_ends()):
        piece = inc.extend(ids[a:b])
        assert "\ufffd" not in piece, f"an incomplete character was emitted: {piece!r}"
        pieces.append(piece)
        assert s.decode(ids[:b]).startswith("".join(pieces))
    pieces.append(inc.flush())
    assert "".join(pieces) == s.decode(ids) == inc.text


def _check_stop_finder(s: TokenStream) -> None:
    """StopFinder, fed round by round, answers as the token-by-token search does: no hit
    before the round that completes the first stop string, then the same (tokens, chars)."""
    finder = StopFinder(s.stops, s.decode)
    out: list[int] = []
    want = _stop_token_by_token(s, list(range(len(s.pieces))))
    for a, b in zip([0] + s.round_ends(), s.round_ends()):
        out.extend(range(a, b))
        hit = finder.find(out, b - a)
        if want is None or want[0] > b:
            assert hit is None, f"stop reported at {hit} after {b} tokens; token by token: {want}"
            continue
        assert hit == want, f"round ending at token {b}: {hit}, token by token: {want}"
        kept = s.decode(out[: hit[0]])
        assert not any(stop in kept[: hit[1]] for stop in s.stops)
        assert any(kept[hit[1]:].startswith(stop) for stop in s.stops)
        return
    assert want is None


@_settings(150)
@given(token_streams(whole_chars_per_round=True, max_stops=1))
def test_stop_finder_equals_token_by_token_search(s):
    """One stop string, rounds ending on whole characters (tokens may still split them)."""
    _check_stop_finder(s)


@_settings(100)
@given(token_streams(max_stops=1))
@example(TokenStream([b"x", b"\xf0", b"\x9f\x98\x80"], [2, 1], ("x",)))
def test_stop_finder_sees_stops_before_an_incomplete_character(s):
    _check_stop_finder(s)


@_settings(100)
@given(token_streams(whole_chars_per_round=True))
@example(TokenStream([b"a", b"b", b"c"], [3], ("abc", "b")))
def test_stop_finder_with_several_stop_strings_equals_token_by_token_search(s):
    _check_stop_finder(s)


@_settings(150)
@given(token_streams())
def test_text_stream_never_releases_what_a_stop_string_cuts(s):
    """The API's streaming loop, with stop strings found as plain decoding finds them: the
    released deltas are whole characters, join to exactly the final text (so nothing released
    is later cut), and hold back no more than a stop string's length."""
    stream = TextStream(s.decode, s.stops)
    longest = max(map(len, s.stops))
    deltas, out = [], []
    for a, b in zip([0] + s.round_ends(), s.round_ends()):
        out.extend(range(a, b))
        hit = _stop_token_by_token(s, out)
        if hit is not None or b == len(s.pieces):  # the request ends: a stop string, or its last token
            final = s.decode(out) if hit is None else s.decode(out[: hit[0]])[: hit[1]]
            deltas.append(stream.finish(final))
            break
        delta = stream.update(out)
        assert "\ufffd" not in delta and delta.encode("utf-8").decode("utf-8") == delta
        deltas.append(delta)
        assert stream.sent >= len(stream.text.text) - (longest - 1), "held back more than a stop prefix"
    assert "".join(deltas) == final


# ====================================================================== KV cache
HEADS, HEAD_DIM = 2, 3


def _filled_cache(batch: int, layers: int, capacity: int, seed: int) -> RaggedKVCache:
    """A cache whose every slot holds a distinct value (``layers`` layers written)."""
    cache = RaggedKVCache(batch, capacity)
    cache.write_pos = torch.arange(capacity).expand(batch, capacity)
    cache.visible = capacity
    g = torch.Generator().manual_seed(seed)
    for layer in range(layers):
        k, v = torch.randn(2, batch, HEADS, capacity, HEAD_DIM, generator=g)
        cache.update(k, v, layer)
    return cache


def _rows(cache: RaggedKVCache) -> list[list[tuple[torch.Tensor, torch.Tensor] | None]]:
    """Per row, per layer: (keys, values) [kv_heads, capacity, head_dim], None if unwritten."""
    return [[None if cache.keys[layer] is None else (cache.keys[layer][r].clone(), cache.values[layer][r].clone())
             for layer in range(len(cache.keys))] for r in range(cache.batch)]


def _same_rows(cache: RaggedKVCache, want) -> None:
    assert cache.batch == len(want)
    for layer in range(len(cache.keys)):
        buf = cache.keys[layer]
        if buf is None:
            assert all(layer >= len(row) or row[layer] is None for row in want)
            continue
        assert buf.shape[0] == cache.batch and cache.values[layer].shape == buf.shape
        for r, row in enumerate(want):
            kv = row[layer] if layer < len(row) else None
            for got, ref in zip((cache.keys[layer][r], cache.values[layer][r]), kv or (None, None)):
                assert torch.equal(got, ref if ref is not None else torch.zeros_like(got)), (layer, r)


@_settings(100)
@given(st.integers(1, 5), st.integers(0, 4), st.integers(0, 3),
       st.lists(st.tuples(st.booleans(), st.integers(0, 4), st.integers(0, 3), st.randoms(use_true_random=False)),
                max_size=6))
def test_ragged_cache_select_and_extend_keep_each_rows_contents(capacity, batch, layers, ops):
    """Rows leave (select, any subset in any order) and join (extend, with more or fewer
    layers written, or none): every row keeps its own keys/values, a row without a layer
    reads zeros there."""
    cache = _filled_cache(batch, layers, capacity, seed=0)
    want = _rows(cache)
    for step, (is_select, n, more_layers, rnd) in enumerate(ops, start=1):
        if is_select:
            index = rnd.sample(range(cache.batch), min(n, cache.batch))
            cache.select(torch.tensor(index, dtype=torch.int64))
            want = [want[i] for i in index]
        else:
            other = _filled_cache(n, more_layers, capacity, seed=step)
            want = want + _rows(other)
            cache.extend(other)
        _same_rows(cache, want)


@_settings(100)
@given(st.integers(2, 8), st.integers(1, 3), st.integers(1, 4), st.data())
def test_ragged_cache_update_writes_each_row_at_its_own_columns(capacity, batch, n, data):
    """A pass writes row b's n new keys/values at its own columns write_pos[b] (from its own
    length), leaves every other column as it was, and returns the first ``visible`` columns."""
    cache = _filled_cache(batch, 1, capacity, seed=0)
    before = cache.keys[0].clone(), cache.values[0].clone()
    start = torch.tensor(data.draw(st.lists(st.integers(0, capacity - 1), min_size=batch, max_size=batch)))
    cache.write_pos = start[:, None] + torch.arange(n)[None, :]                                # [B, n]
    cache.visible = data.draw(st.integers(1, capacity))
    k, v = torch.randn(2, batch, HEADS, n, HEAD_DIM, generator=torch.Generator().manual_seed(1))
    got_k, got_v = cache.update(k, v, 0)
    assert torch.equal(got_k, cache.keys[0][:, :, : cache.visible])
    assert torch.equal(got_v, cache.values[0][:, :, : cache.visible])
    for b in range(batch):
        cols = cache.write_pos[b].tolist()
        for j, col in enumerate(cols):
            if col < capacity - 1:  # past the end, padding queries share the last slot
                assert torch.equal(cache.keys[0][b, :, col], k[b, :, j])
                assert torch.equal(cache.values[0][b, :, col], v[b, :, j])
        untouched = [c for c in range(capacity) if c not in cols and not (c == capacity - 1 and max(cols) >= c)]
        assert torch.equal(cache.keys[0][b, :, untouched], before[0][b, :, untouched])
        assert torch.equal(cache.values[0][b, :, untouched], before[1][b, :, untouched])


# ====================================================================== draft-length policies
class LinearCosts:
    """A stand-in for :class:`diffuspec.cost.CostModel`: a round costs 10 ms plus 1 ms per
    verified token (padded, or packed for the vLLM-style step cost)."""

    ready = True

    def __init__(self, packed: bool) -> None:
        self.packed = packed

    def ensure(self, rows: int) -> None:
        pass

    def round_times(self, rows: int, kmax: int, propose: bool = True) -> np.ndarray:
        return 0.01 + 0.001 * rows * (np.arange(kmax + 1) + 1)

    def step_times(self, tokens: np.ndarray, kmax: np.ndarray, drafting: np.ndarray) -> np.ndarray:
        return 0.01 + 0.001 * tokens

    def calibrate(self, *args) -> None:
        pass


@st.composite
def adl_configs(draw):
    k_min = draw(st.integers(1, 8))
    k_max = draw(st.integers(k_min, 16))
    return ADLConfig(policy=draw(st.sampled_from(DRAFT_LENGTH_POLICIES)), rho=draw(st.sampled_from([0.25, 0.5, 1.0])),
                     delta=draw(st.integers(0, 5)), k_min=k_min, k_max=k_max, k_init=draw(st.integers(k_min, k_max)),
                     verify_budget=draw(st.none() | st.just("auto") | st.integers(2, 64)))


def _per_row(data, rows: int, values) -> torch.Tensor:  # [rows] int64 (or bool) drawn from `values`
    return torch.tensor(data.draw(st.lists(values, min_size=rows, max_size=rows)))


@_settings(100)
@given(adl_configs(), st.integers(1, 20), st.booleans(), st.booleans(), st.data())
def test_every_policy_respects_room_inactive_rows_and_the_verify_budget(cfg, rows, greedy, packed, data):
    """policy.next_k(view), whatever the policy learnt from earlier rounds: 0 <= k <= room, 0
    for inactive rows, and (k + 1) · active rows within the verify budget the config sets.
    The paper's ADL and the fixed policy take exactly min(wanted, room, budget cap)."""
    acceptance = AcceptanceModel(cfg.k_max, greedy=greedy)
    policy = make_policy(rows, cfg, "cpu", costs=LinearCosts(packed), acceptance=acceptance)
    explicit = cfg.verify_budget if isinstance(cfg.verify_budget, int) else None
    for _ in range(data.draw(st.integers(1, 6))):
        active = _per_row(data, rows, st.booleans())
        room = _per_row(data, rows, st.integers(0, 40))
        k = policy.next_k(RoundView(active=active, room=room))
        assert k.dtype == torch.int64 and k.shape == (rows,)
        assert bool((k >= 0).all()) and bool((k <= room).all()), (k, room)
        assert not k[~active].any(), "an inactive row drafts"
        n_active = int(active.sum())
        # the budget: "paper"/"fixed" (and "auto" for small greedy batches) the verify budget
        # resolved for the device; the cost model an explicit one only
        paper_rule = cfg.policy in ("paper", "fixed") or (cfg.policy == "auto" and greedy and n_active < 16)
        budget = verify_budget(cfg, "cpu") if paper_rule else explicit
        cap = max(budget // n_active - 1, 0) if budget is not None and n_active else None
        if cap is not None:
            assert int(k.max()) <= cap, (k, budget, n_active)
        if cfg.policy in ("paper", "fixed"):  # nothing cut that need not be
            want = torch.minimum(policy.wanted(), room)
            want = want if cap is None else want.clamp(max=cap)
            assert torch.equal(k, torch.where(active, want, 0))
        drafted = torch.minimum(k, _per_row(data, rows, st.integers(0, 40)))
        accepted = torch.minimum(drafted, _per_row(data, rows, st.integers(0, 40)))
        generated = torch.minimum(k, _per_row(data, rows, st.integers(0, 40)))
        policy.observe(RoundOutcome(k=k, generated=generated, drafted=drafted, accepted=accepted))
        if cfg.policy == "paper":
            assert bool(((policy.wanted() >= cfg.k_min) & (policy.wanted() <= cfg.k_max)).all())


@_settings(80)
@given(adl_configs(), st.integers(1, 6), st.data())
def test_adl_row_state_moves_with_its_row(cfg, rows, data):
    """select / extend / export_rows / load_rows carry each request's ADL state, so a row's
    next k does not depend on which batch row it sits in."""
    cfg = dataclasses.replace(cfg, policy="paper")
    policy = make_policy(rows, cfg, "cpu")
    for _ in range(data.draw(st.integers(0, 3))):
        k = policy.next_k() * _per_row(data, rows, st.sampled_from([0, 1]))  # some rows sit a round out
        generated = _per_row(data, rows, st.integers(0, 16))
        accepted = torch.minimum(generated, _per_row(data, rows, st.integers(0, 16)))
        policy.observe(RoundOutcome(k=k, generated=generated, drafted=accepted, accepted=accepted))
    state, wanted = policy.export_rows(), policy.wanted()
    fresh = make_policy(rows, cfg, "cpu")
    fresh.load_rows(state)
    assert fresh.export_rows() == state and torch.equal(fresh.wanted(), wanted)
    index = data.draw(st.permutations(range(rows)) | st.lists(st.integers(0, rows - 1), max_size=rows, unique=True))
    policy.select(torch.tensor(index, dtype=torch.int64))
    assert policy.rows == len(index) and policy.export_rows() == [state[i] for i in index]
    assert policy.wanted().tolist() == wanted[index].tolist()
    extra = data.draw(st.integers(0, 3))
    policy.extend(extra)
    newcomer = make_policy(1, cfg, "cpu").export_rows()[0]
    assert policy.export_rows() == [state[i] for i in index] + [newcomer] * extra
