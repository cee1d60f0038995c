"""Packed-sequence attention (docs/upstream-compat.md#attention-masks) with interchangeable backends.

The decoder layers compute q/k/v per token and hand them, as [L, heads, head_dim] tensors, to an
*attend* callable. During training that callable is a `PackedAttention` built from the batch; the KV-cache
inference path (model/inference/) supplies its own callable that merges cached keys/values, so the layers
never change between the two.

Backends (all give the same numbers on the same batch; tests check it):
- ``sdpa``: one `scaled_dot_product_attention` per sample with a dense [S, S] mask (the upstream non-flex
  path). Works everywhere, with autograd; the automatic choice on CPU.
- ``flex``: `flex_attention` with a block mask from sample/split ids (upstream flex path). Compiled on CUDA;
  on CPU torch runs it eagerly and forward only (torch 2.13 has no CPU backward for flex).
- ``flash``: flash-attn varlen on CUDA (optional ``gpu`` extra, imported lazily). A split-gather plan
  expresses every mode exactly: the queries of one split attend to the keys of the earlier non-noise splits of
  their sample plus their own split, causal (bottom-right aligned) for text splits, full otherwise.
- ``varlen``: the same split-gather plan with a pure-torch kernel (tests the plan on CPU).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

MODE_CODES = {"causal": 0, "full": 1, "noise": 2}
FLEX_BLOCK = 128


@functools.lru_cache(maxsize=None)
def flash_attn_available() -> bool:
    """Cached: called per attention call (a failed import is not cached by Python, so it would search
    sys.path every time)."""
    try:
        import flash_attn  # noqa: F401
    except Exception:
        return False
    return torch.cuda.is_available()


def choose_backend(requested: str, device: torch.device) -> str:
    """`auto`: flash-attn on CUDA when installed, else flex on CUDA, else per-sample SDPA."""
    if requested == "flash" and not flash_attn_available():
        raise ValueError("attn_backend 'flash' needs CUDA and flash-attn (pip install -e '.[gpu]'); "
                         "use 'auto', 'sdpa', 'flex' or 'varlen'")
    if requested != "auto":
        return requested
    if device.type == "cuda":
        return "flash" if flash_attn_available() else "flex"
    return "sdpa"


@dataclass
class TokenLayout:
    """Per-token sample id, split id and mode code of the real (unpadded) packed sequence."""

    sample_id: torch.Tensor
    split_id: torch.Tensor
    mode: torch.Tensor
    sample_lens: list[int]
    split_lens: list[int]
    attn_modes: list[str]
    split_sample: list[int]

    @classmethod
    def build(cls, seq_len: int, sample_lens: Sequence[int], split_lens: Sequence[int],
              attn_modes: Sequence[str], device: torch.device | str = "cpu") -> "TokenLayout":
        samples = _trim(list(sample_lens), seq_len, "sample_lens")
        splits = _trim(list(split_lens), seq_len, "split_lens")
        modes = list(attn_modes)[: len(splits)]
        for m in modes:
            if m not in MODE_CODES:
                raise ValueError(f"unknown attention mode {m!r}; expected one of {sorted(MODE_CODES)}")
        sample_bounds = torch.tensor(samples).cumsum(0).tolist()
        split_sample, start, s = [], 0, 0
        for length in splits:
            while start >= sample_bounds[s]:
                s += 1
            if start + length > sample_bounds[s]:
                raise ValueError("a split crosses a sample boundary: split_lens and sample_lens disagree")
            split_sample.append(s)
            start += length
        lens = torch.tensor(splits, dtype=torch.long)
        split_id = torch.repeat_interleave(torch.arange(len(splits)), lens)
        mode = torch.repeat_interleave(torch.tensor([MODE_CODES[m] for m in modes], dtype=torch.long), lens)
        sample_id = torch.repeat_interleave(torch.arange(len(samples)), torch.tensor(samples, dtype=torch.long))
        return cls(sample_id.to(device), split_id.to(device), mode.to(device), samples, splits, modes, split_sample)

    def dense_mask(self, start: int = 0, end: int | None = None) -> torch.Tensor:
        """Boolean [S, S] allow-mask (True = attend) of the docs/upstream-compat.md#attention-masks rule over tokens [start, end)."""
        end = len(self.sample_id) if end is None else end
        return allow_rule(torch.arange(start, end, device=self.sample_id.device)[:, None],
                          torch.arange(start, end, device=self.sample_id.device)[None, :],
                          self.sample_id, self.split_id, self.mode)


