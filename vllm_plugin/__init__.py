"""vLLM adapter for diffuspec (import name ``diffuspec_vllm``).

The proposer and the ``vllm.general_plugins`` entry point land with the vLLM issue; the
algorithm itself lives once, in :mod:`diffuspec`.
"""
