"""Greedy speculative output must equal greedy target-only output, token for token."""

from __future__ import annotations

import pytest
import torch
from conftest import OracleDrafter, RandomDrafter, hf_greedy

from diffuspec import DiffuSpec, DiffuSpecConfig, SamplingParams
from diffuspec.drafters import BidirectionalTransformer, TransformerDrafter, TransformerSpec, load_drafter
from diffuspec.engine import SpeculativeEngine
from diffuspec.kvcache import RaggedKVCache

PROMPTS = ["def fibonacci(n):", "import os\nimport sys\n\n\nclass Path(object):\n    def __init__(self", "x", "for i in range(10):\n    print("]


def _engine(target, drafter, eos, **cfg):
    return SpeculativeEngine(target, drafter, DiffuSpecConfig.from_kwargs(**cfg), eos, emit_vocab=target.config.vocab_size)


def _prompt_ids(tok, n):
    return [tok(p)["input_ids"] for p in PROMPTS[:n]]


@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("kind", ["oracle", "oracle-corrupt", "random", "dream"])
def test_greedy_equals_target_only(tiny_target, tiny_pair, kind, batch):
    model, tok = tiny_target
    mask = tok.mask_token_id
    drafter = {
        "oracle": lambda: OracleDrafter(model, mask),
        "oracle-corrupt": lambda: OracleDrafter(model, mask, corrupt=True),
        "random": lambda: RandomDrafter(model.config.vocab_size, mask),
        "dream": lambda: load_drafter(tiny_pair[1]),
    }[kind]()
    prompts = _prompt_ids(tok, batch)
    new = 24
    # (the paper's ADL drafts every round: "auto" at one row asks measured costs whether to)
    outs = _engine(model, drafter, eos=None, adl="paper").generate(prompts, SamplingParams(max_new_tokens=new))
    plain = _engine(model, None, eos=None).generate(prompts, SamplingParams(max_new_tokens=new))
    for p, o, a in zip(prompts, outs, plain):
        ref = hf_greedy(model, p, new, None)
        assert o.token_ids == ref
        assert a.token_ids == ref
        assert o.finish_reason == "length" and len(o.token_ids) == new
        assert a.stats.rounds == new  # drafting off: one token a round
    st = outs[0].stats
    assert sum(st.accepted) + st.rounds == st.new_tokens
    if kind == "oracle":
        # Everything proposed is accepted, so rounds are few.
        assert st.accepted == st.drafted
        assert st.rounds < new / 3
    if kind == "oracle-corrupt":
        assert all(a <= 1 for a in st.accepted) and max(st.accepted) == 1


def test_verify_budget_caps_k_over_the_batch(tiny_target):
    """A round verifies at most verify_budget tokens over the batch: with 4 rows and a
    budget of 12 each row drafts at most 12 // 4 - 1 = 2; below 2 per row, plain decoding."""
    model, tok = tiny_target
    prompts, new = _prompt_ids(tok, 4), 18
    drafter = OracleDrafter(model, tok.mask_token_id)
    ref = [o.token_ids for o in _engine(model, None, eos=None).generate(prompts, SamplingParams(max_new_tokens=new))]
    for budget, cap in ((12, 2), (7, 0), (None, 16)):
        outs = _engine(model, drafter, eos=None, verify_budget=budget).generate(prompts, SamplingParams(max_new_tokens=new))
        assert [o.token_ids for o in outs] == ref, budget
        k_used = max(k for o in outs for k in o.stats.draft_lengths)
        assert k_used == cap if budget else k_used > 2, (budget, k_used)
        if cap == 0:
            assert all(o.stats.rounds == new for o in outs)  # one token a round


