"""Lattice, proxy, CPS, ADL and acceptance rules on hand-built inputs with written answers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from diffuspec.adl import AdaptiveDraftLength
from diffuspec.config import ADLConfig, CPSConfig, DiffuSpecConfig, LatticeConfig
from diffuspec.policy import make_policy
from diffuspec.cps import search_path
from diffuspec.lattice import build_lattice, generated_length
from diffuspec.proxy import CausalProxy, NGramModel
from diffuspec.verify import accept_greedy, warp_logits

EOS = 9


def _logq(rows):  # rows: list (batch) of list (positions) of {token: prob}; vocab 10
    out = torch.full((len(rows), len(rows[0]), 10), 1e-9)
    for b, positions in enumerate(rows):
        for i, dist in enumerate(positions):
            for t, p in dist.items():
                out[b, i, t] = p
    out = out / out.sum(-1, keepdim=True)
    return out.log()


# ------------------------------------------------------------------ lattice
def test_lattice_sets_are_entropy_adaptive():
    logq = _logq([[{1: 0.95, 2: 0.05}, {3: 0.4, 4: 0.3, 5: 0.2, 6: 0.1}, {7: 0.5, 8: 0.31, 2: 0.19}]])
    lat = build_lattice(logq, torch.tensor([3]), EOS, LatticeConfig())
    sets = [set(lat.tokens[0, i][lat.valid[0, i]].tolist()) for i in range(3)]
    assert sets == [{1}, {3, 4, 5}, {7, 8}]  # mass 0.8 reached after 1, 3 and 2 tokens
    assert lat.length.tolist() == [3]
    assert lat.tokens[0, :, 0].tolist() == [1, 3, 7]


def test_lattice_size_cap():
    flat = {t: 0.1 for t in range(10)}
    lat = build_lattice(_logq([[flat]]), torch.tensor([1]), None, LatticeConfig(max_candidates=4))
    assert int(lat.valid.sum()) == 4


def test_lattice_keeps_eos_and_cuts_after_it():
    logq = _logq([[{1: 0.9, EOS: 0.1}, {2: 0.85, EOS: 0.15}, {3: 1.0}, {4: 1.0}],
                  [{1: 0.97, EOS: 0.03}, {2: 1.0}, {EOS: 0.9, 3: 0.1}, {4: 1.0}]])
    lat = build_lattice(logq, torch.tensor([4, 4]), EOS, LatticeConfig(eos_min_prob=0.05))
    # row 0: EOS (0.1) is outside the 0.8 mass set but kept; the lattice ends at position 0
    assert lat.length.tolist() == [1, 3]
    assert set(lat.tokens[0, 0][lat.valid[0, 0]].tolist()) == {1, EOS}
    # row 1: 0.03 < eos_min_prob, so EOS first appears at position 2
    assert set(lat.tokens[1, 0][lat.valid[1, 0]].tolist()) == {1}
    assert not lat.valid[1, 3].any()


def test_lattice_respects_per_row_k():
    logq = _logq([[{1: 1.0}] * 5, [{2: 1.0}] * 5])
    lat = build_lattice(logq, torch.tensor([5, 2]), EOS, LatticeConfig())
    assert lat.length.tolist() == [5, 2]
    assert lat.valid[1].any(-1).tolist() == [True, True, False, False, False]


# ------------------------------------------------------------------ proxy
def test_witten_bell_bigram_by_hand():
    # sequence a b a c a b (a=0, b=1, c=2), vocab 4
    seq = torch.tensor([[0, 1, 0, 2, 0, 1]])
    m = NGramModel.fit(seq, torch.tensor([6]), order=2, vocab_size=4)
    cand = torch.arange(4)[None]
    got = m.logprob(torch.tensor([0]), torch.tensor([[0]]), cand).exp()[0]
    # unigram: c(a)=3 c(b)=2 c(c)=1, N=6, T=3 → p1(w) = (c + 3/4) / 9
    p1 = torch.tensor([3.75, 2.75, 1.75, 0.75]) / 9
    # after 'a': c(a,b)=2 c(a,c)=1, c(a)=3, T(a)=2 → p2(w|a) = (c(a,w) + 2 p1(w)) / 5
    want = (torch.tensor([0.0, 2.0, 1.0, 0.0]) + 2 * p1) / 5
    assert torch.allclose(got, want, atol=1e-6)
    assert got.sum().item() == pytest.approx(1.0, abs=1e-6)
    # unseen context 'd' (3) falls back to the unigram
    back = m.logprob(torch.tensor([0]), torch.tensor([[3]]), cand).exp()[0]
    assert torch.allclose(back, p1, atol=1e-6)
    # no context at all (-1) is the unigram too
    none = m.logprob(torch.tensor([0]), torch.tensor([[-1]]), cand).exp()[0]
    assert torch.allclose(none, p1, atol=1e-6)


def test_online_model_keeps_rows_apart():
    seqs = torch.tensor([[0, 1, 0, 1, 0, 1], [0, 2, 0, 2, 0, 2]])
    m = NGramModel.fit(seqs, torch.tensor([6, 6]), order=2, vocab_size=3)
    lp = m.logprob(torch.tensor([0, 1]), torch.tensor([[0], [0]]), torch.tensor([[1, 2], [1, 2]])).exp()
    assert lp[0, 0] > 0.5 > lp[0, 1]
    assert lp[1, 1] > 0.5 > lp[1, 0]
    # only the first `length` tokens of a row count
    short = NGramModel.fit(seqs, torch.tensor([6, 1]), order=2, vocab_size=3)
    lp = short.logprob(torch.tensor([1]), torch.tensor([[0]]), torch.tensor([[2]])).exp()
    assert lp.item() == pytest.approx((0 + 1 / 3) / (1 + 1))  # unigram of row 1 = "0" only


def test_corpus_table_round_trip(tmp_path):
    corpus = [[0, 1, 2, 0, 1, 2, 0, 1], [3, 3, 3]]
    m = NGramModel.from_corpus(corpus, order=3, vocab_size=5)
    m.save(tmp_path / "t.safetensors", metadata={"corpus": "test"})
    loaded = NGramModel.load(tmp_path / "t.safetensors")
    ctx, cand = torch.tensor([[0, 1], [3, 3]]), torch.tensor([[2, 3], [3, 0]])
    rows = torch.tensor([5, 9])  # ignored by a pooled table
    assert torch.equal(m.logprob(rows, ctx, cand), loaded.logprob(rows, ctx, cand))
    assert loaded.info == {"corpus": "test"}
    assert loaded.logprob(rows, ctx, cand).exp()[0, 0] > 0.6
    with pytest.raises(ValueError, match="does not exist"):
        NGramModel.load(tmp_path / "missing.safetensors")


def test_mixture_proxy_is_normalised():
    corpus = NGramModel.from_corpus([[0, 1, 2, 3, 0, 1]], order=2, vocab_size=4)
    online = NGramModel.fit(torch.tensor([[3, 2, 1, 0]]), torch.tensor([4]), order=2, vocab_size=4)
    proxy = CausalProxy(online, corpus, corpus_weight=0.3)
    p = proxy.logprob(torch.tensor([0]), torch.tensor([[1]]), torch.arange(4)[None]).exp()
    assert p.sum().item() == pytest.approx(1.0, abs=1e-5)


# ------------------------------------------------------------------ CPS
def test_cps_repairs_an_incoherent_argmax_path():
    """The prompt repeats "1 2 3"; the drafter slightly prefers 5 then 6 at the next two
    positions (argmax path 5 6, never seen in the text); the proxy knows 2 then 3."""
    prefix = torch.tensor([[1, 2, 3, 1, 2, 3, 1, 2, 3, 1]])
    logq = _logq([[{5: 0.52, 2: 0.48}, {6: 0.52, 3: 0.48}]])
    lat = build_lattice(logq, torch.tensor([2]), None, LatticeConfig())
    assert lat.argmax_path().tolist() == [[5, 6]]
    proxy = CausalProxy(NGramModel.fit(prefix, torch.tensor([10]), 3, 10), None, 0.5)
    path = search_path(lat, proxy, prefix[:, -2:], CPSConfig())
    assert path.tolist() == [[2, 3]]
    # λ = 1 ignores the proxy: the argmax path again
    assert search_path(lat, proxy, prefix[:, -2:], CPSConfig(lam=1.0)).tolist() == [[5, 6]]
    # disabled CPS is the argmax path
    assert search_path(lat, proxy, prefix[:, -2:], CPSConfig(enabled=False)).tolist() == [[5, 6]]


def test_beam_finds_what_greedy_misses():
    """The proxy prefers 4 at position 0 (4 is frequent), but only 7 has a likely follower
    at position 1 (7 → 8 was seen; nothing in the lattice follows 4): width 1 commits to 4,
    width 3 keeps 7 alive and finds 7 8. Scores: [4, 8] -2.74 < [7, 8] -2.02."""
    prefix = torch.tensor([[4, 4, 4, 4, 7, 8, 0]])
    logq = _logq([[{4: 0.5, 7: 0.5}, {5: 0.5, 8: 0.5}]])
    lat = build_lattice(logq, torch.tensor([2]), None, LatticeConfig(mass=1.0, max_candidates=2))
    proxy = CausalProxy(NGramModel.fit(prefix, torch.tensor([7]), 2, 10), None, 0.5)
    assert search_path(lat, proxy, prefix[:, -1:], CPSConfig(beam_width=1)).tolist() == [[4, 8]]
    assert search_path(lat, proxy, prefix[:, -1:], CPSConfig(beam_width=3)).tolist() == [[7, 8]]


def test_cps_batched_rows_with_different_lengths():
    prefix = torch.tensor([[1, 2, 3, 1, 2, 3, 1], [4, 5, 4, 5, 4, 5, 4]])
    logq = _logq([[{2: 0.45, 5: 0.55}, {3: 0.45, 4: 0.55}, {1: 1.0}],
                  [{5: 0.45, 2: 0.55}, {4: 1.0}, {0: 1.0}]])
    lat = build_lattice(logq, torch.tensor([3, 1]), None, LatticeConfig())
    proxy = CausalProxy(NGramModel.fit(prefix, torch.tensor([7, 7]), 3, 10), None, 0.5)
    path = search_path(lat, proxy, prefix[:, -2:], CPSConfig())
    assert path[0].tolist() == [2, 3, 1]
    assert path[1, 0].item() == 5


# ------------------------------------------------------------------ ADL
def test_adl_follows_the_paper_recurrence():
    cfg = ADLConfig(rho=0.5, delta=4, k_min=2, k_max=20, k_init=8)
    adl = AdaptiveDraftLength(2, cfg)
    assert adl.next_k().tolist() == [12, 12]  # Ā = Ḡ = 8 initially → ⌊8⌋ + δ
    # row 0: drafts of 8, all accepted; row 1: EOS after 2 tokens, 1 accepted
    adl.update(torch.tensor([8, 2]), torch.tensor([8, 1]), torch.tensor([True, True]))
    # Ḡ = [8, 5], Ā = [8, 4.5]
    assert adl.next_k().tolist() == [12, 5]
    adl.update(torch.tensor([12, 2]), torch.tensor([3, 1]), torch.tensor([True, False]))
    # row 0: Ḡ = 10, Ā = 5.5 → 10; row 1 inactive: unchanged
    assert adl.next_k().tolist() == [10, 5]
    clipped = AdaptiveDraftLength(1, ADLConfig(k_min=4, k_max=6, k_init=6))
    assert clipped.next_k().tolist() == [6]
    assert make_policy(1, ADLConfig(policy="fixed", k_init=5)).next_k().tolist() == [5]


def test_verify_budget_per_batch():
    from diffuspec.policy import CPU_VERIFY_BUDGET, cap_for_batch, verify_budget

    k = torch.tensor([16, 3, 9])
    assert cap_for_batch(k, 3, 48).tolist() == [15, 3, 9]   # 48 // 3 - 1
    assert cap_for_batch(k, 3, 12).tolist() == [3, 3, 3]
    assert cap_for_batch(k, 3, 5).tolist() == [0, 0, 0]     # not even one draft token each: plain decoding
    assert cap_for_batch(k, 3, None).tolist() == [16, 3, 9]
    assert verify_budget(ADLConfig(), "cpu") == CPU_VERIFY_BUDGET
    assert verify_budget(ADLConfig(), "cuda") is None and verify_budget(ADLConfig(verify_budget=64), "cuda") == 64
    with pytest.raises(ValueError, match="verify_budget=1 must be an int >= 2"):
        ADLConfig(verify_budget=1)


def test_policies_share_the_round_limits():
    """Every policy is bounded the same way: room per row, inactive rows, the verify budget."""
    from diffuspec.policy import FixedDraftLength, RoundOutcome, RoundView

    cfg = ADLConfig(k_min=2, k_max=12, k_init=8)
    view = RoundView(active=torch.tensor([True, True, False, True]), room=torch.tensor([20, 3, 20, 0]))
    for policy in (FixedDraftLength(4, cfg, budget=None), AdaptiveDraftLength(4, cfg, budget=None)):
        assert policy.next_k(view).tolist() == [policy.wanted()[0].item(), 3, 0, 0]
    assert FixedDraftLength(4, cfg, budget=12).next_k(view).tolist() == [3, 3, 0, 0]  # 12 // 3 active - 1
    fixed = make_policy(2, ADLConfig(policy="fixed", k_init=5), "cpu")
    fixed.observe(RoundOutcome(*(torch.tensor([5, 5]),) * 2, torch.tensor([5, 5]), torch.tensor([0, 0])))
    assert fixed.next_k().tolist() == [5, 5] and fixed.export_rows() == [{}, {}]


def test_adl_rows_move_between_batches():
    """export_rows / load_rows carry a request's ADL state to another batch row (vLLM)."""
    from diffuspec.policy import RoundOutcome

    cfg = ADLConfig(policy="paper", k_min=2, k_max=20, k_init=8)
    a = make_policy(2, cfg, "cuda")
    assert isinstance(a, AdaptiveDraftLength) and a.budget is None  # no verify cap on an accelerator
    a.observe(RoundOutcome(k=torch.tensor([8, 0]), generated=torch.tensor([2, 9]), drafted=torch.tensor([2, 0]),
                           accepted=torch.tensor([1, 0])))
    rows = a.export_rows()
    assert rows[0] == {"gen_ema": 5.0, "acc_ema": 4.5} and rows[1] == {"gen_ema": 8.0, "acc_ema": 8.0}
    b = make_policy(3, cfg, "cpu")
    b.load_rows([None, rows[0], rows[1]])
    assert b.next_k().tolist() == [12, 5, 12]
    assert DiffuSpecConfig().adl.policy == "auto"  # the default: see docs/architecture.md §6
    assert DiffuSpecConfig.from_kwargs(adl="fixed").adl.policy == "fixed"
    assert DiffuSpecConfig.from_kwargs(adl={"enabled": False}).adl.policy == "fixed"  # the earlier spelling
    with pytest.raises(ValueError, match="adl policy='nope' is not one of"):
        DiffuSpecConfig.from_kwargs(adl="nope")


