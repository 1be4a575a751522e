"""A small PNG encoder (no imaging library needed) for the images of a report.

Images are ``Tensor`` / ``ndarray`` of shape ``[H, W]``, ``[C, H, W]`` or ``[H, W, C]`` (``C`` in
1, 3, 4) or PIL images; uint8 values are kept, floats in ``[0, 1]`` are scaled by 255, other
floats are min-max scaled per image.
"""

from __future__ import annotations

import base64
import math
import struct
import zlib
from typing import Any, Optional

import numpy as np
from torch import Tensor

__all__ = ["png_bytes", "b64_png", "png_size", "as_array", "image_layout", "shape_text", "MAX_IMAGE_SIDE"]

MAX_IMAGE_SIDE = 256  # larger images are subsampled (nearest neighbour) before encoding


def as_array(image: Any) -> Optional[np.ndarray]:
    """``image`` as an ndarray (a Tensor, an ndarray or a PIL image), else ``None``."""
    if isinstance(image, Tensor):
        return image.detach().cpu().numpy()
    if isinstance(image, np.ndarray):
        return image
    if type(image).__module__.startswith("PIL."):
        return np.asarray(image)
    return None


def image_layout(a: np.ndarray) -> Optional[np.ndarray]:
    """``[H, W]`` or ``[H, W, C]`` (C in 1, 3, 4) when ``a`` has an image's shape, else ``None``."""
    if a.ndim == 2 and min(a.shape) >= 4:
        return a
    if a.ndim == 3:
        if a.shape[0] in (1, 3, 4) and a.shape[-1] not in (1, 3, 4) and min(a.shape[1:]) >= 4:
            a = np.moveaxis(a, 0, -1)
        if a.shape[-1] in (1, 3, 4) and min(a.shape[:2]) >= 4:
            return a[..., 0] if a.shape[-1] == 1 else a
    return None


def _to_uint8(a: np.ndarray) -> np.ndarray:
    if a.dtype == np.uint8:
        return a
    if a.dtype == np.bool_:
        return a.astype(np.uint8) * 255
    f = np.nan_to_num(a.astype(np.float64))
    lo, hi = float(f.min()), float(f.max())
    if lo >= 0.0 and hi <= 1.0:
        f = f * 255.0
    elif hi > lo:
        f = (f - lo) * (255.0 / (hi - lo))
    else:
        f = np.zeros_like(f)
    return np.clip(np.rint(f), 0, 255).astype(np.uint8)


def png_bytes(image: Any) -> bytes:
    """Encode an image as PNG bytes (8-bit grey, RGB or RGBA).

    Args:
        image: ``Tensor`` / ``ndarray`` of shape ``[H, W]``, ``[C, H, W]`` or ``[H, W, C]``
            (``C`` in 1, 3, 4) or a PIL image; uint8 as is, floats in ``[0, 1]`` times 255,
            other values min-max scaled. Sides above 256 pixels are subsampled.

    Returns:
        The PNG file's bytes.

    Raises:
        ValueError: ``image`` does not have an image's shape.
    """
    a = as_array(image)
    a = None if a is None else image_layout(a)
    if a is None:
        raise ValueError(f"not an image: expected [H, W], [C, H, W] or [H, W, C] with C in 1, 3, 4; got {shape_text(image)}")
    step = max(1, math.ceil(max(a.shape[:2]) / MAX_IMAGE_SIDE))
    a = np.ascontiguousarray(_to_uint8(a[::step, ::step]))
    h, w = a.shape[:2]
    colour = 0 if a.ndim == 2 else {3: 2, 4: 6}[a.shape[2]]
    raw = b"".join(b"\x00" + a[r].tobytes() for r in range(h))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", w, h, 8, colour, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")


def shape_text(x: Any) -> str:
    """``"Tensor of shape (2, 3)"``, or the type name of something without a shape."""
    shape = getattr(x, "shape", None)
    return f"{type(x).__name__} of shape {tuple(shape)}" if shape is not None else type(x).__name__


def b64_png(image: Any) -> str:
    """:func:`png_bytes` as base64 text (for an HTML ``data:`` URL)."""
    return base64.b64encode(png_bytes(image)).decode("ascii")


def png_size(b64: str) -> Optional[tuple[int, int]]:
    """``(width, height)`` of a base64 PNG from its header, ``None`` when it is not readable."""
    try:
        return struct.unpack(">II", base64.b64decode(b64[:44])[16:24])
    except Exception:  # a malformed image is still shown, just without its size
        return None
