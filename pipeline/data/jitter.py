"""Colour jitter of a batch of uint8 images, pixel for pixel what PIL's ``ImageEnhance`` gives one image.

    from pipeline.data.jitter import jitter_batch
    x = jitter_batch(x_uint8_bchw, [("contrast", amounts, order_keys), ...])   # each row its own amounts and order

``pipeline.data.views`` draws the jitters of ``rrc_flip_jitter`` views and applies them here to a
micro-batch at once; its per-image path (``apply_view``) uses PIL itself and is the reference these
functions are tested against.
"""

from __future__ import annotations

import numpy as np
from PIL import Image


def jitter_batch(x: np.ndarray, jitters: list[tuple[str, np.ndarray, np.ndarray]]) -> np.ndarray:
    """uint8 [B, C, H, W] (C = 1: "L" images, 3: "RGB") after each row's ``jitters`` in the order of
    its keys: step by step, every row whose jitter at that step is the same one at once."""
    if not jitters:
        return x
    order = np.argsort(np.stack([key for _, _, key in jitters], axis=1), axis=1, kind="stable")
    for step in range(len(jitters)):
        for j, (name, amount, _) in enumerate(jitters):
            rows = np.nonzero(order[:, step] == j)[0]
            if len(rows):
                x[rows] = jitter_rows(name, x[rows], amount[rows])
    return x


def jitter_rows(name: str, x: np.ndarray, amount: np.ndarray) -> np.ndarray:
    """One jitter of uint8 [n, C, H, W] rows with their amounts [n], pixel for pixel PIL's.

    ``ImageEnhance`` blends a degenerate image into the image, ``Image.blend(degenerate, image, f)``:
    ``d + f * (x - d)`` in float32 (``f`` a C float), truncated and clipped into 0..255. Brightness's
    degenerate is black; contrast's is grey at ``int(mean + 0.5)``, the mean of the image's "L"
    conversion (``ImageStat``: the integer sum of its pixels over their count); saturation's is that
    "L" image itself (an "L" image's saturation is the image). Hue goes through ``adjust_hue`` row by row.
    """
    if name == "hue":
        return np.stack([_chw(adjust_hue(_pil(img), float(shift))) for img, shift in zip(x, amount)])
    if name == "saturation" and x.shape[1] == 1:
        return x
    if name == "brightness":
        degenerate = np.zeros((len(x), 1, 1, 1), dtype=np.float32)
    else:
        luma = _luma(x)
        if name == "contrast":
            mean = luma.sum(axis=(1, 2), dtype=np.int64) / luma[0].size
            degenerate = np.floor(mean + 0.5).astype(np.float32)[:, None, None, None]
        else:
            degenerate = luma[:, None].astype(np.float32)
    out = x.astype(np.float32)
    out -= degenerate
    out *= amount.astype(np.float32)[:, None, None, None]
    out += degenerate
    return np.clip(out, 0, 255, out=out).astype(np.uint8)


def _luma(x: np.ndarray) -> np.ndarray:
    """int32 [n, H, W]: PIL's "L" conversion of uint8 [n, C, H, W] (ITU-R 601-2 in 16-bit fixed point, as
    its ``rgb2l``; one channel: itself)."""
    if x.shape[1] == 1:
        return x[:, 0].astype(np.int32)
    r, g, b = (x[:, c].astype(np.int32) for c in range(3))
    return (r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16


def _pil(chw: np.ndarray) -> Image.Image:
    """uint8 [C, H, W] (C = 1 or 3) as an "L" or "RGB" image."""
    return Image.fromarray(chw[0] if chw.shape[0] == 1 else np.ascontiguousarray(chw.transpose(1, 2, 0)))


def _chw(img: Image.Image) -> np.ndarray:
    """An "L" or "RGB" image as uint8 [C, H, W]."""
    arr = np.asarray(img)
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def adjust_hue(img: Image.Image, shift: float) -> Image.Image:
    from torchvision.transforms.functional import adjust_hue

    return adjust_hue(img, shift)
