"""Incremental text and stop strings: the same text as decoding everything, found as tokens arrive."""

from __future__ import annotations

import pytest

from diffuspec.detokenize import IncrementalText, StopFinder
from diffuspec.recipe.tiny import stdlib_sample, train_tokenizer


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(stdlib_sample(100_000) + ["héllo wörld — ünïcode ✓ 日本語 😀"] * 20, 600)


def _decode(tok):
    return lambda ids: tok.decode(ids, skip_special_tokens=True)


@pytest.mark.parametrize("text", ["def f(x):\n    return x + 1\n", "héllo wörld — ünïcode ✓ 日本語 😀 end"])
@pytest.mark.parametrize("step", [1, 2, 3, 7])
def test_incremental_text_equals_full_decode(tok, text, step):
    ids = tok(text, add_special_tokens=False)["input_ids"]
    inc = IncrementalText(_decode(tok))
    pieces = []
    for i in range(0, len(ids), step):
        piece = inc.extend(ids[i: i + step])
        assert "\ufffd" not in piece  # an incomplete character is held back, never emitted
        pieces.append(piece)
    pieces.append(inc.flush())
    assert "".join(pieces) == _decode(tok)(ids) == inc.text


def test_multibyte_character_split_across_tokens(tok):
    ids = tok("a😀", add_special_tokens=False)["input_ids"]
    assert len(ids) >= 3  # the emoji's four bytes take more than one token here
    inc = IncrementalText(_decode(tok))
    out = [inc.extend([t]) for t in ids]
    assert out[0] == "a" and all(piece == "" for piece in out[1:-1]) and out[-1] == "😀"
    assert inc.flush() == "" and inc.text == "a😀"


def test_stop_string_split_across_rounds(tok):
    text = "alpha beta gamma delta epsilon"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    finder = StopFinder(("gamma",), _decode(tok))
    out: list[int] = []
    hit = None
    for i in range(0, len(ids), 2):  # two tokens a round: "gamma" may straddle rounds
        new = ids[i: i + 2]
        out.extend(new)
        hit = finder.find(out, len(new))
        if hit:
            break
    assert hit is not None
    keep_tokens, keep_chars = hit
    kept = _decode(tok)(out[:keep_tokens])
    assert "gamma" in kept and "gamma" not in _decode(tok)(out[: keep_tokens - 1])
    assert kept[:keep_chars] == text[: text.index("gamma")]


def test_stop_finder_reads_only_the_new_tail(tok):
    """The cost of a round's check does not grow with the output: decode calls see windows."""
    seen = []

    def decode(ids):
        seen.append(len(ids))
        return tok.decode(ids, skip_special_tokens=True)

    ids = tok("x = 1\n" * 200, add_special_tokens=False)["input_ids"]
    finder = StopFinder(("never there",), decode)
    out: list[int] = []
    for i in range(0, len(ids), 4):
        out.extend(ids[i: i + 4])
        assert finder.find(out, len(ids[i: i + 4])) is None
    assert len(out) > 300 and max(seen) <= 16
