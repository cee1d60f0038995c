"""Interleaved context bookkeeping (docs/upstream-compat.md#image-generation): one session over text and image inputs that keeps the
three guidance contexts, generates text (understanding output) or an image.

- a text input: text-uncond <- copy of cond; the text goes to cond and img-uncond;
- an image input: resized with the VAE rule, then a VAE update (skipped for understanding-only output) and a
  ViT update on cond only; text-uncond <- copy of cond; the output size defaults to that image's size;
- think mode: a system text goes to cond and img-uncond first; for image output the thought is generated (on
  a copy of cond), appended to cond, then the image is sampled.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from PIL import Image

from datasets_catalog.tokenizer import TextTokenizer
from datasets_catalog.transforms import DEFAULT_VIT_ARGS, ImageTransformArgs, resize_target
from model.unified import UnifiedModel
from pipelines.imaging.decode import resize_rgb

from .image_sampler import GuidanceContexts, SamplerParams, decode_latent, sample_latent
from .kv_cache import Context, update_text, update_vae, update_vit
from .text_generation import generate_text

# System texts of think mode (upstream prompts: checkpoints were trained with these exact strings).
VLM_THINK_SYSTEM_PROMPT = (
    "You should first think about the reasoning process in the mind and then provide the user with the answer.\n"
    "The reasoning process is enclosed within <think> </think> tags, i.e. <think> reasoning process here </think> "
    "answer here")
GEN_THINK_SYSTEM_PROMPT = (  # UniMedVL's rewording of BAGEL's generation prompt
    "You should first think about the planning process in your mind, and then generate the image.\n"
    "The planning process is enclosed within <think> </think> tags; that is, <think> planning process here "
    "</think> image here.\n")

# UniMedVL's inference transforms (docs/upstream-compat.md#image-generation): VAE (1024, 32, 16), ViT (980, 387, 14) with the upstream
# default max_pixels. VQA uses the vlm_sft ViT transform (DEFAULT_VIT_ARGS: 980, 378, 14, 2,007,040).
UMV_GEN_VAE_ARGS = ImageTransformArgs(max_image_size=1024, min_image_size=32, image_stride=16)
UMV_GEN_VIT_ARGS = ImageTransformArgs(max_image_size=980, min_image_size=387, image_stride=14)
VQA_VIT_ARGS = DEFAULT_VIT_ARGS


class ContextTooLong(ValueError):
    """The inputs need more positions than the model's context (max_position_embeddings)."""


@dataclass
class TextOptions:
    do_sample: bool = False
    temperature: float = 0.3
    max_new_tokens: int = 1000


