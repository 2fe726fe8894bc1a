"""The training recipe end to end in its tiny preset: every stage runs, saves and reloads."""

from __future__ import annotations

import json

from transformers import AutoModelForCausalLM

from diffuspec import DiffuSpec
from diffuspec.drafters import load_drafter
from diffuspec.proxy import NGramModel
from diffuspec.recipe.train import PRESETS, is_heldout, run


def test_tiny_recipe_end_to_end(tmp_path):
    out = tmp_path / "pair"
    state = run(out, PRESETS["tiny"], log_print=lambda *a: None)
    stages = state["stages"]
    assert list(stages) == ["corpus", "tokenizer", "target", "drafter", "distill_data", "distill", "ar_drafter",
                            "proxy", "evaluate", "finalise"]
    assert stages["evaluate"]["outputs_differing_from_plain"] == 0 and stages["evaluate"]["tau"] >= 1.0
    assert stages["corpus"]["heldout_docs"] >= 1 and len(stages["corpus"]["file_list_sha256"]) == 64
    for name in ("target", "drafter", "ar_drafter"):
        card = (out / name / "README.md").read_text()
        assert "Held-out" in card or "held-out" in card
        assert (out / name / "tokenizer.json").is_file()
    assert AutoModelForCausalLM.from_pretrained(str(out / "ar_drafter")).config.model_type == "qwen2"
    assert load_drafter(out / "drafter").format == "dream"
    assert NGramModel.load(out / "proxy.safetensors").order == 3
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert {r["stage"] for r in log} >= {"target", "drafter", "distill", "ar_drafter"}

    ds = DiffuSpec.from_pretrained(out / "target", out / "drafter", proxy_table=str(out / "proxy.safetensors"))
    spec = ds.generate(["def f(x):", "import"], max_new_tokens=10)
    plain = ds.generate(["def f(x):", "import"], max_new_tokens=10, speculate=False)
    assert [r.token_ids for r in spec] == [r.token_ids for r in plain]

    # a second run resumes: nothing is redone
    again = run(out, PRESETS["tiny"], log_print=lambda *a: None)
    assert again["stages"] == stages


def test_heldout_split_is_a_stable_hash():
    names = [f"pkg/mod{i}.py" for i in range(400)]
    held = [n for n in names if is_heldout(n)]
    assert 5 <= len(held) <= 40
    assert held == [n for n in names if is_heldout(n)]
