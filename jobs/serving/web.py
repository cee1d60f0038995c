"""The Gradio web app (docs/serving.md#web-app): a VQA chat tab and an image tab. Both go through the same worker
as the API; any failure is shown in the page (gr.Error), the app keeps running."""
from __future__ import annotations

import io
import os
import queue
import time
from typing import Any, Callable, Iterator

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")     # the server calls nobody (set before gradio loads)
import gradio as gr  # noqa: E402
from PIL import Image

from datasets_catalog.plan import Message

from .engine import Busy, Engine, Worker
from .protocol import ChatJob

POLL_S = 0.05
RENORM_TYPES = ["global", "channel", "text_channel"]
INTRO = ("**MedLoom** · checkpoint `{name}` · {device}. Research demo, not a medical device: answers and images "
         "can be wrong. The OpenAI-compatible API is at `/v1` (docs/serving.md).")


def _message(exc: BaseException) -> str:
    from model.inference.loading import InferenceError

    if isinstance(exc, (Busy, InferenceError, ValueError)):
        return str(exc)
    return f"internal error: {type(exc).__name__}: {exc}"


def _drain(worker: Worker, fn: Callable[[Callable[[Any], None]], Any]) -> Iterator[tuple[str, Any]]:
    """Run fn(emit) on the worker; yield ("event", x) for each emit and finally ("done", result). A failure
    becomes gr.Error (shown in the page)."""
    events: queue.Queue = queue.Queue()
    try:
        future = worker.submit(lambda: fn(events.put))
    except Busy as exc:
        raise gr.Error(str(exc)) from None
    while True:
        try:
            yield "event", events.get(timeout=POLL_S)
            continue
        except queue.Empty:
            pass
        if future.done() and events.empty():
            break
    exc = future.exception()
    if exc is not None:
        raise gr.Error(_message(exc))
    yield "done", future.result()


def _turns(history: list[dict]) -> list[Message]:
    roles = {"user": "human", "assistant": "gpt"}
    out = []
    for turn in history:
        content = turn.get("content")
        if isinstance(content, list):    # gradio 6 keeps [{"type": "text", "text": ...}]
            content = "\n".join(p.get("text", "") for p in content if isinstance(p, dict))
        if isinstance(content, str) and turn.get("role") in roles:
            out.append(Message(roles[turn["role"]], content))
    return out


