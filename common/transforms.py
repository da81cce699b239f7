"""Image transforms (docs/paper.md §2): train = random resized crop + flip; test = resize + center crop.

The training transform draws its crop and flip from a ``torch.Generator`` it is given, never
from torch's global RNG: a client's augmentations are then a function of (seed, client,
round, epoch, image) alone, whichever clients ran before it in the same process.
"""

from __future__ import annotations

import math

import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF
from torchvision.transforms import transforms as T

Stats = tuple[float, float, float]
_RATIO = (3 / 4, 4 / 3)  # torchvision's RandomResizedCrop default aspect ratios


def _uniform(generator: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand((), generator=generator))


def crop_box(height: int, width: int, scale: tuple[float, float], generator: torch.Generator) -> tuple[int, int, int, int]:
    """``(top, left, h, w)`` drawn as torchvision's ``RandomResizedCrop.get_params`` draws it,
    from ``generator``: 10 tries at a random area and aspect ratio, then a central crop."""
    area = height * width
    log_ratio = (math.log(_RATIO[0]), math.log(_RATIO[1]))
    for _ in range(10):
        target = area * _uniform(generator, *scale)
        aspect = math.exp(_uniform(generator, *log_ratio))
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (), generator=generator))
            left = int(torch.randint(0, width - w + 1, (), generator=generator))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < _RATIO[0]:
        w, h = width, round(width / _RATIO[0])
    elif in_ratio > _RATIO[1]:
        h, w = height, round(height * _RATIO[1])
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


class SeededTrainTransform:
    """Random resized crop (bicubic) + horizontal flip + normalisation, drawn from a generator."""

    def __init__(self, size: int, mean: Stats, std: Stats, scale_min: float = 0.08) -> None:
        self.size, self.scale = size, (scale_min, 1.0)
        self.finish = T.Compose([T.ToTensor(), T.Normalize(mean, std)])

    def __call__(self, image: Image.Image, generator: torch.Generator | None = None) -> torch.Tensor:
        if generator is None:
            raise ValueError("the training transform draws from a seeded generator; wrap the dataset in SeededAugmentation")
        top, left, h, w = crop_box(image.height, image.width, self.scale, generator)
        image = TF.resized_crop(image, top, left, h, w, [self.size, self.size], InterpolationMode.BICUBIC)
        if float(torch.rand((), generator=generator)) < 0.5:
            image = TF.hflip(image)
        return self.finish(image)


def train_transform(size: int, mean: Stats, std: Stats, scale_min: float = 0.08) -> SeededTrainTransform:
    return SeededTrainTransform(size, mean, std, scale_min)


class TestTransform:
    """Resize (bicubic) + centre crop + normalisation, in two parts: :meth:`geometry`, the
    decoded image's uint8 pixels, which an evaluation cache can keep, and :meth:`finish`, the
    float conversion and normalisation, which runs on a batch. ``__call__`` is both, and gives
    exactly what ``Compose([Resize, CenterCrop, ToTensor, Normalize])`` gives."""

    def __init__(self, size: int, mean: Stats, std: Stats) -> None:
        self.size, self.mean, self.std = size, list(mean), list(std)
        self.geometry_key = ("resize-center-crop-bicubic", size)

    def geometry(self, image: Image.Image) -> torch.Tensor:
        image = TF.resize(image, self.size, interpolation=InterpolationMode.BICUBIC)
        return TF.pil_to_tensor(TF.center_crop(image, [self.size, self.size]))

    def finish(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 (..., 3, H, W) to normalised float, as ``ToTensor`` then ``Normalize`` do it."""
        scaled = pixels.to(torch.get_default_dtype()).div(255)
        mean = torch.as_tensor(self.mean, dtype=scaled.dtype).view(-1, 1, 1)
        std = torch.as_tensor(self.std, dtype=scaled.dtype).view(-1, 1, 1)
        return scaled.sub(mean).div(std)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return self.finish(self.geometry(image))


def test_transform(size: int, mean: Stats, std: Stats) -> TestTransform:
    return TestTransform(size, mean, std)
