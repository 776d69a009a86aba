"""The recipes of the random-weight sizes (no torch here: ``farm bench`` reads the shapes, and
their parameter counts, without importing the model libraries).

Sizes: ``tiny`` (tests), ``bench`` (the bench's ~98M model) and ``llama32k`` (a 134M Llama with a
32,000-token vocabulary and untied embeddings: the shape of many real small Llamas, whose
embedding and ``lm_head`` are a third of the weights).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Spec:
    """Recipe of one size.

    `init_range` was chosen by measuring, over many prompts, the smallest top-1 logit gap against
    the batched-vs-single logit difference: a tiny init (0.02) gives near-bigram, degenerate output,
    while a large one (0.3+) makes attention so peaky that float noise grows faster than the gaps.
    ~0.05-0.1 keeps the gap 15-80x above the noise, so greedy output is batch invariant.
    """

    vocab: int
    """Tokens the tokenizer is trained to (its trainer stops near 9.2k on the bundled text)."""
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    context: int
    init_range: float
    # Relative size of the LoRA update vs the base projection it adapts.
    lora_strength: float = 0.5
    seed: int = 1234
    model_vocab: int = 0
    """Rows of the embedding and ``lm_head`` when larger than the tokenizer (0: the tokenizer's
    size). The rows past the tokenizer are padding, as in real models padded to a round vocabulary:
    their ``lm_head`` rows are zero, so greedy decoding never picks them; they cost what real rows
    cost, which is what a benchmark of the shape needs."""

    def params(self, tokenizer_size: int | None = None) -> int:
        """Parameters of the model (untied embeddings, no biases, as ``LlamaConfig`` builds it)."""
        vocab = max(tokenizer_size or self.vocab, self.model_vocab)
        head = self.hidden // self.heads
        attention = 2 * self.hidden * self.hidden + 2 * self.hidden * self.kv_heads * head
        mlp = 3 * self.hidden * self.intermediate
        norms = 2 * self.hidden
        return self.layers * (attention + mlp + norms) + self.hidden + 2 * vocab * self.hidden


SPECS: dict[str, Spec] = {
    "tiny": Spec(vocab=512, hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, context=2048,
                 init_range=0.1),
    # ~98M parameters.
    "bench": Spec(vocab=8192, hidden=768, layers=12, heads=12, kv_heads=12, intermediate=2048, context=2048,
                  init_range=0.05),
    # ~134M parameters: the bench model's layers with a 32,000-row embedding and lm_head (issue 17's
    # "random 134M Llama"); the tokenizer is the bench model's 8,192 tokens, the rest padding.
    "llama32k": Spec(vocab=8192, hidden=768, layers=12, heads=12, kv_heads=12, intermediate=2048,
                     context=2048, init_range=0.05, model_vocab=32000),
}