def test_generated_length_stops_at_first_eos():
    argmax = torch.tensor([[1, 2, EOS, 3, EOS], [1, 2, 3, 4, 5], [EOS, 1, 1, 1, 1]])
    assert generated_length(argmax, torch.tensor([5, 5, 5]), EOS).tolist() == [2, 5, 0]
    assert generated_length(argmax, torch.tensor([1, 3, 5]), EOS).tolist() == [1, 3, 0]


# ------------------------------------------------------------------ acceptance
def test_greedy_acceptance_by_hand():
    logits = torch.full((3, 4, 6), 0.0)
    best = torch.tensor([[1, 2, 3, 4], [1, 5, 3, 4], [0, 0, 0, 0]])
    logits.scatter_(2, best[..., None], 5.0)
    path = torch.tensor([[1, 2, 3], [1, 2, 3], [1, 1, 1]])
    n, nxt = accept_greedy(logits, path, torch.tensor([3, 3, 3]))
    assert n.tolist() == [3, 1, 0]
    assert nxt.tolist() == [4, 5, 0]  # bonus, correction, correction
    n, nxt = accept_greedy(logits, path, torch.tensor([2, 3, 0]))
    assert n.tolist() == [2, 1, 0] and nxt.tolist() == [3, 5, 0]


def test_warp_logits_top_k_top_p():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    assert torch.allclose(warp_logits(logits, 1.0, None, None), torch.tensor([0.5, 0.3, 0.15, 0.05]))
    assert torch.allclose(warp_logits(logits, 1.0, 2, None), torch.tensor([0.625, 0.375, 0, 0]))
    assert torch.allclose(warp_logits(logits, 1.0, None, 0.8), torch.tensor([0.625, 0.375, 0, 0]))
    assert torch.allclose(warp_logits(logits, 1.0, None, 0.81), torch.tensor([0.5, 0.3, 0.15, 0]) / 0.95)
    hot = warp_logits(logits, 2.0, None, None)
    want = torch.tensor([0.5, 0.3, 0.15, 0.05]).sqrt()
    assert torch.allclose(hot, want / want.sum())
    assert math.isclose(float(warp_logits(logits, 1.0, 1, 0.5)[0]), 1.0)


