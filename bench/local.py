"""In-process baselines on one loaded model: ``sequential``, ``gradio-concurrency``, ``static-batch``.

Generation matches the farm's: greedy, a fixed number of new tokens with EOS not stopping a row
(no ``eos_token_id``), left padding, text decoded without special tokens.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, StoppingCriteria
from transformers import StoppingCriteriaList

from bench.workload import Clock, Job, Run, Sample, chunks, closed_loop
from worker.devices import on_own_thread


class LocalModel:
    """A model and tokenizer loaded once in the benchmark process (fp32, eval)."""

    def __init__(self, path: str) -> None:
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()

    def generate(self, jobs: list[Job], on_token: Any = None) -> list[tuple[int, str]]:
        """One left-padded batched ``generate``; (tokens, text) per job."""
        batch = self.tokenizer([j.prompt for j in jobs], return_tensors="pt", padding=True)
        # eos_token_id=[]: no end-of-sequence token. ``None`` is filled in from the model's own
        # generation config, so the demo model stopped at its EOS while the farm went on.
        config = GenerationConfig(max_new_tokens=max(j.new_tokens for j in jobs), do_sample=False,
                                  pad_token_id=self.tokenizer.pad_token_id, eos_token_id=[], bos_token_id=None)
        criteria = StoppingCriteriaList([_OnToken(on_token)]) if on_token else None
        with torch.inference_mode():
            out = self.model.generate(**batch, generation_config=config, stopping_criteria=criteria)
        new = out[:, batch["input_ids"].shape[1]:]
        return [(j.new_tokens, self.decode(new[i, :j.new_tokens].tolist())) for i, j in enumerate(jobs)]

    def decode(self, ids: list[int]) -> str:
        return str(self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False))


class _OnToken(StoppingCriteria):
    """Never stops; tells its callback each time a token was generated (for time to first token)."""

    def __init__(self, callback: Any) -> None:
        self.callback = callback

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any) -> torch.BoolTensor:
        self.callback()
        return torch.zeros(input_ids.shape[0], dtype=torch.bool)  # type: ignore[return-value]


def one_at_a_time(local: LocalModel, job: Job) -> Sample:
    clock = Clock()
    ((tokens, text),) = local.generate([job], clock.token)
    return clock.sample(job, tokens, text)


def run_sequential(local: LocalModel, jobs: list[Job]) -> Run:
    """Plain ``generate``, one prompt at a time."""
    return closed_loop(jobs, 1, lambda job: one_at_a_time(local, job), "sequential")


def run_gradio(local: LocalModel, jobs: list[Job], concurrency: int) -> Run:
    """N threads calling ``generate`` on one shared model, no batching (``concurrency_count=N``)."""
    return closed_loop(jobs, concurrency, lambda job: one_at_a_time(local, job), "gradio-concurrency")


def run_static(local: LocalModel, jobs: list[Job], concurrency: int) -> Run:
    """One in-process batched ``generate`` per group of N prompts: the engine's ceiling. Off the
    main thread like every other mode (``worker.devices.on_own_thread``): there it ran 6-10x slower."""
    return on_own_thread(lambda: _run_static(local, jobs, concurrency))


def _run_static(local: LocalModel, jobs: list[Job], concurrency: int) -> Run:
    run = Run("static-batch", concurrency)
    started = time.perf_counter()
    for group in chunks(jobs, concurrency):
        clock = Clock()
        for job, (tokens, text) in zip(group, local.generate(group, clock.token), strict=True):
            run.samples.append(clock.sample(job, tokens, text))
    run.wall = time.perf_counter() - started
    return run
