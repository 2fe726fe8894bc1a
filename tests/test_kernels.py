"""diffuspec_kernels against the references: the compiled CPU path, the incremental online
proxy, the dispatch, the engine with each, and (in a fresh process, under Triton's
interpreter) the Triton kernels. What "equal" means: tests/kernel_cases.py."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import diffuspec_kernels
from diffuspec import DiffuSpec
from diffuspec.assets import embedded_proxy_table
from diffuspec.config import CPSConfig, LatticeConfig
from diffuspec.lattice import Lattice, build_lattice
from diffuspec.proxy import FlatNGram, NGramModel, OnlineNGram
from diffuspec_kernels import CompiledKernels, ProxyInputs
from kernel_cases import (EOS, assert_same_lattice, check_search, context, lattice_vocab, on_context_vocab,
                          random_k, random_logq, reference_score)


@pytest.fixture(scope="module")
def compiled():
    return CompiledKernels()


@pytest.fixture(scope="module")
def corpus():
    return NGramModel.load(embedded_proxy_table())


# ---------------------------------------------------------------------------- compiled path
@pytest.mark.parametrize("seed", range(6))
def test_compiled_lattice_equals_reference(compiled, seed):
    gen = torch.Generator().manual_seed(seed)
    for k in range(1, 32, 3):
        b = int(torch.randint(1, 6, (1,), generator=gen)) | 1  # odd batch sizes
        logq = random_logq(gen, b, k, 8192, ties=seed % 2 == 1)
        kk = random_k(gen, b, k)
        for cfg in (LatticeConfig(), LatticeConfig(mass=0.95, max_candidates=4, eos_min_prob=0.0)):
            assert_same_lattice(build_lattice(logq, kk, EOS, cfg), compiled.build_lattice(logq, kk, EOS, cfg), logq)
        assert_same_lattice(build_lattice(logq, kk, None, LatticeConfig()),
                            compiled.build_lattice(logq, kk, None, LatticeConfig()), logq)


def test_compiled_lattice_adversarial_rows(compiled):
    gen = torch.Generator().manual_seed(7)
    logq = random_logq(gen, 5, 9, 8192, scale=3.0)
    logq[0] = torch.full((8192,), -30.0).index_fill(0, torch.tensor([EOS]), 0.0).log_softmax(-1)  # all EOS
    logq[1] = torch.zeros(8192).log_softmax(-1)            # all tied
    logq[2, :, 5] = float("-inf")                         # impossible ids
    logq[3] = torch.full((9, 8192), float("-inf")).index_fill(1, torch.tensor([9]), 0.0)  # one possible id
    kk = torch.tensor([9, 9, 0, 4, 9])                    # a row with k = 0
    assert_same_lattice(build_lattice(logq, kk, EOS, LatticeConfig()),
                        compiled.build_lattice(logq, kk, EOS, LatticeConfig()), logq)


def test_compiled_lattice_at_dream_vocabulary(compiled):
    gen = torch.Generator().manual_seed(3)
    logq = random_logq(gen, 2, 5, 152064, scale=4.0)
    kk = torch.tensor([5, 3])
    assert_same_lattice(build_lattice(logq, kk, 151643, LatticeConfig()),
                        compiled.build_lattice(logq, kk, 151643, LatticeConfig()), logq)


@pytest.mark.parametrize("seed", range(8))
def test_compiled_search_equals_reference(compiled, corpus, seed):
    gen = torch.Generator().manual_seed(100 + seed)
    vocab = lattice_vocab(corpus)
    for k in (1, 2, 5, 12, 31):
        b = int(torch.randint(1, 6, (1,), generator=gen)) | 1
        logq = random_logq(gen, b, k, vocab, ties=seed % 3 == 0)
        lattice = on_context_vocab(build_lattice(logq, random_k(gen, b, k), EOS, LatticeConfig()))
        tokens, lengths, tail = context(gen, b)
        for table in (None, corpus):
            for cfg in (CPSConfig(), CPSConfig(beam_width=1), CPSConfig(beam_width=5, lam=0.3)):
                check_search(compiled, lattice, tokens, lengths, tail, table, cfg)


@pytest.mark.parametrize("order", [2, 4, 5])
def test_compiled_search_other_proxy_orders(compiled, order):
    gen = torch.Generator().manual_seed(order)
    logq = random_logq(gen, 3, 10, 8192)
    lattice = on_context_vocab(build_lattice(logq, random_k(gen, 3, 10), EOS, LatticeConfig()))
    tokens, lengths, tail = context(gen, 3, order)
    check_search(compiled, lattice, tokens, lengths, tail, None, order=order)


def test_compiled_search_all_tied_scores(compiled):
    """Every candidate equally likely under the drafter and unseen by the proxy: the stable
    order decides, and must decide alike."""
    lattice = Lattice(tokens=torch.arange(60).reshape(1, 4, 15) + 1000, logq=torch.full((1, 4, 15), -2.7),
                      valid=torch.ones(1, 4, 15, dtype=torch.bool), length=torch.tensor([4]), gen_len=torch.tensor([4]))
    tokens, lengths, tail = context(torch.Generator().manual_seed(0), 1)
    check_search(compiled, lattice, tokens, lengths, tail, None)


def test_compiled_paths_on_recorded_lattices(compiled, monkeypatch):
    """200 lattices the embedded pair really produced (HumanEval-style and prose prompts),
    searched with the embedded corpus table and a keyed per-row online model."""
    import diffuspec.propose as propose
    recorded = []
    real_search = propose.search_path

    def record(lattice, proxy, tail, cfg):
        recorded.append((lattice, proxy, tail, cfg))
        return real_search(lattice, proxy, tail, cfg)

    monkeypatch.setattr(propose, "search_path", record)
    ds = DiffuSpec.from_pretrained(kernels="reference")
    prompts = ["def fibonacci(n):\n", "def is_prime(n):\n    \"\"\"Return True if n is prime.\"\"\"\n",
               "Write a short story about a robot.", "import numpy as np\n\ndef normalize(x):\n",
               "class Stack:\n    def __init__(self):\n", "The capital of France is"]
    while len(recorded) < 200:
        ds.generate(prompts, max_new_tokens=48)
        ds.generate(prompts[:1], max_new_tokens=64)
    assert len(recorded) >= 200
    for lattice, proxy, tail, cfg in recorded[:200]:
        want = real_search(lattice, proxy, tail, cfg)
        online = FlatNGram.from_model(proxy.online)  # one table keyed by row, as the reference fits it
        inputs = ProxyInputs(online, FlatNGram.from_model(proxy.corpus), proxy.corpus_weight)
        got, score = compiled.search_path(lattice, inputs, tail, cfg, return_scores=True)
        assert torch.equal(want, got)
        torch.testing.assert_close(score, reference_score(lattice, proxy, tail, want, cfg.lam), rtol=1e-5, atol=1e-5)


def test_compiled_retrieval_equals_reference(compiled):
    from diffuspec.lattice import context_continuations
    gen = np.random.default_rng(5)
    for _ in range(200):
        tokens = gen.integers(0, 5, (3, 60))
        lengths = gen.integers(1, 61, 3)
        k = int(gen.integers(1, 12))
        lo = int(gen.integers(1, 4))
        hi = int(gen.integers(lo, 6))
        want = np.stack([context_continuations(tokens[b], int(lengths[b]), k, lo, hi) for b in range(3)])
        assert np.array_equal(compiled.context_continuations(tokens, lengths.astype(np.int64), k, lo, hi), want)


# ---------------------------------------------------------------------------- online proxy
@pytest.mark.parametrize("use_compiled", [False, True])
def test_incremental_proxy_equals_refit(compiled, use_compiled):
    gen = torch.Generator().manual_seed(11)
    add = compiled.add_ngrams if use_compiled else None
    for order in (2, 3, 5):
        tokens = torch.randint(0, 7, (4, 80), generator=gen)
        final = torch.randint(1, 81, (4,), generator=gen)
        online = OnlineNGram(order, 7, 3)
        online.extend(1)
        for cut in sorted(torch.randint(1, 80, (5,), generator=gen).tolist()) + [80]:
            online.update(tokens, torch.minimum(final, torch.tensor(cut)), add)
        online.select(torch.tensor([2, 0, 3]))  # rows follow the batch
        for row, b in zip(online.rows, (2, 0, 3)):
            fit = NGramModel.fit(tokens[b:b + 1], final[b:b + 1], order, 7, keyed_by_row=False)
            for name in ("keys", "counts", "ctx_keys", "ctx_counts", "ctx_types"):
                assert np.array_equal(getattr(fit, name).numpy(), getattr(row, name)), (order, b, name)
        # and the scores: incremental flat table vs the refit reference
        context = torch.randint(0, 7, (3, order - 1), generator=gen)
        cand = torch.arange(7).repeat(3, 1)
        rows = torch.arange(3)
        refit = NGramModel.fit(tokens[[2, 0, 3]], final[[2, 0, 3]], order, 7)
        flat = online.flat()
        for r in range(3):
            seg = slice(flat.key_off[r], flat.key_off[r + 1])
            cseg = slice(flat.ctx_off[r], flat.ctx_off[r + 1])
            alone = NGramModel(order, 7, torch.from_numpy(flat.keys[seg]), torch.from_numpy(flat.counts[seg]),
                               torch.from_numpy(flat.ctx_keys[cseg]), torch.from_numpy(flat.ctx_counts[cseg]),
                               torch.from_numpy(flat.ctx_types[cseg]), keyed_by_row=False)
            np.testing.assert_array_equal(alone.logprob_numpy(np.array([0]), context[r:r + 1].numpy(),
                                                              cand[r:r + 1].numpy()),
                                          refit.logprob_numpy(rows[r:r + 1].numpy(), context[r:r + 1].numpy(),
                                                              cand[r:r + 1].numpy()))


def test_incremental_proxy_restarts_a_shorter_row():
    online = OnlineNGram(3, 10, 1)
    online.update(torch.tensor([[1, 2, 3, 4, 5]]), torch.tensor([5]))
    online.update(torch.tensor([[7, 8, 9, 0, 0]]), torch.tensor([3]))  # a reused row with a new, shorter prefix
    fit = NGramModel.fit(torch.tensor([[7, 8, 9]]), torch.tensor([3]), 3, 10, keyed_by_row=False)
    assert np.array_equal(online.rows[0].keys, fit.keys.numpy())


# ---------------------------------------------------------------------------- Triton
def test_triton_kernels_under_the_interpreter():
    """tests/triton_interpreted.py in a fresh process with TRITON_INTERPRET=1 (Triton reads it
    when first imported, and this process imported it long ago)."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    here = Path(__file__).parent
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(here / "triton_interpreted.py")],
                         env=env, cwd=here.parent, capture_output=True, text=True, timeout=1200)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-3000:]
    assert " passed" in run.stdout and "failed" not in run.stdout


