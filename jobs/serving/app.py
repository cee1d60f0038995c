"""The one ASGI app jobs/serve.py runs: the API routes under /v1, the Gradio web app mounted at /."""
from __future__ import annotations

from fastapi import FastAPI

from .engine import Engine, Worker
from .http_api import add_api_routes
from .web import build_blocks


def build_app(engine: Engine, model_name: str, max_queue: int, max_tokens_limit: int,
              api_key: str | None) -> tuple[FastAPI, Worker]:
    """The app and its worker (close it when the server stops)."""
    import gradio as gr

    worker = Worker(max_queue)
    app = FastAPI(title="MedLoom", docs_url=None, redoc_url=None, openapi_url=None)
    add_api_routes(app, engine, worker, model_name, max_tokens_limit, api_key)
    blocks = build_blocks(engine, worker, model_name, max_tokens_limit)
    blocks.queue(default_concurrency_limit=max_queue, max_size=max_queue)
    app = gr.mount_gradio_app(app, blocks, path="", footer_links=[], ssr_mode=False)
    return app, worker
