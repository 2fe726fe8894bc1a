"""Streaming and chat in the Python API: the deltas add up to generate()'s result exactly."""

from __future__ import annotations

import pytest

from diffuspec import DiffuSpec

PROMPTS = ["def fibonacci(n):\n", "import os\n\n\ndef list_files(path):\n", "class Stack:\n"]


@pytest.fixture(scope="module")
def ds():
    # the embedded pair: a real tokenizer and drafts that get accepted (the throughput guard,
    # which may stop drafting on a slow spell of the machine, is tested in test_scheduler.py)
    return DiffuSpec.from_pretrained(throughput_guard=False)


@pytest.fixture(scope="module")
def ds_fixed(ds):
    """The same pair drafting a fixed k: two calls take the same rounds, so even a seeded
    sampled output is reproduced bit for bit (a policy that learns between calls may verify
    with other widths, whose float rounding can move a token across a top-p boundary)."""
    return DiffuSpec(ds.target, ds.drafter, ds.tokenizer, ds.config.replace(adl="fixed", k_init=8))


def _joined(deltas):
    return "".join(d.text for d in deltas), [t for d in deltas for t in d.token_ids]


@pytest.mark.parametrize("kwargs", [{}, {"temperature": 0.8, "top_p": 0.95, "seed": 3}])
def test_stream_equals_generate(ds, ds_fixed, kwargs):
    ds = ds_fixed if kwargs else ds
    for prompt in PROMPTS:
        [ref] = ds.generate(prompt, max_new_tokens=48, **kwargs)
        deltas = list(ds.stream(prompt, max_new_tokens=48, **kwargs))
        text, ids = _joined(deltas)
        assert text == ref.text and ids == ref.token_ids
        assert deltas[-1].finish_reason == ref.finish_reason and deltas[-1].stats.new_tokens == len(ids)
        assert all(d.finish_reason is None and d.stats is None for d in deltas[:-1])
    if not kwargs:  # several tokens a round: fewer deltas than tokens
        assert len(deltas) < len(ids)


def test_seeded_sampling_does_not_depend_on_the_drafts(ds_fixed):
    """Each sampled token's uniform is fixed by (seed, prompt, position): drafting or not,
    the seeded output is the same. (Up to float rounding: the target's probabilities from a
    wide verify pass and a one-token pass differ in the last bits, so a uniform within ~1e-8
    of a CDF boundary can pick the neighbouring token; seed 11 meets one such draw here,
    at 9e-9 from the boundary, so this test uses seed 12.)"""
    for prompt in PROMPTS:
        kwargs = {"max_new_tokens": 48, "temperature": 0.8, "seed": 12}
        [spec] = ds_fixed.generate(prompt, **kwargs)
        [plain] = ds_fixed.generate(prompt, speculate=False, **kwargs)
        assert spec.token_ids == plain.token_ids and spec.stats.rounds < plain.stats.rounds


def test_stream_batch_yields_every_prompt(ds):
    refs = ds.generate(PROMPTS, max_new_tokens=32)
    got = {i: [] for i in range(len(PROMPTS))}
    for i, delta in ds.stream_batch(PROMPTS, max_new_tokens=32):
        got[i].append(delta)
    for i, ref in enumerate(refs):
        assert _joined(got[i]) == (ref.text, ref.token_ids)


def test_stop_string_never_leaks(ds):
    """The stop string is cut from the final text; no delta ever showed text past its start."""
    [free] = ds.generate(PROMPTS[0], max_new_tokens=48)
    stop = free.text[10:14]
    [ref] = ds.generate(PROMPTS[0], max_new_tokens=48, stop=stop)
    assert ref.finish_reason == "stop"
    shown = ""
    for d in ds.stream(PROMPTS[0], max_new_tokens=48, stop=stop):
        shown += d.text
        assert ref.text.startswith(shown)  # never more than the final text
    assert shown == ref.text and stop not in shown


def test_text_stream_holds_stop_prefixes_and_partial_characters():
    from diffuspec.detokenize import TextStream

    pieces = {1: "ab", 2: "c", 3: "\u00e9"[:1], 4: "xy"}
    stream = TextStream(lambda ids: "".join(pieces[i] for i in ids), stop=("cde",))
    assert stream.update([1]) == "ab"
    assert stream.update([1, 2]) == ""          # "c" could begin "cde": held
    assert stream.update([1, 2, 4]) == "cxy"    # it did not: released with what follows
    assert stream.finish("abcxy") == ""


def test_chat_template_applied(ds):
    messages = [{"role": "user", "content": "write a function that adds two numbers"}]
    expected = ds.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    expected = list(expected["input_ids"] if hasattr(expected, "keys") else expected)
    assert ds._chat_ids([messages]) == [expected]
    assert ds._chat_ids("write a function that adds two numbers") == [expected]  # a string is one user message
    result = ds.chat(messages, max_new_tokens=16)
    [same] = ds.generate([expected], max_new_tokens=16)
    assert result.token_ids == same.token_ids
    assert len(ds.chat([messages, messages], max_new_tokens=4)) == 2
    deltas = list(ds.stream(messages, chat=True, max_new_tokens=16))
    assert _joined(deltas)[1] == result.token_ids


def test_chat_errors(ds, tiny_pair):
    with pytest.raises(TypeError, match="conversation 0 must be"):
        ds.chat([{"role": "user"}])
    plain = DiffuSpec.from_pretrained(tiny_pair[0], tiny_pair[1])
    with pytest.raises(ValueError, match="no chat template.*tokenizer.chat_template"):
        plain.generate("hi", chat=True)
    with pytest.raises(TypeError, match="stream\\(\\) takes one prompt.*stream_batch"):
        next(ds.stream(["a", "b"]))
