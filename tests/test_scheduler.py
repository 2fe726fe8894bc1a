"""The cost-aware draft-length policy on hand-built costs and acceptance, with answers worked out here."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import OracleDrafter, hf_greedy

from diffuspec import DiffuSpecConfig, SamplingParams
from diffuspec.config import ADLConfig
from diffuspec.cost import CostModel, CostTable, StepCost
from diffuspec.engine import SpeculativeEngine
from diffuspec.policy import RoundOutcome, RoundView, make_policy
from diffuspec.scheduler import (AcceptanceModel, CopyLengths, CostAwareDraftLength, best_allocation, best_length,
                                 expected_tokens, position_outcomes)


class TableCosts:
    """A padded-layout cost model from a formula: verify rows × (k + 1) tokens, propose."""

    packed, ready = False, True

    def __init__(self, verify, propose=lambda rows, k: 0.0):
        self.verify, self.propose = verify, propose

    def ensure(self, rows):
        pass

    def round_times(self, rows, kmax, propose=True):
        return np.array([self.verify(rows, k + 1) + (self.propose(rows, k) if propose and k else 0.0)
                         for k in range(kmax + 1)])

    def calibrate(self, *args):
        pass


def test_expected_tokens_by_hand():
    e = expected_tokens(np.array([[0.5, 0.5, 1.0]]))
    assert e.tolist() == [[1.0, 1.5, 1.75, 2.0]]  # 1 + .5 + .25 + .25


def test_plain_decoding_when_verifying_cannot_pay():
    """Low acceptance and a verify cost that grows with every token: k = 0."""
    gain = expected_tokens(np.full((4, 8), 0.3))
    times = np.array([1.0 + k for k in range(9)])           # each drafted token costs a whole step
    assert best_length(gain, np.full(4, 8), times) == 0      # 1/1 beats 1.3/2, 1.39/3, ...
    flat = np.array([1.0 + 0.01 * k for k in range(9)])     # drafting nearly free: draft while it adds more
    assert best_length(gain, np.full(4, 8), flat) == 3       # E(3)/1.03 = 1.376 > E(4)/1.04 = 1.370
    # a = 0.9, verify 1 + 0.25 K: rates 1, 1.52, 1.83, 2.0, 2.1, 2.13, 2.14, 2.13 → K = 6
    gain = expected_tokens(np.full((1, 8), 0.9))
    assert best_length(gain, np.array([8]), np.array([1 + 0.25 * k for k in range(9)])) == 6


def test_budget_shifts_to_the_confident_rows():
    """Packed steps (vLLM): the worked example of best_allocation, and a confident row
    taking the whole draft while a doubtful one decodes plainly."""
    survive = np.array([[0.9, 0.8], [0.2, 0.1]])
    assert best_allocation(survive, np.array([2, 2]), lambda t, k, d: 1 + 0.5 * t).tolist() == [2, 0]
    rates = np.array([[0.95] * 6, [0.1] * 6, [0.7] * 6])
    k = best_allocation(rates.cumprod(1), np.array([6, 6, 6]), lambda t, k, d: 1 + 0.2 * t)
    assert k[0] == 6 and k[1] == 0 and 0 < k[2] < 6
    # rooms 6, 0, 2: after row 0's six tokens (8.03 / 2.8 = 2.87), row 2's first (.7) pays
    # (8.73 / 3.0 = 2.91) and its second (.49) does not (9.22 / 3.2 = 2.88)
    assert best_allocation(rates.cumprod(1), np.array([6, 0, 2]), lambda t, k, d: 1 + 0.2 * t).tolist() == [6, 0, 1]


def _allocation_rate(survive, start, a, b, c, ks) -> float:
    """Expected tokens per second of draft lengths ``ks``: step a + b·tokens, c per drafting row."""
    rows = len(ks)
    expected = rows + sum(survive[r, :k].sum() for r, k in enumerate(ks))
    drafting = [r for r, k in enumerate(ks) if k > 0]
    return expected / (a + b * (rows + sum(ks)) + c * len(drafting) + sum(start[r] for r in drafting))


def test_cold_rows_and_per_row_proposal_costs():
    """Three requests with the pooled acceptance 0.9 per position; each drafting row costs the
    proposal 0.5 s, and row 2's drafter has not cached its prompt (5 s to encode it first).
    Rates by hand (step 1 + 0.1·tokens): all three rows k=3 → (3 + 3·2.439) / (1 + 1.2 + 1.5 + 5)
    = 1.18; rows 0 and 1 k=3 → (3 + 2·2.439) / (1 + 0.9 + 1.0) = 2.72; one token for every row
    (drafting breadth-first) → 5.7 / (1 + 0.6 + 1.5 + 5) = 0.70. The cold row stays plain."""
    survive = np.tile(np.cumprod([0.9, 0.9, 0.9]), (3, 1))
    times = lambda t, k, d: 1 + 0.1 * np.asarray(t) + 0.5 * np.asarray(d)  # noqa: E731
    k = best_allocation(survive, np.array([3, 3, 3]), times, np.array([0.0, 0.0, 5.0]))
    assert k.tolist() == [3, 3, 0]
    assert _allocation_rate(survive, [0, 0, 5.0], 1, 0.1, 0.5, k) == pytest.approx(2.7166, abs=1e-3)
    assert best_allocation(survive, np.array([3, 3, 3]), times).tolist() == [3, 3, 3]  # all warm: all draft


def test_allocation_is_near_the_best_of_all_allocations():
    """Pooled acceptance (what the policy passes), random step, per-row and start costs and
    rooms: the allocation's rate is within 1% of the best of every possible allocation."""
    import itertools

    rng = np.random.default_rng(0)
    for _ in range(200):
        rows, width = int(rng.integers(1, 4)), int(rng.integers(1, 4))
        survive = np.tile(np.cumprod(rng.uniform(0.2, 0.99, width)), (rows, 1))
        room = rng.integers(0, width + 1, rows)
        start = rng.choice([0.0, 0.0, 0.3, 2.0], rows)
        a, b, c = rng.uniform(0.5, 2), rng.uniform(0.01, 0.5), rng.uniform(0, 1)
        k = best_allocation(survive, room, lambda t, km, d: a + b * np.asarray(t) + c * np.asarray(d), start)
        assert (k <= room).all()
        best = max(_allocation_rate(survive, start, a, b, c, ks)
                   for ks in itertools.product(*[range(int(m) + 1) for m in room]))
        assert _allocation_rate(survive, start, a, b, c, k) >= 0.99 * best