def test_proxy_numpy_and_torch_paths_agree(tmp_path):
    """CPU scoring runs on numpy (less overhead per call); accelerators keep torch: both agree,
    for an online model and for a compact saved table."""
    g = torch.Generator().manual_seed(0)
    seqs = torch.randint(0, 50, (3, 200), generator=g)
    online = NGramModel.fit(seqs, torch.tensor([200, 120, 7]), order=3, vocab_size=50)
    NGramModel.from_corpus(seqs.tolist(), order=3, vocab_size=50).save(tmp_path / "t.safetensors")
    table = NGramModel.load(tmp_path / "t.safetensors")
    rows = torch.tensor([0, 1, 2, 0])
    ctx = torch.tensor([[3, 4], [-1, 7], [1, 1], [seqs[0, 10].item(), seqs[0, 11].item()]])
    cand = torch.randint(0, 50, (4, 6), generator=g)
    for model in (online, table):
        via_torch = model._logprob_torch(rows, ctx, cand)
        assert torch.allclose(model.logprob(rows, ctx, cand), via_torch, atol=1e-6)
    mixture = CausalProxy(online, table, 0.3)
    via_torch = torch.logaddexp(table._logprob_torch(rows, ctx, cand) + math.log(0.3),
                                online._logprob_torch(rows, ctx, cand) + math.log(0.7))
    assert torch.allclose(mixture.logprob(rows, ctx, cand), via_torch, atol=1e-5)
    short = NGramModel.fit(seqs, torch.tensor([200, 120, 7]), order=2, vocab_size=50)  # models of two orders
    via_torch = torch.logaddexp(table._logprob_torch(rows, ctx, cand) + math.log(0.5),
                                short._logprob_torch(rows, ctx, cand) + math.log(0.5))
    assert torch.allclose(CausalProxy(short, table, 0.5).logprob(rows, ctx, cand), via_torch, atol=1e-5)


