"""The Triton kernels against the references, collected only when run on purpose: under
``TRITON_INTERPRET=1`` on CPU tensors by tests/test_kernels.py (in a fresh process, because
the interpreter must be chosen before anything imports Triton), natively on a CUDA machine by
benchmarks/gpu_check.sh."""

from __future__ import annotations

import os

import pytest
import torch

from diffuspec.assets import embedded_proxy_table
from diffuspec.config import CPSConfig, LatticeConfig
from diffuspec.lattice import Lattice, build_lattice
from diffuspec.proxy import NGramModel
from kernel_cases import (EOS, assert_same_lattice, check_search, context, lattice_vocab, on_context_vocab,
                          random_k, random_logq)


@pytest.fixture(scope="module")
def triton_kernels():
    from diffuspec_kernels.gpu import TritonKernels
    if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        return TritonKernels()
    assert os.environ.get("TRITON_INTERPRET") == "1", "no CUDA device: run with TRITON_INTERPRET=1"
    return TritonKernels(torch.device("cpu"))


@pytest.fixture(scope="module")
def corpus():
    return NGramModel.load(embedded_proxy_table())


@pytest.mark.parametrize("seed", range(3))
def test_triton_lattice_equals_reference(triton_kernels, seed):
    gen = torch.Generator().manual_seed(200 + seed)
    dev = triton_kernels.device
    for k in (1, 4, 7):
        b = (1, 3, 5)[seed]
        logq = random_logq(gen, b, k, 8192, ties=seed == 1)
        kk = random_k(gen, b, k)
        for eos in (EOS, None):
            assert_same_lattice(build_lattice(logq, kk, eos, LatticeConfig()),
                                triton_kernels.build_lattice(logq.to(dev), kk.to(dev), eos, LatticeConfig()), logq)


def test_triton_lattice_adversarial_and_wide(triton_kernels):
    dev = triton_kernels.device
    gen = torch.Generator().manual_seed(9)
    logq = random_logq(gen, 3, 3, 8192, scale=3.0)
    logq[0] = torch.full((8192,), -30.0).index_fill(0, torch.tensor([EOS]), 0.0).log_softmax(-1)  # all EOS
    logq[1] = torch.zeros(8192).log_softmax(-1)                                                   # all tied
    kk = torch.tensor([3, 3, 0])
    assert_same_lattice(build_lattice(logq, kk, EOS, LatticeConfig()),
                        triton_kernels.build_lattice(logq.to(dev), kk.to(dev), EOS, LatticeConfig()), logq)
    wide = random_logq(gen, 1, 2, 152064, scale=4.0)
    kk = torch.tensor([2])
    assert_same_lattice(build_lattice(wide, kk, 151643, LatticeConfig()),
                        triton_kernels.build_lattice(wide.to(dev), kk.to(dev), 151643, LatticeConfig()), wide)


@pytest.mark.parametrize("seed", range(3))
def test_triton_search_equals_reference(triton_kernels, corpus, seed):
    gen = torch.Generator().manual_seed(300 + seed)
    for k in (1, 6, 11):
        b = (1, 3, 2)[seed]
        logq = random_logq(gen, b, k, lattice_vocab(corpus), ties=seed == 0)
        lattice = on_context_vocab(build_lattice(logq, random_k(gen, b, k), EOS, LatticeConfig()))
        tokens, lengths, tail = context(gen, b)
        table = corpus if k != 6 else None
        check_search(triton_kernels, lattice, tokens, lengths, tail, table,
                     CPSConfig(beam_width=3 if seed != 2 else 5, lam=0.5))


def test_triton_search_all_tied_scores(triton_kernels):
    lattice = Lattice(tokens=torch.arange(60).reshape(1, 4, 15) + 1000, logq=torch.full((1, 4, 15), -2.7),
                      valid=torch.ones(1, 4, 15, dtype=torch.bool), length=torch.tensor([4]), gen_len=torch.tensor([4]))
    tokens, lengths, tail = context(torch.Generator().manual_seed(0), 1)
    check_search(triton_kernels, lattice, tokens, lengths, tail, None)
