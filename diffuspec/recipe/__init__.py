"""Tooling that builds model pairs, kept out of the serving path.

- :mod:`diffuspec.recipe.train`: the training recipe behind the embedded default pair
  (``diffuspec train``).
- :mod:`diffuspec.recipe.tiny`: a byte-level BPE tokenizer and small random model pairs built
  on the spot (the tests' fixtures, and the CLI's stand-in when no trained pair is installed).

Nothing in the core package (drafting, search, verification, the engine, the API) imports
from here.
"""