def test_step_cost_learns_what_encoding_a_prompt_costs(tmp_path):
    """Proposals that encode many uncached context tokens teach the cost per token; those
    with warm prefixes correct the profile instead."""
    CostTable("p", verify={1: {1: 1.0}}, propose={1: {1: 0.002, 32: 0.032}, 8: {1: 0.004, 32: 0.050}}).save(
        tmp_path / "p.json")
    costs = StepCost(CostModel(None, None, tmp_path / "p.json"))
    assert costs.encode_s_per_token == pytest.approx(0.001)  # the prior: 32 drafted tokens cost 32 ms
    for _ in range(40):  # 8 rows, 300 prompt tokens each, 0.1 ms per token beyond the profile
        costs.observe_proposal(8, 32, 2400, costs.propose_time(8, 32) + 2400 * 1e-4)
    assert costs.encode_s_per_token == pytest.approx(1e-4, rel=0.02)
    assert costs.start_costs(np.array([0, 500])).tolist() == pytest.approx([0.0, 0.05 / costs.start_horizon], rel=0.02)
    for _ in range(40):  # one cold row among seven warm ones teaches the same
        costs.observe_proposal(8, 32, 300, costs.propose_time(8, 32) + 300 * 2e-4)
    assert costs.encode_s_per_token == pytest.approx(2e-4, rel=0.02)
    CostTable("q", verify={1: {1: 1.0}}, propose={1: {1: 0.002, 32: 0.032}}, encode=5e-5).save(tmp_path / "q.json")
    assert StepCost(CostModel(None, None, tmp_path / "q.json")).encode_s_per_token == 5e-5  # a measured prior


def test_encode_cost_is_profiled_with_the_proposals(tmp_path, monkeypatch):
    """A drafter with a prefix cache: profiling measures what encoding an uncached context
    costs per token, once, and the table on disk keeps it."""
    from diffuspec import cost
    from diffuspec.drafters import load_drafter
    from diffuspec.propose import PathProposer
    from diffuspec.recipe.tiny import build_random_pair

    monkeypatch.setenv("DIFFUSPEC_CACHE", str(tmp_path / "cache"))
    _, drafter_dir = build_random_pair(tmp_path / "pair", drafter_overrides={"prefix_causal": True})
    proposer = PathProposer(load_drafter(drafter_dir), DiffuSpecConfig(), None, 512)
    assert proposer.caches_prefixes
    model = CostModel(None, proposer)
    model.ensure(1)
    assert model.table.encode is not None and 0 < model.table.encode < model.table.propose_time(1, 1)
    monkeypatch.setattr(cost, "measure_encode", lambda *a, **kw: pytest.fail("measured again"))
    again = CostModel(None, proposer)
    again.ensure(1)
    assert again.table.encode == model.table.encode
    assert StepCost(again).encode_s_per_token == model.table.encode


def test_position_outcomes():
    reached, accepted = position_outcomes(np.array([5, 3, 0]), np.array([2, 3, 0]), 6)
    assert reached.tolist() == [[1, 1, 1, 0, 0, 0], [1, 1, 1, 0, 0, 0], [0] * 6]
    assert accepted.tolist() == [[1, 1, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0], [0] * 6]


def _policy(costs, rows=2, k_max=8):
    cfg = ADLConfig(policy="cost", k_min=1, k_max=k_max, k_init=4)
    return make_policy(rows, cfg, "cpu", costs=costs, acceptance=AcceptanceModel(k_max))


def _learn(policy, accepted_per_row, rounds=12, k=8):
    for _ in range(rounds):
        ks = torch.full((policy.rows,), k)
        policy.observe(RoundOutcome(k=ks, generated=ks, drafted=ks, accepted=torch.tensor(accepted_per_row)))


