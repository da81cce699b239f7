"""Seeded, reproducible partitions of a dataset over clients (docs/paper.md §3): computed, printed, saved.

Four schemes, all pure functions of (labels, domains, num_clients, seed, options):

* ``base-to-novel``: label shift of the CoOp family. The base classes (first ceil(C/2)) are
  shuffled and dealt to clients in disjoint chunks (:func:`base_to_novel`), each client takes
  ``shots`` training images of each of its classes (all of them when a class has fewer: the
  partition records the real counts and :func:`make_partition` logs the shortfall).
* ``dirichlet``: label skew (CIFAR). Each class is spread over the clients by Dir(beta),
  through flwr-datasets' ``DirichletPartitioner`` so the split matches Flower's baselines.
* ``pathological``: every client holds exactly ``classes_per_client`` classes.
* ``domain``: feature + label shift (DomainNet, Office-Caltech10). Clients are assigned to
  domains in contiguous blocks; each domain is split over its clients by Dir(beta).

A client's local test set is always *all* test images of the classes it holds (of its domain,
for ``domain``): test sets are small and shared between clients holding the same class, which
keeps local accuracies comparable and avoids a second random draw.
"""

from __future__ import annotations

import json
import logging
import math
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from common.data.base import ImageSource
from common.seeds import sub_seed

logger = logging.getLogger(__name__)

SCHEMES = ("base-to-novel", "dirichlet", "pathological", "domain")
# A client with no training image cannot train nor carry a FedAvg weight, so Dirichlet draws that
# leave one empty are redrawn (flwr-datasets retries up to 10 times). 1 rather than Flower's
# default 10: with small beta and many clients (CIFAR-10, beta 0.1, 100 clients) the smallest
# client legitimately holds a handful of images.
MIN_PARTITION_SIZE = 1


@dataclass
class ClientPartition:
    """One client's shard: indices into the train and test sources."""

    client_id: int
    train_indices: list[int]
    test_indices: list[int]
    classes: list[int]  # classes with at least one training image, sorted
    class_counts: dict[int, int]  # training images per class
    domain: str | None = None

    def per_class(self) -> str:
        """The real training images per class: ``"16"``, or ``"3-16"`` when classes differ."""
        if not self.class_counts:
            return "0"
        low, high = min(self.class_counts.values()), max(self.class_counts.values())
        return str(low) if low == high else f"{low}-{high}"


@dataclass(frozen=True)
class Shortfall:
    """A (client, class) pair holding fewer training images than the ``shots`` asked for."""

    client_id: int
    label: int
    requested: int
    available: int


@dataclass
class Partition:
    """All clients' shards plus what produced them; ``to_json`` is saved in the run directory."""

    scheme: str
    seed: int
    clients: list[ClientPartition]
    base_classes: list[int] | None = None  # base-to-novel only
    novel_classes: list[int] | None = None
    params: dict[str, Any] = field(default_factory=dict)  # shots (as asked), beta, classes-per-client

    @property
    def shortfalls(self) -> list[Shortfall]:
        """Every (client, class) pair with fewer training images than ``params["shots"]``.

        Derived from the real counts rather than stored, so a partition read back from JSON
        (where it is also written, for a reader's benefit) cannot disagree with its counts.
        """
        shots = self.params.get("shots")
        if shots is None:
            return []
        return [
            Shortfall(c.client_id, label, shots, n)
            for c in self.clients
            for label, n in sorted(c.class_counts.items())
            if n < shots
        ]

    def shortfall_summary(self) -> str | None:
        """One line on the pairs short of ``shots`` (None when there are none)."""
        short = self.shortfalls
        if not short:
            return None
        pairs = sum(len(c.class_counts) for c in self.clients)
        fewest = min(s.available for s in short)
        return (
            f"shots={self.params['shots']}: {len(short)} of {pairs} (client, class) pairs have fewer images "
            f"(min {fewest}); using what there is"
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "scheme": self.scheme,
            "seed": self.seed,
            "params": dict(self.params),  # as asked; the real counts are per client below
            "num_clients": len(self.clients),
            "base_classes": self.base_classes,
            "novel_classes": self.novel_classes,
            "shortfalls": [
                {"client_id": s.client_id, "class": s.label, "requested": s.requested, "available": s.available}
                for s in self.shortfalls
            ],
            "clients": [
                {
                    "client_id": c.client_id,
                    "domain": c.domain,
                    "classes": c.classes,
                    "class_counts": {str(k): v for k, v in sorted(c.class_counts.items())},
                    "train_per_class": c.per_class(),
                    "num_train": len(c.train_indices),
                    "num_test": len(c.test_indices),
                    "train_indices": _runs(c.train_indices),
                    "test_indices": _runs(c.test_indices),
                }
                for c in self.clients
            ],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Partition:
        clients = [
            ClientPartition(
                client_id=int(c["client_id"]),
                train_indices=_unruns(c["train_indices"]),
                test_indices=_unruns(c["test_indices"]),
                classes=[int(k) for k in c["classes"]],
                class_counts={int(k): int(v) for k, v in c["class_counts"].items()},
                domain=c["domain"],
            )
            for c in data["clients"]
        ]
        return cls(
            data["scheme"], int(data["seed"]), clients, data["base_classes"], data["novel_classes"], data["params"]
        )

    def write(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_json(), separators=(",", ":")) + "\n")
        return path

    def table(self, preview: int = 8) -> str:
        """A human-readable summary, one row per client, for the start-up log."""
        rows = [("client", "domain", "#classes", "#train", "per-class", "#test", "classes")]
        for c in self.clients:
            shown = ",".join(map(str, c.classes[:preview])) + (",..." if len(c.classes) > preview else "")
            rows.append(
                (
                    str(c.client_id),
                    c.domain or "-",
                    str(len(c.classes)),
                    str(len(c.train_indices)),
                    c.per_class(),
                    str(len(c.test_indices)),
                    shown,
                )
            )
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
        lines = ["  ".join(v.rjust(w) for v, w in zip(r[:-1], widths, strict=True)) + "  " + r[-1] for r in rows]
        params = " ".join(f"{k}={v}" for k, v in self.params.items())
        total = sum(len(c.train_indices) for c in self.clients)
        head = f"partition scheme={self.scheme} seed={self.seed} {params} clients={len(self.clients)} train={total}"
        if self.base_classes is not None:
            head += f" base={len(self.base_classes)} novel={len(self.novel_classes or [])}"
        short = self.shortfall_summary()
        if short:
            # On the header line, so the table keeps one line per client plus the column names.
            head += f" [{short}; per-class shows the real counts]"
        return "\n".join([head, *lines])


