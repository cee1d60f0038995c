"""Batched greedy / sampled decoding (docs/evaluation.md#batched-decoding): several prompts' KV-cache contexts
decode together, one token per prompt per step through one decoder call.

Each step feeds N tokens (one per unfinished prompt) as one flat sequence with their own rope positions; the
per-layer attend callable prepends each prompt's own cached keys/values and attends prompt by prompt
(varlen, causal bottom-right, so a new token sees its whole context and nothing of the other prompts). This
is `text_generation.generate_text` step for step: the same tokens, up to float reassociation of batched
matmuls.
"""
from __future__ import annotations

from typing import Sequence

import torch

from datasets_catalog.tokenizer import SpecialIds
from model.attention import flash_attn_available, varlen_attention
from model.qwen2 import LayerAttendFactory, TokenRoute
from model.unified import UnifiedModel

from .kv_cache import Context, model_device_dtype
from .text_generation import GeneratedText, pick_token


class _BatchAttend(LayerAttendFactory):
    """Per-layer attend for N single-token queries against N separate contexts."""

    def __init__(self, ctxs: list[Context]) -> None:
        self.ctxs = ctxs
        n = len(ctxs[0].keys)
        self.new_keys: list[list[torch.Tensor]] = [[None] * n for _ in ctxs]   # type: ignore[list-item]
        self.new_values: list[list[torch.Tensor]] = [[None] * n for _ in ctxs]  # type: ignore[list-item]

    def __call__(self, layer_idx: int):
        def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            ks, vs, lens = [], [], []
            for i, ctx in enumerate(self.ctxs):
                pk, pv = ctx.keys[layer_idx], ctx.values[layer_idx]
                ki, vi = k[i:i + 1], v[i:i + 1]
                if pk is not None:
                    ki, vi = torch.cat([pk, ki.to(pk.dtype)]), torch.cat([pv, vi.to(pv.dtype)])
                self.new_keys[i][layer_idx], self.new_values[i][layer_idx] = ki, vi
                ks.append(ki)
                vs.append(vi)
                lens.append(ki.shape[0])
            return varlen_attention(q, torch.cat(ks), torch.cat(vs), [1] * len(lens), lens, causal=True,
                                    use_flash=q.is_cuda and flash_attn_available())

        return attend


@torch.no_grad()
def step_tokens(model: UnifiedModel, ctxs: list[Context], tokens: list[int]) -> tuple[torch.Tensor, list[Context]]:
    """One decoding step for N contexts at once: logits [N, V] and the N grown contexts (rope += 1 each)."""
    if model.training:
        raise RuntimeError("inference needs model.eval()")
    device, _ = model_device_dtype(model)
    x = model.embed_text(torch.tensor(tokens, dtype=torch.long, device=device))
    pos = torch.tensor([c.rope for c in ctxs], dtype=torch.long, device=device)
    attend = _BatchAttend(ctxs)
    h = model.language_model(x, TokenRoute(), pos, attend)
    logits = model.language_model.lm_head(h).float()
    new = [Context(attend.new_keys[i], attend.new_values[i], c.kv_len + 1, c.rope + 1) for i, c in enumerate(ctxs)]
    return logits, new


@torch.no_grad()
def generate_text_batch(model: UnifiedModel, ctxs: Sequence[Context], special: SpecialIds,
                        max_new_tokens: Sequence[int] | int = 512, do_sample: bool = False, temperature: float = 1.0,
                        generators: Sequence[torch.Generator | None] | None = None) -> list[GeneratedText]:
    """Decode every context (left untouched) until its eos or its own max_new_tokens; a finished prompt leaves
    the batch, so later steps run only the unfinished ones."""
    n = len(ctxs)
    limits = [max_new_tokens] * n if isinstance(max_new_tokens, int) else list(max_new_tokens)
    gens = list(generators) if generators is not None else [None] * n
    outs: list[list[int]] = [[] for _ in range(n)]
    stopped = [False] * n
    current = list(ctxs)
    tokens = [special.bos] * n
    active = [i for i in range(n) if limits[i] > 0]
    while active:
        logits, grown = step_tokens(model, [current[i] for i in active], [tokens[i] for i in active])
        still = []
        for row, i in enumerate(active):
            current[i] = grown[row]
            token = pick_token(logits[row], do_sample, temperature, gens[i])
            if token == special.eos:
                stopped[i] = True
                continue
            outs[i].append(token)
            tokens[i] = token
            if len(outs[i]) < limits[i]:
                still.append(i)
        active = still
    return [GeneratedText(outs[i], stopped[i], current[i]) for i in range(n)]
