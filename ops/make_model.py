"""Build the embedded farm models offline and deterministically.

No model hub is reachable on the farm's machines, so `ops/` ships its own Llama-architecture causal
LM, tokenizer and two LoRA adapters, all derived from English text that ships with Python
(`pydoc_data.topics`). Sizes:

- ``tiny``: random weights, builds in seconds; for tests.
- ``demo``: trained briefly, writes readable-ish text; the default served on a fresh machine.
- ``bench``: ~100M random parameters; for throughput benchmarks.

Output layout of ``out_dir``: the model and tokenizer (``save_pretrained``), ``adapter/`` and
``adapter2/`` (peft LoRA), and ``farm-model.json`` (the cache marker, written last).

CLI: ``python -m ops.make_model DIR --size tiny|demo|bench [--seed N] [--force]``. Another seed
makes another model of the same size (a second model of a farm in tests).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import glob
import json
import math
import os
import random
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import cast

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

Progress = Callable[[str, float], None]

SIZES = ("tiny", "demo", "bench")
# Bump whenever the recipe changes: cached builds with another version are rebuilt.
BUILD_VERSION = 2
MARKER = "farm-model.json"
ADAPTERS = ("adapter", "adapter2")
LORA_RANK, LORA_ALPHA = 8, 16
UNK, BOS, EOS, PAD = "<unk>", "<s>", "</s>", "<pad>"
# Roles as plain text lines: the demo model never saw chat data, so dedicated tokens would buy nothing.
# No bos here: the tokenizer's post-processor adds it when the rendered prompt is tokenized.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


@dataclass(frozen=True)
class Spec:
    """Recipe of one size.

    `init_range` of the random sizes was chosen by measuring, over many prompts, the smallest top-1
    logit gap against the batched-vs-single logit difference: a tiny init (0.02) gives near-bigram,
    degenerate output, while a large one (0.3+) makes attention so peaky that float noise grows faster
    than the gaps. ~0.05-0.1 keeps the gap 15-80x above the noise, so greedy output is batch invariant.
    """

    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    context: int
    init_range: float
    tie_embeddings: bool = False
    train_steps: int = 0
    batch: int = 16
    seq_len: int = 128
    lr: float = 3e-3
    # Relative size of the LoRA update vs the base projection it adapts.
    lora_strength: float = 0.5
    seed: int = 1234


SPECS: dict[str, Spec] = {
    "tiny": Spec(vocab=512, hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, context=2048,
                 init_range=0.1),
    # 360 steps of batch 16 x 128 take ~110 s on a 2-core CPU; a step count, not a clock, keeps it
    # deterministic.
    "demo": Spec(vocab=2048, hidden=256, layers=4, heads=4, kv_heads=4, intermediate=688, context=512,
                 init_range=0.02, tie_embeddings=True, train_steps=360, lora_strength=0.3),
    # ~98M parameters; the tokenizer trainer stops near 9.2k tokens on this text, so 32k is out of reach.
    "bench": Spec(vocab=8192, hidden=768, layers=12, heads=12, kv_heads=12, intermediate=2048, context=2048,
                  init_range=0.05),
}


# ---------------------------------------------------------------- tokenizer


def _corpus() -> list[str]:
    """Help texts shipped with CPython, sorted so the corpus never depends on dict order."""
    from pydoc_data.topics import topics

    return [topics[key] for key in sorted(topics)]


def _train_tokenizer(vocab: int, texts: list[str]) -> Tokenizer:
    tok = Tokenizer(models.BPE(unk_token=UNK))
    # Byte-level: every string encodes (no unk in practice) and decode(encode(x)) == x.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab, special_tokens=[UNK, BOS, EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    bos_id = tok.token_to_id(BOS)
    # bos via the post-processor, as real Llama tokenizers do; padding then goes left of it.
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B:1",
                                      special_tokens=[(BOS, bos_id)]),
    ])
    return tok


def _wrap_tokenizer(tok: Tokenizer, context: int) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK,
        # The farm batches decoder-only generation: right padding would change outputs.
        padding_side="left", model_max_length=context,
        # Cleanup would rewrite " ," to "," and break the decode/encode round trip.
        clean_up_tokenization_spaces=False, chat_template=CHAT_TEMPLATE,
    )


# ---------------------------------------------------------------- model


def _llama_config(spec: Spec, tokenizer: PreTrainedTokenizerFast) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=spec.hidden, num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads, num_key_value_heads=spec.kv_heads,
        intermediate_size=spec.intermediate, max_position_embeddings=spec.context,
        initializer_range=spec.init_range, tie_word_embeddings=spec.tie_embeddings,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, dtype="float32",
    )


def _generation_config(tokenizer: PreTrainedTokenizerFast) -> GenerationConfig:
    # max_length left unset: callers pass max_new_tokens, and the default 20 would cut them short.
    return GenerationConfig(
        do_sample=False, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def _new_model(spec: Spec, tokenizer: PreTrainedTokenizerFast) -> LlamaForCausalLM:
    torch.manual_seed(spec.seed)
    model = LlamaForCausalLM(_llama_config(spec, tokenizer))
    model.generation_config = _generation_config(tokenizer)
    return model


@torch.no_grad()
def _silence_special_tokens(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast) -> None:
    """Zero the lm_head rows of special tokens in a random model.

    Their logit is then exactly 0, far below the top logit, so greedy output never stops early at
    eos nor emits pad: tests and benchmarks get full-length outputs.
    """
    ids = [tokenizer.convert_tokens_to_ids(t) for t in (UNK, BOS, EOS, PAD)]
    model.lm_head.weight[ids] = 0.0


def count_params(model: torch.nn.Module) -> int:
    """Distinct parameters (tied embeddings count once)."""
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------- training (demo)


def _corpus_ids(tokenizer: PreTrainedTokenizerFast, texts: list[str]) -> torch.Tensor:
    """One stream of `<s> topic </s>` documents, so the model learns where text starts and ends."""
    # The backend tokenizer, because the wrapper warns about documents longer than the context.
    encoded = [enc.ids for enc in tokenizer.backend_tokenizer.encode_batch(texts)]
    flat = [i for ids in encoded for i in (*ids, tokenizer.eos_token_id)]
    return torch.tensor(flat, dtype=torch.long)


def _sample_batch(ids: torch.Tensor, gen: torch.Generator, batch: int, seq_len: int) -> torch.Tensor:
    starts = torch.randint(0, len(ids) - seq_len, (batch,), generator=gen)
    return torch.stack([ids[s:s + seq_len] for s in starts.tolist()])  # [B, S]


def _lr_factor(step: int, total: int) -> float:
    """Linear warmup over the first 10 % of steps, then cosine decay to 10 % of the peak."""
    warmup = max(1, total // 10)
    if step < warmup:
        return (step + 1) / warmup
    done = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * done))


def _train(model: LlamaForCausalLM, ids: torch.Tensor, spec: Spec, progress: Progress) -> None:
    gen = torch.Generator().manual_seed(spec.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, betas=(0.9, 0.95), weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: _lr_factor(step, spec.train_steps))
    report_every = max(1, spec.train_steps // 20)
    model.train()
    for step in range(1, spec.train_steps + 1):
        loss = _train_step(model, opt, _sample_batch(ids, gen, spec.batch, spec.seq_len))
        sched.step()
        if step % report_every == 0:
            progress(f"training loss {loss:.3f}", step / spec.train_steps)
    model.eval()


def _train_step(model: LlamaForCausalLM, opt: torch.optim.Optimizer, batch: torch.Tensor) -> float:
    loss = model(input_ids=batch, labels=batch).loss  # the model shifts labels itself
    loss.backward()
    # Clipping keeps the high learning rate (needed to learn anything in ~400 steps) from diverging.
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(loss.item())


# ---------------------------------------------------------------- adapters


def _lora_config() -> LoraConfig:
    return LoraConfig(r=LORA_RANK, lora_alpha=LORA_ALPHA, target_modules=["q_proj", "v_proj"],
                      task_type="CAUSAL_LM")


@torch.no_grad()
def _randomize_lora(model: PeftModel, seed: int, strength: float) -> None:
    """Seeded random A and B for every adapted projection.

    peft initializes lora_B to zeros, which would make a freshly saved adapter a no-op.
    """
    gen = torch.Generator().manual_seed(seed)
    params = dict(model.named_parameters())
    for name in sorted(params):  # sorted: the draw order, hence the weights, never depends on dict order
        if name.endswith(".lora_A.default.weight"):
            prefix = name.removesuffix("lora_A.default.weight")
            base = params[prefix + "base_layer.weight"]
            _randomize_pair(params[name], params[prefix + "lora_B.default.weight"], base.std().item(), gen,
                            strength)


def _randomize_pair(lora_a: torch.Tensor, lora_b: torch.Tensor, base_std: float, gen: torch.Generator,
                    strength: float) -> None:
    """Size B @ A so the update is about `strength` times the base projection's output scale."""
    rank, fan_in = lora_a.shape  # A: [r, in], B: [out, r]
    # Unit-scale entries of A x; then B brings peft's (alpha / r) * B A x to strength * std(W x).
    lora_a.copy_(torch.randn(lora_a.shape, generator=gen) / math.sqrt(fan_in))
    b_std = strength * base_std * math.sqrt(fan_in) / (LORA_ALPHA / LORA_RANK * math.sqrt(rank))
    lora_b.copy_(torch.randn(lora_b.shape, generator=gen) * b_std)


