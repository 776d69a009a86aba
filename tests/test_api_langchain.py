"""LangChain's ``ChatOpenAI`` answers through ``farm api`` (``langchain-openai``: test-only)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from langchain_openai import ChatOpenAI

from producer import FarmClient
from bench.api import ApiProcess
from tests.api_server import start_api
from tests.conftest import WorkerProcess


@pytest.fixture(scope="module")
def api_server(farm_worker: WorkerProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiProcess]:
    server = start_api(farm_worker.redis_url, tmp_path_factory.mktemp("api-langchain"))
    yield server
    server.close()


def test_chat_openai_invokes_and_streams(api_server: ApiProcess, client: FarmClient) -> None:
    chat = ChatOpenAI(model="tiny", base_url=api_server.base_url, api_key="unused",  # type: ignore[arg-type]
                      max_tokens=16, temperature=0, max_retries=0, stream_usage=True)
    question = [("system", "You are terse."), ("human", "Name a colour.")]
    expected = client.generate(messages=[{"role": "system", "content": "You are terse."},
                                         {"role": "user", "content": "Name a colour."}],
                               max_new_tokens=16, timeout=60)
    answer = chat.invoke(question)
    assert answer.content == expected.text
    assert answer.usage_metadata is not None
    assert answer.usage_metadata["output_tokens"] == expected.completion_tokens
    chunks = list(chat.stream(question))
    assert len([c for c in chunks if c.content]) > 1
    assert "".join(str(c.content) for c in chunks) == expected.text
    usage = [c.usage_metadata for c in chunks if c.usage_metadata]
    assert usage and usage[-1]["input_tokens"] == expected.prompt_tokens