def test_eos_inside_a_draft(tiny_target):
    """Generation stops at an EOS that sits in the middle of an accepted path."""
    model, tok = tiny_target
    prompt = tok(PROMPTS[0])["input_ids"]
    free = hf_greedy(model, prompt, 12, None)
    eos = free[5]  # make the 6th greedy token the EOS
    ref = hf_greedy(model, prompt, 12, eos)
    assert ref[-1] == eos and len(ref) <= 6
    out = _engine(model, OracleDrafter(model, tok.mask_token_id), eos, k_init=8, adl="paper").generate(
        [prompt], SamplingParams(max_new_tokens=12))[0]
    assert out.token_ids == ref
    assert out.finish_reason == "eos"
    assert out.stats.rounds == 1  # the EOS came inside the first path


@pytest.mark.parametrize("new", [1, 2, 5, 9])
def test_max_new_tokens_reached_mid_path(tiny_target, new):
    model, tok = tiny_target
    prompts = _prompt_ids(tok, 3)
    outs = _engine(model, OracleDrafter(model, tok.mask_token_id), None, k_init=8, k_max=8).generate(
        prompts, SamplingParams(max_new_tokens=new))
    for p, o in zip(prompts, outs):
        assert o.token_ids == hf_greedy(model, p, new, None)
        assert o.finish_reason == "length"


def test_api_batch_of_strings_matches_plain(tiny_pair):
    ds = DiffuSpec.from_pretrained(tiny_pair[0], tiny_pair[1])
    spec = ds.generate(PROMPTS, max_new_tokens=16)
    plain = ds.generate(PROMPTS, max_new_tokens=16, speculate=False)
    assert [r.token_ids for r in spec] == [r.token_ids for r in plain]
    assert [r.text for r in spec] == [r.text for r in plain]
    for r in spec:
        st = r.stats
        assert st.rounds == len(st.accepted) == len(st.drafted) == len(st.draft_lengths)
        assert st.wall_time == pytest.approx(st.time_draft + st.time_search + st.time_verify + st.time_other)
        assert st.time_draft > 0 and st.time_verify > 0


def test_stop_string(tiny_pair):
    ds = DiffuSpec.from_pretrained(tiny_pair[0], tiny_pair[1])
    [free] = ds.generate("def f(", max_new_tokens=20, speculate=False)
    assert len(free.text) > 6
    stop = free.text[3:5]
    [cut] = ds.generate("def f(", max_new_tokens=20, stop=stop)
    assert cut.finish_reason == "stop"
    assert cut.text == free.text[: free.text.index(stop)]
    assert cut.token_ids == free.token_ids[: len(cut.token_ids)]
    assert stop in ds.tokenizer.decode(cut.token_ids, skip_special_tokens=True)
    assert stop not in ds.tokenizer.decode(cut.token_ids[:-1], skip_special_tokens=True)


def test_seeded_determinism(tiny_pair):
    ds = DiffuSpec.from_pretrained(tiny_pair[0], tiny_pair[1])
    a = ds.generate(PROMPTS[:2], max_new_tokens=16, temperature=1.0, top_p=0.9, seed=7)
    b = ds.generate(PROMPTS[:2], max_new_tokens=16, temperature=1.0, top_p=0.9, seed=7)
    c = ds.generate(PROMPTS[:2], max_new_tokens=16, temperature=1.0, top_p=0.9, seed=8)
    assert [r.token_ids for r in a] == [r.token_ids for r in b]
    assert [r.token_ids for r in a] != [r.token_ids for r in c]


def test_cps_and_argmax_paths_both_exact(tiny_target, tiny_pair):
    model, tok = tiny_target
    prompts = _prompt_ids(tok, 4)
    drafter = load_drafter(tiny_pair[1])
    ref = [o.token_ids for o in _engine(model, None, None).generate(prompts, SamplingParams(max_new_tokens=12))]
    for cfg in ({"cps": {"enabled": False}}, {"beam_width": 1}, {"adl": {"enabled": False}, "k_init": 4},
                {"drafter_context": 3}, {"drafter_cache": True}):
        config = DiffuSpecConfig.from_kwargs(**cfg)
        drafter.prefix_cache = bool(config.drafter_cache)  # the approximate cache on a bidirectional drafter
        outs = _engine(model, drafter, None, **cfg).generate(prompts, SamplingParams(max_new_tokens=12))
        assert [o.token_ids for o in outs] == ref, cfg


