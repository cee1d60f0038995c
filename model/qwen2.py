"""The Qwen2 decoder with packed-sequence attention and Mixture-of-Transformers routing (docs/upstream-compat.md#forward-pass).

Parameter names follow the upstream checkpoints (docs/upstream-compat.md#state-dict-keys): `model.layers.{i}.self_attn.q_proj`,
`..._moe_gen` twins, `q_norm`/`k_norm` (per-head RMSNorm before RoPE), `model.norm[_moe_gen]`, `lm_head`.

Every layer's `forward` dispatches on `self.training` (docs/upstream-compat.md#forward-pass): `forward_train` applies the `freeze_und`
detaches; `forward_inference` is the same computation without them. Both take an *attend* callable
`attend(q, k, v) -> out` over [tokens, heads, head_dim]. Training passes `model.attention.PackedAttention`;
the KV-cache inference path (model/inference/) passes a callable that concatenates the cached keys/values of
this layer (`layer.layer_idx`) with the new ones, updates the cache and attends — the cache hook. The
per-token building blocks (`project_qkv`, `project_out`, `feed_forward`) are public for the same reason.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .config import LLMConfig

Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class TokenRoute:
    """Which tokens use the understanding weights and which the generation (`_moe_gen`) twins.

    `gen` empty or None means every token is an und token (text-only batches, VQA inference).
    """

    und: torch.Tensor | None = None
    gen: torch.Tensor | None = None

    @property
    def mixed(self) -> bool:
        return self.gen is not None and self.gen.numel() > 0


def route_apply(x: torch.Tensor, route: TokenRoute, f_und: Callable, f_gen: Callable | None,
                detach_und: bool = False) -> torch.Tensor:
    """Apply `f_und` to und tokens and `f_gen` to gen tokens (row-wise), keeping token order."""
    if f_gen is None or not route.mixed:
        out = f_und(x)
        return out.detach() if detach_und else out
    und_out = f_und(x[route.und])
    if detach_und:
        und_out = und_out.detach()
    gen_out = f_gen(x[route.gen])
    out = und_out.new_zeros((x.shape[0],) + tuple(und_out.shape[1:]))
    return out.index_copy(0, route.und, und_out).index_copy(0, route.gen, gen_out.to(und_out.dtype))


class Qwen2RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * x.to(dtype)


class Qwen2RotaryEmbedding(nn.Module):
    """Standard Qwen2 RoPE; inv_freq is a non-persistent buffer (not in checkpoints, docs/upstream-compat.md#state-dict-keys)."""

    def __init__(self, head_dim: int, theta: float) -> None:
        super().__init__()
        self.head_dim, self.theta = head_dim, theta
        self.register_buffer("inv_freq", self._inv_freq(), persistent=False)

    def _inv_freq(self, device=None) -> torch.Tensor:
        return 1.0 / (self.theta ** (torch.arange(0, self.head_dim, 2, dtype=torch.int64, device=device).float()
                                     / self.head_dim))

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        inv = self.inv_freq
        # model.to(bf16) casts this buffer too; bf16-rounded frequencies shift the angles by up to ~0.5 rad
        # within a few hundred positions, so recompute in fp32 (upstream's inv_freq stays fp32)
        if inv.device != position_ids.device or inv.is_meta or inv.dtype != torch.float32:
            inv = self._inv_freq(position_ids.device)
        freqs = position_ids.float()[:, None] * inv[None, :]
        emb = torch.cat([freqs, freqs], dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """q, k: [L, heads, d]; cos, sin: [L, d]."""
    cos, sin = cos[:, None, :], sin[:, None, :]
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


class Qwen2MLP(nn.Module):
    def __init__(self, cfg: LLMConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        if cfg.hidden_act != "silu":
            raise ValueError(f"hidden_act {cfg.hidden_act!r} is not supported (Qwen2 uses silu)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class PackedAttentionModule(nn.Module):
    """q/k/v/o projections (+ optional `_moe_gen` twins) and per-head q/k RMSNorm; the attention itself is
    delegated to the attend callable."""

    def __init__(self, cfg: LLMConfig, twins: bool) -> None:
        super().__init__()
        H, d = cfg.hidden_size, cfg.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, d
        self.twins = twins
        suffixes = ("", "_moe_gen") if twins else ("",)
        for sfx in suffixes:
            setattr(self, f"q_proj{sfx}", nn.Linear(H, self.num_heads * d, bias=True))
            setattr(self, f"k_proj{sfx}", nn.Linear(H, self.num_kv_heads * d, bias=True))
            setattr(self, f"v_proj{sfx}", nn.Linear(H, self.num_kv_heads * d, bias=True))
            setattr(self, f"o_proj{sfx}", nn.Linear(self.num_heads * d, H, bias=False))
            if cfg.qk_norm:
                setattr(self, f"q_norm{sfx}", Qwen2RMSNorm(d, cfg.rms_norm_eps))
                setattr(self, f"k_norm{sfx}", Qwen2RMSNorm(d, cfg.rms_norm_eps))
        self.qk_norm = cfg.qk_norm

    def _gen(self, name: str):
        return getattr(self, f"{name}_moe_gen") if self.twins else None

    def project_qkv(self, h: torch.Tensor, route: TokenRoute, rope: tuple[torch.Tensor, torch.Tensor],
                    detach_und: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Normalised hidden states -> (q, k, v) as [L, heads, d], q/k normed per head and rotated."""
        L = h.shape[0]
        q = route_apply(h, route, self.q_proj, self._gen("q_proj")).view(L, self.num_heads, self.head_dim)
        k = route_apply(h, route, self.k_proj, self._gen("k_proj")).view(L, self.num_kv_heads, self.head_dim)
        v = route_apply(h, route, self.v_proj, self._gen("v_proj"), detach_und)
        v = v.view(L, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            q = route_apply(q, route, self.q_norm, self._gen("q_norm"), detach_und)
            k = route_apply(k, route, self.k_norm, self._gen("k_norm"), detach_und)
        elif detach_und:
            q = route_apply(q, route, lambda t: t, (lambda t: t) if self.twins else None, True)
            k = route_apply(k, route, lambda t: t, (lambda t: t) if self.twins else None, True)
        q, k = apply_rope(q, k, *rope)
        return q, k, v

    def project_out(self, attn: torch.Tensor, route: TokenRoute, detach_und: bool = False) -> torch.Tensor:
        attn = attn.reshape(attn.shape[0], self.num_heads * self.head_dim)
        return route_apply(attn, route, self.o_proj, self._gen("o_proj"), detach_und)


class PackedDecoderLayer(nn.Module):
    """One pre-norm decoder layer. Subclasses pick which per-token weights have generation twins."""

    TWIN_ATTN = False   # q/k/v/o projections and q/k norms
    TWIN_NORMS = False  # input_layernorm / post_attention_layernorm
    TWIN_MLP = False

    def __init__(self, cfg: LLMConfig, layer_idx: int) -> None:
        super().__init__()
        self.cfg, self.layer_idx = cfg, layer_idx
        self.self_attn = PackedAttentionModule(cfg, twins=self.TWIN_ATTN)
        self.mlp = Qwen2MLP(cfg)
        if self.TWIN_MLP:
            self.mlp_moe_gen = Qwen2MLP(cfg)
        self.input_layernorm = Qwen2RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = Qwen2RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        if self.TWIN_NORMS:
            self.input_layernorm_moe_gen = Qwen2RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
            self.post_attention_layernorm_moe_gen = Qwen2RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def _twin(self, name: str, has: bool):
        return getattr(self, f"{name}_moe_gen") if has else None

    def forward(self, x, route: TokenRoute, rope, attend: Attend) -> torch.Tensor:
        if self.training:
            return self.forward_train(x, route, rope, attend)
        return self.forward_inference(x, route, rope, attend)

    def forward_train(self, x, route, rope, attend):
        return self.block(x, route, rope, attend, detach_und=self.cfg.freeze_und)

    def forward_inference(self, x, route, rope, attend):
        """KV-cache path: `attend` is the cache's callable for this layer (it sees only the new queries)."""
        return self.block(x, route, rope, attend, detach_und=False)

    def input_norm(self, x: torch.Tensor, route: TokenRoute) -> torch.Tensor:
        return route_apply(x, route, self.input_layernorm, self._twin("input_layernorm", self.TWIN_NORMS))

    def feed_forward(self, x: torch.Tensor, route: TokenRoute, detach_und: bool = False) -> torch.Tensor:
        post_gen = self._twin("post_attention_layernorm", self.TWIN_NORMS)
        mlp_gen = self._twin("mlp", self.TWIN_MLP)
        if post_gen is None and mlp_gen is None:
            return route_apply(x, route, lambda t: self.mlp(self.post_attention_layernorm(t)), None, detach_und)
        post_gen = post_gen or self.post_attention_layernorm
        mlp_gen = mlp_gen or self.mlp
        return route_apply(x, route, lambda t: self.mlp(self.post_attention_layernorm(t)),
                           lambda t: mlp_gen(post_gen(t)), detach_und)

    def block(self, x, route: TokenRoute, rope, attend: Attend, detach_und: bool = False) -> torch.Tensor:
        h = self.input_norm(x, route)
        q, k, v = self.self_attn.project_qkv(h, route, rope, detach_und)
        a = attend(q, k, v)                                   # <- cache hook (inference)
        x = x + self.self_attn.project_out(a, route, detach_und)
        return x + self.feed_forward(x, route, detach_und)


class Qwen2DecoderLayer(PackedDecoderLayer):
    """Plain layer: no generation twins."""


class Qwen2MoEDecoderLayer(PackedDecoderLayer):
    """Shared attention and norms; only the MLP is duplicated."""

    TWIN_MLP = True


class Qwen2MoTDecoderLayer(PackedDecoderLayer):
    """Mixture-of-Transformers: every per-token weight has a `_moe_gen` twin; one joint attention."""

    TWIN_ATTN = TWIN_NORMS = TWIN_MLP = True


DECODER_LAYERS = {cls.__name__: cls for cls in (Qwen2DecoderLayer, Qwen2MoEDecoderLayer, Qwen2MoTDecoderLayer)}


class Qwen2Model(nn.Module):
    def __init__(self, cfg: LLMConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        layer_cls = DECODER_LAYERS[cfg.layer_module]
        self.layers = nn.ModuleList([layer_cls(cfg, i) for i in range(cfg.num_hidden_layers)])
        self.norm = Qwen2RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        if cfg.use_moe:
            self.norm_moe_gen = Qwen2RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary_emb = Qwen2RotaryEmbedding(cfg.head_dim, cfg.rope_theta)
        self.gradient_checkpointing = False

    def forward(self, x: torch.Tensor, route: TokenRoute, position_ids: torch.Tensor,
                attend: Attend | Callable[[int], Attend]) -> torch.Tensor:
        """x: [L, H] input embeddings -> final-normed hidden states [L, H].

        `attend` is either one callable shared by all layers (training) or a function layer_idx -> callable
        (the KV-cache path gives each layer its own cache slot).
        """
        detach_und = self.training and self.cfg.freeze_und
        if detach_und:
            x = route_apply(x, route, lambda t: t, (lambda t: t) if route.mixed else None, True)
        rope = self.rotary_emb(position_ids, x.dtype)
        per_layer = isinstance(attend, LayerAttendFactory)
        for layer in self.layers:
            fn = attend(layer.layer_idx) if per_layer else attend
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(layer, x, route, rope, fn, use_reentrant=False)
            else:
                x = layer(x, route, rope, fn)
        gen_norm = self.norm_moe_gen if self.cfg.use_moe else None
        return route_apply(x, route, self.norm, gen_norm, detach_und)


class LayerAttendFactory:
    """Base class for per-layer attend providers (subclass it in the KV-cache path: `__call__(layer_idx)`)."""

    def __call__(self, layer_idx: int) -> Attend:  # pragma: no cover - interface
        raise NotImplementedError


class Qwen2ForCausalLM(nn.Module):
    def __init__(self, cfg: LLMConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.model = Qwen2Model(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, x, route, position_ids, attend):
        return self.model(x, route, position_ids, attend)

    def init_moe(self) -> int:
        """copy_init_moe: copy every `*_moe_gen` parameter from its understanding twin; returns the count."""
        params = dict(self.named_parameters())
        n = 0
        with torch.no_grad():
            for name, p in params.items():
                if "_moe_gen" in name:
                    p.copy_(params[name.replace("_moe_gen", "")])
                    n += 1
        return n

    def resize_token_embeddings(self, new_size: int) -> None:
        """Grow (or shrink) embed_tokens and lm_head, keeping existing rows; new rows get the init std."""
        old = self.model.embed_tokens.weight
        if new_size == old.shape[0]:
            return
        emb = nn.Embedding(new_size, old.shape[1], device=old.device, dtype=old.dtype)
        head = nn.Linear(old.shape[1], new_size, bias=False, device=old.device, dtype=old.dtype)
        n = min(new_size, old.shape[0])
        with torch.no_grad():
            for new, src in ((emb.weight, old), (head.weight, self.lm_head.weight)):
                new.normal_(0.0, self.cfg.initializer_range)
                new[:n] = src[:n]
        self.model.embed_tokens = emb
        self.lm_head = head
        if self.cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.cfg.vocab_size = new_size