@pytest.mark.parametrize("tabulated", [True, False])
def test_cps_numpy_and_torch_searches_agree(tabulated, monkeypatch):
    """The CPU (numpy) and accelerator (torch) beam searches pick the same paths, with the
    proxy tabulated over the lattice's contexts and scored step by step."""
    from diffuspec import cps
    from diffuspec.cps import _search_numpy, _search_torch

    if not tabulated:
        monkeypatch.setattr(cps, "_proxy_table", lambda *args, **kwargs: None)

    g = torch.Generator().manual_seed(1)
    vocab = 40
    prefix = torch.randint(0, 8, (3, 60), generator=g)  # a small alphabet: the proxy has opinions
    proxy = CausalProxy(NGramModel.fit(prefix, torch.tensor([60, 30, 2]), 3, vocab),
                        NGramModel.from_corpus(prefix.tolist(), order=3, vocab_size=vocab), 0.5)
    tail = torch.where(torch.arange(2)[None, :] < torch.tensor([[0], [0], [1]]), -1, prefix[:, 28:30])
    for trial in range(5):
        logq = (torch.randn(3, 7, vocab, generator=g) * (2 if trial % 2 else 6)).log_softmax(-1)  # wide, narrow lattices
        lat = build_lattice(logq, torch.tensor([7, 4, 1]), EOS, LatticeConfig(max_candidates=6))
        for cfg in (CPSConfig(), CPSConfig(beam_width=1), CPSConfig(beam_width=5, lam=0.3)):
            a, b = _search_numpy(lat, proxy, tail, cfg), _search_torch(lat, proxy, tail, cfg)
            for row in range(3):
                n = int(lat.length[row])
                assert a[row, :n].tolist() == b[row, :n].tolist(), (trial, cfg, row)


