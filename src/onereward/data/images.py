"""Image decoding with guards, PNG encoding, perceptual hashing."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


class ImageRejected(ValueError):
    """An input image is dropped; `reason` is the counted category."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


def decode_guarded(data: bytes, name: str, *, min_side: int, max_pixels: int, reduce_to: int = 0) -> Image.Image:
    """Decode bytes into RGB, refusing empty, corrupt, tiny or decompression-bomb images. With `reduce_to`, a
    JPEG is decoded at the smallest DCT scale (1/2, 1/4 or 1/8) whose short side keeps `reduce_to` pixels."""
    if not data:
        raise ImageRejected("empty_file", f"{name} has zero bytes")
    try:
        im = Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageRejected("too_large", f"{name}: {e}") from None
    except Exception as e:  # PIL raises many types for garbage input
        raise ImageRejected("corrupt", f"{name}: {type(e).__name__}: {e}") from None
    w, h = im.size
    # Checked on the header, before any pixel is decoded.
    if w * h > max_pixels:
        raise ImageRejected("too_large", f"{name} is {w}x{h} > {max_pixels} pixels")
    if min(w, h) < min_side:
        raise ImageRejected("undersized", f"{name} is {w}x{h}, below {min_side}px")
    if reduce_to:
        short = min(w, h)
        im.draft(None, (-(-w * reduce_to // short), -(-h * reduce_to // short)))  # a no-op for other formats
    try:
        im.load()
        return im.convert("RGB")
    except Exception as e:
        raise ImageRejected("corrupt", f"{name}: {type(e).__name__}: {e}") from None


def center_square(im: Image.Image, size: int) -> Image.Image:
    w, h = im.size
    s = min(w, h)
    left, top = (w - s) // 2, (h - s) // 2
    return im.crop((left, top, left + s, top + s)).resize((size, size), Image.Resampling.LANCZOS)


def to_png(arr: np.ndarray | Image.Image) -> bytes:
    im = arr if isinstance(arr, Image.Image) else Image.fromarray(np.asarray(arr, dtype=np.uint8))
    buf = io.BytesIO()
    im.save(buf, format="PNG", optimize=False, compress_level=1)
    return buf.getvalue()


def from_png(data: bytes, mode: str = "RGB") -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert(mode))


def try_from_png(data: bytes | None, mode: str = "RGB") -> np.ndarray | None:
    """The decoded pixels, or None where the bytes are missing, do not decode, or hold no pixel."""
    if data is None:
        return None
    try:
        arr = from_png(data, mode)
    except Exception:  # PIL raises many types for garbage input
        return None
    return arr if arr.size > 0 else None


def phash(arr: np.ndarray) -> int:
    """64-bit DCT perceptual hash (8x8 low frequencies of a 32x32 grey image vs their median)."""
    from scipy.fft import dctn

    grey = Image.fromarray(arr).convert("L").resize((32, 32), Image.Resampling.LANCZOS)
    coeffs = dctn(np.asarray(grey, dtype=np.float64), norm="ortho")[:8, :8].flatten()
    bits = coeffs > np.median(coeffs[1:])
    return int.from_bytes(np.packbits(bits).tobytes(), "big")


def hamming(a: int, b: int) -> int:
    return (a ^ b).bit_count()
