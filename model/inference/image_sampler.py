"""Image sampling (docs/upstream-compat.md#image-generation): Euler flow sampler with timestep shift and classifier-free guidance
over three KV-cache contexts, then VAE decoding to an 8-bit image.

Guidance (`guide_velocity`, a pure function, tested on hand-built cases):
- cfg_text_scale <= 1: NO guidance at all, even when cfg_img_scale > 1. Quirk kept from upstream: the image
  scale only ever acts together with the text scale, so callers wanting image-only guidance must set the text
  scale slightly above 1.
- global / channel: v_txt = v_tu + s_txt (v - v_tu); v' = v_iu + s_img (v_txt - v_iu) if s_img > 1 else v_txt;
  v <- v' * clamp(|v| / |v'|, renorm_min, 1), one norm over everything (global) or per token (channel).
- text_channel: v_txt renormalised per token against v (same clamp), then image CFG, no further renorm.
The norms' ratio uses |v'| + 1e-8 in the denominator, as upstream does, so a zero v' gives no NaN.

Uncond passes are skipped when their scale does not apply (outside cfg_interval, or scale <= 1).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from PIL import Image

from datasets_catalog.tokenizer import SpecialIds
from model.unified import UnifiedModel, shift_timesteps, unpatchify_latent

from .kv_cache import Context, latent_grid, latent_velocity

RENORM_TYPES = ("global", "channel", "text_channel")
EPS = 1e-8


@dataclass
class SamplerParams:
    """Upstream names; defaults are the UniMedVL editing example's (docs/upstream-compat.md#image-generation)."""

    cfg_text_scale: float = 4.0
    cfg_img_scale: float = 2.0
    cfg_interval: tuple[float, float] = (0.0, 1.0)
    cfg_renorm_type: str = "text_channel"
    cfg_renorm_min: float = 0.0
    num_timesteps: int = 50
    timestep_shift: float = 3.0

    def __post_init__(self) -> None:
        if self.cfg_renorm_type not in RENORM_TYPES:
            raise ValueError(f"cfg_renorm_type {self.cfg_renorm_type!r} is not one of {RENORM_TYPES}")
        if self.num_timesteps < 2:
            raise ValueError(f"num_timesteps must be >= 2 (the sampler takes num_timesteps - 1 steps), "
                             f"got {self.num_timesteps}")
        if self.timestep_shift <= 0:
            raise ValueError(f"timestep_shift must be > 0, got {self.timestep_shift}")
        lo, hi = self.cfg_interval
        self.cfg_interval = (float(lo), float(hi))