def test_prefix_causal_drafter_with_cache_is_exact(tiny_target):
    model, tok = tiny_target
    torch.manual_seed(1)
    spec = TransformerSpec(vocab_size=model.config.vocab_size, hidden_size=32, intermediate_size=64, num_layers=2,
                           num_heads=4, num_kv_heads=2, prefix_causal=True, max_position_embeddings=2048)
    drafter = TransformerDrafter(BidirectionalTransformer(spec), mask_token_id=tok.mask_token_id,
                                 pad_token_id=tok.pad_token_id, shifted=True, format="dream").eval()
    assert drafter.prefix_cache
    prompts = _prompt_ids(tok, 4)
    outs = _engine(model, drafter, None).generate(prompts, SamplingParams(max_new_tokens=20))
    for p, o in zip(prompts, outs):
        assert o.token_ids == hf_greedy(model, p, 20, None)
    # Rows that finish early (EOS) keep riding in the batch while ragged rows go on drafting:
    # their padding must stay inside the caches.
    eos = hf_greedy(model, prompts[2], 4, None)[2]
    outs = _engine(model, drafter, eos, k_max=16, k_init=16).generate(prompts, SamplingParams(max_new_tokens=40))
    finished_early = 0
    for p, o in zip(prompts, outs):
        ref = hf_greedy(model, p, 40, eos)
        assert o.token_ids == ref
        finished_early += len(ref) < 40
    assert finished_early >= 1


def test_target_runner_rows_past_capacity(tiny_target):
    """Finished rows keep riding in the batch; their positions may pass the cache's end."""
    from diffuspec.target import TargetRunner

    model, _ = tiny_target
    ids = torch.randint(0, 500, (2, 12))
    runner = TargetRunner(model, 2, 12)
    runner.forward(ids[:, :10], torch.tensor([0, 0]))
    logits = runner.forward(ids[:, :4], torch.tensor([11, 3]))  # row 0 would write at 11..14
    full = model(torch.cat([ids[1:, :3], ids[1:, :4]], 1)).logits[0, 3:]
    assert torch.allclose(logits[1], full, atol=1e-4)


@pytest.mark.parametrize("speculate", [True, False])
def test_continuous_batching_ragged_prompts(tiny_target, speculate):
    """7 ragged prompts, at most 3 in flight: each prompt's output is exactly its greedy
    output alone; rows that finish leave the batch (the target never sees more rows than are
    still generating) and waiting prompts take their places."""
    model, tok = tiny_target
    texts = PROMPTS + ["while True:", "return", "a = [1, 2, 3]\nb = a"]
    prompts = [tok(t)["input_ids"] for t in texts]
    eos = hf_greedy(model, prompts[1], 6, None)[3]  # some rows stop early on this EOS
    drafter = OracleDrafter(model, tok.mask_token_id, corrupt=True) if speculate else None
    engine = _engine(model, drafter, eos, max_batch_size=3, k_max=6, k_init=6)
    new = [5, 14, 9, 20, 3, 11, 16]
    outs = [engine.generate([p], SamplingParams(max_new_tokens=n))[0] for p, n in zip(prompts, new)]
    assert max(engine.target_batch_sizes) == 1
    # one call with every prompt (max_new_tokens differs per prompt only through EOS here)
    both = engine.generate(prompts, SamplingParams(max_new_tokens=20))
    sizes = engine.target_batch_sizes
    assert max(sizes) == 3 and sizes[-1] < 3  # never more than 3 rows; the tail runs with fewer
    assert sum(sizes) == sum(o.stats.rounds for o in both)  # a verify row per unfinished request per round
    for p, o in zip(prompts, both):
        ref = hf_greedy(model, p, 20, eos)
        assert o.token_ids == ref
        assert o.finish_reason == ("eos" if ref[-1] == eos else "length")
        assert o.stats.new_tokens == len(ref) and o.stats.rounds == len(o.stats.accepted)
    assert sum(o.finish_reason == "eos" for o in both) >= 1
    for p, o, n in zip(prompts, outs, new):
        assert o.token_ids == hf_greedy(model, p, n, eos)


