"""Triton kernels for diffuspec (import name ``diffuspec_kernels``).

Every kernel here has a plain PyTorch reference in :mod:`diffuspec` and is tested against it.
None is needed yet: the CPU path runs the references.
"""