def schedule(num_timesteps: int, shift: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(t_i, dt_i) for i = 0 .. T-2: t = shift(linspace(1, 0, T)), dt_i = t_i - t_{i+1}."""
    t = shift_timesteps(torch.linspace(1, 0, num_timesteps), shift)
    return t[:-1], t[:-1] - t[1:]


def scales_at(t: float, params: SamplerParams) -> tuple[float, float]:
    """(text, image) scales at time t: the configured ones if t is in (lo, hi], else both 1."""
    lo, hi = params.cfg_interval
    if lo < t <= hi:
        return params.cfg_text_scale, params.cfg_img_scale
    return 1.0, 1.0


def _ratio(num: torch.Tensor, den: torch.Tensor, renorm_min: float) -> torch.Tensor:
    return (num / (den + EPS)).clamp(min=renorm_min, max=1.0)


def guide_velocity(v: torch.Tensor, v_text_uncond: torch.Tensor | None, v_img_uncond: torch.Tensor | None,
                   cfg_text_scale: float, cfg_img_scale: float, renorm_type: str = "global",
                   renorm_min: float = 0.0) -> torch.Tensor:
    """Combine the conditional velocity `v` [N, C] with the uncond ones (docs/upstream-compat.md#image-generation, module docstring)."""
    if cfg_text_scale <= 1.0:
        return v  # quirk: no guidance at all, whatever cfg_img_scale is
    if renorm_type not in RENORM_TYPES:
        raise ValueError(f"cfg_renorm_type {renorm_type!r} is not one of {RENORM_TYPES}")
    v_txt = v_text_uncond + cfg_text_scale * (v - v_text_uncond)
    use_img = cfg_img_scale > 1.0
    if renorm_type == "text_channel":
        v_txt = v_txt * _ratio(v.norm(dim=-1, keepdim=True), v_txt.norm(dim=-1, keepdim=True), renorm_min)
        return v_img_uncond + cfg_img_scale * (v_txt - v_img_uncond) if use_img else v_txt
    v_new = v_img_uncond + cfg_img_scale * (v_txt - v_img_uncond) if use_img else v_txt
    if renorm_type == "global":
        scale = _ratio(v.norm(), v_new.norm(), renorm_min)
    else:
        scale = _ratio(v.norm(dim=-1, keepdim=True), v_new.norm(dim=-1, keepdim=True), renorm_min)
    return v_new * scale


@dataclass
class GuidanceContexts:
    """cond = full context; text_uncond = before the last text input; img_uncond = texts only (docs/upstream-compat.md#image-generation)."""

    cond: Context
    text_uncond: Context
    img_uncond: Context


def velocity_at(model: UnifiedModel, ctxs: GuidanceContexts, x_t: torch.Tensor, t: float, height: int, width: int,
                special: SpecialIds, params: SamplerParams) -> torch.Tensor:
    """The guided velocity at one step: cond pass, plus the uncond passes whose scales apply."""
    s_txt, s_img = scales_at(t, params)
    v = latent_velocity(model, ctxs.cond, x_t, t, height, width, special)
    if s_txt <= 1.0:
        return v
    v_tu = latent_velocity(model, ctxs.text_uncond, x_t, t, height, width, special)
    v_iu = latent_velocity(model, ctxs.img_uncond, x_t, t, height, width, special) if s_img > 1.0 else None
    return guide_velocity(v, v_tu, v_iu, s_txt, s_img, params.cfg_renorm_type, params.cfg_renorm_min)


@torch.no_grad()
def sample_latent(model: UnifiedModel, ctxs: GuidanceContexts, height: int, width: int, special: SpecialIds,
                  params: SamplerParams, generator: torch.Generator | None = None,
                  on_step: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """Euler from t = 1 (noise x ~ N(0, I) drawn from `generator`) to t = 0; returns tokens [h*w, p*p*z].
    `on_step(done, total)` is called after each step (progress bars)."""
    d = model.config.latent_downsample
    if height % d or width % d or height <= 0 or width <= 0:
        raise ValueError(f"image size {height}x{width} must be positive multiples of {d} (VAE 8x, latent patch 2)")
    h, w = latent_grid(height, width, model)
    limit = model.config.max_latent_size
    if not model.config.interpolate_pos and (h > limit or w > limit):
        raise ValueError(f"image size {height}x{width} gives a {h}x{w} latent grid, larger than max_latent_size "
                         f"{limit}; ask for a smaller image")
    x = torch.randn(h * w, model.config.latent_channels, generator=generator)
    device = model.llm2vae.weight.device
    x = x.to(device)
    ts, dts = schedule(params.num_timesteps, params.timestep_shift)
    steps = list(zip(ts.tolist(), dts.tolist()))
    for i, (t, dt) in enumerate(steps):
        v = velocity_at(model, ctxs, x, t, height, width, special, params)
        x = x - v.to(x.dtype) * dt
        if on_step is not None:
            on_step(i + 1, len(steps))
    return x


@torch.no_grad()
def decode_latent(model: UnifiedModel, tokens: torch.Tensor, height: int, width: int) -> Image.Image:
    """Unpatchify to [1, z, 2h, 2w], VAE-decode, x*0.5 + 0.5, clamp, uint8 (docs/upstream-compat.md#image-generation)."""
    h, w = latent_grid(height, width, model)
    latent = unpatchify_latent(tokens.float(), h, w, model.config.latent_patch_size)[None]
    vae = model.vae_model
    param = next(vae.parameters())
    image = vae.decode(latent.to(device=param.device, dtype=param.dtype)).float()
    image = (image * 0.5 + 0.5).clamp(0, 1)[0].permute(1, 2, 0) * 255
    return Image.fromarray(image.to(torch.uint8).cpu().numpy())

