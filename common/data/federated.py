"""A client's shard: what it trains on, what it is evaluated on, and with which classes.

The same seeded partition is computed on every node (and on the server, for the record)
from the dataset's labels alone, so no node needs anyone else's images.
"""

from __future__ import annotations

from functools import lru_cache

from common.config import RunConfig
from common.data.base import ClientData, EvalSet, ImageSource, LabeledDataset, SplitSources
from common.data.partition import Partition, indices_of_classes, make_partition
from common.data.registry import load_dataset, resolve_domains
from common.transforms import Stats, test_transform, train_transform


@lru_cache(maxsize=4)
def load_sources(dataset: str, data_dir: str, domains: tuple[str, ...], test_per_class: int, seed: int) -> SplitSources:
    """``domains`` as `dataset-domains` gives them: empty means the dataset's default."""
    domains = resolve_domains(dataset, domains)
    if dataset == "shapes":
        train_per_class = max(64, 2 * test_per_class)
        return load_dataset("shapes", styles=domains, train_per_class=train_per_class, test_per_class=test_per_class, seed=seed)
    return load_dataset(dataset, data_dir, **({"domains": list(domains)} if domains else {}))


def sources_for(cfg: RunConfig, data_dir: str = "") -> SplitSources:
    return load_sources(cfg.dataset, data_dir or cfg.data_dir, cfg.domains, cfg.test_per_class, cfg.seed)


@lru_cache(maxsize=4)
def _partition(cfg: RunConfig, num_clients: int, data_dir: str) -> Partition:
    sources = sources_for(cfg, data_dir)
    return make_partition(
        cfg.partition, sources.train, sources.test, num_clients, cfg.seed,
        shots=cfg.shots or None, beta=cfg.dirichlet_beta, classes_per_client=cfg.classes_per_client,
        base_classes=sources.base_classes,
    )


def partition_for(cfg: RunConfig, num_clients: int, data_dir: str = "") -> Partition:
    return _partition(cfg, num_clients, data_dir)


def _view(source: ImageSource, indices: list[int], classes: list[int], transform) -> EvalSet:
    label_map = {c: i for i, c in enumerate(classes)}
    names = [source.class_names[c] for c in classes]
    return EvalSet(LabeledDataset(source, indices, transform, label_map), names)


def _validation(sources: SplitSources, asked_by: str) -> ImageSource:
    if sources.val is None:
        raise ValueError(f"{asked_by} needs a validation split; dataset {sources.name!r} has none")
    return sources.val


def _own_indices(source: ImageSource, classes: list[int], domain: str | None) -> list[int]:
    """The images of ``source`` in the client's classes (and its domain, under feature shift)."""
    own = set(classes)
    chosen = [i for i, label in enumerate(source.labels) if int(label) in own]
    if domain is not None and source.domains is not None:
        chosen = [i for i in chosen if source.domains[i] == domain]
    return chosen


def client_data(
    cfg: RunConfig, partition_id: int, num_partitions: int, image_size: int, mean: Stats, std: Stats, data_dir: str = ""
) -> ClientData:
    """Client ``partition_id``'s training set and evaluation sets.

    Base-to-novel: the classifier covers all base classes; Local = test images of the
    client's own classes; Base = every base-class test image; Novel = every novel-class
    test image, classified among the novel class names. Other partitions: the classifier
    covers every class and only Local (and Val) are defined.
    """
    sources = sources_for(cfg, data_dir)
    partition = partition_for(cfg, num_partitions, data_dir)
    mine = partition.clients[partition_id]
    test_tf = test_transform(image_size, mean, std)
    train_tf = train_transform(image_size, mean, std, cfg.crop_scale_min)
    if partition.base_classes is not None:  # base-to-novel
        classes = list(partition.base_classes)
    else:
        classes = list(range(len(sources.class_names)))
    train = _view(sources.train, mine.train_indices, classes, train_tf).dataset
    measured = sources.test if cfg.eval_split == "test" else _validation(sources, "eval-split='val'")
    local = mine.test_indices if measured is sources.test else _own_indices(measured, mine.classes, mine.domain)
    evals = {"local": _view(measured, local, classes, test_tf)}
    if partition.base_classes is not None and partition.novel_classes is not None:
        evals["base"] = _view(measured, indices_of_classes(measured.labels, partition.base_classes), classes, test_tf)
        novel = list(partition.novel_classes)
        evals["novel"] = _view(measured, indices_of_classes(measured.labels, novel), novel, test_tf)
    if cfg.model_selection == "val":
        val = _validation(sources, "model-selection='val'")
        evals["val"] = _view(val, _own_indices(val, mine.classes, mine.domain), classes, test_tf)
    position = {c: i for i, c in enumerate(classes)}
    return ClientData(
        class_names=[sources.class_names[c] for c in classes], train=train, evals=evals, domain=mine.domain,
        own_classes=tuple(position[c] for c in mine.classes),
    )