# ---------------------------------------------------------------------------- dispatch and engine
def test_dispatch_choices():
    cpu = torch.device("cpu")
    assert diffuspec_kernels.select("reference", cpu) is None
    assert diffuspec_kernels.select("auto", cpu).name == "compiled"
    assert diffuspec_kernels.select("compiled", cpu).name == "compiled"
    assert diffuspec_kernels.select("auto", torch.device("meta")) is None  # no kernels for that device
    with pytest.raises(ValueError, match="kernels='triton' cannot run on cpu"):
        diffuspec_kernels.select("triton", cpu)
    with pytest.raises(ValueError, match="kernels='fast' is not one of"):
        DiffuSpec.from_pretrained(kernels="fast")


def test_a_kernel_that_cannot_load_falls_back_with_a_warning(monkeypatch, caplog):
    prompts = ["def add(a, b):\n", "Once upon a time"]
    want = [r.token_ids for r in DiffuSpec.from_pretrained(kernels="reference").generate(prompts, max_new_tokens=40)]

    def broken(kind):
        raise ImportError("numba is not installed")

    monkeypatch.setattr(diffuspec_kernels, "_load", broken)
    with caplog.at_level(logging.WARNING, logger="diffuspec_kernels"):
        ds = DiffuSpec.from_pretrained(kernels="auto")
        got = [r.token_ids for r in ds.generate(prompts, max_new_tokens=40)]
    assert got == want
    warnings = [r for r in caplog.records if "could not load" in r.getMessage()]
    assert len(warnings) == 1 and "numba is not installed" in warnings[0].getMessage()
    with pytest.raises(RuntimeError, match="install numba or use kernels='reference'"):
        DiffuSpec.from_pretrained(kernels="compiled")


