"""Where the embedded default model pair lives inside the installed package.

The trained pair (target + Dream-format drafter + proxy table) ships as package data under
``diffuspec/pair/``; until it is trained and added, :func:`embedded_pair` returns None.
"""

from __future__ import annotations

from pathlib import Path

PAIR_DIR = Path(__file__).parent / "pair"


def embedded_pair() -> tuple[Path, Path] | None:
    target, drafter = PAIR_DIR / "target", PAIR_DIR / "drafter"
    if (target / "config.json").is_file() and (drafter / "config.json").is_file():
        return target, drafter
    return None
