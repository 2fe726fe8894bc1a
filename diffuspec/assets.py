"""Where the embedded default model pair lives inside the installed package.

The trained pair ships as package data under ``diffuspec/pair/``: ``target/`` (Qwen2 causal
LM), ``drafter/`` (Dream format), ``proxy.safetensors`` (corpus n-gram table), each model
folder with its tokenizer and model card. :func:`embedded_pair` returns None when absent.
"""

from __future__ import annotations

from pathlib import Path

PAIR_DIR = Path(__file__).parent / "pair"


def embedded_pair() -> tuple[Path, Path] | None:
    target, drafter = PAIR_DIR / "target", PAIR_DIR / "drafter"
    if (target / "config.json").is_file() and (drafter / "config.json").is_file():
        return target, drafter
    return None


def embedded_proxy_table() -> Path | None:
    table = PAIR_DIR / "proxy.safetensors"
    return table if table.is_file() else None
