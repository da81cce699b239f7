"""What the ClientApp does with a message, one for every method (``client.app`` registers it with
Flower and may hand it to a warm worker, ``client.warm``, which runs this same code).

Train: load the global shared tensors, restore this client's private tensors, train E local
epochs with this client's own optimiser on the method's loss, store the private tensors, and
reply with the shared tensors only. Evaluate: accuracy with the tensors the server sent and
this client's private ones. What is shared or private is the method's role table
(``common/methods``); nothing here depends on which method runs.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from torch.utils.data import DataLoader, Dataset

from client.guards import check_received, clip_for_dp
from client.runtime import initial_private, pick_device, shard, shared_model
from client.state_lock import exclusive
from client.state_store import PrivateStateStore
from client.trainer import class_features, evaluate, train
from common import protocol as wire
from common.arrays import from_record, to_record
from common.config import NodeConfig, RunConfig
from common.data.base import ClientData, EvalSet, SeededAugmentation
from common.data.eval_cache import cacheable, eval_batches, set_budgets
from common.device import (
    Precision,
    bound_gpu_share,
    configure_determinism,
    device_report,
    precision,
    reset_peak_memory,
)
from common.errors import PERMANENT_ERROR_CODE, PermanentError, is_disk_full, one_line
from common.methods import Method, StepInputs, method_for
from common.methods.classifiers import Classifier
from common.model.clip import ClipBundle
from common.model.roles import Role
from common.seeds import sub_seed

log = logging.getLogger(__name__)

# Independent random streams of one (seed, client, round): the loader's order, the method's
# own draws (dropout), the image augmentations.
STREAMS = {"shuffle": 0, "method": 1, "augment": 2}
AUTO_LOADER_WORKERS = 4  # with a GPU: decode and augment beside the training thread


@dataclass
class ClientJob:
    """One message's worth of client work: config, method, model, data and private store."""

    cfg: RunConfig
    node: NodeConfig
    method: Method
    device: torch.device
    bundle: ClipBundle
    data: ClientData
    store: PrivateStateStore
    precision: Precision
    skipped_images: int = 0  # image files of the shard left out under skip-corrupt

    @classmethod
    def from_context(cls, context: Context, namespace: str = "") -> ClientJob:
        """``namespace`` names the private-state files; the server sends it with each message."""
        cfg = RunConfig.from_flower(context.run_config)
        node = NodeConfig.from_flower(context.node_config)
        method = method_for(cfg)
        configure_determinism(cfg.deterministic)
        device = pick_device()
        bound_gpu_share(device)
        reset_peak_memory(device)
        bundle = shared_model(cfg, device, node.cache_dir)
        checked = shard(cfg, node.partition_id, node.num_partitions, node.data_dir, bundle)
        namespace = namespace or cfg.experiment_name or f"run-{context.run_id}"
        store = PrivateStateStore(node.resolved_state_dir(cfg), namespace, node.partition_id, method.fingerprint())
        chosen = precision(device, cfg.amp)
        return cls(cfg, node, method, device, bundle, checked.data, store, chosen, len(checked.skipped_files))

    def load_state(self, received: Mapping[str, torch.Tensor]) -> str:
        """Global shared tensors from the message (refused if non-finite or implausible), private
        ones from the store (or the init)."""
        roles, model = self.method.roles, self.bundle.model
        check_received(received, self.cfg.max_parameter_abs, "global shared tensor")
        roles.load(model, Role.SHARED, received)
        private, source = self.store.load()
        roles.load(model, Role.PRIVATE, private if private is not None else initial_private(self.cfg))
        return source

    def seed(self, server_round: int, stream: int) -> int:
        """An independent seed per (run seed, client, round, stream): no draw from a global RNG."""
        return sub_seed(self.cfg.seed, self.node.partition_id, server_round, stream)

    def loader(self, dataset: Dataset, shuffle: bool, server_round: int) -> DataLoader:
        """Batches decoded and augmented in ``loader-workers`` processes, into pinned memory on a
        GPU. The order comes from the seeded generator and each image's augmentation from its own
        seed (``SeededAugmentation``), so the batches are the same with any number of workers."""
        generator = torch.Generator().manual_seed(self.seed(server_round, STREAMS["shuffle"]))
        workers = self.loader_workers()
        return DataLoader(
            dataset, batch_size=self.cfg.batch_size, shuffle=shuffle, generator=generator,
            pin_memory=self.device.type == "cuda", num_workers=workers,
            prefetch_factor=4 if workers else None,
        )

    def loader_workers(self) -> int:
        if self.node.loader_workers >= 0:
            return self.node.loader_workers
        return min(AUTO_LOADER_WORKERS, os.cpu_count() or 1) if self.device.type == "cuda" else 0

    def device_record(self) -> ConfigRecord:
        return ConfigRecord(dict(device_report(self.device, self.precision, self.cfg.deterministic)))

    def eval_batches(self, dataset: Dataset, server_round: int) -> Iterable:
        """Test images decoded once per process and reused (``common.data.eval_cache``), in large
        no-grad batches; a dataset without the deterministic test transform goes through a loader."""
        if cacheable(dataset):
            node = self.node
            set_budgets(node.eval_cache_mb, node.eval_cache_gpu_mb, node.eval_cache_dir, node.eval_disk_cache_mb)
            return eval_batches(dataset, self.cfg.eval_batch_size)  # type: ignore[arg-type]
        return self.loader(dataset, shuffle=False, server_round=server_round)

    def classifier(self, class_names: list[str], inputs: StepInputs) -> Classifier:
        return self.method.classifier(self.bundle.model, self.bundle.tokenizer, class_names, self.device, inputs)


