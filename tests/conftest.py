"""Fixtures: tiny random models built on the spot (no downloads), and test drafters."""

from __future__ import annotations

import os
import tempfile

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from diffuspec.drafters import DiffusionDrafter
from diffuspec.recipe.tiny import build_random_pair

torch.set_num_threads(2)
# Cost tables profiled by the tests go to a fresh folder, never the user's cache.
os.environ.setdefault("DIFFUSPEC_CACHE", tempfile.mkdtemp(prefix="diffuspec-test-cache-"))


@pytest.fixture(scope="session")
def tiny_pair(tmp_path_factory):
    """(target_dir, drafter_dir): a random Qwen2 target and a random Dream-format drafter
    sharing a freshly trained 512-token BPE tokenizer."""
    return build_random_pair(tmp_path_factory.mktemp("pair"))


@pytest.fixture(scope="session")
def tiny_target(tiny_pair):
    model = AutoModelForCausalLM.from_pretrained(str(tiny_pair[0])).eval()
    return model, AutoTokenizer.from_pretrained(str(tiny_pair[0]))


class OracleDrafter(DiffusionDrafter):
    """Proposes the target's own greedy continuation as one-hot distributions, so every
    drafted token is accepted (with ``corrupt``, every other position is replaced by a
    wrong token, so acceptance stops early)."""

    def __init__(self, target, mask_token_id: int, corrupt: bool = False):
        super().__init__()
        self.target = target
        self.mask_token_id = mask_token_id
        self.vocab_size = target.get_output_embeddings().weight.shape[0]
        self.max_positions = 10_000
        self.corrupt = corrupt

    @torch.no_grad()
    def draft(self, tokens, lengths, k, context=None, state=None):
        b, kmax = tokens.shape[0], int(k.max())
        logits = torch.full((b, kmax, self.vocab_size), -1e4)
        for i in range(b):
            seq = tokens[i, : int(lengths[i])].tolist()
            for j in range(int(k[i])):
                nxt = int(self.target(torch.tensor([seq])).logits[0, -1].argmax())
                shown = (nxt + 1) % self.vocab_size if self.corrupt and j % 2 == 1 else nxt
                logits[i, j, shown] = 0.0
                seq.append(nxt)
        return logits


class RandomDrafter(DiffusionDrafter):
    """Uniformly random proposals: almost nothing is accepted."""

    def __init__(self, vocab_size: int, mask_token_id: int, seed: int = 0):
        super().__init__()
        self.vocab_size, self.mask_token_id, self.max_positions = vocab_size, mask_token_id, 10_000
        self.gen = torch.Generator().manual_seed(seed)

    def draft(self, tokens, lengths, k, context=None, state=None):
        return torch.randn(tokens.shape[0], int(k.max()), self.vocab_size, generator=self.gen) * 5


def hf_greedy(model, prompt_ids: list[int], max_new_tokens: int, eos_token_id: int | None) -> list[int]:
    """transformers' own greedy generate(): the independent reference for exactness."""
    ids = torch.tensor([prompt_ids])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
                         eos_token_id=eos_token_id, pad_token_id=0)
    gen = out[0, len(prompt_ids):].tolist()
    if eos_token_id is not None and eos_token_id in gen:
        gen = gen[: gen.index(eos_token_id) + 1]
    return gen
