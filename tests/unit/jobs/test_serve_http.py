"""jobs/serving/http_api.py on a real FastAPI app (in-process client) with a stand-in engine whose answers the
test controls: the 503 of a full queue, a failing model that leaves the server serving, the server-sent events
format and the bearer token. The real model behind the real server is tests/integration/jobs/test_serve.py."""
from __future__ import annotations

import json
import threading
import time

import pytest

fastapi = pytest.importorskip("fastapi", reason="pip install -e '.[serve]'")
from fastapi.testclient import TestClient  # noqa: E402

from jobs.serving.engine import ChatResult, Worker  # noqa: E402
from jobs.serving.http_api import add_api_routes  # noqa: E402

QUESTION = {"model": "m", "messages": [{"role": "user", "content": "hello"}]}


class FakeEngine:
    """Answers 'ok!' token by token; blocks while `gate` is clear; raises what `fail` holds."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.gate.set()
        self.fail: BaseException | None = None
        self.started = threading.Event()

    def chat(self, job, on_text=None) -> ChatResult:
        self.started.set()
        self.gate.wait(10)
        if self.fail is not None:
            raise self.fail
        for piece in ("o", "k", "!"):
            if on_text:
                on_text(piece)
        return ChatResult("ok!", 3, "stop")


def make(api_key=None, max_queue=1):
    app = fastapi.FastAPI()
    engine, worker = FakeEngine(), Worker(max_queue)
    add_api_routes(app, engine, worker, "m", max_tokens_limit=64, api_key=api_key)
    return TestClient(app), engine, worker


def test_a_full_queue_is_a_503_with_a_message():
    client, engine, worker = make(max_queue=1)
    engine.gate.clear()
    results = []
    threads = [threading.Thread(target=lambda: results.append(client.post("/v1/chat/completions", json=QUESTION)))]
    threads[0].start()
    assert engine.started.wait(10)                     # one request runs
    threads.append(threading.Thread(target=lambda: results.append(client.post("/v1/chat/completions",
                                                                              json=QUESTION))))
    threads[1].start()
    deadline = time.monotonic() + 10
    while worker.waiting() < 1 and time.monotonic() < deadline:   # one waits
        time.sleep(0.01)
    third = client.post("/v1/chat/completions", json=QUESTION)
    assert third.status_code == 503
    assert third.json()["error"]["message"].startswith("the server is busy: 1 requests are already waiting")
    engine.gate.set()
    for t in threads:
        t.join(10)
    assert [r.status_code for r in results] == [200, 200]
    assert results[0].json()["choices"][0]["message"] == {"role": "assistant", "content": "ok!"}
    worker.close()


def test_a_failing_model_is_a_500_and_the_server_keeps_serving():
    client, engine, worker = make()
    engine.fail = RuntimeError("out of memory")
    r = client.post("/v1/chat/completions", json=QUESTION)
    assert r.status_code == 500 and r.json()["error"]["message"] == "internal error: RuntimeError: out of memory"
    from model.inference.loading import InferenceError

    engine.fail = InferenceError("the prompt is 9 tokens; ... shorten it")
    r = client.post("/v1/chat/completions", json={**QUESTION, "stream": True})
    assert r.status_code == 400 and "shorten it" in r.json()["error"]["message"]
    engine.fail = None
    assert client.post("/v1/chat/completions", json=QUESTION).json()["choices"][0]["message"]["content"] == "ok!"
    worker.close()


def test_streaming_is_server_sent_events_ending_with_done():
    client, engine, worker = make()
    r = client.post("/v1/chat/completions", json={**QUESTION, "stream": True})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = [line[len("data: "):] for line in r.text.split("\n\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"} and len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == "ok!"
    assert chunks[-1]["choices"][0] == {"index": 0, "delta": {}, "finish_reason": "stop"}
    worker.close()


def test_the_api_key_guards_v1_only():
    client, engine, worker = make(api_key="k")
    assert client.get("/v1/models").status_code == 401
    assert client.get("/v1/models", headers={"Authorization": "Bearer nope"}).status_code == 401
    r = client.get("/v1/models", headers={"Authorization": "Bearer k"})
    assert r.status_code == 200 and r.json()["data"][0]["id"] == "m"
    assert client.get("/elsewhere").status_code == 404          # not the API: no key asked
    r = client.post("/v1/chat/completions", json={**QUESTION, "model": "other"}, headers={"Authorization": "Bearer k"})
    assert r.status_code == 404 and "GET /v1/models lists 'm'" in r.json()["error"]["message"]
    worker.close()
