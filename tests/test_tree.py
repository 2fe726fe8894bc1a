"""Draft trees (diffuspec.tree): the mask written out, best-first construction by hand, greedy
exactness, the KV cache after the accepted branch is moved into place, and the sampled
distribution."""

from __future__ import annotations

import pytest
import torch
from conftest import OracleDrafter, RandomDrafter, hf_greedy
from test_sampling import PROMPT, V, N, _chi_square_p, _exact_joint, small_vocab_pair  # noqa: F401

from diffuspec import DiffuSpecConfig, SamplingParams
from diffuspec.config import LatticeConfig
from diffuspec.drafters import DiffusionDrafter, load_drafter
from diffuspec.engine import SpeculativeEngine
from diffuspec.lattice import Lattice
from diffuspec.target import TargetRunner
from diffuspec.tree import ancestor_mask, build_tree
from diffuspec.verify import accept_tree

PROMPTS = ["def fibonacci(n):", "import os\nimport sys\n\n\nclass Path(object):\n    def __init__(self", "x",
           "for i in range(10):\n    print("]


class SwappedOracle(OracleDrafter):
    """The target's greedy continuation as the *second* choice at every position (log q
    -0.5 against 0 for a wrong token): the argmax path is wrong from its first token, but a
    tree with a few extra nodes holds the right one."""

    def draft(self, tokens, lengths, k, context=None, state=None):
        right = super().draft(tokens, lengths, k, context, state).argmax(-1)          # [B, k]
        logits = torch.full((tokens.shape[0], int(k.max()), self.vocab_size), -1e4)
        logits.scatter_(2, ((right + 1) % self.vocab_size)[..., None], 0.0)
        logits.scatter_(2, right[..., None], -0.5)
        return logits


def _engine(target, drafter, eos=None, **cfg):
    return SpeculativeEngine(target, drafter, DiffuSpecConfig.from_kwargs(**cfg), eos,
                             emit_vocab=target.config.vocab_size)


TREE = {"tree": {"enabled": True, "extra_nodes": 6}, "adl": "fixed", "k_init": 4, "k_max": 4}


