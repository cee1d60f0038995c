"""Python API with the upstream parameter names (docs/upstream-compat.md#text-generation, #image-generation; UniMedVL's VQA and image-generation
scripts): `VQAInferencer(model_path).infer_single(...)` -> str and
`ImageGenerator(model_path).infer_single(...)` -> GenerationResult (.image, .thought).

Either accepts any checkpoint directory the trainer writes, or a released UniMedVL / BAGEL directory.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from PIL import Image

from datasets_catalog.plan import IMAGE_TAG, Message, build_plan
from datasets_catalog.task_kinds import resolve_task_kind
from datasets_catalog.transforms import ImageTransformArgs
from pipelines.imaging.decode import ImageDecodeError, load_image_rgb

from .image_sampler import SamplerParams
from .interleave import GEN_THINK_SYSTEM_PROMPT, VLM_THINK_SYSTEM_PROMPT, ContextTooLong, Session, TextOptions
from .loading import InferenceError, Loaded, load_for_inference, note

ImageLike = str | Path | Image.Image
UNDERSTANDING_MODES = ("append", "turn", "none")


def open_image(image: ImageLike) -> Image.Image:
    """An RGB PIL image from a path (any format the shared decoder reads: PNG/JPEG, DICOM, NIfTI) or a PIL
    image; a bad path or undecodable file raises InferenceError naming the image and why."""
    if isinstance(image, Image.Image):
        return image.convert("RGB") if image.mode != "RGB" else image
    path = Path(image)
    if not path.exists():
        raise InferenceError(f"image {path}: no such file")
    if path.is_dir():
        raise InferenceError(f"image {path}: is a directory, not an image file")
    try:
        return load_image_rgb(None, path)
    except ImageDecodeError as exc:
        raise InferenceError(f"image {path}: cannot be read: {exc}") from None


def _seed_all(seed: int) -> None:
    torch.manual_seed(seed)


class VQAInferencer:
    """Visual question answering / report writing: ViT-update each image, text-update the prompt, generate.

    `vit_transform` defaults to the ViT transform the checkpoint's training_args.json records for its
    understanding datasets (model/inference/defaults.py), and for a released directory to the vlm_sft transform
    of the released models (980, 378, 14, 2,007,040; docs/upstream-compat.md#text-generation). `loaded` reuses
    a model already loaded (a server holding one copy for chat and image generation)."""

    def __init__(self, model_path: str | Path, device: str | torch.device | None = None,
                 dtype: str | torch.dtype | None = None, use_ema: bool = True,
                 vit_transform: ImageTransformArgs | None = None, loaded: Loaded | None = None) -> None:
        self._loaded = loaded or load_for_inference(model_path, visual_gen=False, device=device, dtype=dtype,
                                                    use_ema=use_ema)
        self.model, self.tokenizer = self._loaded.model, self._loaded.tokenizer
        self.device, self.dtype = self._loaded.device, self._loaded.dtype
        self.defaults = defaults = self._loaded.defaults   # what the checkpoint was trained at
        if vit_transform is None:
            for text in defaults.notes_for("vit_transform"):
                note(text)
        self.vit_transform = vit_transform or defaults.vit_transform

    def infer_single(self, image_path: ImageLike | Sequence[ImageLike] | None, prompt: str,
                     temperature: float = 1.0, max_new_tokens: int = 512, do_sample: bool = True,
                     seed: int = 42, think: bool = False, on_token: Callable[[int], None] | None = None) -> str:
        """Answer `prompt` about the image(s). Defaults as UniMedVL's VQA script (sampling at temperature 1.0,
        512 new tokens); `do_sample=False` is greedy. `<image>` tags in the prompt place the images as in
        training (pieces stripped); without tags the images come first, then the raw prompt. `think` adds the
        reasoning system text first (BAGEL's VLM think prompt); the answer then holds <think> ... </think>."""
        images = [] if image_path is None else (
            list(image_path) if isinstance(image_path, (list, tuple)) else [image_path])
        return self.chat(images, [Message("human", prompt)], temperature=temperature,
                         max_new_tokens=max_new_tokens, do_sample=do_sample, seed=seed, think=think,
                         on_token=on_token)

    def prepare(self, images: Sequence[ImageLike], messages: Sequence[Message], think: bool = False,
                seed: int = 42, on_token: Callable[[int], None] | None = None) -> Session:
        """The session after the conversation's context (ViT images, text turns), before any answer token.
        `on_token` sees each answer token id as it is generated (decode with self.tokenizer)."""
        pil = [open_image(i) for i in images]
        s = Session(self.model, self.tokenizer, vit_args=self.vit_transform, understanding_output=True, seed=seed,
                    on_token=on_token)
        try:
            if think:
                s.add_system(VLM_THINK_SYSTEM_PROMPT)
            has_tags = any(IMAGE_TAG in m.value for m in messages if m.role == "human")
            if not has_tags:
                for im in pil:
                    s.add_vit_image(im)
                for m in messages:
                    s.add_text(m.value)
            else:  # the training layout of SFT records (docs/upstream-compat.md#sequence-plans): the shared plan, gpt turns as context
                plan = build_plan(resolve_task_kind("sft"), list(messages), len(pil), 0)
                for item in plan.items:
                    if item.type == "text":
                        s.add_text(item.text)
                    elif item.type == "vit_image":
                        s.add_vit_image(pil[item.image.index])
        except ContextTooLong as exc:
            raise InferenceError(str(exc)) from None
        return s

    def chat(self, images: Sequence[ImageLike], messages: Sequence[Message], temperature: float = 1.0,
             max_new_tokens: int = 512, do_sample: bool = True, seed: int = 42, think: bool = False,
             on_token: Callable[[int], None] | None = None) -> str:
        """Replay a conversation ending with a human turn (earlier gpt turns are context), then answer it.
        `on_token` sees each answer token id as it is generated (decode with self.tokenizer)."""
        _seed_all(seed)
        s = self.prepare(images, messages, think=think, seed=seed, on_token=on_token)
        options = TextOptions(do_sample=do_sample, temperature=temperature, max_new_tokens=max_new_tokens)
        return s.generate_text(options)

    def answer_batch(self, sessions: Sequence[Session], max_new_tokens: int = 512) -> list[str]:
        """Greedy answers of prepared sessions, decoded together (model.inference.batched_text): the same
        tokens as `chat(..., do_sample=False)` one at a time."""
        from .batched_text import generate_text_batch

        if not sessions:
            return []
        limits = [min(max_new_tokens, max(0, s.max_positions - s.cond.rope - 1)) for s in sessions]
        outs = generate_text_batch(self.model, [s.cond for s in sessions], self.tokenizer.special, limits)
        return [self.tokenizer.decode(o.ids, skip_special_tokens=True) for o in outs]


@dataclass
class GenerationResult:
    image: Image.Image
    thought: str | None                 # the analysis text of thinking mode, else None
    understanding: str | None           # the understanding-pass text (appended or its own turn), else None
    instruction: str                    # the final instruction the image was generated from
    latent: torch.Tensor                # sampled latent tokens [h*w, p*p*z] (float32, CPU) the image decodes
    height: int
    width: int


class ImageGenerator:
    """Image generation and editing (UniMedVL's image-generation script, docs/upstream-compat.md#image-generation).

    Editing (an input image): an understanding pass (or, with use_thinking, an analysis in think mode) writes
    text that is appended to the instruction, then [image, instruction] is generated with CFG; the output
    size follows the input's aspect ratio through the VAE resize rule. Text-to-image (no input image): the
    instruction alone, BAGEL think mode when use_thinking, at `image_shape` (default 1024 x 1024).

    `vae_transform` / `vit_transform` default to the transforms the checkpoint's training_args.json records for
    its generation datasets (model/inference/defaults.py), and for a released directory to UniMedVL's (VAE
    1024, 32, 16; ViT 980, 387, 14)."""

    def __init__(self, model_path: str | Path, device: str | torch.device | None = None,
                 dtype: str | torch.dtype | None = None, use_ema: bool = True,
                 vae_transform: ImageTransformArgs | None = None,
                 vit_transform: ImageTransformArgs | None = None, loaded: Loaded | None = None) -> None:
        self._loaded = loaded or load_for_inference(model_path, visual_gen=True, device=device, dtype=dtype,
                                                    use_ema=use_ema)
        self._on_step: Callable[[int, int], None] | None = None
        self.model, self.tokenizer = self._loaded.model, self._loaded.tokenizer
        self.device, self.dtype = self._loaded.device, self._loaded.dtype
        self.defaults = defaults = self._loaded.defaults
        roles = (["gen_vae_transform"] if vae_transform is None else []) + \
            (["gen_vit_transform"] if vit_transform is None else [])
        for text in defaults.notes_for(*roles):
            note(text)
        self.vae_transform = vae_transform or defaults.gen_vae_transform
        self.vit_transform = vit_transform or defaults.gen_vit_transform

    def _session(self, understanding_output: bool, seed: int) -> Session:
        return Session(self.model, self.tokenizer, self.vae_transform, self.vit_transform,
                       understanding_output=understanding_output, seed=seed, on_step=self._on_step)

    def _understand(self, image: Image.Image, text: str, think: bool, options: TextOptions, seed: int) -> str:
        s = self._session(True, seed)
        if think:
            s.add_system(VLM_THINK_SYSTEM_PROMPT)
        s.add_image(image)
        s.add_text(text, "the instruction")
        return s.generate_text(options)

    def infer_single(self, image: ImageLike | None, instruction: str, cfg_text_scale: float = 4.0,
                     cfg_img_scale: float = 2.0, cfg_interval: Sequence[float] = (0.0, 1.0),
                     cfg_renorm_type: str = "text_channel", cfg_renorm_min: float = 0.0, num_timesteps: int = 50,
                     timestep_shift: float = 3.0, seed: int = 42, use_thinking: bool = False,
                     understanding: str = "append", text_do_sample: bool = False, text_temperature: float = 0.3,
                     max_think_token_n: int = 800, image_shape: Sequence[int] | None = None,
                     on_step: Callable[[int, int], None] | None = None) -> GenerationResult:
        """Defaults as the UniMedVL editing example (scales 4.0 / 2.0, interval [0, 1], text_channel renorm,
        50 steps, shift 3.0, seed 42, greedy text at temperature 0.3, 800 think tokens).

        `understanding` (edits without use_thinking): "append" = UniMedVL's example (an understanding pass over
        [ViT image, instruction] whose text is appended to the instruction); "turn" = the text is generated on
        the full generation context and added as its own turn before the image (the sequence layout of edit
        training records: VAE + ViT image, human text, gpt text, target); "none" = no text pass.
        `on_step(done, total)` follows the image sampling steps (progress bars)."""
        if understanding not in UNDERSTANDING_MODES:
            raise InferenceError(f"understanding {understanding!r} is not one of {UNDERSTANDING_MODES}")
        try:
            params = SamplerParams(cfg_text_scale=cfg_text_scale, cfg_img_scale=cfg_img_scale,
                                   cfg_interval=tuple(cfg_interval), cfg_renorm_type=cfg_renorm_type,
                                   cfg_renorm_min=cfg_renorm_min, num_timesteps=num_timesteps,
                                   timestep_shift=timestep_shift)
        except ValueError as exc:
            raise InferenceError(str(exc)) from None
        pil = open_image(image) if image is not None else None
        _seed_all(seed)
        self._on_step = on_step
        options = TextOptions(do_sample=text_do_sample, temperature=text_temperature, max_new_tokens=max_think_token_n)
        thought = text = None
        final = instruction
        try:
            if pil is not None:
                if use_thinking:
                    prompt = f"Analyze this medical image and develop an editing strategy for: '{instruction}'."
                    thought = self._understand(pil, prompt, True, options, seed)
                    if thought:
                        final = f"{instruction}\n\nBased on analysis: {thought}"
                elif understanding == "append":
                    text = self._understand(pil, instruction, False, options, seed)
                    if text:
                        final = f"{instruction}\n\n{text}"
                s = self._session(False, seed)
                s.add_image(pil)
                s.add_text(final, "the instruction")
                if understanding == "turn" and not use_thinking:
                    text = s.generate_text(options)
                    s.append_to_cond(text)
            else:
                s = self._session(False, seed)
                if use_thinking:
                    s.add_system(GEN_THINK_SYSTEM_PROMPT)
                s.add_text(final, "the instruction")
                if use_thinking:
                    thought = s.generate_text(options)
                    s.append_to_cond(thought)
            shape = tuple(int(v) for v in image_shape) if image_shape is not None else None
            img, latent, (h, w) = s.generate_image(params, shape)
        except ContextTooLong as exc:
            raise InferenceError(str(exc)) from None
        except ValueError as exc:  # an impossible output size
            raise InferenceError(str(exc)) from None
        return GenerationResult(img, thought, text, final, latent.float().cpu(), h, w)
