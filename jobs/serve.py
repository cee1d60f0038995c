#!/usr/bin/env python
"""Serve a checkpoint: a web app (VQA chat, image generation) and an OpenAI-compatible API in one process.

    python jobs/serve.py --model_path CKPT_DIR                       # http://127.0.0.1:7860/
    python jobs/serve.py --model_path CKPT_DIR --host 0.0.0.0 --api-key SECRET

The web app is at /, the API at /v1 (GET /v1/models, POST /v1/chat/completions, streaming included, and the
image_generation extension); docs/serving.md has the details. One model, one request at a time, a bounded
queue (503 when full). Binds to 127.0.0.1 unless told otherwise; there is no authentication except the
optional --api-key on the API. Exit status 2 for a user mistake (one message, no traceback).
"""
from __future__ import annotations

import argparse
import socket
import sys

from jobs import add_model_group, prog
from model.inference.interleave import UMV_GEN_VAE_ARGS, UMV_GEN_VIT_ARGS, VQA_VIT_ARGS
from model.inference.jobs_io import exit_status, format_transform, parse_transform
from model.inference.loading import InferenceError

NO_AUTH_WARNING = ("warning: --host {host} makes the server reachable from other machines and it has no "
                   "authentication{extra}; anyone who can reach port {port} can use the model")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog=prog("jobs/serve.py"),
        description="Serve a checkpoint over HTTP: a web app at / (VQA chat, image generation and editing) and "
                    "an OpenAI-compatible API at /v1 (chat completions with images, streaming).",
        epilog="Example: python jobs/serve.py --model_path runs/mix/checkpoints/0000200 --port 7860, then open "
               "http://127.0.0.1:7860/ or point the openai client at base_url=http://127.0.0.1:7860/v1")
    p.add_argument("--model_path", required=True, help="checkpoint directory (llm_config.json, vit_config.json, "
                                                       "ema.safetensors, tokenizer files; ae.safetensors for images)")
    s = p.add_argument_group("server")
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default %(default)s: this machine only)")
    s.add_argument("--port", type=int, default=7860, help="port (default %(default)s)")
    s.add_argument("--api-key", "--api_key", dest="api_key",
                   help="require 'Authorization: Bearer KEY' on /v1 (the web app stays open)")
    s.add_argument("--model_name", help="the model id /v1/models lists and requests name (default: the "
                                        "checkpoint folder's name)")
    s.add_argument("--max_queue", type=int, default=8, help="requests that may wait for the model; more get a 503 "
                                                            "(default %(default)s)")
    s.add_argument("--max_tokens_limit", type=int, default=2048,
                   help="largest max_tokens a request may ask for (default %(default)s)")
    m = add_model_group(p)
    m.add_argument("--vit_transform",
                   help="chat: ViT resize MAX,MIN,STRIDE[,MAX_PIXELS] as jobs/vqa.py (default: as the checkpoint's "
                        f"training_args.json records; a released directory: {format_transform(VQA_VIT_ARGS)})")
    m.add_argument("--gen_vae_transform",
                   help="images: VAE resize as jobs/generate.py --vae_transform (default: as recorded; a released "
                        f"directory: {format_transform(UMV_GEN_VAE_ARGS)})")
    m.add_argument("--gen_vit_transform",
                   help="images: ViT resize as jobs/generate.py --vit_transform (default: as recorded; a released "
                        f"directory: {format_transform(UMV_GEN_VIT_ARGS)})")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Exit status 2 with one `error:` line for a user mistake (never a traceback), 130 when interrupted."""
    return exit_status(_main, argv)


def _check_port(host: str, port: int) -> None:
    """Fail before loading the model when the address cannot be bound."""
    if not 0 < port < 65536:
        raise InferenceError(f"--port {port}: must be between 1 and 65535")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise InferenceError(f"--host {host} --port {port}: cannot listen there ({exc.strerror}); pick "
                                 f"another --port or stop what uses it") from None


def _main(argv: list[str] | None) -> int:
    args = parse_args(argv)
    vit, gen_vae, gen_vit = (parse_transform(value, flag) if value else None for value, flag in (
        (args.vit_transform, "--vit_transform"), (args.gen_vae_transform, "--gen_vae_transform"),
        (args.gen_vit_transform, "--gen_vit_transform")))
    if args.max_queue < 1:
        raise InferenceError(f"--max_queue must be >= 1, got {args.max_queue}")
    if args.max_tokens_limit < 1:
        raise InferenceError(f"--max_tokens_limit must be >= 1, got {args.max_tokens_limit}")
    if args.api_key is not None and not args.api_key.strip():
        raise InferenceError("--api-key is empty")
    _check_port(args.host, args.port)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        extra = " on the web app (--api-key guards only /v1)" if args.api_key else ""
        print(NO_AUTH_WARNING.format(host=args.host, port=args.port, extra=extra), file=sys.stderr)

    try:
        import uvicorn

        from jobs.serving.app import build_app
    except ImportError as exc:
        raise InferenceError(f"serving needs the 'serve' extra ({exc.name} is missing): "
                             f"pip install -e '.[serve]'") from None
    from jobs.serving.engine import Engine

    print(f"[serve] loading {args.model_path} ...", file=sys.stderr, flush=True)
    engine = Engine(args.model_path, device=args.device, dtype=args.dtype, use_ema=not args.use_model_weights,
                    vit_transform=vit, gen_vae_transform=gen_vae, gen_vit_transform=gen_vit)
    name = args.model_name or engine.path.resolve().name
    app, worker = build_app(engine, name, max_queue=args.max_queue, max_tokens_limit=args.max_tokens_limit,
                            api_key=args.api_key)
    shown = f"[{args.host}]" if ":" in args.host else args.host
    images = "yes" if engine.generator is not None else "no (no ae.safetensors)"
    print(f"[serve] model {name!r} on {engine.device} ({str(engine.dtype).replace('torch.', '')}); image "
          f"generation: {images}; queue {args.max_queue}", file=sys.stderr)
    print(f"[serve] web app http://{shown}:{args.port}/  API http://{shown}:{args.port}/v1", file=sys.stderr,
          flush=True)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    finally:
        worker.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
