"""Per-row sampling on torch: each sampling row draws with its own temperature, top-p, top-k and
seeded generator; greedy rows pass untouched, so they decode exactly as plain greedy ``generate``."""

from __future__ import annotations

import torch
from transformers import LogitsProcessor

from protocol.schema import GenerationRequest
from worker.engine.runner import BatchRow


class RowSampler(LogitsProcessor):
    """Samples each non-greedy row with its own parameters and leaves only the chosen token finite."""

    def __init__(self, rows: list[BatchRow]) -> None:
        self.rows = rows

    def __call__(self, input_ids: torch.LongTensor | None, scores: torch.FloatTensor) -> torch.FloatTensor:
        for i, row in enumerate(self.rows):
            if not row.request.greedy and not row.state.done:
                scores[i] = sample_to_onehot(scores[i], row.request, row.generator)
        return scores


def sample_to_onehot(logits: torch.Tensor, request: GenerationRequest,
                     generator: torch.Generator | None) -> torch.Tensor:
    """Draw a token from ``logits`` [V] per the request; return logits where only it is finite."""
    # The generators live on the CPU, so sampling does too (one row of V floats).
    probs = torch.softmax(_filter(logits.float().cpu() / request.temperature, request), dim=-1)
    token = torch.multinomial(probs, 1, generator=generator).to(logits.device)
    out = torch.full_like(logits, float("-inf"))
    out[token] = 0.0
    return out


def _filter(logits: torch.Tensor, request: GenerationRequest) -> torch.Tensor:
    if request.top_k and request.top_k < logits.numel():
        kth = torch.topk(logits, request.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if request.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        drop = cumulative - torch.softmax(sorted_logits, dim=-1) >= request.top_p  # keep the first
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    return logits


def new_generator(request: GenerationRequest) -> torch.Generator | None:
    """The row's own random generator (seeded when the request says so); none for greedy rows."""
    if request.greedy:
        return None
    generator = torch.Generator()
    if request.seed is not None:
        generator.manual_seed(request.seed)
    else:
        generator.seed()
    return generator