def test_context_candidates_join_the_lattice_by_hand():
    """Prompt-lookup continuations: the latest earlier match of the last n tokens, longest
    n first; merged where the lattice has a position, a drafter token keeping the larger
    log q, a new token in a new column with log(prior), repeats left out."""
    from diffuspec.lattice import Lattice, add_context_candidates, context_continuations, copied_drafts

    t = np.array([5, 6, 7, 8, 5, 6, 9, 9, 5, 6])
    assert context_continuations(t, 10, 4, 1, 3).tolist() == [[-1] * 4, [9, 9, 5, 6], [9, 9, 5, 6]]
    assert context_continuations(t, 3, 4, 1, 2).tolist() == [[-1] * 4, [-1] * 4]  # nothing earlier matches
    # Copied drafts (the vLLM proposer's steps without a drafter pass): the longest match's
    # continuation up to the row's room; [] where nothing matched.
    cands = np.stack([context_continuations(t, 10, 4, 1, 3), context_continuations(t, 3, 4, 1, 2).repeat(2, 0)[:3]])
    assert copied_drafts(cands, np.array([3, 4])) == [[9, 9, 5], []]
    # a continuation that runs into the end of the context repeats with that period: the
    # last 3 tokens of 1 2 3 4 1 2 3 4 1 2 3 matched 4 back, where 4 1 2 followed
    loop = np.array([1, 2, 3, 4, 1, 2, 3, 4, 1, 2, 3])
    cands = context_continuations(loop, 11, 6, 3, 3)
    assert cands.tolist() == [[4, 1, 2, 3, -1, -1]]
    assert copied_drafts(cands[None], np.array([6])) == [[4, 1, 2, 3, 4, 1]]
    assert copied_drafts(np.array([[[-1, -1, -1], [7, -1, -1]]]), np.array([2])) == [[7, 7]]
    inf = float("-inf")
    lattice = Lattice(tokens=torch.tensor([[[10, 11], [12, 13], [14, 15]]]),
                      logq=torch.tensor([[[-0.1, -3.0], [-0.2, inf], [-0.3, inf]]]),
                      valid=torch.tensor([[[True, True], [True, False], [True, False]]]),
                      length=torch.tensor([2]), gen_len=torch.tensor([3]))
    out = add_context_candidates(lattice, torch.tensor([[[11, 20, 30], [11, 21, -1], [-1, 20, 31]]]), 0.3)
    lp = float(np.log(np.float32(0.3)))
    assert out.valid[0].tolist() == [[True, True, False, False, False], [True, False, True, True, False],
                                     [True, False, False, False, False]]
    assert out.tokens[0, 1, 2:4].tolist() == [20, 21]
    assert out.logq[0, 0, :2].tolist() == pytest.approx([-0.1, lp])        # 11 boosted to the prior
    assert out.logq[0, 1, 2:4].tolist() == pytest.approx([lp, lp])