@dataclass(frozen=True)
class BaseNovelPartition:
    """Base and novel classes: by default the first ceil(C/2) labels are base, the rest novel;
    a dataset may name its own base classes (shapes: held-out compositions).

    Base classes are shuffled with the seed and dealt to clients in disjoint contiguous
    chunks (the paper's pathological split); ``client_classes[i]`` is client i's chunk.
    """

    base_classes: list[int]
    novel_classes: list[int]
    client_classes: list[list[int]]


def base_to_novel(
    num_classes: int, num_clients: int, seed: int, base_classes: Sequence[int] | None = None
) -> BaseNovelPartition:
    base = sorted(base_classes) if base_classes is not None else list(range(math.ceil(num_classes / 2)))
    num_base = len(base)
    if num_clients > num_base:
        raise ValueError(
            f"num-partitions={num_clients} exceeds the {num_base} base classes; "
            "every client needs at least one class of its own"
        )
    shuffled = np.random.default_rng(seed).permutation(base).tolist()
    chunks = np.array_split(np.array(shuffled), num_clients)
    return BaseNovelPartition(
        base_classes=base,
        novel_classes=sorted(set(range(num_classes)) - set(base)),
        client_classes=[sorted(int(c) for c in chunk) for chunk in chunks],
    )


def few_shot_indices(labels: np.ndarray, classes: Sequence[int], shots: int, seed: int) -> list[int]:
    """``shots`` indices of each class in ``classes`` (all of them when fewer exist)."""
    rng = np.random.default_rng(seed)
    chosen: list[int] = []
    for c in classes:
        pool = np.flatnonzero(labels == c)
        if len(pool) == 0:
            raise ValueError(f"class {c} has no images in this split")
        chosen.extend(sorted(rng.choice(pool, size=min(shots, len(pool)), replace=False).tolist()))
    return chosen


def indices_of_classes(labels: np.ndarray, classes: Sequence[int]) -> list[int]:
    return np.flatnonzero(np.isin(labels, list(classes))).tolist()


def _runs(indices: Sequence[int]) -> list[int | list[int]]:
    """Sorted indices as runs: a lone index stays an int, a run is ``[start, stop)``.

    Test sets and whole classes are contiguous in most sources, so this is far shorter than the
    plain list, and never longer.
    """
    out: list[int | list[int]] = []
    values = sorted(indices)
    i = 0
    while i < len(values):
        j = i
        while j + 1 < len(values) and values[j + 1] == values[j] + 1:
            j += 1
        out.append(values[i] if i == j else [values[i], values[j] + 1])
        i = j + 1
    return out