def allow_rule(q: torch.Tensor, k: torch.Tensor, sample_id: torch.Tensor, split_id: torch.Tensor,
               mode: torch.Tensor) -> torch.Tensor:
    """allow(q, k) = [q >= k or same full/noise split] and not [k in a noise split other than q's] and same sample."""
    same_split = split_id[q] == split_id[k]
    bidirectional = same_split & (mode[q] != MODE_CODES["causal"])
    hidden_noise = (mode[k] == MODE_CODES["noise"]) & ~same_split
    return ((q >= k) | bidirectional) & ~hidden_noise & (sample_id[q] == sample_id[k])


def _trim(lens: list[int], total: int, name: str) -> list[int]:
    """Drop the trailing flex pad entry so the lengths cover exactly the real sequence."""
    out, acc = [], 0
    for length in lens:
        if acc >= total:
            break
        out.append(int(length))
        acc += int(length)
    if acc != total:
        raise ValueError(f"{name} sum to {acc}, but the packed sequence has {total} tokens")
    return out


def repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """[L, kv_heads, d] -> [L, kv_heads * groups, d], each kv head repeated `groups` times (Qwen2 GQA order)."""
    if groups == 1:
        return x
    L, h, d = x.shape
    return x[:, :, None, :].expand(L, h, groups, d).reshape(L, h * groups, d)