@pytest.mark.parametrize("kernels", ["auto", "reference"])
def test_engine_is_exact_with_retrieval(kernels):
    """Copied context continuations in the lattice change drafts, never outputs."""
    prompts = ["def add(a, b):\n    return a + b\n\ndef add3(a, b, c):\n", "one two three one two three one"]
    ds = DiffuSpec.from_pretrained(kernels=kernels, retrieval={"enabled": True, "max_match": 4})
    plain = [r.token_ids for r in ds.generate(prompts, max_new_tokens=48, speculate=False)]
    assert [r.token_ids for r in ds.generate(prompts, max_new_tokens=48)] == plain


@pytest.mark.parametrize("kernels", ["auto", "reference"])
def test_engine_is_exact_with_either_kernels(kernels):
    """Greedy output equals plain decoding, batch 1 and a ragged batch of 3, and the kernels
    propose exactly the reference's paths (same acceptance, round by round)."""
    prompts = ["def fibonacci(n):\n", "Tell me about the sea.", "import os\nimport sys\n\ndef main():\n"]
    ds = DiffuSpec.from_pretrained(kernels=kernels)
    plain = [r.token_ids for r in ds.generate(prompts, max_new_tokens=64, speculate=False)]
    one = ds.generate(prompts[0], max_new_tokens=64)[0]
    batch = ds.generate(prompts, max_new_tokens=64)
    assert one.token_ids == plain[0]
    assert [r.token_ids for r in batch] == plain
    # the paper's ADL: draft lengths that do not depend on measured times, so both propose alike
    ref = DiffuSpec.from_pretrained(kernels="reference", throughput_guard=False, adl="paper")
    mine = DiffuSpec.from_pretrained(kernels=kernels, throughput_guard=False, adl="paper")
    for p in prompts:
        a, b = ref.generate(p, max_new_tokens=64)[0], mine.generate(p, max_new_tokens=64)[0]
        assert (a.stats.drafted, a.stats.accepted) == (b.stats.drafted, b.stats.accepted)
