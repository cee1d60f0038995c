"""jobs/serving/protocol.py and the worker: request validation (fields named, 4xx statuses, no network URLs)
and the bounded queue. The server end to end is tests/integration/jobs/test_serve.py."""
from __future__ import annotations

import base64
import io
import threading

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from jobs.serving.engine import Busy, Worker
from jobs.serving.protocol import RequestError, decode_image_url, parse_chat_request

MODEL = "tiny"


def png_url(size=(6, 4), color=(200, 10, 30)) -> str:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def body(**extra) -> dict:
    content = [{"type": "image_url", "image_url": {"url": png_url()}}, {"type": "text", "text": "What is this?"}]
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], **extra}


def parse(b) -> object:
    return parse_chat_request(b, MODEL, max_tokens_limit=64)


def test_an_image_question_becomes_a_job():
    job = parse(body(max_tokens=7, temperature=0, seed=3))
    assert len(job.images) == 1 and job.images[0].size == (6, 4)
    assert job.images[0].getpixel((0, 0)) == (200, 10, 30)
    assert [(m.role, m.value) for m in job.messages] == [("human", "What is this?")]
    assert (job.max_tokens, job.do_sample, job.seed, job.stream) == (7, False, 3, False)


def test_defaults_follow_the_vqa_cli():
    job = parse_chat_request({"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}, MODEL, 1024)
    assert (job.max_tokens, job.do_sample, job.temperature, job.seed) == (512, True, 1.0, 42)


def test_multi_turn_keeps_roles_and_order():
    b = {"model": MODEL, "messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                                      {"role": "user", "content": [{"type": "text", "text": "c"}]}]}
    assert [(m.role, m.value) for m in parse(b).messages] == [("human", "a"), ("gpt", "b"), ("human", "c")]


@pytest.mark.parametrize("url, scheme", [("http://example.org/x.png", "http"), ("https://h/x.png", "https"),
                                         ("ftp://h/x.png", "ftp")])
def test_network_urls_are_refused(url, scheme):
    b = body()
    b["messages"][0]["content"][0]["image_url"]["url"] = url
    with pytest.raises(RequestError) as err:
        parse(b)
    assert err.value.status == 400
    assert str(err.value).startswith(f"messages[0].content[0].image_url.url: {scheme}:// image URLs are refused")
    assert "fetches nothing" in str(err.value)


def test_a_broken_image_is_named():
    url = "data:image/png;base64," + base64.b64encode(b"\x89PNG\r\n\x1a\n broken").decode()
    with pytest.raises(RequestError, match=r"^messages\[0\]\.content\[1\]\.image_url\.url: cannot decode the image"):
        parse({"model": MODEL, "messages": [{"role": "user", "content": [
            {"type": "text", "text": "q"}, {"type": "image_url", "image_url": {"url": url}}]}]})
    with pytest.raises(RequestError, match="base64 data is broken"):
        decode_image_url("data:image/png;base64,@@@", "x")


@pytest.mark.parametrize("extra, where", [
    ({"frequency_penalty": 0.5}, "frequency_penalty"),
    ({"messages": [{"role": "user", "content": "q", "colour": 1}]}, "messages[0].colour"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "q", "bold": True}]}]},
     "messages[0].content[0].bold"),
])
def test_unknown_fields_are_refused_by_name(extra, where):
    with pytest.raises(RequestError) as err:
        parse(body(**extra))
    assert str(err.value) == f"{where}: unknown field; remove it (docs/serving.md#api lists the fields)"
    assert err.value.status == 400 and err.value.param == where


def test_other_mistakes():
    with pytest.raises(RequestError) as err:
        parse(body(model="gpt-4o"))
    assert err.value.status == 404 and "GET /v1/models" in str(err.value)
    with pytest.raises(RequestError, match="max_tokens: 65 is above this server's limit of 64"):
        parse(body(max_tokens=65))
    with pytest.raises(RequestError, match=r"^temperature: "):
        parse(body(temperature=-1))
    with pytest.raises(RequestError, match=r"^messages: required field is missing"):
        parse({"model": MODEL})
    with pytest.raises(RequestError, match="last message must be the user's"):
        parse({"model": MODEL, "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]})
    with pytest.raises(RequestError, match=r"^messages\[0\]\.role: "):
        parse({"model": MODEL, "messages": [{"role": "robot", "content": "q"}]})
    with pytest.raises(RequestError, match="stream: not supported with image_generation"):
        parse(body(stream=True, image_generation={}))
    with pytest.raises(RequestError, match=r"^image_generation\.size: "):
        parse(body(image_generation={"size": "big"}))


def test_image_generation_extension():
    job = parse(body(image_generation={"num_timesteps": 3, "size": "32x48", "think": True}))
    assert job.image_generation.num_timesteps == 3 and job.image_size == (32, 48)
    assert job.image_generation.cfg_text_scale == 4.0     # jobs/generate.py's default


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                                        max_size=3), max_leaves=12)
part = st.fixed_dictionaries({"type": st.sampled_from(["text", "image_url", "audio"])},
                             optional={"text": json_values, "image_url": json_values | st.fixed_dictionaries(
                                 {"url": st.text(max_size=30) | st.just(png_url())})})
message = st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system", "tool"])},
                                optional={"content": st.text(max_size=10) | st.lists(part, max_size=3)})
request = st.fixed_dictionaries({"model": st.sampled_from([MODEL, "x"])},
                                optional={"messages": st.lists(message, max_size=3), "max_tokens": json_values,
                                          "temperature": json_values, "stream": json_values, "seed": json_values})


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(request, json_values))
def test_any_body_is_a_job_or_one_request_error(b):
    try:
        job = parse(b)
    except RequestError as exc:
        assert 400 <= exc.status < 500 and ": " in str(exc) and "\n" not in str(exc)
        return
    assert job.messages[-1].role == "human" and 1 <= job.max_tokens <= 64


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=64), st.sampled_from(["image/png", "image/jpeg", ""]))
def test_any_bytes_decode_or_fail_cleanly(raw, mime):
    url = f"data:{mime};base64," + base64.b64encode(raw).decode()
    try:
        img = decode_image_url(url, "u")
    except RequestError as exc:
        assert str(exc).startswith("u: ")
        return
    assert img.mode == "RGB"


def test_the_worker_runs_in_order_refuses_when_full_and_survives_errors():
    worker = Worker(max_queue=2)
    gate, order = threading.Event(), []
    first = worker.submit(lambda: gate.wait(5) and order.append(1))
    deadline = threading.Event()
    while worker.waiting() and not deadline.wait(0.01):   # until the worker has taken the first job
        pass
    second = worker.submit(lambda: order.append(2))
    failing = worker.submit(lambda: 1 / 0)
    with pytest.raises(Busy, match=r"2 requests are already waiting \(--max_queue\)"):
        worker.submit(lambda: order.append(4))
    gate.set()
    first.result(5), second.result(5)
    with pytest.raises(ZeroDivisionError):
        failing.result(5)
    assert worker.submit(lambda: "still serving").result(5) == "still serving"
    assert order == [1, 2]
    worker.close()
    with pytest.raises(ValueError):
        Worker(0)
