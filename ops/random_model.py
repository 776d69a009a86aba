"""The random-weight sizes (``tiny`` for tests, ``bench`` and ``llama32k`` for throughput; recipes in
`ops.model_specs`) and their LoRA adapters.

A Llama-architecture causal LM with a byte-level BPE tokenizer trained on English text that ships
with Python (`pydoc_data.topics`), so it builds offline; its two adapters are seeded random LoRA
weights that change greedy output, not any trained behaviour.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import cast

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from ops.model_specs import Spec

Progress = Callable[[str, float], None]

ADAPTERS = ("adapter", "adapter2")
SERVED_AS = {"adapter": "default", "adapter2": "second"}
"""Request names ``farm up`` serves the adapters under (``default`` is ``FARM_ADAPTER``)."""
LORA_RANK, LORA_ALPHA = 8, 16
UNK, BOS, EOS, PAD = "<unk>", "<s>", "</s>", "<pad>"
# Roles as plain text lines: the model never saw chat data, so dedicated tokens would buy nothing.
# No bos here: the tokenizer's post-processor adds it when the rendered prompt is tokenized.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


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
        vocab_size=max(len(tokenizer), spec.model_vocab), hidden_size=spec.hidden, num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads, num_key_value_heads=spec.kv_heads,
        intermediate_size=spec.intermediate, max_position_embeddings=spec.context,
        initializer_range=spec.init_range, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, dtype="float32",
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
    """Zero the lm_head rows of special tokens (and of vocabulary padding) in a random model.

    Their logit is then exactly 0, far below the top logit, so greedy output never stops early at
    eos nor emits pad: tests and benchmarks get full-length outputs.
    """
    ids = [tokenizer.convert_tokens_to_ids(t) for t in (UNK, BOS, EOS, PAD)]
    model.lm_head.weight[ids] = 0.0
    model.lm_head.weight[len(tokenizer):] = 0.0  # padding rows of a vocabulary wider than the tokenizer


def count_params(model: torch.nn.Module) -> int:
    """Distinct parameters (tied embeddings count once)."""
    return sum(p.numel() for p in model.parameters())


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


def build_random(build_dir: Path, final_dir: Path, spec: Spec, progress: Progress) -> int:
    """Write tokenizer, model and adapters into `build_dir`; returns the parameter count."""
    progress("tokenizer", 0.0)
    tokenizer = _wrap_tokenizer(_train_tokenizer(spec.vocab, _corpus()), spec.context)
    tokenizer.save_pretrained(build_dir)
    progress("model", 0.0)
    model = _new_model(spec, tokenizer)
    _silence_special_tokens(model, tokenizer)
    progress("saving", 0.0)
    model.save_pretrained(build_dir)
    # Adapters name their base by its final path, never a hub id.
    model.name_or_path = str(final_dir)
    for offset, name in enumerate(ADAPTERS, start=1):
        progress(f"adapter {name}", offset / (len(ADAPTERS) + 1))
        model = _save_adapter(model, build_dir / name, spec.seed + offset, spec.lora_strength)
    return count_params(model)
