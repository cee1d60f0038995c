"""Text generation from a KV-cache context (docs/upstream-compat.md#text-generation): greedy or temperature sampling, no top-k /
top-p, stop at `<|im_end|>` or after `max_new_tokens` steps.

The decoder is seeded with `<|im_start|>` at the context's rope; every step feeds the previous token (cache
updated, causal) and picks the next one from lm_head. The end token itself is never fed back, as upstream.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from datasets_catalog.tokenizer import SpecialIds
from model.unified import UnifiedModel

from .kv_cache import Context, step_token


@dataclass
class GeneratedText:
    ids: list[int]          # generated tokens, without the seed bos and without the final eos
    stopped_at_eos: bool
    context: Context        # the context after the last fed token (for callers that keep going)


def pick_token(logits: torch.Tensor, do_sample: bool, temperature: float,
               generator: torch.Generator | None) -> int:
    """argmax, or a multinomial draw from softmax(logits / temperature)."""
    if not do_sample:
        return int(torch.argmax(logits))
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 when sampling, got {temperature}")
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    return int(torch.multinomial(probs.cpu(), 1, generator=generator)[0])


@torch.no_grad()
def generate_text(model: UnifiedModel, ctx: Context, special: SpecialIds, max_new_tokens: int = 512,
                  do_sample: bool = False, temperature: float = 1.0,
                  generator: torch.Generator | None = None,
                  on_token: Callable[[int], None] | None = None) -> GeneratedText:
    """Decode from `ctx` (left untouched). `generator` (CPU) drives the draws when do_sample; `on_token` sees
    each kept token as it is picked (streaming servers), never the final eos."""
    token = special.bos
    out: list[int] = []
    stopped = False
    for _ in range(max_new_tokens):
        logits, ctx = step_token(model, ctx, token)
        token = pick_token(logits, do_sample, temperature, generator)
        if token == special.eos:
            stopped = True
            break
        out.append(token)
        if on_token is not None:
            on_token(token)
    return GeneratedText(out, stopped, ctx)