def test_tree_mask_and_positions_written_out(tiny_target):
    """The module docstring's tree: root ── a(0) ── b(1) ── c(3), root ── d(2)."""
    parent = torch.tensor([[-1, 0, -1, 1]])
    depth = torch.tensor([[1, 2, 1, 3]])
    expected = torch.tensor([  # rows: root, a, b, d, c; columns the same
        [1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [1, 1, 1, 0, 0],
        [1, 0, 0, 1, 0],
        [1, 1, 1, 0, 1]], dtype=torch.bool)
    assert torch.equal(ancestor_mask(parent)[0], expected)

    model, _ = tiny_target
    runner = TargetRunner(model, 1, 16)
    seen = {}

    def spy(**kwargs):
        seen.update(kwargs)
        return model.__class__.forward(model, **kwargs)

    runner.model = spy
    runner.forward(torch.tensor([[5, 6, 7, 8, 9]]), torch.tensor([3]), tree=(parent, depth))
    assert seen["position_ids"].tolist() == [[3, 4, 5, 4, 6]]     # start + depth (the root at start)
    allowed = seen["attention_mask"][0, 0] == 0                    # [5 queries, 8 visible columns]
    assert allowed[:, :3].all()                                    # the row's cache: everyone
    assert torch.equal(allowed[:, 3:], expected)                   # the block: ancestors and itself
    assert runner.cache.write_pos.tolist() == [[3, 4, 5, 6, 7]]    # written in node order


def _lattice(tokens, logq, length):
    tokens = torch.tensor([tokens])
    logq = torch.tensor([logq], dtype=torch.float32)
    return Lattice(tokens=tokens, logq=logq, valid=torch.isfinite(logq), length=torch.tensor([length]),
                   gen_len=torch.tensor([length]))


def test_build_tree_best_first_by_hand():
    """Three positions, two candidates each. Spine (the path) = 10, 20, 30; the extra nodes
    by branch log q: root→11 (-1.2), 10→21 (-0.1-1.0 = -1.1 first), then root→11 ..."""
    lat = _lattice([[10, 11], [20, 21], [30, 31]],
                   [[-0.1, -1.2], [-0.2, -1.0], [-0.3, -2.0]], 3)
    tree = build_tree(lat, torch.tensor([[10, 20, 30]]), extra=3, eos_token_id=None)
    # extra nodes by score: 10→21 (-1.1), root→11 (-1.2), 21→30 (-1.4, ahead of 11→20 at
    # -1.4 by rounding: -1.40000001 vs -1.40000005 in float32); 20→31 (-2.3) is not reached
    assert tree.tokens[0].tolist() == [10, 20, 30, 21, 11, 30]
    assert tree.parent[0].tolist() == [-1, 0, 1, 0, -1, 3]
    assert tree.depth[0].tolist() == [1, 2, 3, 2, 1, 3]
    assert tree.valid.all()
    chain = build_tree(lat, torch.tensor([[10, 20, 30]]), extra=0, eos_token_id=None)
    assert chain.tokens[0].tolist() == [10, 20, 30] and chain.parent[0].tolist() == [-1, 0, 1]
    # a node holding EOS gets no children; nothing past the lattice's length
    eos = build_tree(_lattice([[10, 11], [20, 21], [30, 31]], [[-0.1, -0.2], [-0.1, -5.0], [-0.1, -5.0]], 2),
                     torch.tensor([[10, 20, 30]]), extra=4, eos_token_id=11)
    assert eos.depth[0].max() <= 2
    holds_eos = [j for j, t in enumerate(eos.tokens[0].tolist()) if t == 11]
    assert holds_eos and not set(holds_eos) & set(eos.parent[0].tolist())


def test_accept_tree_walks_the_targets_tokens():
    """Hand-built logits: the target wants 7 after the root, then 8, then 9."""
    tokens = torch.tensor([[3, 7, 8, 4]])      # root→3, root→7, 7→8, 8→4
    parent = torch.tensor([[-1, -1, 1, 2]])
    depth = torch.tensor([[1, 1, 2, 3]])
    want = [7, 0, 8, 9, 0]                     # the target's argmax at root, 3, 7, 8, 4
    logits = torch.full((1, 5, 12), -5.0)
    for i, t in enumerate(want):
        logits[0, i, t] = 5.0
    n, nxt, nodes = accept_tree(logits, tokens, parent, torch.ones(1, 4, dtype=torch.bool), depth)
    assert n.tolist() == [2] and nxt.tolist() == [9] and nodes[0].tolist() == [1, 2, -1]


@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("kind", ["oracle", "swapped", "random", "dream"])
def test_tree_greedy_equals_target_only(tiny_target, tiny_pair, kind, batch):
    model, tok = tiny_target
    mask = tok.mask_token_id
    drafter = {"oracle": lambda: OracleDrafter(model, mask), "swapped": lambda: SwappedOracle(model, mask),
               "random": lambda: RandomDrafter(model.config.vocab_size, mask),
               "dream": lambda: load_drafter(tiny_pair[1])}[kind]()
    prompts = [tok(p)["input_ids"] for p in PROMPTS[:batch]]
    new = 20
    outs = _engine(model, drafter, **TREE).generate(prompts, SamplingParams(max_new_tokens=new))
    for p, o in zip(prompts, outs):
        assert o.token_ids == hf_greedy(model, p, new, None)
    st = outs[0].stats
    assert sum(st.accepted) + st.rounds == st.new_tokens
    if kind == "swapped":  # every path's first token is wrong: the root's second child is right
        assert sum(st.accepted) >= st.rounds - 1 > 0


def test_tree_accepts_branches_the_path_misses(tiny_target):
    model, tok = tiny_target
    prompt = [tok(PROMPTS[0])["input_ids"]]
    path = _engine(model, SwappedOracle(model, tok.mask_token_id), adl="fixed", k_init=4, k_max=4).generate(
        prompt, SamplingParams(max_new_tokens=24))[0]
    tree = _engine(model, SwappedOracle(model, tok.mask_token_id), **TREE).generate(
        prompt, SamplingParams(max_new_tokens=24))[0]
    assert path.token_ids == tree.token_ids == hf_greedy(model, prompt[0], 24, None)
    assert sum(path.stats.accepted) <= 1 < sum(tree.stats.accepted)  # the wrong token rarely happens to be right
    assert tree.stats.rounds < path.stats.rounds


def test_tree_with_no_extra_nodes_is_the_path(tiny_target, tiny_pair):
    model, tok = tiny_target
    prompts = [tok(p)["input_ids"] for p in PROMPTS]
    cfg = {"adl": "fixed", "k_init": 6, "k_max": 6}
    path = _engine(model, load_drafter(tiny_pair[1]), **cfg).generate(prompts, SamplingParams(max_new_tokens=16))
    chain = _engine(model, load_drafter(tiny_pair[1]), tree={"enabled": True, "extra_nodes": 0}, **cfg).generate(
        prompts, SamplingParams(max_new_tokens=16))
    for a, b in zip(path, chain):
        assert a.token_ids == b.token_ids and a.stats.accepted == b.stats.accepted


def test_tree_eos_and_length_inside_a_branch(tiny_target):
    model, tok = tiny_target
    prompt = tok(PROMPTS[0])["input_ids"]
    free = hf_greedy(model, prompt, 12, None)
    eos = free[3]
    out = _engine(model, SwappedOracle(model, tok.mask_token_id), eos, **TREE).generate(
        [prompt], SamplingParams(max_new_tokens=12))[0]
    assert out.token_ids == hf_greedy(model, prompt, 12, eos) and out.finish_reason == "eos"
    for new in (1, 2, 3):
        out = _engine(model, SwappedOracle(model, tok.mask_token_id), **TREE).generate(
            [prompt], SamplingParams(max_new_tokens=new))[0]
        assert out.token_ids == free[:new] and out.finish_reason == "length"


def test_cache_after_moving_the_branch_equals_a_fresh_prefill(tiny_target):
    """After a tree pass whose accepted branch is not the first one, the branch's keys and
    values moved into place give the next step the logits of a fresh prefill of the text."""
    model, tok = tiny_target
    prompt = tok(PROMPTS[1])["input_ids"]
    right = hf_greedy(model, prompt, 4, None)
    wrong = [(t + 1) % model.config.vocab_size for t in right]
    # nodes: a wrong chain first (0, 1), then the right chain (2, 3, 4): root→w0→w1, root→r0→r1→r2
    tokens = torch.tensor([[wrong[0], wrong[1], right[0], right[1], right[2]]])
    parent = torch.tensor([[-1, 0, -1, 2, 3]])
    depth = torch.tensor([[1, 2, 1, 2, 3]])
    with torch.inference_mode():
        _move_and_compare(model, prompt, right, tokens, parent, depth)


def _move_and_compare(model, prompt, right, tokens, parent, depth):
    runner = TargetRunner(model, 1, 64)
    n = len(prompt)
    runner.forward(torch.tensor([prompt[:-1]]), torch.zeros(1, dtype=torch.int64), keep=1)
    logits = runner.forward(torch.cat([torch.tensor([[prompt[-1]]]), tokens], 1), torch.tensor([n - 1]),
                            tree=(parent, depth))
    acc, nxt, nodes = accept_tree(logits, tokens, parent, torch.ones(1, 5, dtype=torch.bool), depth)
    assert acc.tolist() == [3] and nxt.tolist() == [right[3]] and nodes[0].tolist() == [2, 3, 4]
    runner.cache.move(n + nodes, n + torch.arange(3)[None, :])
    step = runner.forward(torch.tensor([[right[3]]]), torch.tensor([n + 3]))[0, -1]
    fresh = model(torch.tensor([prompt + right[:4]])).logits[0, -1]
    assert torch.allclose(step, fresh, atol=1e-4)


class SpreadDrafter(DiffusionDrafter):
    """Far-from-uniform, spread per-position distributions (log r plus noise), so the
    lattice holds several candidates and the tree branches at every position."""

    def __init__(self):
        super().__init__()
        self.vocab_size, self.mask_token_id, self.max_positions = V + 1, V, 64
        self.logr = torch.log(torch.tensor([16.0, 8, 4, 2, 1, 1, 0.5, 0.5, 1e-9]))
        self.gen = torch.Generator().manual_seed(5)

    def draft(self, tokens, lengths, k, context=None, state=None):
        b, kmax = tokens.shape[0], int(k.max())
        return self.logr + torch.randn(b, kmax, V + 1, generator=self.gen)


def _tree_samples(target, drafter, temperature, top_p, seed, engine_hook=None):
    cfg = DiffuSpecConfig.from_kwargs(tree={"enabled": True, "extra_nodes": 6}, adl="fixed", k_init=3, k_min=2, k_max=3,
                                      verify_budget=None, max_batch_size=None,
                                      lattice=LatticeConfig(mass=0.99, max_candidates=4))
    engine = SpeculativeEngine(target, drafter, cfg, eos_token_id=None, emit_vocab=V)
    if engine_hook is not None:
        engine_hook(engine)
    outs = engine.generate([PROMPT] * N, SamplingParams(max_new_tokens=3, temperature=temperature, top_p=top_p,
                                                          seed=seed))
    firsts = torch.tensor([o.token_ids[0] * V + o.token_ids[1] for o in outs])
    return torch.bincount(firsts, minlength=V * V), sum(o.stats.accepted[0] for o in outs)


@pytest.mark.parametrize("temperature,top_p", [(1.0, None), (1.0, 0.8)])
def test_tree_sampling_matches_target(small_vocab_pair, temperature, top_p):  # noqa: F811
    target, _ = small_vocab_pair
    exact = _exact_joint(target, temperature, top_p)
    counts, accepted = _tree_samples(target, SpreadDrafter(), temperature, top_p, seed=1)
    assert 0 < accepted < 2 * N  # drafts were really tested: some accepted, some not
    assert _chi_square_p(counts, exact) > 1e-3

    # Mutation: one uniform for every position of a round (draws no longer independent) must fail.
    def same_uniform(engine):
        original = engine._uniforms
        engine._uniforms = lambda batch, width: original(batch, width)[:, :1].expand(-1, width).contiguous()

    counts, _ = _tree_samples(target, SpreadDrafter(), temperature, top_p, seed=1, engine_hook=same_uniform)
    assert _chi_square_p(counts, exact) < 1e-3
