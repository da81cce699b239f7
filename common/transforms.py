"""Image transforms (SPEC §2): train = random resized crop + flip; test = resize + center crop."""

from __future__ import annotations

from torchvision import transforms as T

Stats = tuple[float, float, float]


def train_transform(size: int, mean: Stats, std: Stats, scale_min: float = 0.08) -> T.Compose:
    return T.Compose(
        [
            T.RandomResizedCrop(size, scale=(scale_min, 1.0), interpolation=T.InterpolationMode.BICUBIC),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            T.Normalize(mean, std),
        ]
    )


def test_transform(size: int, mean: Stats, std: Stats) -> T.Compose:
    return T.Compose(
        [
            T.Resize(size, interpolation=T.InterpolationMode.BICUBIC),
            T.CenterCrop(size),
            T.ToTensor(),
            T.Normalize(mean, std),
        ]
    )