def test_policy_learns_to_stop_and_to_go():
    costs = TableCosts(lambda rows, w: rows * w * 1.0)  # compute-bound: every token costs the same
    policy = _policy(costs)
    view = RoundView(torch.ones(2, dtype=torch.bool), torch.tensor([8, 8]))
    _learn(policy, [0, 0])                               # nothing is ever accepted
    assert policy.next_k(view).tolist() == [0, 0]
    cheap = _policy(TableCosts(lambda rows, w: 1.0 + 0.001 * rows * w))  # verifying more is almost free
    _learn(cheap, [8, 8])                                # everything accepted
    assert cheap.next_k(view).tolist() == [8, 8]
    room = RoundView(torch.tensor([True, False]), torch.tensor([3, 8]))
    assert cheap.next_k(room).tolist() == [3, 0]         # each row's room; inactive rows draft nothing


def _plain_rounds(policy, rounds: int, accepted: int = 0) -> list[int]:
    """The k a one-row policy chooses over ``rounds`` rounds in which at most ``accepted``
    tokens of a draft are accepted."""
    view = RoundView(torch.ones(1, dtype=torch.bool), torch.tensor([8]))
    chosen = []
    for _ in range(rounds):
        k = policy.next_k(view)
        chosen.append(int(k[0]))
        policy.observe(RoundOutcome(k=k, generated=k, drafted=k, accepted=k.clamp(max=accepted)))
    return chosen


def test_policy_explores_after_plain_rounds_and_backs_off():
    # a drafted token costs half a step: drafting pays at good acceptance, not at the learnt zero
    policy = _policy(TableCosts(lambda rows, w: rows * (1.0 + 0.5 * (w - 1))), rows=1)
    _learn(policy, [0])
    chosen = _plain_rounds(policy, 40)
    explore = [i for i, k in enumerate(chosen) if k]
    assert chosen[0] == 0 and len(explore) == 1 and explore[0] == 16  # after 16 plain rounds, one exploratory draft
    assert chosen[explore[0]] == policy.explore_k and policy.acceptance.explore_after == 32  # it failed: wait longer


def test_exploring_that_keeps_a_token_but_does_not_pay_still_backs_off():
    """At T = 0.7 an exploratory draft of 2 often keeps one token, yet drafting still does
    not pay: the wait before the next one doubles all the same (it used to start over at 16
    rounds, and exploring cost ~2% at T = 0.7)."""
    policy = _policy(TableCosts(lambda rows, w: rows * (1.0 + 0.5 * (w - 1))), rows=1)
    _learn(policy, [0])
    chosen = _plain_rounds(policy, 120, accepted=1)
    explore = [i for i, k in enumerate(chosen) if k]
    assert explore[:3] == [16, 16 + 1 + 32, 16 + 1 + 32 + 1 + 64]
    assert policy.acceptance.explore_after == 128


def test_policy_does_not_explore_where_no_acceptance_could_pay():
    """Every verified token costs a whole step (a busy, compute-bound batch): even drafts
    that were always accepted would only break even, so the policy never drafts to explore."""
    policy = _policy(TableCosts(lambda rows, w: rows * w * 1.0), rows=1)
    _learn(policy, [0])
    assert _plain_rounds(policy, 200) == [0] * 200


def test_policy_rows_travel_between_batches():
    """A request's own cap (its ADL state) rides with it to another batch row (vLLM)."""
    policy = _policy(TableCosts(lambda rows, w: 1.0 + 0.001 * rows * w))
    ks = torch.tensor([8, 8])
    policy.observe(RoundOutcome(k=ks, generated=torch.tensor([8, 2]), drafted=ks, accepted=torch.tensor([8, 0])))
    rows = policy.export_rows()
    other = _policy(policy.costs, rows=3)
    other.acceptance = policy.acceptance
    other.load_rows([None, rows[1], rows[0]])
    assert other.caps.wanted().tolist() == [8, 3, 8]  # row 1 carries the request whose drafter saw an early EOS
    assert json.loads(json.dumps(rows)) == rows  # plain numbers: they ride in vLLM's request state


def test_pooled_curve_inherits_the_rate_before_it():
    pooled = AcceptanceModel(4, prior=0.5, strength=2.0)
    pooled.observe(np.array([[1.0, 1.0, 0.0, 0.0]] * 8), np.array([[1.0, 1.0, 0.0, 0.0]] * 8))
    rates = pooled.rates()
    assert rates[0] == pytest.approx((8 + 2 * 0.5) / (8 + 2))   # 0.9
    assert rates[1] == pytest.approx((8 + 2 * rates[0]) / 10)   # 0.98
    assert rates[2] == rates[1] and rates[3] == rates[1]        # never reached: the rate before


def test_cost_table_interpolation_and_files(tmp_path):
    table = CostTable("k", verify={1: {1: 1.0, 9: 3.0}, 4: {1: 2.0, 9: 8.0}}, propose={1: {1: 0.5, 8: 1.2}})
    assert table.verify_time(1, 5) == pytest.approx(2.0)      # linear in width
    assert table.verify_time(2, 1) == pytest.approx(1.5)      # log2(2) halfway between 1 and 4 rows
    assert table.propose_time(1, 0) == 0.0
    table.save(tmp_path / "t.json")
    assert CostTable.load(tmp_path / "t.json").verify == table.verify
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="cost table .*bad.json.* cannot be read"):
        CostTable.load(tmp_path / "bad.json")
    with pytest.raises(ValueError, match="cost_table=.*does not exist"):
        CostModel(torch.nn.Linear(1, 1), path=tmp_path / "none.json")


