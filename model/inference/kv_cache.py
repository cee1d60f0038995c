"""KV-cache context operations (docs/upstream-compat.md#kv-cache): text, ViT-image and VAE-image context updates, and the
latent query of image generation, on top of the model's own per-token modules.

A `Context` is (per-layer keys/values, kv_len, rope) for batch size 1, as upstream. Updates never modify a
context in place: they return a new one whose cache tensors are fresh concatenations, so `ctx.copy()` is a
cheap shallow copy and the three CFG contexts of docs/upstream-compat.md#image-generation can share their common prefix safely.

Each op builds the query tokens' input embeddings, picks the und/gen route (markers and text -> und expert,
latents -> gen expert), and runs the decoder (in eval mode, so every layer takes its `forward_inference`
path) with a per-layer attend callable that prepends this layer's cached keys/values. Text queries are causal
(bottom-right aligned against the cache); image and latent queries are non-causal.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from PIL import Image

from datasets_catalog.tokenizer import SpecialIds
from datasets_catalog.transforms import ImageTransformArgs, resize_target
from model.attention import flash_attn_available, varlen_attention
from model.qwen2 import LayerAttendFactory, TokenRoute
from model.unified import UnifiedModel, patchify_latent
from pipelines.imaging.decode import image_to_tensor
from pipelines.packing.ops import patchify
from pipelines.packing.position_ids import get_flattened_position_ids


@dataclass
class Context:
    """One KV-cache context: per-layer keys/values [kv_len, kv_heads, head_dim], its length and next rope."""

    keys: list[torch.Tensor | None] = field(default_factory=list)
    values: list[torch.Tensor | None] = field(default_factory=list)
    kv_len: int = 0
    rope: int = 0

    @classmethod
    def empty(cls, num_layers: int) -> "Context":
        return cls([None] * num_layers, [None] * num_layers, 0, 0)

    def copy(self) -> "Context":
        """Shallow copy: cache tensors are never written in place, so sharing them is safe."""
        return Context(list(self.keys), list(self.values), self.kv_len, self.rope)


class CacheAttend(LayerAttendFactory):
    """Per-layer attend callables against `ctx`; with `update` the merged keys/values are kept in `new_*`."""

    def __init__(self, ctx: Context, causal: bool, update: bool) -> None:
        self.ctx, self.causal, self.update = ctx, causal, update
        self.new_keys: list[torch.Tensor | None] = list(ctx.keys)
        self.new_values: list[torch.Tensor | None] = list(ctx.values)

    def __call__(self, layer_idx: int):
        def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            past_k, past_v = self.ctx.keys[layer_idx], self.ctx.values[layer_idx]
            if past_k is not None:
                k = torch.cat([past_k, k.to(past_k.dtype)])
                v = torch.cat([past_v, v.to(past_v.dtype)])
            if self.update:
                self.new_keys[layer_idx], self.new_values[layer_idx] = k, v
            return varlen_attention(q, k, v, [q.shape[0]], [k.shape[0]], causal=self.causal,
                                    use_flash=q.is_cuda and flash_attn_available())

        return attend


def model_device_dtype(model: UnifiedModel) -> tuple[torch.device, torch.dtype]:
    w = model.language_model.model.embed_tokens.weight
    return w.device, w.dtype


def run_query(model: UnifiedModel, ctx: Context, x: torch.Tensor, position_ids: torch.Tensor,
              route: TokenRoute, causal: bool, update: bool) -> tuple[torch.Tensor, Context]:
    """Run query embeddings `x` [n, H] against `ctx`; returns final-normed hidden states and the new context
    (kv_len grown by n when `update`, else `ctx` itself). Rope bookkeeping is the caller's."""
    if model.training:
        raise RuntimeError("inference needs model.eval(): the layers dispatch on .training (docs/upstream-compat.md#forward-pass)")
    attend = CacheAttend(ctx, causal=causal, update=update)
    h = model.language_model(x, route, position_ids, attend)
    if not update:
        return h, ctx
    return h, Context(attend.new_keys, attend.new_values, ctx.kv_len + x.shape[0], ctx.rope)


