"""Time to first token with a shared prompt prefix, prefix cache on against off (issue 17).

``python -m bench.prefix_micro [--model DIR] [--prefix-tokens 512] [--clients 16] [--requests 32]``

Two farm-continuous workers (``bench.farm.FarmUnderTest``) on the same model, one with
``FARM_PREFIX_CACHE_MB`` at its default and one with 0; every prompt starts with the same
``--prefix-tokens`` tokens and ends with one of the bench's own prompts. The two take turns
(``--rounds`` each), so a slow minute hits both; prints each round's TTFT and latency p50 and the
median ratio, and checks that both gave the same texts.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from pathlib import Path

from bench.workload import Job, make_prompts


def shared_prompts(model: str, prefix_tokens: int, count: int) -> list[str]:
    """``count`` prompts whose first ``prefix_tokens`` tokens (as this model tokenizes) are one text."""
    from pydoc_data.topics import topics
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    text = " ".join(topics[key] for key in sorted(topics))
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][:prefix_tokens]
    prefix = tokenizer.decode(ids, skip_special_tokens=True) + "\n\n"
    return [prefix + p for p in make_prompts(count)]


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from bench.farm import FarmUnderTest, run_farm

    prompts = shared_prompts(args.model, args.prefix_tokens, args.requests)
    jobs = [Job(i, p, args.new_tokens) for i, p in enumerate(prompts)]
    logdir = Path(tempfile.mkdtemp(prefix="prefix-micro-"))
    farms = {}
    for name, budget in (("cache on", "256"), ("cache off", "0")):
        os.environ["FARM_PREFIX_CACHE_MB"] = budget
        farms[name] = FarmUnderTest(args.model, "continuous", args.threads, args.clients,
                                    args.new_tokens + args.prefix_tokens, logdir / name.replace(" ", "-"))
    try:
        ttft: dict[str, list[float]] = {name: [] for name in farms}
        texts: dict[str, list[str]] = {}
        for round_ in range(args.rounds):
            for name, farm in farms.items():
                run = run_farm(farm, jobs, args.clients, name)
                summary = run.summary()
                ttft[name].append(summary["ttft_p50"])
                texts[name] = [s.text for s in sorted(run.samples, key=lambda s: s.index)]
                print(f"round {round_} {name:>9}: TTFT p50 {summary['ttft_p50']:.3f} s, latency p50 "
                      f"{summary['latency_p50']:.3f} s, {summary['tokens_per_s']:.1f} tok/s, "
                      f"errors {summary['errors']}", flush=True)
    finally:
        for farm in farms.values():
            farm.close()
    on, off = statistics.median(ttft["cache on"]), statistics.median(ttft["cache off"])
    same = sum(a == b for a, b in zip(texts["cache on"], texts["cache off"], strict=True))
    print(f"{args.prefix_tokens}-token shared prefix, {args.clients} clients: TTFT p50 {on:.3f} s with the "
          f"cache, {off:.3f} s without: {on / off:.2f}x; same texts {same}/{len(jobs)}")
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.prefix_micro", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=".farm/models/bench")
    parser.add_argument("--prefix-tokens", type=int, default=512)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    return parser


if __name__ == "__main__":
    raise SystemExit(main())