def test_step_cost_learns_a_line_and_skips_idle_gaps(tmp_path):
    CostTable("p", verify={1: {1: 1.0}}, propose={1: {1: 0.002, 8: 0.002}, 8: {1: 0.002, 8: 0.002}}).save(
        tmp_path / "p.json")
    costs = StepCost(CostModel(None, None, tmp_path / "p.json"), min_samples=8)
    assert not costs.ready
    rng = np.random.default_rng(0)
    for _ in range(40):
        tokens = int(rng.integers(4, 200))
        costs.observe_step(tokens, 0.010 + 0.0005 * tokens)
    costs.observe_step(50, 30.0)  # the engine sat idle: not a step
    assert costs.ready
    assert costs.step_times(np.array([100]), np.array([0]), np.array([4]))[0] == pytest.approx(0.060, rel=0.02)
    assert costs.step_times(np.array([100]), np.array([8]), np.array([4]))[0] == pytest.approx(0.062, rel=0.02)


def test_a_cold_packed_step_drafts_for_one_row_the_cheapest_to_start(tmp_path):
    """Before vLLM's step cost is learnt, one row a step drafts its ADL length, not every
    row: of the rows with room, the one whose draft costs least to start (the drafter has
    its context cached), so after its first draft the same row again. Once the cost is
    learnt, the policy decides for every row."""
    CostTable("p", verify={1: {1: 1.0}}, propose={r: {1: 0.0001, 8: 0.0001} for r in (1, 4, 8)}).save(
        tmp_path / "p.json")
    costs = StepCost(CostModel(None, None, tmp_path / "p.json"), min_samples=4)
    cfg = ADLConfig(policy="cost", k_min=2, k_max=8, k_init=5)
    room = torch.tensor([8, 0, 8, 8])
    starts = [[0.5, 0.0, 0.3, 0.3], [0.5, 0.0, 0.0, 0.3], [0.5, 0.0, 0.0, 0.3], [0.0, 0.0, 0.1, 0.3]]
    chosen = []
    for step, start in enumerate(starts):
        policy = make_policy(4, cfg, "cpu", costs=costs, acceptance=AcceptanceModel(8))
        k = policy.next_k(RoundView(torch.ones(4, dtype=torch.bool), room, torch.tensor(start, dtype=torch.float64)))
        j = int(torch.argmax(k))
        assert int((k > 0).sum()) == 1 and int(k[j]) == int(policy.caps.wanted()[j])  # one row, its ADL length
        chosen.append(j)
        costs.observe_step(4 + 5 * (step % 2), 0.01 + 0.001 * (4 + 5 * (step % 2)))
    assert chosen == [2, 2, 2, 0]  # the cheapest start with room (row 1 has none; ties: the first)
    assert costs.ready
    acceptance = AcceptanceModel(8)
    acceptance.observe(np.full((1, 8), 100.0), np.full((1, 8), 99.0))  # drafts nearly always kept
    k = make_policy(4, cfg, "cpu", costs=costs, acceptance=acceptance).next_k(
        RoundView(torch.ones(4, dtype=torch.bool), room))
    assert (k > 0).tolist() == [True, False, True, True]  # learnt: every row with room drafts


def test_cost_policy_in_the_engine_is_exact(tiny_target, tiny_pair, tmp_path, monkeypatch):
    """Greedy output under the cost-aware policy is the target's own: with a cost table that
    makes drafting nearly free (long drafts, an oracle drafter), and with the tiny pair's
    own costs profiled into the cache folder on first use."""
    from diffuspec.drafters import load_drafter

    monkeypatch.setenv("DIFFUSPEC_CACHE", str(tmp_path))
    model, tok = tiny_target
    prompts = [tok(p)["input_ids"] for p in ["def f(x):", "import os\n", "x = [1, 2"]]
    flat = CostTable("flat", verify={r: {w: 1.0 + 0.001 * w for w in (1, 33)} for r in (1, 64)},
                     propose={r: {k: 0.01 for k in (1, 32)} for r in (1, 64)})
    flat.save(tmp_path / "flat.json")
    cfg = DiffuSpecConfig.from_kwargs(adl="cost", k_max=8, k_init=4, k_min=1, cost_table=str(tmp_path / "flat.json"))
    engine = SpeculativeEngine(model, OracleDrafter(model, tok.mask_token_id), cfg, None,
                               emit_vocab=model.config.vocab_size)
    outs = engine.generate(prompts, SamplingParams(max_new_tokens=16))
    for p, o in zip(prompts, outs):
        assert o.token_ids == hf_greedy(model, p, 16, None)
        assert max(o.stats.draft_lengths) == 8 and o.stats.rounds <= 4  # long drafts, all accepted
    profiled = SpeculativeEngine(model, load_drafter(tiny_pair[1]), DiffuSpecConfig.from_kwargs(adl="cost"), None,
                                 emit_vocab=model.config.vocab_size)
    for p, o in zip(prompts, profiled.generate(prompts, SamplingParams(max_new_tokens=16))):
        assert o.token_ids == hf_greedy(model, p, 16, None)
    saved = [f for f in (tmp_path / "costs").glob("*.json") if not f.name.startswith("few-rows-")]  # (cost tables)
    assert len(saved) == 1 and set(CostTable.load(saved[0]).verify) >= {2, 4}  # measured around 3 rows
    assert profiled.costs.profile_seconds > 0  # the time it took, which rounds leave out of their own


