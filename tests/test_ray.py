"""placement="ray": the drafter in a Ray actor (a local Ray, started here with bounded
waits), exactness against in-process and plain decoding, pipelining, a killed actor and
bad input. The offline job on Ray Data: test_offline.py (run before this module, so that its
own local Ray is the only one)."""

from __future__ import annotations

import sys
import time

import pytest
import ray
import torch

from diffuspec import DiffuSpec

PROMPTS = ["def fibonacci(n):\n", "Write a haiku about the sea.", "import os\n\ndef list_files(path):\n"]


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=3, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def in_process():
    return DiffuSpec.from_pretrained()


@pytest.fixture(scope="module")
def plain(in_process):
    return [r.token_ids for r in in_process.generate(PROMPTS, max_new_tokens=48, speculate=False)]


@pytest.mark.parametrize("pipelined", [False, True])
def test_ray_placement_equals_in_process(local_ray, in_process, plain, pipelined):
    ds = DiffuSpec.from_pretrained(placement="ray", pipelined=pipelined)
    assert ds.remote is not None and ds.drafter is None  # no drafter in this process
    batch = ds.generate(PROMPTS, max_new_tokens=48)                       # a ragged batch
    one = ds.generate(PROMPTS[0], max_new_tokens=48)[0]
    assert [r.token_ids for r in batch] == plain
    assert one.token_ids == plain[0]
    local = in_process.generate(PROMPTS, max_new_tokens=48)
    drafted = sum(sum(r.stats.drafted) for r in batch)
    assert drafted > 0 and sum(sum(r.stats.accepted) for r in batch) > 0
    if not pipelined:  # the same proposals as in-process: the same rounds
        assert [r.stats.accepted for r in batch] == [r.stats.accepted for r in local]
    else:
        st = ds.remote.stats
        assert st.predraft_hits > 0, st
        assert sum(r.stats.predraft_hits + r.stats.predraft_misses for r in batch) > 0
    # what crossed the wire: token ids and small metadata, not logits
    st = ds.remote.stats
    assert st.bytes_sent < 64 * 1024 and st.bytes_received < 64 * 1024, st


def test_ray_placement_with_a_tiny_random_pair(local_ray, tiny_pair):
    target, drafter = tiny_pair
    local = DiffuSpec.from_pretrained(target, drafter)
    remote = DiffuSpec.from_pretrained(target, drafter, placement="ray")
    prompts = ["hello world", "the cat sat on"]
    want = [r.token_ids for r in local.generate(prompts, max_new_tokens=24, speculate=False)]
    assert [r.token_ids for r in remote.generate(prompts, max_new_tokens=24)] == want


def test_ray_placement_sampling_equals_in_process_for_a_seed(local_ray, in_process):
    """T = 1: each token's uniform is fixed by (seed, prompt, position), whatever was drafted
    (diffuspec.verify.position_uniforms), so the same seed gives the same sample in and out
    of process; the distribution itself is tested in test_sampling.py."""
    ds = DiffuSpec.from_pretrained(placement="ray")
    for seed in (0, 1):
        want = [r.token_ids for r in in_process.generate(PROMPTS, max_new_tokens=32, temperature=1.0, seed=seed)]
        assert [r.token_ids for r in ds.generate(PROMPTS, max_new_tokens=32, temperature=1.0, seed=seed)] == want


def test_killed_drafter_actor(local_ray, plain, caplog):
    ds = DiffuSpec.from_pretrained(placement="ray", max_restarts=2)
    first = ds.remote.incarnation
    rounds = 0
    for _ in ds.stream(PROMPTS[0], max_new_tokens=48):
        rounds += 1
        if rounds == 1:
            ray.kill(ds.remote.actor, no_restart=False)
    [again] = ds.generate(PROMPTS[0], max_new_tokens=48)  # after the kill, within the same engine
    assert again.token_ids == plain[0]
    assert ds.remote.stats.failures >= 1
    deadline = time.time() + 120
    while time.time() < deadline:  # the restarted actor drafts again
        [r] = ds.generate(PROMPTS[2], max_new_tokens=48)
        assert r.token_ids == plain[2]
        if sum(r.stats.drafted) > 0:
            break
        time.sleep(1)
    assert sum(r.stats.drafted) > 0, "the restarted actor was never used"
    assert ds.remote.incarnation != first  # a new actor, restarted by Ray


def test_rows_the_actor_lost_are_resent(local_ray):
    """A row whose tokens the actor does not hold as the driver believes (a restarted
    actor, a call that timed out half-way) is answered "resend" and sent whole once."""
    from diffuspec.remote import RemoteState

    ds = DiffuSpec.from_pretrained(placement="ray")
    ids = torch.tensor([ds.tokenizer(PROMPTS[0])["input_ids"]])
    lengths, k = torch.tensor([ids.shape[1]]), torch.tensor([6])
    state = RemoteState(1)
    want = ds.remote.propose(ids, lengths, k, RemoteState(1))
    state.sent[0] = 3  # the driver believes the actor holds 3 tokens of a request it never saw
    got = ds.remote.propose(ids, lengths, k, state)
    assert ds.remote.stats.resends == 1 and state.sent[0] == ids.shape[1]
    assert torch.equal(got.path, want.path)


def test_bad_placement_input(local_ray, monkeypatch):
    with pytest.raises(ValueError, match="placement='gpu' must be 'local'"):
        DiffuSpec.from_pretrained(placement="gpu")
    with pytest.raises(ValueError, match="adl='cost' profiles the drafter"):
        DiffuSpec.from_pretrained(placement="ray", adl="cost")
    with pytest.raises(ValueError, match=r"asks for num_gpus=1, but the Ray cluster has 0"):
        DiffuSpec.from_pretrained(placement="ray", drafter_resources={"num_gpus": 1})


def test_unreachable_address_and_missing_ray(monkeypatch):
    t = time.time()
    with pytest.raises(ValueError, match="cannot be reached"):
        DiffuSpec.from_pretrained(placement="ray", ray_address="127.0.0.1:9")
    assert time.time() - t < 30
    monkeypatch.setitem(sys.modules, "ray", None)  # as if not installed
    with pytest.raises(ImportError, match=r"pip install 'diffuspec\[ray\]'"):
        DiffuSpec.from_pretrained(placement="ray")


def test_pipelining_model():
    from diffuspec.remote import pipelined_speedup
    assert pipelined_speedup(2.0, 10.0, 0.5, hit_rate=0.0) == pytest.approx(1.0)   # every pre-draft missed
    assert pipelined_speedup(2.0, 10.0, 0.5, hit_rate=1.0) == pytest.approx(12.5 / 10.5)  # drafting fully hidden
    assert pipelined_speedup(20.0, 10.0, 0.0, hit_rate=1.0) == pytest.approx(30.0 / 20.0)  # the draft outlasts verify