def _save_adapter(model: LlamaForCausalLM, path: Path, seed: int, strength: float) -> LlamaForCausalLM:
    """Save one LoRA adapter for `model`; returns the base model with the LoRA layers removed."""
    with warnings.catch_warnings():
        # peft 0.21 calls a transformers 5 API that warns it is deprecated; nothing for us to fix.
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
        peft_model = get_peft_model(model, _lora_config())
    _randomize_lora(peft_model, seed, strength)
    # The embeddings are untouched; without this peft looks for a config.json that is not in place yet.
    peft_model.save_pretrained(str(path), save_embedding_layers=False)
    return cast(LlamaForCausalLM, peft_model.unload())


# ---------------------------------------------------------------- cache + atomic install


def _read_marker(out_dir: Path) -> dict[str, object] | None:
    try:
        data = json.loads((out_dir / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def is_current(out_dir: str | Path, size: str, seed: int | None = None) -> bool:
    """True when `out_dir` holds a complete build of `size` (and `seed`) made by this BUILD_VERSION."""
    marker = _read_marker(Path(out_dir))
    wanted = SPECS[size].seed if seed is None else seed
    return (marker is not None and marker.get("size") == size and marker.get("version") == BUILD_VERSION
            and marker.get("seed", SPECS[size].seed) == wanted)


def _write_marker(build_dir: Path, size: str, params: int, seed: int) -> None:
    marker = {"size": size, "version": BUILD_VERSION, "params": params, "seed": seed}
    (build_dir / MARKER).write_text(json.dumps(marker, indent=2) + "\n")


def _check_replaceable(out_dir: Path) -> None:
    """Refuse to replace a directory that is neither empty nor one of our builds (e.g. a typo'd '.')."""
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise FileExistsError(f"{out_dir} exists and is not a directory")
    if any(out_dir.iterdir()) and _read_marker(out_dir) is None:
        raise FileExistsError(f"{out_dir} is not empty and holds no {MARKER}; refusing to replace it")


def _make_readable(build_dir: Path) -> None:
    """Workers may run as another user: mkdtemp (0700) and safetensors (0600) files are too private."""
    for path in (build_dir, *build_dir.rglob("*")):
        path.chmod(path.stat().st_mode | (0o055 if path.is_dir() else 0o044))


def _install(build_dir: Path, out_dir: Path) -> None:
    """Move a finished build into place; readers never see a half-written model."""
    _check_replaceable(out_dir)
    _make_readable(build_dir)
    old = None
    if out_dir.exists():
        # rename(2) cannot replace a non-empty directory: move the old build aside first.
        old = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.old-"))
        os.replace(out_dir, old / "model")
    os.replace(build_dir, out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def _build_dir(out_dir: Path) -> Iterator[Path]:
    """A temporary sibling of `out_dir` (same filesystem, so the final rename is atomic)."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.build-"))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _remove_stale_builds(out_dir: Path) -> None:
    """Delete temporary siblings left by killed builds; call only while holding the build lock."""
    for kind in ("build", "old"):
        for path in out_dir.parent.glob(f".{glob.escape(out_dir.name)}.{kind}-*"):
            shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def _build_lock(out_dir: Path) -> Iterator[None]:
    """Serialize builders of one `out_dir`: one worker per device on a host all ensure the same model.

    Without it, a second builder would swap the directory under a worker that is loading it.
    """
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(out_dir.parent / f".{out_dir.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


@contextlib.contextmanager
def _deterministic(seed: int) -> Iterator[None]:
    """Seed everything and force deterministic kernels, restoring the caller's RNG state after."""
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    py_state = random.getstate()
    with torch.random.fork_rng(devices=[]):
        torch.use_deterministic_algorithms(True)
        random.seed(seed)
        torch.manual_seed(seed)
        try:
            yield
        finally:
            torch.use_deterministic_algorithms(was_deterministic)
            random.setstate(py_state)


# ---------------------------------------------------------------- public API


def _no_progress(stage: str, fraction: float) -> None:
    """Default progress sink."""


def _build_into(build_dir: Path, final_dir: Path, spec: Spec, progress: Progress) -> int:
    """Write tokenizer, model and adapters into `build_dir`; returns the parameter count."""
    texts = _corpus()
    progress("tokenizer", 0.0)
    tokenizer = _wrap_tokenizer(_train_tokenizer(spec.vocab, texts), spec.context)
    tokenizer.save_pretrained(build_dir)
    progress("model", 0.0)
    model = _new_model(spec, tokenizer)
    if spec.train_steps:
        _train(model, _corpus_ids(tokenizer, texts), spec, progress)
    else:
        _silence_special_tokens(model, tokenizer)
    progress("saving", 0.0)
    model.save_pretrained(build_dir)
    # Adapters name their base by its final path, never a hub id.
    model.name_or_path = str(final_dir)
    for offset, name in enumerate(ADAPTERS, start=1):
        progress(f"adapter {name}", offset / (len(ADAPTERS) + 1))
        model = _save_adapter(model, build_dir / name, spec.seed + offset, spec.lora_strength)
    return count_params(model)


def build_model(
    out_dir: str | Path, size: str = "tiny", progress: Progress | None = None, force: bool = False,
    seed: int | None = None,
) -> Path:
    """Build the `size` model into `out_dir` (skipped when already current, unless `force`);
    `seed` other than the size's own makes another model of that size."""
    if size not in SPECS:
        raise ValueError(f"unknown size {size!r}; expected one of {SIZES}")
    out_dir = Path(out_dir).resolve()
    progress = progress or _no_progress
    if not force and is_current(out_dir, size, seed):
        progress("cached", 1.0)
        return out_dir
    _check_replaceable(out_dir)
    with _build_lock(out_dir):
        # Another process may have finished the same build while we waited for the lock.
        if not force and is_current(out_dir, size, seed):
            progress("cached", 1.0)
            return out_dir
        _build_and_install(out_dir, size, progress, seed)
    progress("done", 1.0)
    return out_dir


def _build_and_install(out_dir: Path, size: str, progress: Progress, seed: int | None = None) -> None:
    _remove_stale_builds(out_dir)
    spec = SPECS[size] if seed is None else replace(SPECS[size], seed=seed)
    with _build_dir(out_dir) as build_dir, _deterministic(spec.seed):
        params = _build_into(build_dir, out_dir, spec, progress)
        _write_marker(build_dir, size, params, spec.seed)
        _install(build_dir, out_dir)


def ensure_model(out_dir: str | Path, size: str, progress: Progress | None = None,
                 seed: int | None = None) -> Path:
    """Return `out_dir`, building it first only if missing or made by another size, seed or version."""
    return build_model(out_dir, size, progress, force=False, seed=seed)


# ---------------------------------------------------------------- CLI


def _stderr_progress() -> Progress:
    """Progress lines with elapsed seconds, so slow stages show up in build logs."""
    start = time.monotonic()

    def report(stage: str, fraction: float) -> None:
        elapsed = time.monotonic() - start
        print(f"[{fraction * 100:5.1f}%] {stage} ({elapsed:.1f} s)", file=sys.stderr, flush=True)

    return report


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m ops.make_model", description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path, help="directory to build into (replaced atomically)")
    parser.add_argument("--size", choices=SIZES, default="tiny")
    parser.add_argument("--seed", type=int, help="another seed makes another model of the same size")
    parser.add_argument("--force", action="store_true", help="rebuild even if the cached build is current")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    try:
        path = build_model(args.out_dir, args.size, _stderr_progress(), force=args.force, seed=args.seed)
    except OSError as exc:
        print(f"make_model: {exc}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