def test_rounds_the_policy_holds_plain_skip_its_bookkeeping(tiny_target, tiny_pair, tmp_path, monkeypatch):
    """Where drafting cannot pay (every verified token costs a whole step), the policy
    decides plain decoding and re-decides only every ``recheck_every`` rounds; the rounds in
    between cost what a round without a drafter does: no policy call, no guard sample. The
    output is the target's own."""
    from diffuspec.drafters import load_drafter
    from diffuspec.guard import ThroughputGuard
    from diffuspec.scheduler import CostAwareDraftLength

    monkeypatch.setenv("DIFFUSPEC_CACHE", str(tmp_path))
    model, tok = tiny_target
    busy = CostTable("busy", verify={r: {w: float(r * w) for w in (1, 33)} for r in (1, 64)},
                     propose={r: {k: 0.01 for k in (1, 32)} for r in (1, 64)})
    busy.save(tmp_path / "busy.json")
    cfg = DiffuSpecConfig.from_kwargs(adl="cost", cost_table=str(tmp_path / "busy.json"))
    engine = SpeculativeEngine(model, load_drafter(tiny_pair[1]), cfg, None, emit_vocab=model.config.vocab_size)
    calls = {"choose": 0, "allow": 0}
    for cls, name in ((CostAwareDraftLength, "choose"), (ThroughputGuard, "allow")):
        original = getattr(cls, name)
        monkeypatch.setattr(cls, name, lambda self, *a, _f=original, _n=name: (
            calls.__setitem__(_n, calls[_n] + 1), _f(self, *a))[-1])
    prompt = tok("def f(x):")["input_ids"]
    out = engine.generate([prompt], SamplingParams(max_new_tokens=40))[0]
    assert out.token_ids == hf_greedy(model, prompt, 40, None)
    assert out.stats.rounds == 40 and set(out.stats.draft_lengths) == {0}
    assert 3 <= calls["choose"] <= 40 // CostAwareDraftLength.recheck_every + 3  # not once a round
    assert calls["allow"] == calls["choose"]


def test_profiling_inside_a_round_is_not_the_rounds_time(tiny_target, tiny_pair, tmp_path, monkeypatch):
    """The cost model profiles a batch size the first time it meets it, inside a round. The
    throughput guard times rounds without it: a round that profiled says nothing about
    drafting's rate (here every round "profiles" for 0.1 s)."""
    import time

    from diffuspec.drafters import load_drafter

    monkeypatch.setenv("DIFFUSPEC_CACHE", str(tmp_path))
    model, tok = tiny_target
    engine = SpeculativeEngine(model, load_drafter(tiny_pair[1]), DiffuSpecConfig.from_kwargs(adl="cost"), None,
                               emit_vocab=model.config.vocab_size)
    prompt = tok("def f(x):")["input_ids"]
    engine.generate([prompt], SamplingParams(max_new_tokens=4))  # the cost model is built and profiled
    costs = engine.costs

    def slow_ensure(rows):
        time.sleep(0.1)
        costs.profile_seconds += 0.1
    monkeypatch.setattr(costs, "ensure", slow_ensure)
    from diffuspec.guard import ThroughputGuard

    timed = []
    finished = ThroughputGuard.finished
    monkeypatch.setattr(ThroughputGuard, "finished", lambda self, tokens, seconds: (
        timed.append(seconds), finished(self, tokens, seconds))[-1])
    engine.guards.clear()
    engine.generate([prompt], SamplingParams(max_new_tokens=12))
    assert costs.profile_seconds >= 0.2 and len(timed) >= 3  # profiling ran in rounds the guard timed
    assert max(timed) < 0.08


def test_auto_routes_small_greedy_batches_to_the_paper_rule():
    """adl="auto": greedy batches of 2 to 15 rows take the paper's ADL under the CPU verify
    budget; one row, sampling and bigger batches take the cost model (which here says: don't
    draft)."""
    cfg = ADLConfig(policy="auto", k_min=1, k_max=8, k_init=4)
    costs = TableCosts(lambda rows, w: rows * w * 1.0)  # compute-bound: drafting cannot pay
    greedy = make_policy(2, cfg, "cpu", costs=costs, acceptance=AcceptanceModel(8, greedy=True))
    view = RoundView(torch.ones(2, dtype=torch.bool), torch.tensor([8, 3]))
    assert greedy.next_k(view).tolist() == [8, 3]   # ADL: k_init + delta, within each row's room
    alone = make_policy(1, cfg, "cpu", costs=costs, acceptance=AcceptanceModel(8, greedy=True))
    assert alone.next_k(RoundView(torch.ones(1, dtype=torch.bool), torch.tensor([8]))).tolist() == [0]
    sampling = make_policy(2, cfg, "cpu", costs=costs, acceptance=AcceptanceModel(8, greedy=False))
    assert sampling.next_k(view).tolist() == [0, 0]
    big = make_policy(16, cfg, "cpu", costs=costs, acceptance=AcceptanceModel(8, greedy=True))
    assert big.next_k(RoundView(torch.ones(16, dtype=torch.bool), torch.full((16,), 8))).tolist() == [0] * 16
    assert make_policy(4, cfg, "cpu", costs=costs, acceptance=AcceptanceModel(8, greedy=True)).next_k(
        RoundView(torch.ones(4, dtype=torch.bool), torch.full((4,), 8))).tolist() == [8] * 4  # 48 // 4 - 1 = 11
    assert make_policy(12, cfg, "cpu", costs=costs, acceptance=AcceptanceModel(8, greedy=True)).next_k(
        RoundView(torch.ones(12, dtype=torch.bool), torch.full((12,), 8))).tolist() == [3] * 12  # 48 // 12 - 1


