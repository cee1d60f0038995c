"""The OpenAI-compatible routes (docs/serving.md#api): GET /v1/models, POST /v1/chat/completions (JSON or
server-sent events), the `image_generation` extension, the optional bearer token. Every failure is a JSON
`{"error": {...}}` body with a 4xx/5xx status; the server keeps serving."""
from __future__ import annotations

import asyncio
import base64
import hmac
import json
import time
import uuid
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from .engine import Busy, Engine, Worker
from .protocol import ChatJob, RequestError, parse_chat_request

MAX_BODY_BYTES = 32 * 1024 * 1024
STREAM_IDLE_S = 600.0           # a stream with no token for this long is closed (bounded waits)


def error_response(status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                   headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": status}},
                        status_code=status, headers=headers)


def _user_error(exc: BaseException) -> JSONResponse | None:
    """A model-side user mistake (prompt too long, impossible image size) -> 400; else None."""
    from model.inference.loading import InferenceError

    if isinstance(exc, InferenceError):
        return error_response(400, str(exc))
    return None


def _chunk(cid: str, created: int, model: str, delta: dict, finish: str | None) -> str:
    body = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


def add_api_routes(app: FastAPI, engine: Engine, worker: Worker, model_name: str, max_tokens_limit: int,
                   api_key: str | None) -> None:
    created_at = int(time.time())

    @app.middleware("http")
    async def _guard(request: Request, call_next):
        if not request.url.path.startswith("/v1"):
            return await call_next(request)
        if api_key is not None:
            given = request.headers.get("authorization", "")
            scheme, _, token = given.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
                return error_response(401, "missing or wrong API key: send the header 'Authorization: Bearer KEY' "
                                           "with the server's --api-key", "authentication_error",
                                      headers={"WWW-Authenticate": "Bearer"})
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > MAX_BODY_BYTES:
            return error_response(413, f"request body of {int(length)} bytes is above the limit of {MAX_BODY_BYTES}")
        try:
            return await call_next(request)
        except Exception as exc:  # a bug must not kill the server: one 500 with the reason
            return error_response(500, f"internal error: {type(exc).__name__}: {exc}", "server_error")

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created_at,
                                            "owned_by": "medloom"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        raw = await request.body()
        if len(raw) > MAX_BODY_BYTES:
            return error_response(413, f"request body of {len(raw)} bytes is above the limit of {MAX_BODY_BYTES}")
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            return error_response(400, f"body: not JSON ({exc})")
        try:
            job = await asyncio.to_thread(parse_chat_request, body, model_name, max_tokens_limit)
        except RequestError as exc:
            return error_response(exc.status, str(exc), param=exc.param,
                                  kind="not_found_error" if exc.status == 404 else "invalid_request_error")
        if job.image_generation is not None:
            return await _image(job)
        if job.stream:
            return await _stream(job)
        result, failure = await _queued(lambda: engine.chat(job))
        if failure is not None:
            return failure
        return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                "model": model_name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": result.text},
                             "finish_reason": result.finish_reason}]}

    async def _queued(work):
        """Run `work` on the model's worker: (result, None), or (None, the 503 / 4xx / 500 response)."""
        try:
            return await asyncio.wrap_future(worker.submit(work)), None
        except Busy as exc:
            return None, error_response(503, str(exc), "server_busy")
        except Exception as exc:
            return None, _user_error(exc) or error_response(500, f"internal error: {type(exc).__name__}: {exc}",
                                                            "server_error")

    async def _image(job: ChatJob):
        opts = job.image_generation
        options: dict[str, Any] = opts.model_dump(exclude={"think", "size"})
        options.update(cfg_interval=tuple(opts.cfg_interval), use_thinking=opts.think, image_shape=job.image_size)
        instruction = job.messages[-1].value
        image = job.images[0] if job.images else None
        result, failure = await _queued(lambda: engine.generate(image, instruction, job.seed, options))
        if failure is not None:
            return failure
        return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                "model": model_name,
                "choices": [{"index": 0, "finish_reason": "stop",
                             "message": {"role": "assistant", "content": result.text,
                                         "images": [{"type": "image_url", "mime_type": "image/png",
                                                     "width": result.width, "height": result.height,
                                                     "b64_json": base64.b64encode(result.png).decode()}]}}]}

    async def _stream(job: ChatJob):
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def on_text(piece: str) -> None:
            loop.call_soon_threadsafe(events.put_nowait, ("text", piece))

        try:
            future = worker.submit(lambda: engine.chat(job, on_text))
        except Busy as exc:
            return error_response(503, str(exc), "server_busy")
        future.add_done_callback(lambda f: loop.call_soon_threadsafe(events.put_nowait, ("done", f)))
        first = await events.get()          # errors in the prompt come before any token: answer them as JSON
        if first[0] == "done" and first[1].exception() is not None:
            exc = first[1].exception()
            return _user_error(exc) or error_response(500, f"internal error: {type(exc).__name__}: {exc}",
                                                      "server_error")
        cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        async def sse() -> AsyncIterator[str]:
            yield _chunk(cid, created, model_name, {"role": "assistant", "content": ""}, None)
            event = first
            while True:
                if event[0] == "text":
                    yield _chunk(cid, created, model_name, {"content": event[1]}, None)
                else:
                    exc = event[1].exception()
                    if exc is not None:
                        payload = {"error": {"message": f"{type(exc).__name__}: {exc}", "type": "server_error"}}
                        yield f"data: {json.dumps(payload)}\n\n"
                    else:
                        yield _chunk(cid, created, model_name, {}, event[1].result().finish_reason)
                    yield "data: [DONE]\n\n"
                    return
                event = await asyncio.wait_for(events.get(), STREAM_IDLE_S)

        return StreamingResponse(sse(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
