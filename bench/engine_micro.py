"""Where one request's time goes in the engine, against plain ``generate`` (issue 17).

``python -m bench.engine_micro [--model DIR] [--new-tokens 64] [--repeat 5] [--threads 2]``

Layers, each timed on the same model and prompts in this one process (medians of ``--repeat``):

- ``generate``: ``model.generate``, greedy, one prompt (the bench's ``sequential``).
- ``forward-loop``: the same tokens by a bare loop of ``model(...)`` calls on a ``DynamicCache``
  (what is left is the model).
- ``batch``: the continuous engine's running batch (``ContinuousBatch.join`` + ``step``), null observer.
- ``core``: the whole ``EngineCore`` (scheduler, admit, tokenize, finish) with null sinks.
- ``core+redis``: the same with the worker's Redis stream sink (needs ``--redis-url``).

Celery pickup and the client's side are what ``farm bench`` adds on top of ``core+redis``.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from bench.workload import make_prompts


def _medians(layers: dict[str, Callable[[], Any]], repeat: int) -> dict[str, float]:
    """Median seconds of each layer; the layers take turns, so a slow minute hits each alike."""
    times: dict[str, list[float]] = {name: [] for name in layers}
    for fn in layers.values():
        fn()  # warm up
    for _ in range(repeat):
        for name, fn in layers.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


class _NullOutput:
    def begin(self, request_ids: list[str], worker: str, batch_size: int) -> None:
        pass

    def write(self, deltas: dict[str, str], finished: list[str]) -> None:
        pass

    def end(self, result: Any) -> None:
        pass


class _NoCancels:
    def cancelled(self, request_ids: list[str]) -> set[str]:
        return set()


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    from protocol.schema import GenerationRequest, Limits
    from protocol.settings import FarmSettings
    from worker.engine.build import make_engine
    from worker.engine.kv_slab import ContinuousBatch
    from worker.engine.model_runner import ModelRunner
    from worker.engine.runner import Quiet
    from worker.engine.sinks import EngineSinks
    from worker.model import load_model

    settings = dataclasses.replace(FarmSettings.from_env(), model=args.model, adapter="", adapters="",
                                   torch_threads=args.threads, max_new_tokens=max(1024, args.new_tokens))
    loaded = load_model(settings, "cpu")
    model = loaded.model
    prompts = make_prompts(args.prompts)
    runner = ModelRunner(loaded)
    request = GenerationRequest.from_dict({"prompt": "x", "max_new_tokens": args.new_tokens, "ignore_eos": True},
                                          Limits.from_settings(settings))
    n = args.new_tokens

    def generate() -> None:
        for prompt in prompts:
            ids = torch.tensor([runner.encode(prompt)])
            with torch.inference_mode():
                model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                               min_new_tokens=n, do_sample=False, pad_token_id=runner.pad_id)

    def forward_loop() -> None:
        from transformers import DynamicCache
        for prompt in prompts:
            ids = torch.tensor([runner.encode(prompt)])
            cache = DynamicCache(config=model.config)
            with torch.inference_mode():
                out = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
                for _ in range(n - 1):
                    ids = out.logits[:, -1].argmax(-1, keepdim=True)
                    out = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)

    def batch() -> None:
        for i, prompt in enumerate(prompts):
            running = ContinuousBatch(runner)
            running.join([runner.new_row(f"r{i}", runner.encode(prompt), _request(request, prompt))], Quiet())
            while running.rows:
                running.evict()
                running.step(Quiet())

    def core(output: Any) -> Callable[[], None]:
        engine = make_engine(settings, loaded, EngineSinks(output, _NoCancels()), "micro", lambda r: r.prompt or "")

        def run() -> None:
            for prompt in prompts:
                sub = _submission(engine, _request(request, prompt))
                while not sub.future.done():
                    engine.core.step()
        return run

    layers = {"generate": generate, "forward-loop": forward_loop, "batch": batch, "core": core(_NullOutput())}
    if args.redis_url:
        import redis

        from worker.streams import RedisStreamSink
        layers["core+redis"] = core(RedisStreamSink(redis.Redis.from_url(args.redis_url), 1000, 60))
    results = _medians(layers, args.repeat)
    base = results["generate"]
    print(f"model {args.model}; {len(prompts)} prompts x {n} tokens, batch 1, {args.threads} threads")
    for name, seconds in results.items():
        per = seconds / len(prompts)
        print(f"{name:>14}: {per * 1000:8.1f} ms/request  {per / n * 1000:6.2f} ms/token  {seconds / base:5.3f}x")
    return 0


def _request(template: Any, prompt: str) -> Any:
    from dataclasses import replace
    return replace(template, prompt=prompt)


def _submission(engine: Any, request: Any) -> Any:
    from worker.engine.core import Submission
    sub = Submission(f"m{time.monotonic_ns()}", request, time.time(), 0)
    engine.core.admit([sub])
    return sub


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.engine_micro", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=".farm/models/bench")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--redis-url", default="")
    return parser


if __name__ == "__main__":
    raise SystemExit(main())
