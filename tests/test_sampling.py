"""At T > 0 speculation must reproduce the target's distribution exactly (point-mass rule).

On an 8-token vocabulary, thousands of rows of one prompt are generated in one batch; the
joint distribution of the first two generated tokens is compared by chi-square with the
exact distribution computed from the target's logits here, independently of the engine.
The test first shows it has the power to see a 2% shift of probability mass.
"""

from __future__ import annotations

import math

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from diffuspec import DiffuSpecConfig, SamplingParams
from diffuspec.drafters import DiffusionDrafter
from diffuspec.engine import SpeculativeEngine

V = 8
N = 30_000
PROMPT = [1, 5, 2, 7, 3]


@pytest.fixture(scope="module")
def small_vocab_pair():
    torch.manual_seed(3)
    target = Qwen2ForCausalLM(Qwen2Config(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2,
                                          max_position_embeddings=64)).eval()
    with torch.no_grad():  # spread the logits so the distribution is neither flat nor one-hot
        target.lm_head.weight.mul_(8.0)
    return target, SkewedDrafter()


class SkewedDrafter(DiffusionDrafter):
    """Per row and position, proposes token x with a fixed, far-from-uniform probability
    r(x): every token gets proposed (in and out of the nucleus, likely and unlikely), and a
    wrong residual rule could not cancel out as it would under uniform proposals."""

    def __init__(self):
        super().__init__()
        self.vocab_size, self.mask_token_id, self.max_positions = V + 1, V, 64
        self.r = torch.tensor([16.0, 8, 4, 2, 1, 1, 0.5, 0.5])
        self.gen = torch.Generator().manual_seed(5)

    def draft(self, tokens, lengths, k, context=None, state=None):
        b, kmax = tokens.shape[0], int(k.max())
        pick = torch.multinomial(self.r, b * kmax, replacement=True, generator=self.gen).view(b, kmax)
        logits = torch.full((b, kmax, V + 1), -30.0)
        return logits.scatter(2, pick[..., None], 0.0)


def _reference_probs(logits: torch.Tensor, temperature: float, top_p: float | None) -> torch.Tensor:
    """Written out independently of diffuspec.verify.warp_logits."""
    p = torch.softmax(logits.double() / temperature, -1)
    if top_p is not None:
        order = torch.argsort(p, descending=True)
        kept, total = [], 0.0
        for idx in order.tolist():
            kept.append(idx)
            total += float(p[idx])
            if total >= top_p:
                break
        q = torch.zeros_like(p)
        q[kept] = p[kept]
        p = q / q.sum()
    return p


def _exact_joint(target, temperature, top_p) -> torch.Tensor:  # [V, V]
    with torch.no_grad():
        p1 = _reference_probs(target(torch.tensor([PROMPT])).logits[0, -1], temperature, top_p)
        joint = torch.zeros(V, V, dtype=torch.float64)
        for a in range(V):
            p2 = _reference_probs(target(torch.tensor([PROMPT + [a]])).logits[0, -1], temperature, top_p)
            joint[a] = p1[a] * p2
    return joint.flatten()


def _chi_square_p(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """p-value of Pearson's chi-square; cells expecting < 5 are pooled; Wilson-Hilferty tail."""
    n = counts.sum().item()
    expected = probs * n
    small = expected < 5
    obs = torch.cat([counts[~small].double(), counts[small].double().sum()[None]])
    exp = torch.cat([expected[~small], expected[small].sum()[None]])
    keep = exp > 0
    obs, exp = obs[keep], exp[keep]
    stat = float(((obs - exp) ** 2 / exp).sum())
    df = len(exp) - 1
    z = ((stat / df) ** (1 / 3) - (1 - 2 / (9 * df))) / math.sqrt(2 / (9 * df))
    return 0.5 * math.erfc(z / math.sqrt(2))


def _shifted(probs: torch.Tensor, amount: float = 0.02) -> torch.Tensor:
    """Move `amount` of mass from the likeliest cell to the next ones: a 2% shift."""
    q = probs.clone()
    order = torch.argsort(q, descending=True)
    q[order[0]] -= amount
    q[order[1:5]] += amount / 4
    return q


@pytest.mark.parametrize("temperature,top_p", [(1.0, None), (1.0, 0.8), (0.7, None)])
def test_speculative_sampling_matches_target(small_vocab_pair, temperature, top_p):
    target, drafter = small_vocab_pair
    exact = _exact_joint(target, temperature, top_p)

    # Power: the same test rejects samples drawn from a distribution shifted by 2%.
    gen = torch.Generator().manual_seed(0)
    shifted_counts = torch.bincount(torch.multinomial(_shifted(exact).float(), N, replacement=True, generator=gen),
                                    minlength=V * V)
    assert _chi_square_p(shifted_counts, exact) < 1e-3

    # N rows, drafting anyway: the fixed policy (the default would ask the measured costs,
    # which at 30,000 rows may say no draft pays, and then nothing would be tested)
    cfg = DiffuSpecConfig.from_kwargs(adl="fixed", k_init=4, k_min=2, k_max=4, verify_budget=None)
    engine = SpeculativeEngine(target, drafter, cfg, eos_token_id=None, emit_vocab=V)
    outs = engine.generate([PROMPT] * N, SamplingParams(max_new_tokens=3, temperature=temperature, top_p=top_p, seed=1))
    firsts = torch.tensor([o.token_ids[0] * V + o.token_ids[1] for o in outs])
    # The drafter's proposals must really be tested: some accepted, some rejected.
    accepted = sum(o.stats.accepted[0] for o in outs)
    assert 0 < accepted < 2 * N
    assert _chi_square_p(torch.bincount(firsts, minlength=V * V), exact) > 1e-3

    # Drafting off through the same engine: the same distribution.
    plain = SpeculativeEngine(target, None, cfg, eos_token_id=None, emit_vocab=V).generate(
        [PROMPT] * N, SamplingParams(max_new_tokens=2, temperature=temperature, top_p=top_p, seed=2))
    plain_firsts = torch.tensor([o.token_ids[0] * V + o.token_ids[1] for o in plain])
    assert _chi_square_p(torch.bincount(plain_firsts, minlength=V * V), exact) > 1e-3


def test_seeded_uniforms_are_uniform_from_the_first_draw():
    """Every (seed, request, position) key gets its own uniform, the all-zero one included
    (a mixer without an offset maps it to u = 0: seed 0's first token would always be the
    first token of the vocabulary with any mass), and a position's uniforms over many seeds
    or requests look uniform."""
    from diffuspec.verify import position_uniforms, sample_at

    assert 0.0 < float(position_uniforms(0, torch.tensor([0]), torch.tensor([[0]]))) < 1.0
    over_seeds = torch.cat([position_uniforms(s, torch.tensor([0]), torch.tensor([[0]])).flatten() for s in range(2000)])
    over_requests = position_uniforms(0, torch.arange(2000), torch.zeros(2000, 1, dtype=torch.int64)).flatten()
    for u in (over_seeds, over_requests):
        counts = torch.histc(u.float(), bins=10, min=0.0, max=1.0)
        assert float(((counts - 200) ** 2 / 200).sum()) < 27.9  # chi-square, 9 dof, p = 0.001
    assert int(sample_at(torch.tensor([0.0, 0.5, 0.0, 0.5]), torch.tensor(0.0, dtype=torch.float64))) == 1
