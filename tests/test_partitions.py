"""Properties of the seeded partitions in common/data/partition.py: coverage, disjointness, shots, seeds."""

from __future__ import annotations

import json
import logging
from collections import Counter
from typing import Any

import numpy as np
import pytest
from PIL import Image

from common.data import partition as partition_module
from common.data.base import ImageSource
from common.data.partition import SCHEMES, Partition, Shortfall, make_partition
from common.data.shapes import ShapesSource


class Labels(ImageSource):
    """Labels (and optional domains) only: partitions never decode images."""

    def __init__(self, labels: np.ndarray, domains: np.ndarray | None = None) -> None:
        self.labels = np.asarray(labels)
        self.class_names = [str(c) for c in range(int(self.labels.max()) + 1)]
        self.domains = domains

    def image(self, index: int) -> Image.Image:
        raise NotImplementedError


def cifar_like(per_class: int = 100, num_classes: int = 10, seed: int = 0) -> Labels:
    return Labels(np.random.default_rng(seed).permutation(np.repeat(np.arange(num_classes), per_class)))


def make(scheme: str, train: ImageSource, test: ImageSource, n: int, seed: int = 0, **kw: Any) -> Partition:
    opts: dict[str, Any] = {"shots": None, "beta": 0.5, "classes_per_client": 2} | kw
    return make_partition(scheme, train, test, n, seed, **opts)


def all_train(p: Partition) -> list[int]:
    return [i for c in p.clients for i in c.train_indices]


def test_base_to_novel_disjoint_base_classes_and_exact_shots() -> None:
    train, test = Labels(np.repeat(np.arange(10), 20)), Labels(np.repeat(np.arange(10), 5))
    p = make("base-to-novel", train, test, 3, seed=1, shots=4)
    assert p.base_classes == [0, 1, 2, 3, 4] and p.novel_classes == [5, 6, 7, 8, 9]
    owned = [c for client in p.clients for c in client.classes]
    assert sorted(owned) == p.base_classes  # disjoint and covering the base classes
    for client in p.clients:
        assert client.class_counts == {c: 4 for c in client.classes}
        assert Counter(test.labels[client.test_indices].tolist()) == {c: 5 for c in client.classes}
    assert len(set(all_train(p))) == len(all_train(p))


def test_dirichlet_uses_every_index_once_and_test_follows_classes() -> None:
    train, test = cifar_like(100), cifar_like(10, seed=1)
    p = make("dirichlet", train, test, 8, seed=3, beta=0.3)
    assert sorted(all_train(p)) == list(range(len(train)))
    assert sum(sum(c.class_counts.values()) for c in p.clients) == len(train)
    for client in p.clients:
        assert len(client.train_indices) >= 1
        assert sorted(set(test.labels[client.test_indices].tolist())) == client.classes
        assert len(client.test_indices) == 10 * len(client.classes)


def test_dirichlet_small_beta_is_skewed() -> None:
    p = make("dirichlet", cifar_like(200), cifar_like(5), 10, beta=0.1)
    # Per-client label entropy far below uniform (log 10) on average.
    ent = [
        -sum(
            n / sum(c.class_counts.values()) * np.log(n / sum(c.class_counts.values())) for n in c.class_counts.values()
        )
        for c in p.clients
    ]
    assert np.mean(ent) < 0.6 * np.log(10)


def test_seed_reproducibility() -> None:
    train, test = (
        ShapesSource("train", 6, styles=("solid", "outline")),
        ShapesSource("test", 2, styles=("solid", "outline")),
    )
    for scheme, n in [("base-to-novel", 4), ("dirichlet", 5), ("pathological", 12), ("domain", 4)]:
        kw = {"shots": 3, "classes_per_client": 4}  # 12 clients x 4 classes cover the 48 shapes classes
        a, b = make(scheme, train, test, n, seed=7, **kw), make(scheme, train, test, n, seed=7, **kw)
        c = make(scheme, train, test, n, seed=8, **kw)
        assert a == b, scheme
        assert [x.train_indices for x in a.clients] != [x.train_indices for x in c.clients], scheme


def test_pathological_exactly_k_classes_every_class_used() -> None:
    train, test = cifar_like(30), cifar_like(4)
    for n, k in [(10, 2), (7, 3), (5, 2), (3, 10)]:
        p = make("pathological", train, test, n, seed=n, classes_per_client=k)
        assert all(len(c.classes) == k for c in p.clients)
        assert set().union(*(c.classes for c in p.clients)) == set(range(10))
        assert sorted(all_train(p)) == list(range(len(train)))
        # A class's images are split evenly over the clients holding it.
        for cls in range(10):
            shares = [c.class_counts[cls] for c in p.clients if cls in c.class_counts]
            assert max(shares) - min(shares) <= 1


def test_pathological_shots_cap() -> None:
    p = make("pathological", cifar_like(30), cifar_like(4), 5, classes_per_client=2, shots=3)
    assert all(c.class_counts == {k: 3 for k in c.classes} for c in p.clients)


def test_domain_covers_every_domain_with_own_test_images() -> None:
    styles = ("solid", "outline", "striped")
    train, test = ShapesSource("train", 4, styles=styles), ShapesSource("test", 2, styles=styles)
    p = make("domain", train, test, 6, seed=2, beta=0.5)
    assert [c.domain for c in p.clients] == ["solid", "solid", "outline", "outline", "striped", "striped"]
    assert sorted(all_train(p)) == list(range(len(train)))
    for c in p.clients:
        assert set(train.domains[c.train_indices]) == {c.domain}  # type: ignore[index]
        assert set(test.domains[c.test_indices]) == {c.domain}  # type: ignore[index]
        assert sorted(set(test.labels[c.test_indices].tolist())) == c.classes


