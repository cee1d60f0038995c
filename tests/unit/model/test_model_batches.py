"""Hand-built packed batches for the model tests (an independent re-statement of docs/upstream-compat.md#pack-sequence, #attention-masks), plus
tests of the attention-mask rule against the upstream two-pass mask algorithm."""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from model.attention import TokenLayout
from pipelines.packing.packed_batch import PackedBatch

BOS, EOS, SOI, EOI = 257, 258, 259, 260  # the builtin tokenizer's special ids (asserted below)


@pytest.fixture(autouse=True)
def single_thread():
    """One intra-op thread: on the shared 2-core box, 2 threads under load made tiny steps ~20x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@dataclass
class Text:
    ids: list[int]
    loss: bool = False


@dataclass
class Vit:
    image: torch.Tensor  # [3, H, W], sides multiples of 14


@dataclass
class Vae:
    image: torch.Tensor  # [3, H, W], sides multiples of 16
    loss: bool = False


def patchify(img: torch.Tensor, p: int) -> torch.Tensor:
    c, h, w = img.shape
    x = img.reshape(c, h // p, p, w // p, p)
    return torch.einsum("chpwq->hwpqc", x).reshape((h // p) * (w // p), p * p * c)


def reference_sample_mask(split_lens: list[int], modes: list[str]) -> torch.Tensor:
    """Upstream `prepare_attention_mask_per_sample` (docs/upstream-compat.md#patchify), two passes, float 0 / -inf."""
    S = sum(split_lens)
    allow = torch.zeros(S, S, dtype=torch.bool)
    start = 0
    for length, mode in zip(split_lens, modes):
        end = start + length
        if mode == "causal":
            allow[start:end, start:end] = torch.ones(length, length, dtype=torch.bool).tril()
        else:
            allow[start:end, start:end] = True
        allow[start:end, :start] = True
        start = end
    start = 0
    for length, mode in zip(split_lens, modes):
        end = start + length
        if mode == "noise":
            allow[:, start:end] = False
            allow[start:end, start:end] = True
        start = end
    return torch.zeros(S, S).masked_fill(~allow, float("-inf"))


def make_batch(samples: list[list], max_side: int = 70, max_latent: int = 32, timestep_gen: torch.Generator | None = None,
               nested_masks: bool = True, flex_pad: int = 0) -> PackedBatch:
    """Pack samples (lists of Text / Vit / Vae) following the docs/upstream-compat.md#pack-sequence pack_sequence rules."""
    g = timestep_gen or torch.Generator().manual_seed(0)
    text_ids, text_idx, pos, labels, ce_idx = [], [], [], [], []
    vit_tokens, vit_seqlens, vit_pos, vit_idx = [], [], [], []
    vae_images, vae_shapes, lat_pos, vae_idx, timesteps, mse_idx = [], [], [], [], [], []
    sample_lens, split_lens, modes, masks = [], [], [], []
    cur = 0
    for sample in samples:
        s_start, rope, s_splits, s_modes = cur, 0, [], []
        for el in sample:
            if isinstance(el, Text):
                toks = [BOS, *el.ids, EOS]
                n = len(toks)
                text_ids += toks
                text_idx += list(range(cur, cur + n))
                pos += list(range(rope, rope + n))
                if el.loss:
                    labels += [*el.ids, EOS]
                    ce_idx += list(range(cur, cur + n - 1))
                rope += n
                s_splits.append(n)
                s_modes.append("causal")
                cur += n
            elif isinstance(el, Vit):
                tok = patchify(el.image, 14)
                hh, ww = el.image.shape[1] // 14, el.image.shape[2] // 14
                n = tok.shape[0] + 2
                text_ids += [SOI, EOI]
                text_idx += [cur, cur + n - 1]
                vit_tokens.append(tok)
                vit_seqlens.append(tok.shape[0])
                vit_pos += [r * max_side + c for r in range(hh) for c in range(ww)]
                vit_idx += list(range(cur + 1, cur + n - 1))
                pos += [rope] * n
                rope += 1
                s_splits.append(n)
                s_modes.append("full")
                cur += n
            else:
                hh, ww = el.image.shape[1] // 16, el.image.shape[2] // 16
                n = hh * ww + 2
                text_ids += [SOI, EOI]
                text_idx += [cur, cur + n - 1]
                vae_images.append(el.image)
                vae_shapes.append((hh, ww))
                lat_pos += [r * max_latent + c for r in range(hh) for c in range(ww)]
                vae_idx += list(range(cur + 1, cur + n - 1))
                pos += [rope] * n
                if el.loss:
                    t = torch.randn((), generator=g).item()
                    timesteps += [t] * (hh * ww)
                    mse_idx += list(range(cur + 1, cur + n - 1))
                    s_modes.append("noise")
                else:
                    timesteps += [float("-inf")] * (hh * ww)
                    s_modes.append("full")
                    rope += 1
                s_splits.append(n)
                cur += n
        sample_lens.append(cur - s_start)
        split_lens += s_splits
        modes += s_modes
        masks.append(reference_sample_mask(s_splits, s_modes))
    L = cur
    if flex_pad:
        sample_lens.append(flex_pad)
        split_lens.append(flex_pad)
        modes.append("causal")
    long = lambda v: torch.tensor(v, dtype=torch.long)  # noqa: E731
    padded = None
    if vae_images:
        Hm = max(i.shape[1] for i in vae_images)
        Wm = max(i.shape[2] for i in vae_images)
        padded = torch.zeros(len(vae_images), 3, Hm, Wm)
        for i, img in enumerate(vae_images):
            padded[i, :, : img.shape[1], : img.shape[2]] = img
    return PackedBatch(
        sequence_length=L, sample_lens=sample_lens, packed_text_ids=long(text_ids), packed_text_indexes=long(text_idx),
        packed_position_ids=long(pos), split_lens=split_lens, attn_modes=modes,
        nested_attention_masks=masks if nested_masks else None,
        packed_vit_tokens=torch.cat(vit_tokens) if vit_tokens else None,
        vit_token_seqlens=torch.tensor(vit_seqlens, dtype=torch.int32) if vit_tokens else None,
        packed_vit_position_ids=long(vit_pos) if vit_tokens else None,
        packed_vit_token_indexes=long(vit_idx) if vit_tokens else None,
        padded_images=padded, patchified_vae_latent_shapes=vae_shapes,
        packed_latent_position_ids=long(lat_pos) if vae_images else None,
        packed_vae_token_indexes=long(vae_idx) if vae_images else None,
        packed_timesteps=torch.tensor(timesteps) if vae_images else None,
        mse_loss_indexes=long(mse_idx) if mse_idx else None,
        packed_label_ids=long(labels) if labels else None, ce_loss_indexes=long(ce_idx) if ce_idx else None,
        ce_loss_weights=torch.ones(len(labels)) if labels else None,
    )


def rand_image(h: int, w: int, seed: int) -> torch.Tensor:
    return torch.rand(3, h, w, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def vqa_sample(seed: int = 0) -> list:
    """An SFT/VQA sample: question text, ViT image, answer text with loss (docs/upstream-compat.md#sequence-plans Ver1 shape)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 256, (6,), generator=g).tolist()
    a = torch.randint(0, 256, (5,), generator=g).tolist()
    return [Vit(rand_image(28, 42, seed)), Text(q), Text(a, loss=True)]


def edit_sample(seed: int = 1) -> list:
    """An image-editing sample: vae + vit of the input, instruction, answer text, noised target (docs/upstream-compat.md#sequence-plans)."""
    g = torch.Generator().manual_seed(seed)
    instr = torch.randint(0, 256, (5,), generator=g).tolist()
    ans = torch.randint(0, 256, (3,), generator=g).tolist()
    return [Vae(rand_image(32, 48, seed)), Vit(rand_image(28, 28, seed + 7)), Text(instr), Text(ans, loss=True),
            Vae(rand_image(32, 48, seed + 3), loss=True)]


# -- tests of the mask rule ------------------------------------------------------------------------

def test_builtin_special_ids_match_helpers():
    from datasets_catalog.tokenizer import TextTokenizer

    sp = TextTokenizer.builtin().special
    assert (sp.bos, sp.eos, sp.start_of_image, sp.end_of_image) == (BOS, EOS, SOI, EOI)


@pytest.mark.parametrize("seed", range(6))
def test_layout_mask_equals_upstream_two_pass_mask(seed):
    g = torch.Generator().manual_seed(seed)
    n = int(torch.randint(1, 7, (1,), generator=g))
    lens = torch.randint(1, 6, (n,), generator=g).tolist()
    modes = [["causal", "full", "noise"][int(i)] for i in torch.randint(0, 3, (n,), generator=g)]
    layout = TokenLayout.build(sum(lens), [sum(lens)], lens, modes)
    ref = reference_sample_mask(lens, modes) == 0
    assert torch.equal(layout.dense_mask(), ref)


def test_layout_rejects_split_crossing_samples_and_trims_flex_pad():
    with pytest.raises(ValueError, match="crosses a sample boundary"):
        TokenLayout.build(6, [3, 3], [2, 4], ["causal", "causal"])
    lay = TokenLayout.build(5, [5, 123], [2, 3, 123], ["causal", "full", "causal"])
    assert lay.sample_lens == [5] and lay.split_lens == [2, 3]