def test_cache_rows_leave_and_join_in_place():
    """Finished rows leave and new rows join the batch's KV cache without copying it: select
    moves only the rows whose place changes, and extend writes into the memory of rows that
    left while there is room; the contents are exactly those of gathering and concatenating."""
    torch.manual_seed(0)
    cache = RaggedKVCache(6, 5)
    full = [torch.randn(6, 2, 5, 3), torch.randn(6, 2, 5, 3)]
    cache.keys, cache.values = [full[0].clone()], [full[1].clone()]
    where = cache.keys[0].data_ptr()
    keep = torch.tensor([0, 5, 2, 4])  # rows 1 and 3 finished; row 5 takes row 1's place
    cache.select(keep)
    assert torch.equal(cache.keys[0], full[0][keep]) and torch.equal(cache.values[0], full[1][keep])
    new = RaggedKVCache(2, 5)
    new.keys, new.values = [torch.ones(2, 2, 5, 3)], [torch.full((2, 2, 5, 3), 2.0)]
    cache.extend(new)
    assert cache.batch == 6 and cache.keys[0].data_ptr() == where  # the same memory, filled again
    assert torch.equal(cache.keys[0], torch.cat([full[0][keep], new.keys[0]]))
    assert torch.equal(cache.values[0], torch.cat([full[1][keep], new.values[0]]))
    cache.extend(RaggedKVCache(1, 5))  # no room left: a new allocation, zero rows appended
    assert cache.batch == 7 and torch.equal(cache.keys[0][:4], full[0][keep]) and not cache.keys[0][6].any()


def test_prefill_passes_group_rows_of_similar_length():
    """The worked example of prefill_passes, and its edge cases: rows with nothing to
    prefill cost no pass, one row is one pass, a huge pass cost keeps one pass."""
    from diffuspec.target import prefill_passes

    assert prefill_passes([10, 12, 100, 110], 32) == [(0, 2), (2, 4)]  # 32 + 24 + 32 + 220 < 32 + 440
    assert prefill_passes([0, 0, 5], 32) == [(0, 2), (2, 3)]
    assert prefill_passes([7], 32) == [(0, 1)]
    assert prefill_passes([], 32) == []
    assert prefill_passes([10, 12, 100, 110], 10_000) == [(0, 4)]


def test_ragged_prompts_prefill_in_passes_of_similar_length(tiny_target):
    """Admitted together, a long prompt and short ones are prefilled in separate passes (one
    pass would pad the short ones to the long one), and each prompt's output is still
    exactly its greedy output alone, in prompt order."""
    model, tok = tiny_target
    texts = [PROMPTS[0], PROMPTS[1] * 6, "x", PROMPTS[3], PROMPTS[1] * 5]
    prompts = [tok(t)["input_ids"] for t in texts]
    shapes = []

    def record(module, args, kwargs):  # the engine's target passes
        if isinstance(kwargs.get("past_key_values"), RaggedKVCache):
            shapes.append(tuple(kwargs["input_ids"].shape))

    hook = model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        engine = _engine(model, RandomDrafter(model.config.vocab_size, tok.mask_token_id), None, adl="fixed")
        outs = engine.generate(prompts, SamplingParams(max_new_tokens=12))
    finally:
        hook.remove()
    prefills = shapes[: len(shapes) - len(engine.target_batch_sizes)]  # the verify passes come after them
    assert len(prefills) >= 2
    assert sum(r * w for r, w in prefills) < len(prompts) * (max(map(len, prompts)) - 1)  # less padding than one pass
    assert sum(r for r, _ in prefills) == len(prompts) - 1  # each row once; "x" (one token) needs none
    for p, o in zip(prompts, outs):
        assert o.token_ids == hf_greedy(model, p, 12, None)
