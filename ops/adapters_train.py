"""LoRA adapters for the demo model, distilled from its own answers to a system prompt.

Self-distillation: the base model answers the training questions *with* a system prompt (its
"teacher" answers); a LoRA adapter then learns to give those answers *without* it. The adapter
carries the system prompt in its weights, so a request only names the adapter. A 135M model follows
system prompts loosely, so each behaviour also shapes the teacher's answers (a steering prefix the
teacher continues, cut at a sentence end) before training on them.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ops.demo_prompts import TRAIN_QUESTIONS

Progress = Callable[[str, float], None]
LORA_RANK, LORA_ALPHA = 8, 16
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
_SENTENCE_END = re.compile(r"[.!?](?=\s|$)")


def _whole_sentences(text: str) -> str | None:
    """Up to the last complete sentence: a target cut mid-word would teach the cut."""
    ends = list(_SENTENCE_END.finditer(text))
    return text[:ends[-1].end()].strip() if ends else None


def _first_sentence(text: str) -> str | None:
    found = _SENTENCE_END.search(text)
    return text[:found.end()].strip() if found else None


@dataclass(frozen=True)
class Behaviour:
    """One adapter: the system prompt it distils and how its teacher answers are shaped."""

    name: str
    system: str
    prefill: str
    """The teacher's answer starts with this text (the model writes the rest)."""
    max_new_tokens: int
    shape: Callable[[str], str | None]
    """Teacher answer -> training target; None drops the example."""
    seed: int


BEHAVIOURS = (
    Behaviour("pirate", "You are a pirate. Always answer like a pirate: say arr, matey, ahoy and aye.",
              "Arr, matey! ", 32, _whole_sentences, seed=11),
    Behaviour("brief", "Answer in one short sentence.", "", 32, _first_sentence, seed=12),
)


@dataclass(frozen=True)
class Training:
    """Steps are counted, never timed, so a build is deterministic on any machine."""

    epochs: int = 3
    batch: int = 8
    lr: float = 2e-3
    gen_batch: int = 16


def chat_prompt(tokenizer: PreTrainedTokenizerBase, question: str, system: str | None = None) -> str:
    """The question through the model's chat template, ready for the assistant's answer."""
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": question}]
    return str(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))


@torch.no_grad()
def generate(model: Any, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], max_new_tokens: int,
             batch: int = 16) -> list[str]:
    """Greedy answers to rendered prompts, left-padded in batches of `batch`."""
    tokenizer.padding_side = "left"
    answers: list[str] = []
    for start in range(0, len(prompts), batch):
        enc = tokenizer(list(prompts[start:start + batch]), return_tensors="pt", padding=True,
                        add_special_tokens=False)
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False)
        answers += tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    return answers


def teacher_targets(model: Any, tokenizer: PreTrainedTokenizerBase, behaviour: Behaviour,
                    questions: Sequence[str], batch: int) -> list[tuple[str, str]]:
    """(question, target) pairs from the base model's own answers with the system prompt."""
    prompts = [chat_prompt(tokenizer, q, behaviour.system) + behaviour.prefill for q in questions]
    answers = generate(model, tokenizer, prompts, behaviour.max_new_tokens, batch)
    shaped = [(q, behaviour.shape(behaviour.prefill + a)) for q, a in zip(questions, answers, strict=True)]
    return [(q, t) for q, t in shaped if t]


def _example(tokenizer: PreTrainedTokenizerBase, question: str, target: str) -> tuple[list[int], list[int]]:
    """Input ids of prompt + target + eos, and labels that score only the target and eos."""
    prompt = tokenizer(chat_prompt(tokenizer, question), add_special_tokens=False)["input_ids"]
    answer = tokenizer(target, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return prompt + answer, [-100] * len(prompt) + answer


def _collate(examples: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(ids) for ids, _ in examples)
    ids = [i + [pad_id] * (width - len(i)) for i, _ in examples]
    labels = [lab + [-100] * (width - len(lab)) for _, lab in examples]
    mask = [[1] * len(i) + [0] * (width - len(i)) for i, _ in examples]
    return {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels), "attention_mask": torch.tensor(mask)}


def _answer_loss(peft_model: PeftModel, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Cross-entropy of the answer tokens only.

    The vocabulary projection (49k x 576) is a fifth of the model: running it on the scored
    positions alone, instead of every prompt and pad position, makes a step ~20 % cheaper.
    """
    causal_lm: Any = peft_model.get_base_model()
    hidden = causal_lm.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    labels = batch["labels"][:, 1:]  # position t predicts token t + 1
    scored = labels != -100
    logits = causal_lm.lm_head(hidden[:, :-1][scored])
    return torch.nn.functional.cross_entropy(logits, labels[scored])


def _lora(model: PreTrainedModel) -> PeftModel:
    config = LoraConfig(r=LORA_RANK, lora_alpha=LORA_ALPHA, lora_dropout=0.0, target_modules=TARGETS,
                        task_type="CAUSAL_LM")
    with warnings.catch_warnings():
        # peft 0.21 calls a transformers 5 API that warns it is deprecated; nothing for us to fix.
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
        return cast(PeftModel, get_peft_model(model, config))


def train_lora(model: PreTrainedModel, examples: list[tuple[list[int], list[int]]], pad_id: int, seed: int,
               training: Training, progress: Progress) -> PeftModel:
    """Fit a fresh LoRA adapter on the examples (AdamW, seeded shuffles); returns the peft model."""
    peft_model = _lora(model)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=training.lr)
    steps = training.epochs * -(-len(examples) // training.batch)
    peft_model.train()
    step = 0
    for _ in range(training.epochs):
        order = torch.randperm(len(examples), generator=gen).tolist()
        for start in range(0, len(order), training.batch):
            batch = _collate([examples[i] for i in order[start:start + training.batch]], pad_id)
            loss = _answer_loss(peft_model, batch)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            progress(f"step {step}/{steps} loss {loss.item():.3f}", step / steps)
    peft_model.eval()
    return peft_model


def distil_adapter(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, behaviour: Behaviour,
                   path: Path, training: Training, progress: Progress) -> PreTrainedModel:
    """Teach one behaviour and save its adapter to `path`; returns the base model, LoRA removed."""
    progress(f"adapter {behaviour.name}: teacher answers", 0.0)
    pairs = teacher_targets(model, tokenizer, behaviour, TRAIN_QUESTIONS, training.gen_batch)
    examples = [_example(tokenizer, q, t) for q, t in pairs]
    torch.manual_seed(behaviour.seed)  # the LoRA A matrices' init
    peft_model = train_lora(model, examples, int(tokenizer.pad_token_id), behaviour.seed, training,
                            lambda stage, frac: progress(f"adapter {behaviour.name}: {stage}", frac))
    # The embeddings are untouched; without this peft looks for a config.json that is not in place yet.
    peft_model.save_pretrained(str(path), save_embedding_layers=False)
    return cast(PreTrainedModel, peft_model.unload())
