"""Tests of the embedded model builder (tiny size only, so they stay fast)."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from ops import make_model

PROMPTS = [
    "The list type",
    "Hi",
    "def f(x):\n    return",
    "In Python, the assert statement is used to check",
    "x",
    "The quick brown fox jumps over the lazy dog, again and again and again.",
    "Exceptions",
    "A for loop iterates over the items of any sequence, in the order that they appear",
    "import os",
    "1 2 3",
    "What is a generator?",
    "class C:",
]
NEW_TOKENS = 24


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model.build_model(tmp_path_factory.mktemp("tiny") / "model", "tiny")


@pytest.fixture(scope="module")
def tokenizer(tiny: Path) -> Any:
    return AutoTokenizer.from_pretrained(tiny)


@pytest.fixture(scope="module")
def model(tiny: Path) -> Any:
    return AutoModelForCausalLM.from_pretrained(tiny).eval()


def _greedy(model: Any, tokenizer: PreTrainedTokenizerFast, prompts: list[str]) -> list[list[int]]:
    """New token ids of a greedy left-padded batched generate, one list per prompt."""
    tokenizer.padding_side = "left"
    inputs = tokenizer(prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model.generate(**inputs, do_sample=False, max_new_tokens=NEW_TOKENS)
    return out[:, inputs["input_ids"].shape[1]:].tolist()


def test_build_is_deterministic(tiny: Path, tmp_path: Path) -> None:
    again = make_model.build_model(tmp_path / "again", "tiny")
    first, second = load_file(tiny / "model.safetensors"), load_file(again / "model.safetensors")
    assert first.keys() == second.keys()
    for name, tensor in first.items():
        assert torch.equal(tensor, second[name]), name
    assert (tiny / "tokenizer.json").read_bytes() == (again / "tokenizer.json").read_bytes()
    for adapter in make_model.ADAPTERS:
        a = load_file(tiny / adapter / "adapter_model.safetensors")
        b = load_file(again / adapter / "adapter_model.safetensors")
        assert all(torch.equal(a[k], b[k]) for k in a), adapter


def test_layout_and_marker(tiny: Path) -> None:
    marker = json.loads((tiny / make_model.MARKER).read_text())
    assert marker["size"] == "tiny" and marker["version"] == make_model.BUILD_VERSION
    assert marker["params"] > 0
    for name in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json"):
        assert (tiny / name).is_file(), name
    adapter_config = json.loads((tiny / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str(tiny)
    leftovers = [*tiny.parent.glob(".model.build-*"), *tiny.parent.glob(".model.old-*")]
    assert not leftovers, "temporary build directories left behind"


def test_loads_with_auto_classes(model: Any, tokenizer: PreTrainedTokenizerFast) -> None:
    assert type(model).__name__ == "LlamaForCausalLM"
    assert isinstance(tokenizer, PreTrainedTokenizerFast)
    assert model.config.hidden_size == 64 and model.config.num_hidden_layers == 2
    assert model.generation_config.do_sample is False
    assert model.generation_config.pad_token_id == tokenizer.pad_token_id


def test_tokenizer_round_trip_and_bos(tokenizer: PreTrainedTokenizerFast) -> None:
    text = "Hello,  world!\n\tThe list type , e.g. é 漢字"
    ids = tokenizer(text)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    assert {tokenizer.eos_token, tokenizer.pad_token, tokenizer.unk_token} == {"</s>", "<pad>", "<unk>"}


def test_chat_template(tokenizer: PreTrainedTokenizerFast) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == "<|system|>\nBe brief.\n<|user|>\nHi\n<|assistant|>\n"


def test_batched_greedy_equals_single(model: Any, tokenizer: PreTrainedTokenizerFast) -> None:
    batched = _greedy(model, tokenizer, PROMPTS)
    single = [_greedy(model, tokenizer, [prompt])[0] for prompt in PROMPTS]
    assert batched == single
    # Full-length outputs: the random model must not stop at eos.
    assert all(tokenizer.eos_token_id not in ids for ids in batched)


def test_adapter_changes_greedy_output(tiny: Path, tokenizer: PreTrainedTokenizerFast) -> None:
    base = AutoModelForCausalLM.from_pretrained(tiny).eval()
    plain = _greedy(base, tokenizer, PROMPTS)
    outputs = {}
    for name in make_model.ADAPTERS:
        adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny), tiny / name).eval()
        outputs[name] = _greedy(adapted, tokenizer, PROMPTS)
        assert sum(a != b for a, b in zip(outputs[name], plain, strict=True)) >= len(PROMPTS) // 2, name
    assert outputs["adapter"] != outputs["adapter2"]


def test_ensure_model_is_a_cache_hit(tiny: Path) -> None:
    before = (tiny / "model.safetensors").stat().st_mtime_ns
    stages: list[str] = []
    assert make_model.ensure_model(tiny, "tiny", lambda stage, _: stages.append(stage)) == tiny
    assert stages == ["cached"]
    assert (tiny / "model.safetensors").stat().st_mtime_ns == before


def test_stale_marker_triggers_rebuild(tmp_path: Path) -> None:
    out = tmp_path / "model"
    out.mkdir()
    (out / make_model.MARKER).write_text(json.dumps({"size": "tiny", "version": -1, "params": 0}))
    killed_build = tmp_path / ".model.build-killed"  # what a build killed mid-way leaves behind
    killed_build.mkdir()
    make_model.ensure_model(out, "tiny")
    assert make_model.is_current(out, "tiny")
    assert (out / "model.safetensors").is_file()
    assert not killed_build.exists()


def test_concurrent_ensure_builds_once(tmp_path: Path) -> None:
    # One worker per device on a host: all of them ensure the same model directory at start.
    out, stages = tmp_path / "shared", []

    def record(stage: str, _: float) -> None:
        stages.append(stage)

    with ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(make_model.ensure_model, out, "tiny", record) for _ in range(2)]
        assert [f.result() for f in futures] == [out, out]
    assert stages.count("done") == 1 and stages.count("cached") == 1


def test_refuses_to_replace_foreign_directory(tmp_path: Path) -> None:
    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(FileExistsError):
        make_model.build_model(tmp_path, "tiny")
    assert (tmp_path / "precious.txt").read_text() == "keep me"


def test_cli_rejects_unknown_size(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        make_model.main([str(tmp_path / "m"), "--size", "huge"])
    assert not (tmp_path / "m").exists()


def test_served_adapters_of_a_build(tiny: Path) -> None:
    # What `farm up` serves when FARM_ADAPTER(S) are unset: the build's adapters under their names.
    assert make_model.served_adapters(tiny) == {"FARM_ADAPTER": str(tiny / "adapter"),
                                                "FARM_ADAPTERS": f"second={tiny / 'adapter2'}"}