@dataclass
class PackedAttention:
    """The training-time *attend* callable: `attn(q, k, v) -> out`, all [L, heads, head_dim] (k/v: kv heads).

    Built once per batch (masks and plans are cached across layers).
    """

    layout: TokenLayout
    backend: str
    nested_masks: list[torch.Tensor] | None = None
    _cache: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_batch(cls, batch, backend: str = "auto", device: torch.device | str | None = None) -> "PackedAttention":
        device = torch.device(device) if device is not None else batch.packed_position_ids.device
        chosen = choose_backend(backend, device)
        layout = TokenLayout.build(batch.sequence_length, batch.sample_lens, batch.split_lens, batch.attn_modes, device)
        nested = batch.nested_attention_masks if chosen == "sdpa" else None
        return cls(layout, chosen, nested)

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        fn = {"sdpa": self._sdpa, "flex": self._flex, "flash": self._varlen, "varlen": self._varlen}[self.backend]
        return fn(q, k, v)

    # -- SDPA, one call per sample -------------------------------------------------------------
    def _sdpa(self, q, k, v):
        groups = q.shape[1] // k.shape[1]
        k, v = repeat_kv(k, groups), repeat_kv(v, groups)
        outs, start = [], 0
        for i, length in enumerate(self.layout.sample_lens):
            end = start + length
            if self.nested_masks is not None:
                mask = self.nested_masks[i].to(device=q.device, dtype=q.dtype)
            else:
                key = f"sdpa_mask_{i}"
                if key not in self._cache:
                    self._cache[key] = self.layout.dense_mask(start, end)
                mask = self._cache[key]
            out = F.scaled_dot_product_attention(q[start:end].transpose(0, 1), k[start:end].transpose(0, 1),
                                                 v[start:end].transpose(0, 1), attn_mask=mask)
            outs.append(out.transpose(0, 1))
            start = end
        return torch.cat(outs, 0)

    # -- flex attention with a block mask ------------------------------------------------------
    def _flex(self, q, k, v):
        from torch.nn.attention.flex_attention import create_block_mask

        L = q.shape[0]
        padded = -(-L // FLEX_BLOCK) * FLEX_BLOCK
        if "block_mask" not in self._cache:
            lay = self.layout
            pad = padded - L
            dev = q.device
            sample_id = torch.cat([lay.sample_id, torch.full((pad,), -1, device=dev, dtype=torch.long)])
            split_id = torch.cat([lay.split_id, torch.full((pad,), -1, device=dev, dtype=torch.long)])
            mode = torch.cat([lay.mode, torch.zeros(pad, device=dev, dtype=torch.long)])

            def mask_mod(b, h, qi, ki):
                return allow_rule(qi, ki, sample_id, split_id, mode)

            self._cache["block_mask"] = create_block_mask(mask_mod, None, None, padded, padded, device=dev)
        pad = padded - L

        def prep(x):
            return F.pad(x, (0, 0, 0, 0, 0, pad)).transpose(0, 1).unsqueeze(0)

        out = _flex_fn(q.device.type)(prep(q), prep(k), prep(v), block_mask=self._cache["block_mask"],
                                      enable_gqa=q.shape[1] != k.shape[1])
        return out[0].transpose(0, 1)[:L]

    # -- split-gather varlen plan (flash-attn on CUDA, torch kernel otherwise) -----------------
    def _varlen_plan(self, device):
        if "varlen" in self._cache:
            return self._cache["varlen"]
        lay = self.layout
        starts = [0]
        for length in lay.split_lens:
            starts.append(starts[-1] + length)
        plan = {}
        for causal in (True, False):
            q_idx, k_idx, q_lens, k_lens = [], [], [], []
            for j, length in enumerate(lay.split_lens):
                if (lay.attn_modes[j] == "causal") != causal:
                    continue
                keys = [torch.arange(starts[i], starts[i + 1]) for i in range(j)
                        if lay.split_sample[i] == lay.split_sample[j] and lay.attn_modes[i] != "noise"]
                keys.append(torch.arange(starts[j], starts[j + 1]))
                q_idx.append(torch.arange(starts[j], starts[j + 1]))
                k_idx.append(torch.cat(keys))
                q_lens.append(length)
                k_lens.append(len(k_idx[-1]))
            if q_idx:
                plan[causal] = (torch.cat(q_idx).to(device), torch.cat(k_idx).to(device), q_lens, k_lens)
        self._cache["varlen"] = plan
        return plan

    def _varlen(self, q, k, v):
        out = torch.empty_like(q)
        for causal, (q_idx, k_idx, q_lens, k_lens) in self._varlen_plan(q.device).items():
            part = varlen_attention(q[q_idx], k[k_idx], v[k_idx], q_lens, k_lens, causal,
                                    use_flash=self.backend == "flash")
            out = out.index_copy(0, q_idx, part)
        return out


@functools.lru_cache(maxsize=None)
def _flex_fn(device_type: str) -> Callable:
    from torch.nn.attention.flex_attention import flex_attention

    if device_type == "cuda":
        return torch.compile(flex_attention)
    return flex_attention


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_lens: Sequence[int],
                     k_lens: Sequence[int], causal: bool, use_flash: bool = False) -> torch.Tensor:
    """Variable-length attention over concatenated sequences; causal is bottom-right aligned (flash-attn 2.1+).

    q: [sum q_lens, H, d]; k, v: [sum k_lens, H_kv, d]. Also the cache hook for inference: the KV-cache path
    passes the new queries and the merged cached+new keys/values here.
    """
    if use_flash:
        from flash_attn import flash_attn_varlen_func

        dev = q.device
        cu_q = F.pad(torch.tensor(list(q_lens), device=dev).cumsum(0), (1, 0)).to(torch.int32)
        cu_k = F.pad(torch.tensor(list(k_lens), device=dev).cumsum(0), (1, 0)).to(torch.int32)
        dtype = q.dtype if q.dtype in (torch.float16, torch.bfloat16) else torch.bfloat16
        out = flash_attn_varlen_func(q.to(dtype), k.to(dtype), v.to(dtype), cu_q, cu_k, max(q_lens), max(k_lens),
                                     causal=causal)
        return out.to(q.dtype)
    groups = q.shape[1] // k.shape[1]
    outs, qs, ks = [], 0, 0
    for lq, lk in zip(q_lens, k_lens):
        qq = q[qs:qs + lq].transpose(0, 1)
        kk = repeat_kv(k[ks:ks + lk], groups).transpose(0, 1)
        vv = repeat_kv(v[ks:ks + lk], groups).transpose(0, 1)
        mask = None
        if causal:
            mask = torch.ones(lq, lk, dtype=torch.bool, device=q.device).tril(diagonal=lk - lq)
        outs.append(F.scaled_dot_product_attention(qq, kk, vv, attn_mask=mask).transpose(0, 1))
        qs, ks = qs + lq, ks + lk
    return torch.cat(outs, 0)