def _run_guard(guard, rows: int, spec_rate: float, plain_rate: float, steps: int) -> list[bool]:
    """Drive a ThroughputGuard with steps whose measured tokens/s depends on the mode."""
    allowed = []
    for _ in range(steps):
        ok = guard.allow(rows)
        guard.started(rows, drafted=ok)
        guard.finished(int(spec_rate if ok else plain_rate), 1.0)
        allowed.append(ok)
    return allowed


def test_throughput_guard_stops_drafting_that_measures_slower():
    from diffuspec.guard import ThroughputGuard

    guard = ThroughputGuard(min_samples=8, probe_every=64, probe_cost=0.02)
    allowed = _run_guard(guard, 64, spec_rate=700, plain_rate=1000, steps=1000)
    late = allowed[200:]
    # Equal 1 s steps, drafting at 0.7x: a probe forgoes 0.3 s of plain tokens, so one comes
    # after 0.3 / 0.02 = 15 plain steps (one step in 16 drafts: 1.9% of the time lost).
    assert 800 // 17 <= sum(late) <= 800 // 16 + 1
    # drafting that pays keeps drafting, but for one probe of plain decoding in 64 steps
    allowed = _run_guard(guard, 1, spec_rate=400, plain_rate=120, steps=1000)
    assert 0.97 < sum(allowed[200:]) / 800 < 1.0
    # the classes are independent, and a load that changes is followed
    allowed = _run_guard(guard, 64, spec_rate=1500, plain_rate=1000, steps=2000)
    assert sum(allowed[-500:]) / 500 > 0.97


@pytest.mark.parametrize("spec_rate, wait", [(300, 35), (700, 15), (950, 4)])
def test_throughput_guard_probes_drafting_as_often_as_it_can_afford(spec_rate, wait):
    """Where drafting loses, it is re-measured after (1 - ratio) / probe_cost of the plain
    steps' time (at least 4 plain steps, at most probe_every): a near tie (0.95x) is probed
    after 4 plain steps, so a request that drafts well is found soon; a clear loss (0.3x)
    after 35."""
    from diffuspec.guard import ThroughputGuard

    guard = ThroughputGuard(min_samples=8, probe_every=64, probe_cost=0.02)
    allowed = _run_guard(guard, 1, spec_rate=spec_rate, plain_rate=1000, steps=1200)
    late = allowed[200:]
    assert 1000 / (wait + 2) - 3 <= sum(late) <= 1000 / (wait + 1) + 3  # (+1: a wait just past a step)
    assert sum(late) * (1 - spec_rate / 1000) / 1000 <= 0.021  # the time the probes forgo


def test_throughput_guard_starts_from_the_profiled_plain_step():
    """With a prior for plain steps (the profiled verify pass), drafting that pays runs from
    the first step: no plain steps are forced to learn plain's rate, and the first probe of
    plain comes after probe_every drafting steps; drafting that loses against the prior
    stops after min_samples steps (a prior does not decide by time alone: one slow first
    drafting step, which encodes a whole prompt, must not stop drafting)."""
    from diffuspec.guard import ThroughputGuard

    prior = lambda rows: 1.0  # noqa: E731  (a plain step of 1000 rows: 1000 tokens in 1 s, as _run_guard's)
    allowed = _run_guard(ThroughputGuard(min_samples=8, probe_every=64, plain_prior=prior), 1000,
                         spec_rate=1500, plain_rate=1000, steps=200)
    assert all(allowed[:64]) and not all(allowed[:70])
    without = _run_guard(ThroughputGuard(min_samples=8, probe_every=64), 1000, spec_rate=1500, plain_rate=1000,
                         steps=200)
    assert not all(without[:16])  # the learning phase measures plain steps
    allowed = _run_guard(ThroughputGuard(min_samples=8, probe_every=64, plain_prior=prior), 1000,
                         spec_rate=700, plain_rate=1000, steps=40)
    assert all(allowed[:8]) and sum(allowed[8:24]) <= 1
    # a slow first drafting step (its prompt encoded in the drafter) against the prior: not decisive
    guard = ThroughputGuard(min_samples=8, probe_every=64, plain_prior=lambda rows: 0.1)  # 1000 rows in 0.1 s
    assert guard.allow(1000)
    guard.started(1000, drafted=True)
    guard.finished(1000, 1.5)
    assert guard.allow(1000)


