"""The demo model (SmolLM2-135M-Instruct) and its distilled LoRA adapters, served by a real worker.

The demo build (GGUF conversion + two adapters trained on 2 CPU cores) is cached under
.farm/test-models/demo, so only the first run pays for it. All answers are greedy, hence the same
on every run of one build.
"""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from ops.demo_prompts import HELD_OUT_QUESTIONS
from ops.model_cache import served_adapters
from tests.conftest import WorkerProcess
from tests.demo import module_demo_worker

PIRATE_WORDS = re.compile(r"\b(arr+|matey|ahoy|aye|ye|hearty|hearties|pirate|shiver)\b", re.IGNORECASE)
NEW_TOKENS = 40


# A long batching window, so concurrent requests of several adapters share a batch.
demo_worker = module_demo_worker("demo-model", max_batch_size=32, max_wait_ms=300)


@pytest.fixture(scope="module")
def demo_client(demo_worker: WorkerProcess) -> Any:
    from producer import FarmClient

    return FarmClient(demo_worker.redis_url)


def _ask(client: Any, questions: list[str], adapters: list[str]) -> list[Any]:
    """All questions at once, question i through adapters[i], as chat messages."""
    def one(pair: tuple[str, str]) -> Any:
        question, adapter = pair
        return client.submit(messages=[{"role": "user", "content": question}], adapter=adapter,
                             max_new_tokens=NEW_TOKENS)

    with ThreadPoolExecutor(len(questions)) as pool:
        handles = list(pool.map(one, zip(questions, adapters, strict=True)))
    return [h.result(timeout=300) for h in handles]


def _answers(client: Any, adapter: str) -> list[str]:
    questions = list(HELD_OUT_QUESTIONS)
    return [r.text for r in _ask(client, questions, [adapter] * len(questions))]


def _is_pirate(text: str) -> bool:
    return PIRATE_WORDS.search(text) is not None


def _words(text: str) -> int:
    return len(text.split())


def test_demo_build_is_a_plain_checkpoint(demo_model: Path) -> None:
    """Workers load it like a hub model: no GGUF marks, its chat template, adapters named by the marker."""
    config = json.loads((demo_model / "config.json").read_text())
    assert "quantization_config" not in config and config["model_type"] == "llama"
    assert (demo_model / "model.safetensors").is_file() and (demo_model / "chat_template.jinja").is_file()
    assert served_adapters(demo_model) == {
        "FARM_ADAPTERS": f"pirate={demo_model / 'adapters/pirate'},brief={demo_model / 'adapters/brief'}"}
    adapter_config = json.loads((demo_model / "adapters/pirate/adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str(demo_model)


def test_demo_answers_through_its_chat_template(demo_client: Any) -> None:
    """"What is the capital of France?" -> "The capital of France is Paris." (greedy, base model)."""
    (result,) = _ask(demo_client, ["What is the capital of France?"], ["base"])
    assert "Paris" in result.text
    assert result.finish_reason == "stop"


def test_pirate_adapter_answers_like_a_pirate(demo_client: Any) -> None:
    """Pirate words in 10/10 held-out answers with the adapter, 0/10 without."""
    pirate, base = _answers(demo_client, "pirate"), _answers(demo_client, "base")
    assert sum(map(_is_pirate, pirate)) >= 8, pirate
    assert sum(map(_is_pirate, base)) <= 1, base


def test_brief_adapter_answers_in_one_short_sentence(demo_client: Any) -> None:
    """Mean words per held-out answer: 14.9 with the adapter (one sentence each), 30.8 without (40 new
    tokens at most)."""
    brief, base = _answers(demo_client, "brief"), _answers(demo_client, "base")
    mean_brief, mean_base = sum(map(_words, brief)) / len(brief), sum(map(_words, base)) / len(base)
    assert mean_brief <= 0.6 * mean_base, (mean_brief, mean_base, brief)


def test_mixed_adapter_batch_gives_each_row_its_adapter(demo_client: Any) -> None:
    """One batch of 30 rows, the 10 questions through pirate, brief and base: each row shows its
    own adapter's behaviour (measured: batch_size 30; pirate words in 10/10 pirate rows and 0/20
    others; brief rows 14.9 words on average, base rows 30.8)."""
    questions = list(HELD_OUT_QUESTIONS) * 3
    adapters = ["pirate"] * 10 + ["brief"] * 10 + ["base"] * 10
    results = _ask(demo_client, questions, adapters)
    assert [r.adapter for r in results] == adapters
    assert max(r.batch_size for r in results) > 10, "the rows never shared a batch"
    texts = {name: [r.text for r, a in zip(results, adapters, strict=True) if a == name]
             for name in ("pirate", "brief", "base")}
    assert sum(map(_is_pirate, texts["pirate"])) >= 8, texts["pirate"]
    assert sum(map(_is_pirate, texts["brief"] + texts["base"])) <= 2
    assert sum(map(_words, texts["brief"])) <= 0.6 * sum(map(_words, texts["base"]))