def _shared_arrays(msg: Message) -> ArrayRecord:
    records = msg.content.array_records
    if wire.SHARED not in records:
        raise ValueError(f"expected an ArrayRecord {wire.SHARED!r} of shared tensors, got {sorted(records)}")
    return records[wire.SHARED]


def _step_inputs(msg: Message, job: ClientJob, server_round: int) -> StepInputs:
    """The message's extra tensor records (only those the method expects) and a seeded generator."""
    extras = {name: record for name, record in msg.content.array_records.items() if name != wire.SHARED}
    unexpected = sorted(set(extras) - set(job.method.extra_records))
    if unexpected:
        raise ValueError(
            f"method {job.method.name!r} takes records {list(job.method.extra_records)} besides "
            f"{wire.SHARED!r}; the message also has {unexpected}"
        )
    generator = torch.Generator().manual_seed(job.seed(server_round, STREAMS["method"]))
    tensors = {name: from_record(record) for name, record in extras.items()}
    for name, record in tensors.items():
        check_received(record, job.cfg.max_parameter_abs, f"{name!r} tensor")
    return StepInputs(tensors, generator)


def _other_classes(eval_set: EvalSet, own: Iterable[int]) -> torch.Tensor:
    """Which examples of ``eval_set`` (in order) belong to classes outside ``own``."""
    labels = torch.as_tensor([eval_set.dataset.label(i) for i in range(len(eval_set.dataset))])
    return ~torch.isin(labels, torch.as_tensor(list(own), dtype=labels.dtype))


def permanent_errors_replied(handler: Callable[[Message, Context], Message]) -> Callable[[Message, Context], Message]:
    """Turn an error this client would repeat every round (bad config, missing or unreadable
    data, an unusable private state or checkpoint, a full disk) into an error reply the server
    reads as permanent, one line naming the client; other exceptions propagate to Flower,
    which reports them as (possibly transient) ClientApp failures."""

    @functools.wraps(handler)
    def wrapped(msg: Message, context: Context) -> Message:
        try:
            return handler(msg, context)
        except Exception as exc:
            if not isinstance(exc, PermanentError) and not is_disk_full(exc):
                raise
            partition = context.node_config.get(wire.PARTITION_ID)
            reason = f"client {partition}: {one_line(exc)}" if partition is not None else one_line(exc)
            log.error("%s (permanent: the server stops the run after this round)", reason)
            return Message(Error(code=PERMANENT_ERROR_CODE, reason=reason), reply_to=msg)

    return wrapped


@contextlib.contextmanager
def _one_writer(job: ClientJob, msg: Message, context: Context, final: bool) -> Iterator[None]:
    """This message's hold on the client's private-state namespace (none for a method with
    nothing private): a second run using the same namespace is refused (client.state_lock)."""
    if not initial_private(job.cfg):
        yield
        return
    owners = frozenset(int(r) for r in str(_config(msg).get(wire.STATE_OWNERS, "")).split(",") if r.strip().isdigit())
    with exclusive(job.store.lock_path, context.run_id, owners, 2 * job.cfg.round_timeout, release=final):
        yield


def _config(msg: Message) -> dict:
    config = msg.content.config_records.get(wire.CONFIG)
    return dict(config) if config else {}


def _round(msg: Message) -> int:
    return int(_config(msg).get(wire.SERVER_ROUND, 0))


@permanent_errors_replied
def train_handler(msg: Message, context: Context) -> Message:
    job = ClientJob.from_context(context, str(_config(msg).get(wire.STATE_NAMESPACE, "")))
    if not job.method.trains:
        raise ValueError(f"method {job.method.name!r} trains nothing; the server should not ask it to")
    with _one_writer(job, msg, context, final=False):
        return _train(job, msg)