def _unruns(runs: Iterable[int | list[int]]) -> list[int]:
    out: list[int] = []
    for r in runs:
        out.extend([r] if isinstance(r, int) else range(r[0], r[1]))
    return out


def _client(
    client_id: int, train_labels: np.ndarray, train: Iterable[int], test: Iterable[int], domain: str | None = None
) -> ClientPartition:
    train_sorted = sorted(int(i) for i in train)
    labels, counts = np.unique(train_labels[train_sorted], return_counts=True)
    counts_by_class = {int(c): int(n) for c, n in zip(labels, counts, strict=True)}
    return ClientPartition(
        client_id, train_sorted, sorted(int(i) for i in test), sorted(counts_by_class), counts_by_class, domain
    )


def _cap(labels: np.ndarray, indices: Sequence[int], shots: int | None, seed: int) -> list[int]:
    """At most ``shots`` of ``indices`` per class (seeded); all of them when ``shots`` is None."""
    if shots is None:
        return list(indices)
    idx = np.asarray(indices, dtype=np.int64)
    sub = few_shot_indices(labels[idx], np.unique(labels[idx]).tolist(), shots, seed)
    return idx[sub].tolist()


def _dirichlet(labels: np.ndarray, num_clients: int, beta: float, seed: int) -> list[list[int]]:
    """Per-class Dir(beta) split of ``range(len(labels))`` over clients, by flwr-datasets."""
    if num_clients > len(labels):
        raise ValueError(f"num_clients={num_clients} exceeds the {len(labels)} training images to split")
    # Imported here: datasets + flwr-datasets (and matplotlib through its visualisation module)
    # cost seconds at import, and only the Dirichlet partition needs them.
    import datasets  # type: ignore[import-untyped]
    from flwr_datasets.partitioner import DirichletPartitioner  # type: ignore[import-untyped]

    ds = datasets.Dataset.from_dict({"label": labels.tolist(), "idx": list(range(len(labels)))})
    partitioner = DirichletPartitioner(
        num_partitions=num_clients,
        partition_by="label",
        alpha=float(beta),
        min_partition_size=MIN_PARTITION_SIZE,
        self_balancing=False,
        seed=seed,
    )
    partitioner.dataset = ds
    try:
        with warnings.catch_warnings():
            # flwr-datasets warns on each redraw; the final failure is reported below instead.
            warnings.simplefilter("ignore", UserWarning)
            return [list(partitioner.load_partition(i)["idx"]) for i in range(num_clients)]
    except ValueError as e:
        raise ValueError(
            f"Dirichlet split with beta={beta} over num_clients={num_clients} left a client without "
            f"training images in 11 draws ({len(labels)} images); raise beta or lower num_clients ({e})"
        ) from e


def _deal_classes(num_classes: int, num_clients: int, k: int, seed: int) -> list[list[int]]:
    """Each client gets k distinct classes: contiguous windows of a cycled, shuffled class list.

    Windows of length k <= C of a cycle never repeat a class, and cycling through the whole
    permutation before reusing a class spreads classes evenly (each held by floor or ceil of
    num_clients * k / C clients).
    """
    order = np.random.default_rng(seed).permutation(num_classes).tolist()
    return [sorted(order[(i * k + j) % num_classes] for j in range(k)) for i in range(num_clients)]


def _warn_shortfalls(partition: Partition) -> Partition:
    """Log the (client, class) pairs short of ``shots`` once. Only where each client is promised
    ``shots`` per class (base-to-novel, pathological): under Dirichlet skew a client holding few
    images of a class is the point; the table and partition.json give the real counts anyway."""
    short = partition.shortfall_summary()
    if short:
        logger.warning("%s", short)
    return partition