def test_throughput_guard_weighs_a_long_step_by_its_time():
    """A busy batch: one drafting step takes as long as 20 plain steps and emits 5 times
    their tokens. The guard decides after that one step (its time outweighs min_samples
    measured plain steps), and probes it again only after 16 such steps' worth of plain time
    (a quarter of probe_every: a probe then costs ~1/16 of the time)."""
    from diffuspec.guard import ThroughputGuard

    guard = ThroughputGuard(min_samples=8, probe_every=64)
    for _ in range(8):  # plain steps measured first (say the policy chose not to draft): 64 tokens in 50 ms
        guard.started(64, drafted=False)
        guard.finished(64, 0.05)
    assert guard.allow(64)  # drafting not measured yet
    guard.started(64, drafted=True)
    guard.finished(320, 1.0)  # 320 tokens/s against 1280 for plain
    drafted = []
    for _ in range(3000):
        ok = guard.allow(64)
        guard.started(64, drafted=ok)
        guard.finished(320 if ok else 64, 1.0 if ok else 0.05)
        drafted.append(ok)
    assert sum(drafted[:300]) == 0  # 16 s of plain steps (320 of them) before the first probe
    assert 1 <= sum(drafted) <= 3000 * 0.05 // 16 + 1  # then one probe per 16 s of plain time


def test_throughput_guard_ignores_steps_it_cannot_compare():
    from diffuspec.guard import ThroughputGuard

    guard = ThroughputGuard(min_samples=2)
    guard.started(8, drafted=True)
    guard.discard()
    guard.finished(100, 1.0)
    assert guard.rates == {}


def test_throughput_guard_follows_a_probe_that_finds_drafting_paying_now():
    """Drafting lost on the text so far (50 tokens/s against plain's 100); the text turns
    repetitive and the next probe measures 500 tokens/s. A probe weighs half (probes are
    rare): one such probe lets drafting run again. At the running steps' weight (0.1) it
    would have taken several probes, each after ~25 plain steps (Spec-Bench: prompts whose
    drafts pay from their middle on were decoded plainly to the end)."""
    from diffuspec.guard import ThroughputGuard

    guard = ThroughputGuard(min_samples=8, probe_every=64, probe_cost=0.02)
    allowed = _run_guard(guard, 1, spec_rate=50, plain_rate=100, steps=300)
    assert not any(allowed[100:]) or sum(allowed[100:]) <= 10  # drafting loses: probes only
    steps = 0
    while not guard.allow(1):  # plain steps until the next probe
        guard.started(1, drafted=False)
        guard.finished(100, 1.0)
        steps += 1
    assert steps <= 30
    guard.started(1, drafted=True)
    guard.finished(500, 1.0)   # the probe: drafting pays now
    assert guard.allow(1)      # and drafting runs at once


@pytest.mark.parametrize("drafter_s, copy_s, want_drafter, want_copies", [
    (0.052, 0.015, False, True),   # MT-Bench at 16 requests: the drafter's steps lose, copies win
    (0.020, 0.030, True, False),   # the drafter's steps win, copy-only steps lose to plain ones
])
def test_copy_and_drafter_steps_are_guarded_apart(drafter_s, copy_s, want_drafter, want_copies):
    """Steps with a drafter pass are measured against steps without one, copy-only steps
    against plain ones: a fast copy step no longer lets a slow drafter run (in one guard its
    rate hid the drafter's), and a slow copy step is stopped while the drafter runs on.
    Steps of 16 rows: a drafter step emits 48 tokens, a copy step 20, a plain step 16 in 13 ms;
    the policy asks for the drafter every other step, copies in the others."""
    from diffuspec.guard import CopyAndDraftGuards

    guards = CopyAndDraftGuards()
    modes = []
    for step in range(400):
        drafter = step % 2 == 0 and guards.drafter.allow(16)
        copies = not drafter and guards.copies.allow(16)
        guards.started(16, drafter=drafter, copies=copies)
        tokens, seconds = (48, drafter_s) if drafter else (20, copy_s) if copies else (16, 0.013)
        guards.finished(tokens, seconds)
        modes.append("drafter" if drafter else "copy" if copies else "plain")
    last = modes[-100:]
    assert last.count("drafter") > 40 if want_drafter else last.count("drafter") < 10
    assert last.count("copy") > 40 if want_copies else last.count("copy") < 10
    assert guards.forced_plain > 0


