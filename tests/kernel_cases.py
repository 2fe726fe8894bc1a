"""Inputs and comparisons shared by the kernel tests (test_kernels.py, triton_interpreted.py).

Equality means: the same lattice sets per position (a tie straddling the size cap may keep
either of the tied tokens, as torch.topk may), the same path on the same lattice, and
scores within 1e-5 of the reference's score of that path."""

from __future__ import annotations

import numpy as np
import torch

from diffuspec.config import CPSConfig
from diffuspec.cps import search_path
from diffuspec.lattice import Lattice
from diffuspec.proxy import CausalProxy, FlatNGram, NGramModel, OnlineNGram
from diffuspec_kernels import ProxyInputs

EOS = 2
CTX_VOCAB = 40  # context and candidate tokens are drawn below this, so the proxy has counts to use


# ---------------------------------------------------------------------------- inputs
def random_logq(gen, b, k, vocab, scale=None, ties=False):
    scale = float(torch.rand(1, generator=gen) * 6) if scale is None else scale
    logits = torch.randn(b, k, vocab, generator=gen) * scale
    if ties:  # many equal logits, at the top too; EOS apart (which of the tied tokens at the
        # size cap a top-m keeps is not specified, and EOS in or out would change the length)
        logits = (logits * 2).round() / 2
        logits[..., EOS] += 0.25
    return logits.log_softmax(-1)


def random_k(gen, b, k):
    kk = torch.randint(0, k + 1, (b,), generator=gen)
    kk[0] = k
    return kk


def assert_same_lattice(ref: Lattice, got: Lattice, logq: torch.Tensor):
    assert torch.equal(ref.length, got.length.cpu()) and torch.equal(ref.gen_len, got.gen_len.cpu())
    got_tokens, got_valid, got_logq = got.tokens.cpu(), got.valid.cpu(), got.logq.cpu()
    b, k, _ = ref.tokens.shape
    for r in range(b):
        for i in range(k):
            a = set(ref.tokens[r, i][ref.valid[r, i]].tolist())
            c = set(got_tokens[r, i][got_valid[r, i]].tolist())
            va = sorted(ref.logq[r, i][ref.valid[r, i]].tolist())
            vc = sorted(got_logq[r, i][got_valid[r, i]].tolist())
            assert np.allclose(va, vc, atol=1e-6), (r, i, va, vc)
            if a != c:  # only tokens tied at the size cap may differ: one value, and a kept one
                tied = {float(logq[r, i, t]) for t in a ^ c}
                assert len(tied) == 1 and tied.pop() in va, (r, i, a, c)


def context(gen, b, order=3):
    tokens = torch.randint(0, CTX_VOCAB, (b, 40), generator=gen)
    lengths = torch.randint(1, 41, (b,), generator=gen)
    hist = order - 1
    idx = lengths[:, None] - hist + torch.arange(hist)[None, :]
    tail = torch.where(idx >= 0, tokens.gather(1, idx.clamp(min=0)), torch.full_like(idx, -1))
    return tokens, lengths, tail


def on_context_vocab(lattice: Lattice) -> Lattice:
    """The lattice with its candidates folded onto the context's vocabulary (the proxy then
    scores real counts, and rows get duplicate candidates: more ties)."""
    return Lattice(lattice.tokens % CTX_VOCAB, lattice.logq, lattice.valid, lattice.length, lattice.gen_len)


def reference_score(lattice, proxy, tail, path, lam):
    """S(path) of paper eq. 5 under the reference proxy, summed in float32 as the search does."""
    b, k, _ = lattice.tokens.shape
    out = []
    for r in range(b):
        ctx = tail[r].tolist()
        s = np.float32(0)
        for i in range(int(lattice.length[r])):
            t = int(path[r, i])
            # the valid column holding t (context retrieval may add a copy of a drafter token
            # that the mass cut left invalid: the copy is the valid one)
            j = int(((lattice.tokens[r, i] == t) & lattice.valid[r, i]).nonzero()[0])
            lp = proxy.logprob_numpy(np.array([r]), np.array([ctx]), np.array([[t]]))[0, 0]
            s = s + (np.float32(lam) * np.float32(lattice.logq[r, i, j]) + np.float32(1 - lam) * lp)
            ctx = ctx[1:] + [t]
        out.append(s)
    return torch.tensor(out)


def check_search(kernels, lattice, tokens, lengths, tail, corpus, cfg=CPSConfig(), order=3):
    b = tokens.shape[0]
    online = OnlineNGram(order, lattice_vocab(corpus), b)
    online.update(tokens, lengths, getattr(kernels, "add_ngrams", None))
    proxy = CausalProxy(NGramModel.fit(tokens, lengths, order, lattice_vocab(corpus)), corpus, 0.5)
    want = search_path(lattice, proxy, tail, cfg)
    inputs = ProxyInputs(online.flat(), FlatNGram.from_model(corpus) if corpus is not None else None, 0.5)
    got, score = kernels.search_path(lattice, inputs, tail, cfg, return_scores=True)
    assert torch.equal(want, got.cpu())
    torch.testing.assert_close(score.cpu(), reference_score(lattice, proxy, tail, want, cfg.lam), rtol=1e-5, atol=1e-5)


def lattice_vocab(corpus):
    return corpus.vocab_size if corpus is not None else 8192