def make_partition(
    scheme: str,
    train: ImageSource,
    test: ImageSource,
    num_clients: int,
    seed: int,
    *,
    shots: int | None,
    beta: float,
    classes_per_client: int,
    base_classes: Sequence[int] | None = None,
) -> Partition:
    """Split ``train`` (and ``test`` accordingly) over ``num_clients`` clients.

    ``shots`` caps the training images per class per client in every scheme (None: no cap);
    ``beta`` is used by ``dirichlet`` and ``domain``, ``classes_per_client`` by ``pathological``,
    ``base_classes`` (None: the first half of the labels) by ``base-to-novel``.
    Without a cap, ``dirichlet``, ``pathological`` and ``domain`` assign every training image to
    exactly one client. A (client, class) pair with fewer images than ``shots`` keeps all it has;
    such pairs are logged once here and listed in :attr:`Partition.shortfalls`.
    """
    if scheme not in SCHEMES:
        raise ValueError(f"partition scheme={scheme!r} is unknown; valid: {list(SCHEMES)}")
    if num_clients < 1:
        raise ValueError(f"num_clients={num_clients} must be at least 1")
    if shots is not None and shots <= 0:
        raise ValueError(f"shots={shots} must be a positive number of images per class, or None for all")
    if scheme in ("dirichlet", "domain") and not beta > 0:
        raise ValueError(f"beta={beta} must be > 0 (Dirichlet concentration; 0.1-0.5 in the paper)")
    labels = np.asarray(train.labels)
    test_labels = np.asarray(test.labels)
    num_classes = len(train.class_names) if getattr(train, "class_names", None) else int(labels.max()) + 1
    params: dict[str, Any] = {"shots": shots}

    if scheme == "base-to-novel":
        split = base_to_novel(num_classes, num_clients, seed, base_classes)
        clients = []
        for i, own in enumerate(split.client_classes):
            # Same per-client seed as common.data.federated.client_data, so both agree.
            train_idx = (
                indices_of_classes(labels, own)
                if shots is None
                else few_shot_indices(labels, own, shots, seed=seed * 100_003 + i)
            )
            clients.append(_client(i, labels, train_idx, indices_of_classes(test_labels, own)))
        return _warn_shortfalls(Partition(scheme, seed, clients, split.base_classes, split.novel_classes, params))

    if scheme == "dirichlet":
        params["beta"] = beta
        shards = _dirichlet(labels, num_clients, beta, seed)
        clients = []
        for i, shard in enumerate(shards):
            shard = _cap(labels, shard, shots, sub_seed(seed, i))
            own = np.unique(labels[shard]).tolist()
            clients.append(_client(i, labels, shard, indices_of_classes(test_labels, own)))
        return Partition(scheme, seed, clients, params=params)

    if scheme == "pathological":
        k = classes_per_client
        params["classes_per_client"] = k
        if not 1 <= k <= num_classes:
            raise ValueError(f"classes_per_client={k} must be between 1 and the {num_classes} classes")
        if num_clients * k < num_classes:
            raise ValueError(
                f"num_clients={num_clients} x classes_per_client={k} < {num_classes} classes; "
                "every class must be held by some client"
            )
        dealt = _deal_classes(num_classes, num_clients, k, seed)
        holders: dict[int, list[int]] = {c: [i for i, cs in enumerate(dealt) if c in cs] for c in range(num_classes)}
        parts: list[list[int]] = [[] for _ in range(num_clients)]
        rng = np.random.default_rng(sub_seed(seed, 1))
        for c in range(num_classes):
            pool = rng.permutation(np.flatnonzero(labels == c))
            if len(pool) < len(holders[c]):
                raise ValueError(
                    f"class {c} has {len(pool)} training images for {len(holders[c])} clients "
                    f"(num_clients={num_clients}, classes_per_client={k}); lower either"
                )
            for i, part in zip(holders[c], np.array_split(pool, len(holders[c])), strict=True):
                parts[i].extend(_cap(labels, part.tolist(), shots, sub_seed(seed, i, c)))
        clients = [_client(i, labels, s, indices_of_classes(test_labels, dealt[i])) for i, s in enumerate(parts)]
        return _warn_shortfalls(Partition(scheme, seed, clients, params=params))

    # scheme == "domain"
    params["beta"] = beta
    if train.domains is None or test.domains is None:
        which = "train" if train.domains is None else "test"
        raise ValueError(f"partition scheme='domain' needs per-image domains, but the {which} source has none")
    train_domains, test_domains = np.asarray(train.domains), np.asarray(test.domains)
    # Domains in order of first appearance, so the client -> domain map follows the source's order.
    names, first = np.unique(train_domains, return_index=True)
    domains = [str(names[j]) for j in np.argsort(first)]
    missing = sorted(set(domains) - set(test_domains.tolist()))
    if missing:
        raise ValueError(f"domains {missing} have training images but no test images")
    if num_clients % len(domains):
        raise ValueError(f"num_clients={num_clients} must be a multiple of the {len(domains)} domains {domains}")
    per_domain = num_clients // len(domains)
    clients = []
    for d, name in enumerate(domains):
        in_domain = np.flatnonzero(train_domains == name)
        for j, local in enumerate(_dirichlet(labels[in_domain], per_domain, beta, sub_seed(seed, d))):
            i = d * per_domain + j
            shard = _cap(labels, in_domain[local].tolist(), shots, sub_seed(seed, i))
            own = np.unique(labels[shard]).tolist()
            test_idx = np.flatnonzero((test_domains == name) & np.isin(test_labels, own)).tolist()
            clients.append(_client(i, labels, shard, test_idx, domain=name))
    return Partition(scheme, seed, clients, params=params)
