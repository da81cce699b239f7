"""A procedural image dataset made by code: coloured shapes in several visual styles.

Classes are compositions ``"{colour} {shape}"`` (8 colours x 6 shapes = 48), so a model that
learnt colours and shapes from some compositions can recognise unseen ones, which makes
base-to-novel generalisation measurable offline. Styles act as domains. Every image is a
pure function of (seed, split, class, index, style): nothing is downloaded or stored.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
from PIL import Image

from common.data.base import ImageSource, SplitSources

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 180, 40),
    "blue": (40, 70, 230),
    "yellow": (235, 220, 40),
    "magenta": (210, 40, 200),
    "cyan": (40, 210, 220),
    "orange": (245, 140, 20),
    "white": (240, 240, 240),
}
SHAPES = ("circle", "square", "triangle", "diamond", "cross", "ring")
STYLES = ("solid", "outline", "striped", "noisy")
SPLIT_CODES = {"train": 0, "val": 1, "test": 2}
_SUPERSAMPLE = 2
_CACHED_IMAGES = 20_000  # per source, about 60 MB at 32x32
_SOURCE_DIGEST = hashlib.blake2b(Path(__file__).read_bytes(), digest_size=16).digest()  # of the drawing code


def class_names() -> list[str]:
    """All compositions, ordered shape-major: label = shape_index * 8 + colour_index."""
    return [f"{colour} {shape}" for shape in SHAPES for colour in COLOURS]


def caption(name: str, style: str) -> str:
    return f"a {style} picture of a {name}."


def _shape_mask(shape: str, dx: np.ndarray, dy: np.ndarray, r: float) -> np.ndarray:
    if shape == "circle":
        return dx**2 + dy**2 <= r**2
    if shape == "square":
        return np.maximum(abs(dx), abs(dy)) <= r * 0.85
    if shape == "triangle":
        return (dy <= r * 0.8) & (abs(dx) * 1.7 <= dy + r)
    if shape == "diamond":
        return abs(dx) + abs(dy) <= r * 1.1
    if shape == "cross":
        arm = r * 0.35
        return ((abs(dx) <= arm) & (abs(dy) <= r)) | ((abs(dy) <= arm) & (abs(dx) <= r))
    if shape == "ring":
        d2 = dx**2 + dy**2
        return (d2 <= r**2) & (d2 >= (0.55 * r) ** 2)
    raise ValueError(f"unknown shape {shape!r}; valid: {SHAPES}")


def render(label: int, style: str, rng: np.random.Generator, size: int = 32) -> Image.Image:
    """Draw one image of class ``label`` in ``style``; randomness only from ``rng``."""
    shape = SHAPES[label // len(COLOURS)]
    colour = np.array(list(COLOURS.values())[label % len(COLOURS)], dtype=np.float32)
    n = size * _SUPERSAMPLE
    ys, xs = np.mgrid[0:n, 0:n].astype(np.float32) + 0.5
    r = rng.uniform(0.22, 0.38) * n
    cx, cy = rng.uniform(r, n - r, size=2)
    mask = _shape_mask(shape, xs - cx, ys - cy, r)

    grey = rng.uniform(30, 110)
    background = np.full((n, n, 3), grey, dtype=np.float32)
    background += rng.normal(0, 12 if style != "noisy" else 45, size=(n, n, 3))
    fill = colour * rng.uniform(0.8, 1.05)
    if style == "outline":
        inner = _shape_mask(shape, xs - cx, ys - cy, r * 0.72)
        mask = mask & ~inner
    elif style == "striped":
        period = rng.uniform(2.5, 4) * _SUPERSAMPLE
        stripes = ((xs + ys) // period) % 2 == 0
        mask = mask & stripes
    image = np.where(mask[..., None], fill, background)
    image = image.reshape(size, _SUPERSAMPLE, size, _SUPERSAMPLE, 3).mean(axis=(1, 3))
    return Image.fromarray(np.clip(image, 0, 255).astype(np.uint8), mode="RGB")


def _image_seed(seed: int, split: str, label: int, index: int, style: str) -> int:
    key = f"{seed}/{split}/{label}/{index}/{style}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little")


class ShapesSource(ImageSource):
    """``per_class`` images of every class in each of ``styles``, for one split."""

    def __init__(
        self, split: str, per_class: int, styles: tuple[str, ...] = ("solid",), seed: int = 0, size: int = 32
    ) -> None:
        if split not in SPLIT_CODES:
            raise ValueError(f"split={split!r}; valid: {sorted(SPLIT_CODES)}")
        unknown = set(styles) - set(STYLES)
        if unknown:
            raise ValueError(f"unknown styles {sorted(unknown)}; valid: {STYLES}")
        self.class_names = class_names()
        self.split, self.seed, self.size = split, seed, size
        grid = [(label, style, i) for style in styles for label in range(len(self.class_names)) for i in range(per_class)]
        self.labels = np.array([g[0] for g in grid], dtype=np.int64)
        self._styles = np.array([g[1] for g in grid])
        self.domains = self._styles
        self._index = np.array([g[2] for g in grid], dtype=np.int64)
        # Rendering costs far more than reading back 3 KB: every image is drawn once per process
        # (clients in one simulation worker evaluate on the same Base and Novel images each round).
        self._rendered: dict[int, Image.Image] = {}

    def image(self, index: int) -> Image.Image:
        cached = self._rendered.get(index)
        if cached is None:
            label, style = int(self.labels[index]), str(self._styles[index])
            rng = np.random.default_rng(_image_seed(self.seed, self.split, label, int(self._index[index]), style))
            cached = render(label, style, rng, self.size)
            if len(self._rendered) < _CACHED_IMAGES:
                self._rendered[index] = cached
        return cached.copy()  # callers may transform in place

    def cache_key(self) -> str:
        """Every image is a function of the drawing code (this file), numpy's generators (whose
        streams may change between releases), the split, seed and size, and which (class, style,
        index) sits at each position."""
        digest = hashlib.blake2b(_SOURCE_DIGEST, digest_size=16)
        digest.update(f"{np.__version__}/{self.split}/{self.seed}/{self.size}".encode())
        for column in (self.labels, self._styles.astype(str), self._index):
            digest.update(np.ascontiguousarray(column).tobytes())
        return f"shapes:{len(self)}:{digest.hexdigest()}"


def load_shapes(
    train_per_class: int = 16, test_per_class: int = 10, styles: tuple[str, ...] = ("solid",), seed: int = 0
) -> SplitSources:
    from common.data.novel_split import BASE_LABELS  # it imports this module's attributes

    return SplitSources(
        name="shapes",
        class_names=class_names(),
        train=ShapesSource("train", train_per_class, styles, seed),
        test=ShapesSource("test", test_per_class, styles, seed),
        val=ShapesSource("val", max(1, test_per_class // 2), styles, seed),
        base_classes=BASE_LABELS,
    )