@dataclass
class Session:
    """One inference session: the three contexts and the text/image bookkeeping of docs/upstream-compat.md#image-generation."""

    model: UnifiedModel
    tokenizer: TextTokenizer
    vae_args: ImageTransformArgs = UMV_GEN_VAE_ARGS
    vit_args: ImageTransformArgs = UMV_GEN_VIT_ARGS
    understanding_output: bool = False
    seed: int = 42
    cond: Context = field(init=False)
    text_uncond: Context = field(init=False)
    img_uncond: Context = field(init=False)
    image_shape: tuple[int, int] | None = field(init=False, default=None)  # (H, W) of the last input image
    on_token: Callable[[int], None] | None = None        # sees each generated text token (streaming)
    on_step: Callable[[int, int], None] | None = None    # (done, total) after each image sampling step

    def __post_init__(self) -> None:
        n = self.model.config.llm.num_hidden_layers
        self.cond, self.text_uncond, self.img_uncond = Context.empty(n), Context.empty(n), Context.empty(n)
        self._vae_gen = torch.Generator().manual_seed(self.seed)  # posterior samples of VAE context images
        self._text_gen = torch.Generator().manual_seed(self.seed + 1)

    @property
    def special(self):
        return self.tokenizer.special

    @property
    def max_positions(self) -> int:
        return int(self.model.config.llm.max_position_embeddings)

    def _check_room(self, needed: int, what: str) -> None:
        if self.cond.rope + needed > self.max_positions:
            raise ContextTooLong(
                f"{what} is {needed} tokens; with the {self.cond.rope} positions already in the context it "
                f"exceeds the model's context of {self.max_positions} positions (max_position_embeddings in "
                f"llm_config.json); shorten it")

    # -- inputs -------------------------------------------------------------------------------------
    def add_system(self, text: str) -> None:
        """Think-mode system text: cond and img-uncond only."""
        ids = self.tokenizer.encode(text)
        self._check_room(len(ids) + 2, "the system text")
        self.cond = update_text(self.model, self.cond, ids, self.special)
        self.img_uncond = update_text(self.model, self.img_uncond, ids, self.special)

    def add_text(self, text: str, what: str = "the prompt") -> None:
        ids = self.tokenizer.encode(text)
        self._check_room(len(ids) + 2, what)
        self.text_uncond = self.cond.copy()
        self.cond = update_text(self.model, self.cond, ids, self.special)
        self.img_uncond = update_text(self.model, self.img_uncond, ids, self.special)

    def add_image(self, image: Image.Image, vit: bool = True) -> None:
        """VAE-resize, then VAE update (unless understanding-only output) and ViT update, cond only."""
        width, height = resize_target(image.width, image.height, self.vae_args)
        image = resize_rgb(image, width, height)
        if not self.understanding_output:
            self.cond = update_vae(self.model, self.cond, image, self.vae_args, self.special, self._vae_gen)
        if vit:
            self.cond = update_vit(self.model, self.cond, image, self.vit_args, self.special)
        self.text_uncond = self.cond.copy()
        self.image_shape = (height, width)

    def add_vit_image(self, image: Image.Image) -> None:
        """VQA `chat()`: a ViT update of the image as given (no VAE pre-resize), cond only."""
        self.cond = update_vit(self.model, self.cond, image, self.vit_args, self.special)
        self.text_uncond = self.cond.copy()

    def add(self, inputs: Sequence[str | Image.Image]) -> None:
        for item in inputs:
            if isinstance(item, str):
                self.add_text(item)
            else:
                self.add_image(item)

    # -- outputs ------------------------------------------------------------------------------------
    def generate_text(self, options: TextOptions) -> str:
        """Decode from cond (left untouched); returns the text between bos and eos."""
        room = max(0, self.max_positions - self.cond.rope - 1)
        out = generate_text(self.model, self.cond, self.special, max_new_tokens=min(options.max_new_tokens, room),
                            do_sample=options.do_sample, temperature=options.temperature,
                            generator=self._text_gen, on_token=self.on_token)
        return self.tokenizer.decode(out.ids, skip_special_tokens=True)

    def append_to_cond(self, text: str) -> None:
        """A generated thought joins cond only (docs/upstream-compat.md#image-generation think mode)."""
        ids = self.tokenizer.encode(text)
        self._check_room(len(ids) + 2, "the generated text")
        self.cond = update_text(self.model, self.cond, ids, self.special)

    def generate_image(self, params: SamplerParams, image_shape: tuple[int, int] | None = None,
                       ) -> tuple[Image.Image, torch.Tensor, tuple[int, int]]:
        """Sample (seeded by the session seed) and decode; returns (image, latent tokens, (H, W))."""
        height, width = image_shape or self.image_shape or (1024, 1024)
        ctxs = GuidanceContexts(self.cond, self.text_uncond, self.img_uncond)
        gen = torch.Generator().manual_seed(self.seed)
        latent = sample_latent(self.model, ctxs, height, width, self.special, params, gen, on_step=self.on_step)
        return decode_latent(self.model, latent, height, width), latent, (height, width)


def interleave_inference(model: UnifiedModel, tokenizer: TextTokenizer, inputs: Sequence[str | Image.Image],
                         think: bool = False, understanding_output: bool = False,
                         text: TextOptions | None = None, params: SamplerParams | None = None,
                         image_shape: tuple[int, int] | None = None, seed: int = 42,
                         vae_args: ImageTransformArgs = UMV_GEN_VAE_ARGS,
                         vit_args: ImageTransformArgs = UMV_GEN_VIT_ARGS) -> dict:
    """BAGEL `interleave_inference`: returns {"text": str | None, "image": PIL | None, "latent": tensor | None,
    "image_shape": (H, W) | None}."""
    text = text or TextOptions()
    s = Session(model, tokenizer, vae_args, vit_args, understanding_output=understanding_output, seed=seed)
    if think:
        s.add_system(VLM_THINK_SYSTEM_PROMPT if understanding_output else GEN_THINK_SYSTEM_PROMPT)
    s.add(inputs)
    if understanding_output:
        return {"text": s.generate_text(text), "image": None, "latent": None, "image_shape": None}
    thought = None
    if think:
        thought = s.generate_text(text)
        s.append_to_cond(thought)
    image, latent, shape = s.generate_image(params or SamplerParams(), image_shape)
    return {"text": thought, "image": image, "latent": latent, "image_shape": shape}
