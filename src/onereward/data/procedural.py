"""The built-in procedural source: scenes with exact object masks, known backgrounds and rendered text.

Backgrounds are gradients, CC0 textures and photo crops bundled with scikit-image / scikit-learn;
objects are procedural shapes (always) or Debian openclipart-png cut-outs (when installed).
"""

from __future__ import annotations

import functools
import glob
import hashlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 180, 50),
    "blue": (30, 60, 220),
    "yellow": (240, 220, 30),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
    "orange": (250, 140, 20),
    "purple": (140, 40, 190),
}
COLOR_NAMES = tuple(COLORS)
PALETTE = np.array([COLORS[n] for n in COLOR_NAMES])
SHAPES = ("circle", "square", "triangle")
PHOTO_NAMES = ("astronaut", "camera", "cat", "chelsea", "coffee", "coins", "moon", "rocket",
               "immunohistochemistry", "hubble_deep_field", "clock", "retina")
TEXTURE_NAMES = ("brick", "grass", "gravel")
SKLEARN_PHOTOS = ("china.jpg", "flower.jpg")  # "sklearn:0", "sklearn:1": load_sample_images() order
CLIPART_GLOB = "/usr/share/openclipart/png/**/*.png"
LATIN_FONT = Path(__import__("matplotlib").get_data_path()) / "fonts/ttf/DejaVuSans-Bold.ttf"
CJK_FONTS = ("/usr/share/fonts/truetype/wqy/wqy-microhei.ttc",
             "/usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc")


@dataclass
class Scene:
    image: np.ndarray  # HxWx3 uint8
    background: np.ndarray  # the scene without the removable object
    object_mask: np.ndarray  # HxW bool
    object_label: str
    recipe: str


@functools.cache
def _photo(name: str) -> np.ndarray:
    import warnings

    if name.startswith("sklearn:"):  # read from scikit-learn's package: importing sklearn.datasets takes ~1.4 s
        spec = importlib.util.find_spec("sklearn")
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError("scikit-learn is not installed")
        photo = SKLEARN_PHOTOS[int(name.removeprefix("sklearn:"))]
        path = Path(spec.submodule_search_locations[0], "datasets", "images", photo)
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    import skimage.data

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        img = getattr(skimage.data, name)()
    if img.ndim == 2:
        img = np.stack([img] * 3, axis=-1)
    return np.ascontiguousarray(img[..., :3]).astype(np.uint8)


@functools.cache
def photo_names() -> tuple[str, ...]:
    names = []
    for n in (*PHOTO_NAMES, *TEXTURE_NAMES, "sklearn:0", "sklearn:1"):
        try:
            _photo(n)
            names.append(n)
        except Exception:  # an asset missing from this install is simply not used
            continue
    return tuple(names)


@functools.cache
def clipart_files() -> tuple[str, ...]:
    return tuple(sorted(glob.glob(CLIPART_GLOB, recursive=True)))


@functools.cache
def cjk_font_path() -> str | None:
    return next((p for p in CJK_FONTS if Path(p).exists()), None)


def asset_fingerprint(paths: tuple[str, ...] | str | None, root: str | Path = "/") -> str | None:
    """Names (relative to `root`) and sizes of machine assets (fonts, clipart) that change what the data stages
    produce, hashed: part of the stage keys, so installing or removing them is not served from cache. Where
    `root` is does not count: the Latin font lives in the virtual environment, and its path in the key gave every
    checkout (or container image) its own keys for the same data."""
    if not paths:
        return None
    items = [paths] if isinstance(paths, str) else list(paths)
    listing = "\n".join(f"{Path(p).relative_to(root)}:{Path(p).stat().st_size}" for p in items)
    return hashlib.sha256(listing.encode()).hexdigest()[:16]


@functools.cache
def font(size: int, cjk: bool = False) -> ImageFont.FreeTypeFont:
    path = cjk_font_path() if cjk else None
    return ImageFont.truetype(path or str(LATIN_FONT), size)