def build_blocks(engine: Engine, worker: Worker, model_name: str, max_tokens_limit: int) -> gr.Blocks:
    def chat(image: Image.Image | None, question: str, history: list[dict], greedy: bool, temperature: float,
             max_tokens: float, seed: float):
        question = (question or "").strip()
        if not question:
            raise gr.Error("type a question first")
        if not greedy and temperature <= 0:
            raise gr.Error("temperature must be > 0 when sampling (or tick greedy)")
        history = list(history or [])
        job = ChatJob(images=[image.convert("RGB")] if image is not None else [],
                      messages=_turns(history) + [Message("human", question)],
                      max_tokens=max(1, min(int(max_tokens), max_tokens_limit)), do_sample=not greedy,
                      temperature=float(temperature) if not greedy else 1.0, seed=int(seed), stream=True)
        history += [{"role": "user", "content": question}, {"role": "assistant", "content": ""}]
        answer = ""
        for kind, value in _drain(worker, lambda emit: engine.chat(job, emit)):
            answer = answer + value if kind == "event" else value.text
            history[-1] = {"role": "assistant", "content": answer}
            yield history, ""

    def generate(image: Image.Image | None, instruction: str, cfg_text: float, cfg_img: float, lo: float,
                 hi: float, renorm: str, renorm_min: float, steps: float, shift: float, seed: float, think: bool,
                 understanding: str, size: str, progress=gr.Progress()):
        instruction = (instruction or "").strip()
        if not instruction:
            raise gr.Error("type an instruction first")
        shape = None
        if (size or "").strip():
            try:
                h, w = (int(v) for v in size.lower().split("x"))
                shape = (h, w)
            except ValueError:
                raise gr.Error(f"size {size!r}: expected HEIGHTxWIDTH, e.g. 512x512") from None
        options = dict(cfg_text_scale=cfg_text, cfg_img_scale=cfg_img, cfg_interval=(lo, hi), cfg_renorm_type=renorm,
                       cfg_renorm_min=renorm_min, num_timesteps=int(steps), timestep_shift=shift,
                       use_thinking=think, understanding=understanding, image_shape=shape)
        pil = image.convert("RGB") if image is not None else None
        progress(0, desc="waiting for the model")
        started = time.monotonic()
        for kind, value in _drain(worker, lambda emit: engine.generate(
                pil, instruction, int(seed), options, on_step=lambda d, t: emit((d, t)))):
            if kind == "event":
                done, total = value
                progress((done, total), desc=f"sampling step {done}/{total}", unit="steps")
            else:
                out = Image.open(io.BytesIO(value.png))
                note = f"{value.width}x{value.height} in {time.monotonic() - started:.1f} s"
                return out, value.text, note
        raise gr.Error("no result")  # pragma: no cover (the drain always ends with "done" or gr.Error)

    can_generate = engine.generator is not None
    with gr.Blocks(title=f"MedLoom · {model_name}", analytics_enabled=False) as blocks:
        gr.Markdown(INTRO.format(name=model_name, device=engine.device))
        with gr.Tab("VQA chat"):
            with gr.Row():
                with gr.Column(scale=1):
                    image = gr.Image(type="pil", image_mode="RGB", label="Image", sources=["upload", "clipboard"],
                                     elem_id="vqa-image")
                    greedy = gr.Checkbox(True, label="greedy (argmax) decoding", elem_id="vqa-greedy")
                    temperature = gr.Slider(0.0, 2.0, value=1.0, step=0.05, label="temperature (when sampling)",
                                            elem_id="vqa-temperature")
                    max_tokens = gr.Slider(1, max_tokens_limit, value=min(512, max_tokens_limit), step=1,
                                           label="max new tokens")
                    seed = gr.Number(42, precision=0, label="seed")
                with gr.Column(scale=2):
                    chatbot = _chatbot()
                    question = gr.Textbox(label="Question", placeholder="Ask about the image",
                                          elem_id="vqa-question", lines=2)
                    with gr.Row():
                        send = gr.Button("Send", variant="primary", elem_id="vqa-send")
                        clear = gr.Button("Clear conversation")
            inputs = [image, question, chatbot, greedy, temperature, max_tokens, seed]
            send.click(chat, inputs, [chatbot, question])
            question.submit(chat, inputs, [chatbot, question])
            clear.click(lambda: ([], ""), None, [chatbot, question])
        with gr.Tab("Image generation"):
            if not can_generate:
                gr.Markdown("This checkpoint has no VAE (ae.safetensors): image generation is off.")
            with gr.Row():
                with gr.Column():
                    src = gr.Image(type="pil", image_mode="RGB", label="Input image (leave empty for text-to-image)")
                    instruction = gr.Textbox(label="Instruction", lines=2, elem_id="gen-instruction")
                    with gr.Row():
                        cfg_text = gr.Number(4.0, label="CFG text scale")
                        cfg_img = gr.Number(2.0, label="CFG image scale")
                    with gr.Row():
                        lo = gr.Number(0.0, label="CFG interval from t")
                        hi = gr.Number(1.0, label="CFG interval to t")
                    with gr.Row():
                        renorm = gr.Dropdown(RENORM_TYPES, value="text_channel", label="CFG renorm type")
                        renorm_min = gr.Number(0.0, label="CFG renorm min")
                    with gr.Row():
                        steps = gr.Slider(1, 100, value=50, step=1, label="timesteps", elem_id="gen-steps")
                        shift = gr.Number(3.0, label="timestep shift")
                    with gr.Row():
                        gen_seed = gr.Number(42, precision=0, label="seed")
                        size = gr.Textbox("", label="size HEIGHTxWIDTH (empty: input's size, or 1024x1024)",
                                          elem_id="gen-size")
                    with gr.Row():
                        think = gr.Checkbox(False, label="thinking mode (show the thought)", elem_id="gen-think")
                        understanding = gr.Dropdown(["append", "turn", "none"], value="append",
                                                    label="edit understanding pass")
                    run = gr.Button("Generate", variant="primary", interactive=can_generate, elem_id="gen-run")
                with gr.Column():
                    out = gr.Image(label="Result", type="pil", format="png", elem_id="gen-out")
                    thought = gr.Textbox(label="Thought / understanding text", lines=6, elem_id="gen-thought")
                    note = gr.Markdown()
            run.click(generate, [src, instruction, cfg_text, cfg_img, lo, hi, renorm, renorm_min, steps, shift,
                                 gen_seed, think, understanding, size], [out, thought, note])
    return blocks


def _chatbot() -> gr.Chatbot:
    """A chatbot holding OpenAI-style {"role", "content"} turns (gradio 6's only format)."""
    return gr.Chatbot(label="Conversation", elem_id="vqa-chat", height=360)
