"""One model, one device, one request at a time: a worker thread runs jobs from a bounded queue, so the web app
and the API share the model without racing on it, and a full queue is refused at once (HTTP 503) rather than
piling up (docs/serving.md#queue)."""
from __future__ import annotations

import queue
import threading
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from datasets_catalog.transforms import ImageTransformArgs


class Busy(RuntimeError):
    """The queue is full; try again later."""


class Worker:
    """Runs submitted callables one after another on its own thread; at most `max_queue` wait."""

    def __init__(self, max_queue: int) -> None:
        if max_queue < 1:
            raise ValueError(f"max_queue must be >= 1, got {max_queue}")
        self.max_queue = max_queue
        self._jobs: queue.Queue = queue.Queue(maxsize=max_queue)
        self._thread = threading.Thread(target=self._run, name="medloom-serve-worker", daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[[], Any]) -> Future:
        future: Future = Future()
        try:
            self._jobs.put_nowait((fn, future))
        except queue.Full:
            raise Busy(f"the server is busy: {self.max_queue} requests are already waiting (--max_queue); "
                       f"retry later") from None
        return future

    def waiting(self) -> int:
        return self._jobs.qsize()

    def _run(self) -> None:
        while True:
            fn, future = self._jobs.get()
            if fn is None:
                return
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn())
            except BaseException as exc:  # handed to the waiting request; the worker keeps serving
                future.set_exception(exc)

    def close(self, timeout: float = 5.0) -> None:
        try:
            self._jobs.put((None, None), timeout=timeout)
        except queue.Full:
            return
        self._thread.join(timeout)


@dataclass
class ChatResult:
    text: str
    tokens: int
    finish_reason: str          # "stop" (end token) or "length" (max_tokens reached)


@dataclass
class ImageResult:
    png: bytes
    width: int
    height: int
    text: str                   # the thought (thinking mode) or the understanding text, else ""


class Engine:
    """The loaded checkpoint: VQA chat always, image generation when the checkpoint has a VAE. One copy of the
    weights serves both (loaded with the VAE when there is one)."""

    def __init__(self, model_path: str | Path, device: str | None, dtype: str | None, use_ema: bool,
                 vit_transform: ImageTransformArgs | None, gen_vae_transform: ImageTransformArgs | None,
                 gen_vit_transform: ImageTransformArgs | None) -> None:
        """A None transform: the one the checkpoint was trained at (model/inference/defaults.py)."""
        from model.inference.api import ImageGenerator, VQAInferencer
        from model.inference.loading import InferenceError, check_checkpoint_dir, load_for_inference

        try:
            check_checkpoint_dir(model_path, need_vae=True)
            can_generate = True
        except InferenceError as exc:
            if "ae.safetensors" not in str(exc):
                raise
            can_generate = False
        loaded = load_for_inference(model_path, visual_gen=can_generate, device=device, dtype=dtype,
                                    use_ema=use_ema)
        self.path, self.device, self.dtype = loaded.path, loaded.device, loaded.dtype
        self.tokenizer = loaded.tokenizer
        self.vqa = VQAInferencer(loaded.path, vit_transform=vit_transform, loaded=loaded)
        self.generator = (ImageGenerator(loaded.path, vae_transform=gen_vae_transform,
                                         vit_transform=gen_vit_transform, loaded=loaded) if can_generate else None)

    def chat(self, job, on_text: Callable[[str], None] | None = None) -> ChatResult:
        """Answer a protocol.ChatJob; `on_text` gets the answer in pieces as tokens are generated."""
        ids: list[int] = []
        sent = ""

        def on_token(token: int) -> None:
            nonlocal sent
            ids.append(token)
            if on_text is None:
                return
            text = self.tokenizer.decode(ids, skip_special_tokens=True)
            if text.startswith(sent) and not text.endswith("\ufffd") and len(text) > len(sent):
                on_text(text[len(sent):])
                sent = text

        answer = self.vqa.chat(job.images, job.messages, temperature=job.temperature,
                               max_new_tokens=job.max_tokens, do_sample=job.do_sample, seed=job.seed,
                               on_token=on_token)
        if on_text is not None and answer.startswith(sent) and len(answer) > len(sent):
            on_text(answer[len(sent):])
        return ChatResult(answer, len(ids), "length" if len(ids) >= job.max_tokens else "stop")

    def generate(self, image, instruction: str, seed: int, options: dict,
                 on_step: Callable[[int, int], None] | None = None) -> ImageResult:
        """Text-to-image (image None) or an edit, with jobs/generate.py's options; the PNG as bytes."""
        import io

        from model.inference.loading import InferenceError

        if self.generator is None:
            raise InferenceError(f"{self.path} has no VAE (ae.safetensors): this checkpoint cannot generate images")
        result = self.generator.infer_single(image, instruction, seed=seed, on_step=on_step, **options)
        buf = io.BytesIO()
        result.image.save(buf, format="PNG")
        return ImageResult(buf.getvalue(), result.width, result.height, result.thought or result.understanding or "")