def _train(job: ClientJob, msg: Message) -> Message:
    received = from_record(_shared_arrays(msg))
    source = job.load_state(received)
    server_round = _round(msg)
    log.info("client %d round %d: private state from %s", job.node.partition_id, server_round, source)
    model, roles = job.bundle.model, job.method.roles
    optimizer = job.method.optimizer(model)
    augmented = SeededAugmentation(job.data.train, job.seed(server_round, STREAMS["augment"]))
    loader = job.loader(augmented, shuffle=True, server_round=server_round)
    classifier = job.classifier(job.data.class_names, _step_inputs(msg, job, server_round))
    result = train(classifier, loader, optimizer, job.cfg.local_epochs, job.device, job.precision)
    job.store.save(roles.state(model, Role.PRIVATE))  # only if finite; else DivergedError, nothing sent
    shared = clip_for_dp(roles.state(model, Role.SHARED), received, _config(msg), job.cfg.dp)
    check_received(shared, float("inf"), "trained shared tensor")  # a NaN is never sent
    # The reply is built from the shared role alone: private tensors never enter a Message.
    content = RecordDict(
        {
            wire.SHARED: to_record(shared),
            wire.METRICS: MetricRecord(
                {
                    wire.NUM_EXAMPLES: result.num_examples,
                    wire.TRAIN_LOSS: result.loss,
                    wire.TRAIN_ACCURACY: result.accuracy,
                    wire.PARTITION_ID: job.node.partition_id,
                    wire.NUM_PARTITIONS: job.node.num_partitions,
                    # Where the private tensors came from (0 init, 1 context.state, 2 disk):
                    # lets the server see a restarted node resume rather than re-initialise.
                    wire.PRIVATE_SOURCE: wire.PRIVATE_SOURCES.index(source),
                    wire.SKIPPED_IMAGES: job.skipped_images,
                }
            ),
            wire.DEVICE: job.device_record(),
        }
    )
    return Message(content=content, reply_to=msg)


@permanent_errors_replied
def evaluate_handler(msg: Message, context: Context) -> Message:
    """Local accuracy every time; Base/Novel when the server asks for the full protocol."""
    job = ClientJob.from_context(context, str(_config(msg).get(wire.STATE_NAMESPACE, "")))
    with _one_writer(job, msg, context, final=_round(msg) >= job.cfg.num_server_rounds):
        return _evaluate(job, msg)


def _evaluate(job: ClientJob, msg: Message) -> Message:
    job.load_state(from_record(_shared_arrays(msg)))
    server_round = _round(msg)
    inputs = _step_inputs(msg, job, server_round)
    full = bool(_config(msg).get(wire.FULL_EVAL, True))
    wanted = ("local", "val", "base", "novel") if full else ("local", "val")
    metrics = MetricRecord(
        {wire.PARTITION_ID: job.node.partition_id, wire.NUM_PARTITIONS: job.node.num_partitions,
         wire.SKIPPED_IMAGES: job.skipped_images}
    )
    # One classifier and one set of text features per class list (Local, Val and Base share the
    # training classes), from this client's current state.
    classifiers: dict[tuple[str, ...], tuple[Classifier, Any]] = {}
    for name in wanted:
        if name not in job.data.evals:
            continue
        eval_set = job.data.evals[name]
        key = tuple(eval_set.class_names)
        if key not in classifiers:
            classifier = job.classifier(eval_set.class_names, inputs)
            classifiers[key] = (classifier, class_features(classifier, job.device, job.precision))
        classifier, text = classifiers[key]
        batches = job.eval_batches(eval_set.dataset, server_round)
        result = evaluate(classifier, batches, job.device, job.precision, text)
        metrics[wire.accuracy_key(name)] = result.accuracy
        if name == "base" and result.hits is not None:  # Base = own classes (Local) + other clients' classes
            other = _other_classes(eval_set, job.data.own_classes)
            if other.any():
                metrics[wire.accuracy_key("base-other")] = result.hits[other].float().mean().item()
        if name == "local":
            metrics[wire.LOCAL_LOSS] = result.loss
            metrics[wire.NUM_EXAMPLES] = result.num_examples
    content = RecordDict({wire.METRICS: metrics, wire.DEVICE: job.device_record()})
    if job.data.domain is not None:
        content[wire.CLIENT] = ConfigRecord({wire.DOMAIN: job.data.domain})
    return Message(content=content, reply_to=msg)


def query_handler(msg: Message, context: Context) -> Message:
    """Which client this node is: servers that address clients individually map node ids with it."""
    node = NodeConfig.from_flower(context.node_config)
    metrics = MetricRecord({wire.PARTITION_ID: node.partition_id, wire.NUM_PARTITIONS: node.num_partitions})
    return Message(content=RecordDict({wire.METRICS: metrics}), reply_to=msg)


HANDLERS = {"train": train_handler, "evaluate": evaluate_handler, "query": query_handler}


def handle(msg: Message, context: Context) -> Message:
    """The reply to ``msg``, by its message type (Flower's ``train``, ``evaluate``, ``query``)."""
    kind = msg.metadata.message_type.split(".")[0]
    if kind not in HANDLERS:
        raise ValueError(f"message type {msg.metadata.message_type!r}: this ClientApp handles {sorted(HANDLERS)}")
    return HANDLERS[kind](msg, context)