def test_to_json_round_trips_and_table_prints() -> None:
    train, test = (
        ShapesSource("train", 4, styles=("solid", "outline")),
        ShapesSource("test", 2, styles=("solid", "outline")),
    )
    for scheme in SCHEMES:
        p = make(scheme, train, test, 4, shots=2, classes_per_client=12)
        data = json.loads(json.dumps(p.to_json()))
        assert data == p.to_json()
        assert Partition.from_json(data) == p
        assert data["clients"][0]["num_train"] == len(p.clients[0].train_indices)
        table = p.table()
        assert scheme in table and len(table.splitlines()) == 2 + len(p.clients)
    # Contiguous test blocks are stored as [start, stop) runs.
    bn = make("base-to-novel", train, test, 4, shots=2).to_json()
    assert any(isinstance(r, list) for r in bn["clients"][0]["test_indices"])


def test_write(tmp_path: object) -> None:
    from pathlib import Path

    p = make("dirichlet", cifar_like(20), cifar_like(2), 3)
    path = p.write(Path(str(tmp_path)) / "partition.json")
    assert Partition.from_json(json.loads(path.read_text())) == p


@pytest.mark.parametrize(
    ("scheme", "n", "kw", "match"),
    [
        ("iid", 2, {}, r"scheme='iid' is unknown; valid: \['base-to-novel', 'dirichlet', 'pathological', 'domain'\]"),
        ("dirichlet", 0, {}, "num_clients=0 must be at least 1"),
        ("dirichlet", 2, {"beta": 0.0}, "beta=0.0 must be > 0"),
        ("domain", 2, {"beta": -1.0}, "beta=-1.0 must be > 0"),
        ("dirichlet", 2, {"shots": 0}, "shots=0 must be a positive"),
        ("base-to-novel", 6, {}, "num-partitions=6 exceeds the 5 base classes"),
        ("dirichlet", 1001, {}, "num_clients=1001 exceeds the 1000 training images"),
        ("pathological", 5, {"classes_per_client": 0}, "classes_per_client=0 must be between 1 and the 10"),
        ("pathological", 5, {"classes_per_client": 11}, "classes_per_client=11 must be between 1 and the 10"),
        ("pathological", 3, {"classes_per_client": 3}, r"num_clients=3 x classes_per_client=3 < 10 classes"),
        ("domain", 2, {}, "needs per-image domains, but the train source has none"),
    ],
)
def test_errors(scheme: str, n: int, kw: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make(scheme, cifar_like(100), cifar_like(2), n, **kw)


def test_domain_count_must_divide_clients() -> None:
    styles = ("solid", "outline", "striped")
    train, test = ShapesSource("train", 2, styles=styles), ShapesSource("test", 1, styles=styles)
    with pytest.raises(ValueError, match=r"num_clients=4 must be a multiple of the 3 domains"):
        make("domain", train, test, 4)


def test_pathological_too_few_images_for_holders() -> None:
    with pytest.raises(ValueError, match="class .* has 1 training images for .* clients"):
        make("pathological", cifar_like(1), cifar_like(1), 10, classes_per_client=5)


def test_dirichlet_impossible_split_is_explained() -> None:
    with pytest.raises(ValueError, match="beta=0.01 over num_clients=40 left a client without"):
        make("dirichlet", cifar_like(5), cifar_like(1), 40, beta=0.01)


def test_shots_beyond_the_images_warn_and_the_record_shows_real_counts(caplog: pytest.LogCaptureFixture) -> None:
    # Class 0 has 3 training images, every other class 20; 4 shots per class asked for.
    labels = np.concatenate([np.zeros(3, dtype=np.int64), np.repeat(np.arange(1, 10), 20)])
    with caplog.at_level(logging.WARNING, logger=partition_module.__name__):
        p = make("base-to-novel", Labels(labels), Labels(np.repeat(np.arange(10), 2)), 5, seed=1, shots=4)
    holder = next(c for c in p.clients if 0 in c.classes)
    assert holder.class_counts[0] == 3
    assert p.shortfalls == [Shortfall(holder.client_id, 0, 4, 3)]
    assert "shots=4: 1 of 5 (client, class) pairs have fewer images (min 3); using what there is" in caplog.text
    data = p.to_json()
    assert data["shortfalls"] == [{"client_id": holder.client_id, "class": 0, "requested": 4, "available": 3}]
    assert data["clients"][holder.client_id]["train_per_class"] == "3"
    row = p.table().splitlines()[2 + holder.client_id].split()
    assert row[3:5] == ["3", "3"]  # #train and per-class: the real number, not the 4 asked for
    assert "1 of 5 (client, class) pairs have fewer images" in p.table().splitlines()[0]
    assert Partition.from_json(json.loads(json.dumps(data))) == p


def test_shots_within_the_images_do_not_warn(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger=partition_module.__name__):
        p = make("base-to-novel", cifar_like(20), cifar_like(2), 5, shots=4)
        unlimited = make("dirichlet", cifar_like(20), cifar_like(2), 3)
    assert caplog.text == "" and p.shortfalls == [] and unlimited.shortfalls == []
    assert "fewer" not in p.table() and p.to_json()["shortfalls"] == []
    assert all(row.split()[4] == "4" for row in p.table().splitlines()[2:])
