"""Image scores of generation / editing records (docs/evaluation.md#scoring-rules): PSNR and SSIM against the target
image at the target's size (scikit-image), FID not yet (see `fid_note`).

The prediction is resized to the target's size (bicubic) before comparing: a model may generate at another
resolution than the reference, and the target is what the user asked for.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def _as_array(image: Image.Image, size: tuple[int, int] | None = None) -> np.ndarray:
    rgb = image.convert("RGB")
    if size is not None and rgb.size != size:
        rgb = rgb.resize(size, Image.BICUBIC)
    return np.asarray(rgb, dtype=np.uint8)


def psnr_ssim(target: Image.Image, prediction: Image.Image) -> dict[str, float]:
    """{"psnr": dB (capped at 100 for identical images), "ssim": in [-1, 1]} over 8-bit RGB at the target size."""
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    ref = _as_array(target)
    pred = _as_array(prediction, (ref.shape[1], ref.shape[0]))
    if np.array_equal(ref, pred):
        psnr = 100.0
    else:
        psnr = float(peak_signal_noise_ratio(ref, pred, data_range=255))
    win = min(7, ref.shape[0], ref.shape[1])
    win -= (win + 1) % 2  # odd window that fits the image
    ssim = float(structural_similarity(ref, pred, data_range=255, channel_axis=2, win_size=max(win, 3)))
    return {"psnr": min(psnr, 100.0), "ssim": ssim}


def fid_note(weights: Path | None) -> str:
    """FID is not computed in this version (no Inception network is bundled, and nothing is downloaded): the
    note metrics.json carries instead, naming what was asked for."""
    if weights is not None and not Path(weights).is_file():
        return f"FID not computed: --fid_weights {weights}: no such file"
    return "FID not computed: this version bundles no Inception-v3 network for --fid_weights; PSNR / SSIM are reported"
