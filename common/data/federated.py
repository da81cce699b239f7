"""A client's shard: which images it trains and tests on, and its classifier's classes."""

from __future__ import annotations

from functools import lru_cache

from common.config import RunConfig
from common.data.base import ClientData, LabeledDataset, SplitSources
from common.data.shapes import load_shapes
from common.partition import base_to_novel, few_shot_indices, indices_of_classes
from common.transforms import Stats, test_transform, train_transform


@lru_cache(maxsize=4)
def load_sources(dataset: str, data_dir: str, test_per_class: int, seed: int) -> SplitSources:
    if dataset == "shapes":
        return load_shapes(train_per_class=max(64, 2 * test_per_class), test_per_class=test_per_class, seed=seed)
    raise ValueError(f"dataset={dataset!r} is unknown; valid: ['shapes']")


def client_data(
    cfg: RunConfig, partition_id: int, num_partitions: int, image_size: int, mean: Stats, std: Stats, data_dir: str = ""
) -> ClientData:
    """Client ``partition_id``'s K-shot training set and local test set (base-to-novel split).

    The classifier covers all base classes; the local test set is the test images of the
    client's own classes.
    """
    sources = load_sources(cfg.dataset, data_dir or cfg.data_dir, cfg.test_per_class, cfg.seed)
    split = base_to_novel(len(sources.class_names), num_partitions, cfg.seed)
    own = split.client_classes[partition_id]
    label_map = {c: i for i, c in enumerate(split.base_classes)}
    train_idx = few_shot_indices(sources.train.labels, own, cfg.shots, seed=cfg.seed * 100_003 + partition_id)
    test_idx = indices_of_classes(sources.test.labels, own)
    return ClientData(
        class_names=[sources.class_names[c] for c in split.base_classes],
        train=LabeledDataset(sources.train, train_idx, train_transform(image_size, mean, std, cfg.crop_scale_min), label_map),
        test=LabeledDataset(sources.test, test_idx, test_transform(image_size, mean, std), label_map),
    )
