"""Small checkpoints built on the spot: a byte-level BPE tokenizer and random model pairs.

Used by the tests (tiny random models, no downloads) and by the CLI before the embedded
trained pair exists. Random weights agree with nothing, so a random pair shows the machinery
and exactness, not speed.
"""

from __future__ import annotations

import sysconfig
from pathlib import Path

import torch

EOS, PAD, MASK = "<|endoftext|>", "<|pad|>", "<|mask|>"


def stdlib_sample(max_bytes: int = 400_000) -> list[str]:
    """Some CPython standard-library source of the running interpreter (tests excluded)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    texts, total = [], 0
    for f in sorted(root.glob("*.py")):
        try:
            t = f.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        texts.append(t)
        total += len(t)
        if total >= max_bytes:
            break
    return texts


def train_tokenizer(texts: list[str], vocab_size: int, out_dir: str | Path | None = None):
    """A byte-level BPE with eos, pad and mask tokens, as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS, PAD, MASK],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=PAD, mask_token=MASK)
    if out_dir is not None:
        fast.save_pretrained(str(out_dir))
    return fast


def tiny_target_config(vocab_size: int, eos_id: int, pad_id: int, **overrides):
    from transformers import Qwen2Config

    kw = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
              eos_token_id=eos_id, pad_token_id=pad_id, bos_token_id=None, tie_word_embeddings=False)
    kw.update(overrides)
    return Qwen2Config(**kw)


def build_random_pair(out_dir: str | Path, *, vocab_size: int = 512, seed: int = 0,
                      target_overrides: dict | None = None, drafter_overrides: dict | None = None) -> tuple[Path, Path]:
    """Write ``out_dir/target`` (Qwen2 causal LM) and ``out_dir/drafter`` (Dream format), both
    with random weights and the same freshly trained tokenizer. Returns the two folders."""
    from transformers import Qwen2ForCausalLM

    from ..drafters import BidirectionalTransformer, TransformerDrafter, TransformerSpec, save_dream

    out = Path(out_dir)
    target_dir, drafter_dir = out / "target", out / "drafter"
    tok = train_tokenizer(stdlib_sample(), vocab_size)
    eos, pad, mask = tok.convert_tokens_to_ids([EOS, PAD, MASK])
    torch.manual_seed(seed)
    target = Qwen2ForCausalLM(tiny_target_config(len(tok), eos, pad, **(target_overrides or {})))
    target.save_pretrained(str(target_dir))
    tok.save_pretrained(str(target_dir))
    spec_kw = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                   num_kv_heads=2, max_position_embeddings=2048)
    spec_kw.update(drafter_overrides or {})
    drafter = TransformerDrafter(BidirectionalTransformer(TransformerSpec(**spec_kw)), mask_token_id=mask,
                                 pad_token_id=pad, shifted=True, format="dream", config={"eos_token_id": eos})
    save_dream(drafter, drafter_dir)
    tok.save_pretrained(str(drafter_dir))
    return target_dir, drafter_dir