def _ids(values: list[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.long, device=device)


# -- text ------------------------------------------------------------------------------------------

@torch.no_grad()
def update_text(model: UnifiedModel, ctx: Context, ids: list[int], special: SpecialIds) -> Context:
    """bos + ids + eos at rope .. rope + n - 1, causal, und expert; rope += n (docs/upstream-compat.md#kv-cache, #special-tokens)."""
    device, _ = model_device_dtype(model)
    tokens = [special.bos, *ids, special.eos]
    n = len(tokens)
    x = model.embed_text(_ids(tokens, device))
    pos = torch.arange(ctx.rope, ctx.rope + n, device=device)
    _, new = run_query(model, ctx, x, pos, TokenRoute(), causal=True, update=True)
    new.rope = ctx.rope + n
    return new


@torch.no_grad()
def step_token(model: UnifiedModel, ctx: Context, token: int) -> tuple[torch.Tensor, Context]:
    """One decoding step: the token at the current rope, cache updated, rope += 1; returns its logits [V]."""
    device, _ = model_device_dtype(model)
    x = model.embed_text(_ids([token], device))
    pos = torch.tensor([ctx.rope], device=device)
    h, new = run_query(model, ctx, x, pos, TokenRoute(), causal=True, update=True)
    new.rope = ctx.rope + 1
    return model.language_model.lm_head(h[-1]).float(), new


# -- images ----------------------------------------------------------------------------------------

def resize_for(image: Image.Image, args: ImageTransformArgs) -> tuple[int, int]:
    """(width, height) of `image` under the shared resize rule (docs/upstream-compat.md#resize-rule)."""
    return resize_target(image.width, image.height, args)


@torch.no_grad()
def update_vit(model: UnifiedModel, ctx: Context, image: Image.Image, args: ImageTransformArgs,
               special: SpecialIds) -> Context:
    """start marker + ViT patches + end marker, all at one rope, non-causal, und expert; rope += 1."""
    cfg = model.config
    device, dtype = model_device_dtype(model)
    width, height = resize_for(image, args)
    pixels = image_to_tensor(image, width, height)
    patch = cfg.vit.patch_size
    tokens = patchify(pixels, patch).to(device)
    vit_pos = get_flattened_position_ids(height, width, patch, cfg.vit_max_num_patch_per_side,
                                         interpolate=cfg.interpolate_pos).to(device)
    feats = model.embed_vit(tokens, [tokens.shape[0]], vit_pos).to(dtype)
    marks = model.embed_text(_ids([special.start_of_image, special.end_of_image], device))
    x = torch.cat([marks[:1], feats, marks[1:]])
    pos = torch.full((x.shape[0],), ctx.rope, device=device, dtype=torch.long)
    _, new = run_query(model, ctx, x, pos, TokenRoute(), causal=False, update=True)
    new.rope = ctx.rope + 1
    return new


def latent_grid(height: int, width: int, model: UnifiedModel) -> tuple[int, int]:
    """(h, w) latent tokens of an image of height x width pixels (multiples of latent_downsample)."""
    d = model.config.latent_downsample
    return height // d, width // d


def latent_position_ids(model: UnifiedModel, height: int, width: int, device) -> torch.Tensor:
    cfg = model.config
    return get_flattened_position_ids(height, width, cfg.latent_downsample, cfg.max_latent_size,
                                      interpolate=cfg.interpolate_pos).to(device)


def _gen_route(n_latent: int, device) -> TokenRoute:
    """Markers (first and last query token) -> und expert, the latents in between -> gen expert."""
    und = _ids([0, n_latent + 1], device)
    gen = torch.arange(1, n_latent + 1, device=device)
    return TokenRoute(und=und, gen=gen)


def _latent_query_embeddings(model: UnifiedModel, latents: torch.Tensor, t: torch.Tensor, height: int, width: int,
                             special: SpecialIds) -> torch.Tensor:
    device, dtype = model_device_dtype(model)
    pos_ids = latent_position_ids(model, height, width, device)
    lat = model.embed_latent(latents.to(device), t.to(device), pos_ids).to(dtype)
    marks = model.embed_text(_ids([special.start_of_image, special.end_of_image], device))
    return torch.cat([marks[:1], lat, marks[1:]])


@torch.no_grad()
def encode_vae_image(model: UnifiedModel, image: Image.Image, args: ImageTransformArgs,
                     generator: torch.Generator | None = None) -> tuple[torch.Tensor, int, int]:
    """Resize, normalise and VAE-encode (posterior sample, as upstream) -> (latent tokens [h*w, p*p*z], H, W)."""
    width, height = resize_for(image, args)
    device, _ = model_device_dtype(model)
    vae = model.vae_model
    vae_dtype = next(vae.parameters()).dtype
    pixels = image_to_tensor(image, width, height)[None].to(device=device, dtype=vae_dtype)
    latent = vae.encode(pixels, generator=generator)[0]
    h, w = latent_grid(height, width, model)
    return patchify_latent(latent.float(), h, w, model.config.latent_patch_size), height, width


@torch.no_grad()
def update_vae(model: UnifiedModel, ctx: Context, image: Image.Image, args: ImageTransformArgs,
               special: SpecialIds, generator: torch.Generator | None = None) -> Context:
    """start + clean latents (t = 0) + end at one rope, non-causal; markers und, latents gen; rope += 1."""
    device, _ = model_device_dtype(model)
    tokens, height, width = encode_vae_image(model, image, args, generator)
    t = torch.zeros(tokens.shape[0], device=device)
    x = _latent_query_embeddings(model, tokens, t, height, width, special)
    pos = torch.full((x.shape[0],), ctx.rope, device=device, dtype=torch.long)
    _, new = run_query(model, ctx, x, pos, _gen_route(tokens.shape[0], device), causal=False, update=True)
    new.rope = ctx.rope + 1
    return new


@torch.no_grad()
def latent_velocity(model: UnifiedModel, ctx: Context, x_t: torch.Tensor, t: float, height: int, width: int,
                    special: SpecialIds) -> torch.Tensor:
    """The latent query (generation): start + noisy latents at time t + end at ctx.rope, non-causal, gen
    mode, cache NOT updated; returns the predicted velocity llm2vae(h) of the latent tokens [h*w, p*p*z]."""
    device, _ = model_device_dtype(model)
    n = x_t.shape[0]
    tt = torch.full((n,), float(t), device=device)
    x = _latent_query_embeddings(model, x_t, tt, height, width, special)
    pos = torch.full((x.shape[0],), ctx.rope, device=device, dtype=torch.long)
    h, _ = run_query(model, ctx, x, pos, _gen_route(n, device), causal=False, update=False)
    return model.llm2vae(h[1:n + 1]).float()