def test_copies_are_cut_to_what_pays():
    """CopyLengths on a padded round of two rows, one copy of 6 tokens and one of 3. Cheap
    tokens (a round costs 1 + 0.01·K) and copies kept 95% of the time: the whole copies.
    A token costs half a round (1 + 0.5·K) and copies are kept 10% of the time: E(1) =
    2 + 0.1 + 0.1 tokens in 1.5 s against 2 in 1 s: none. Perfect copies would pay there
    (K = 1: 4 tokens in 1.5 s), so after ``explore_every`` calls that kept nothing, the
    longest copy explores ``explore_k`` tokens."""
    cut = CopyLengths(8)
    pooled = cut.acceptance
    have = np.array([6, 3])
    cheap = lambda kmax: 1.0 + 0.01 * np.arange(kmax + 1)  # noqa: E731
    dear = lambda kmax: 1.0 + 0.5 * np.arange(kmax + 1)    # noqa: E731
    pooled.reached[:], pooled.accepted[:], pooled._rates = 1000.0, 950.0, None
    assert cut.cut(have, cheap, packed=False).tolist() == [6, 3]
    pooled.accepted[:], pooled._rates = 100.0, None
    outcomes = [cut.cut(have, dear, packed=False).tolist() for _ in range(CostAwareDraftLength.explore_every)]
    assert all(o == [0, 0] for o in outcomes[:-1])
    assert outcomes[-1] == [CostAwareDraftLength.explore_k, 0]
    # what a round of copies teaches: the first row kept 2 of 6, the second all 3
    fresh = CopyLengths(8)
    fresh.observe(np.array([6, 3]), np.array([2, 3]))
    assert fresh.acceptance.reached[:4].tolist() == [2, 2, 2, 0] and fresh.acceptance.accepted[:4].tolist() == [2, 2, 1, 0]


def test_copy_rounds_verify_the_context_where_the_drafter_does_not_run(tiny_target, tiny_pair, tmp_path,
                                                                       monkeypatch):
    """A drafter pass far too dear to pay (100 s) and cheap verified tokens: the cost policy
    never drafts, and the rounds that are not held plain verify copies from the context
    instead (prompt-lookup drafts, no pass). Greedy output is the target's own, and seeded
    sampling draws exactly what plain decoding draws with the same seed; the copies teach
    their own acceptance, not the drafter's. ``copy_rounds=False`` restores plain rounds."""
    from diffuspec.drafters import load_drafter

    monkeypatch.setenv("DIFFUSPEC_CACHE", str(tmp_path))
    model, tok = tiny_target
    dear = CostTable("dear", verify={r: {w: 0.01 + 0.0001 * w for w in (1, 33)} for r in (1, 64)},
                     propose={r: {k: 100.0 for k in (1, 32)} for r in (1, 64)})
    dear.save(tmp_path / "dear.json")
    prompts = [tok(p)["input_ids"] for p in ["x = 1\ny = 2\nx = 1\ny = 2\nx = 1\n", "def f(x):\n    return x\n" * 3]]

    def engine(**kw):
        cfg = DiffuSpecConfig.from_kwargs(adl="cost", cost_table=str(tmp_path / "dear.json"), **kw)
        return SpeculativeEngine(model, load_drafter(tiny_pair[1]), cfg, None, emit_vocab=model.config.vocab_size)

    copying = engine()
    outs = copying.generate(prompts, SamplingParams(max_new_tokens=48))
    for p, o in zip(prompts, outs):
        assert o.token_ids == hf_greedy(model, p, 48, None)
        assert o.stats.time_draft == 0.0  # the drafter never ran
    assert sum(o.stats.copied_rounds for o in outs) > 0
    assert sum(sum(o.stats.accepted) for o in outs) > 0  # and some copied tokens were kept
    regime = (0.0, None, None)
    assert copying.acceptance[regime].reached.sum() == 0 and copying.copy_lengths[regime].acceptance.reached.sum() > 0
    sampled = SamplingParams(max_new_tokens=48, temperature=0.7, seed=3)
    plain = engine(speculate=False).generate(prompts, sampled)
    assert [o.token_ids for o in copying.generate(prompts, sampled)] == [o.token_ids for o in plain]
    off = engine(retrieval={"copy_rounds": False}).generate(prompts, SamplingParams(max_new_tokens=48))
    assert [o.token_ids for o in off] == [o.token_ids for o in outs]
    assert all(o.stats.copied_rounds == 0 and set(o.stats.drafted) == {0} for o in off)


@pytest.mark.parametrize("copies_replace_drafter, want_drafter", [(True, False), (False, True)])
def test_engine_compares_the_drafter_with_plain_rounds_only(copies_replace_drafter, want_drafter):
    """In our engine a round copies only where no row drafts, i.e. where the text repeats,
    so a copy round's rate is no measure of the rounds the drafter takes: there the drafter
    is compared with plain rounds alone (``copies_replace_drafter=False``). Rounds of 16
    rows: a drafter round emits 48 tokens in 30 ms (1600 tokens/s), a copy round 20 in
    10 ms (2000), a plain one 16 in 13 ms (1231). Counting copy rounds as the drafter's
    alternative stops the drafter; against plain rounds it runs."""
    from diffuspec.guard import CopyAndDraftGuards

    guards = CopyAndDraftGuards(copies_replace_drafter=copies_replace_drafter)
    modes = []
    for step in range(400):
        drafter = step % 2 == 0 and guards.drafter.allow(16)
        copies = not drafter and guards.copies.allow(16)
        guards.started(16, drafter=drafter, copies=copies)
        tokens, seconds = (48, 0.030) if drafter else (20, 0.010) if copies else (16, 0.013)
        guards.finished(tokens, seconds)
        modes.append("drafter" if drafter else "copy" if copies else "plain")
    last = modes[-100:]
    assert last.count("drafter") > 40 if want_drafter else last.count("drafter") < 10
    assert last.count("copy") > 20