def _crop(rng: np.random.Generator, img: np.ndarray, size: int) -> np.ndarray:
    h, w = img.shape[:2]
    s = int(rng.integers(min(h, w) // 4, min(h, w) + 1))
    y, x = int(rng.integers(0, h - s + 1)), int(rng.integers(0, w - s + 1))
    crop = Image.fromarray(img[y : y + s, x : x + s]).resize((size, size), Image.Resampling.LANCZOS)
    return np.asarray(crop)


def background(rng: np.random.Generator, size: int, photos: bool) -> tuple[np.ndarray, str]:
    kind = rng.choice(["gradient", "photo"] if photos else ["gradient"], p=[0.4, 0.6] if photos else None)
    if kind == "photo":
        name = str(rng.choice(photo_names()))
        return _crop(rng, _photo(name), size), f"photo:{name}"
    c0, c1 = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    angle = rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[0:size, 0:size] / max(size - 1, 1)
    t = (np.cos(angle) * xx + np.sin(angle) * yy)
    t = (t - t.min()) / max(t.max() - t.min(), 1e-6)
    img = c0[None, None] * (1 - t[..., None]) + c1[None, None] * t[..., None]
    img += rng.normal(0, 4, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8), "gradient"


def shape_mask(rng: np.random.Generator, size: int, shape: str) -> np.ndarray:
    r = rng.uniform(0.14, 0.3) * size
    cx, cy = rng.uniform(r, size - r), rng.uniform(r, size - r)
    canvas = Image.new("L", (size, size), 0)
    d = ImageDraw.Draw(canvas)
    if shape == "circle":
        d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
    elif shape == "square":
        d.rectangle((cx - r, cy - r, cx + r, cy + r), fill=255)
    else:
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=255)
    return np.asarray(canvas) > 127


def _clipart(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray, str] | None:
    files = clipart_files()
    if not files:
        return None
    path = files[int(rng.integers(len(files)))]
    try:
        im = Image.open(path).convert("RGBA")
    except Exception:
        return None
    side = int(rng.uniform(0.35, 0.6) * size)
    im.thumbnail((side, side))
    canvas = Image.new("RGBA", (size, size), (0, 0, 0, 0))
    x, y = int(rng.integers(0, size - im.width + 1)), int(rng.integers(0, size - im.height + 1))
    canvas.paste(im, (x, y))
    arr = np.asarray(canvas)
    mask = arr[..., 3] > 127
    if mask.mean() < 0.02:
        return None
    return arr[..., :3], mask, Path(path).parent.name.replace("_", " ")


def scene(rng: np.random.Generator, size: int, photos: bool = True, clipart: bool = True) -> Scene:
    """Background, an optional distractor shape, then the removable object on top."""
    bg, recipe = background(rng, size, photos)
    base = bg.copy()
    if rng.random() < 0.3:
        dmask = shape_mask(rng, size, str(rng.choice(SHAPES)))
        base[dmask] = COLORS[str(rng.choice(list(COLORS)))]
        recipe += "+distractor"
    img = base.copy()
    art = _clipart(rng, size) if clipart and rng.random() < 0.3 else None
    if art is not None:
        pixels, mask, label = art
        img[mask] = pixels[mask]
    else:
        shape, color = str(rng.choice(SHAPES)), str(rng.choice(list(COLORS)))
        mask = shape_mask(rng, size, shape)
        img[mask] = COLORS[color]
        label = f"{color} {shape}"
    return Scene(img, base, mask, label, f"{recipe}+{label}")


def render_text(img: np.ndarray, box: tuple[int, int, int, int], text: str, cjk: bool) -> np.ndarray:
    """Draw `text` centred in box (x0, y0, x1, y1) in a colour contrasting with the region."""
    x0, y0, x1, y1 = box
    region = img[y0:y1, x0:x1].reshape(-1, 3).mean(0)
    color = (0, 0, 0) if region.mean() > 127 else (255, 255, 255)
    out = Image.fromarray(img.copy())
    f, (left, top, right, bottom) = _fit_text(text, x1 - x0, y1 - y0, cjk)
    tx = x0 + (x1 - x0 - (right - left)) / 2 - left
    ty = y0 + (y1 - y0 - (bottom - top)) / 2 - top
    ImageDraw.Draw(out).text((tx, ty), text, fill=color, font=f)
    return np.asarray(out)


@functools.lru_cache(maxsize=4096)
def _fit_text(text: str, w: int, h: int, cjk: bool) -> tuple[ImageFont.FreeTypeFont,
                                                              tuple[float, float, float, float]]:
    """The largest font size from h down (at least 6) whose text bbox fits w x h, and that bbox; cached
    because the search measures the text once per size, and boxes and texts repeat."""
    d = ImageDraw.Draw(Image.new("RGB", (1, 1)))  # bboxes depend on the font and the RGB mode only
    size = max(h, 6)
    f = font(size, cjk)
    while size > 6:
        left, top, right, bottom = d.textbbox((0, 0), text, font=f)
        if right - left <= w and bottom - top <= h:
            break
        size -= 1
        f = font(size, cjk)
    return f, d.textbbox((0, 0), text, font=f)


def color_name(pixels: np.ndarray) -> str:
    """Nearest palette name of the mean colour of some pixels (prompts for free-form fills)."""
    mean = pixels.reshape(-1, 3).mean(0)
    return COLOR_NAMES[int(np.argmin(((PALETTE - mean) ** 2).sum(1)))]  # ties: the first, as min() did
