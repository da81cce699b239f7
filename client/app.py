"""The pFedMMA ClientApp.

Train: load the global shared projections, restore this client's private adapters, train
E local epochs with this client's own optimiser, store the private adapters, and reply
with the shared projections only. Evaluate: local test accuracy with the newest shared
projections and this client's private adapters.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from torch.utils.data import DataLoader, Dataset

from client.runtime import initial_private, model_fingerprint, pick_device, shard, shared_model
from client.state_store import PrivateStateStore
from client.trainer import evaluate, train
from common.arrays import from_record, to_record
from common.classify import PromptClassifier
from common.config import NodeConfig, RunConfig
from common.data.base import ClientData
from common.model import ClipBundle
from common.roles import Role, build_optimizer, load_role_state, role_state

log = logging.getLogger(__name__)

app = ClientApp()

PRIVATE_SOURCES = ("init", "context", "disk")


@dataclass
class ClientJob:
    """One message's worth of client work: config, model, data and private store."""

    cfg: RunConfig
    node: NodeConfig
    device: torch.device
    bundle: ClipBundle
    data: ClientData
    store: PrivateStateStore

    @classmethod
    def from_context(cls, context: Context, namespace: str = "") -> ClientJob:
        """``namespace`` names the private-state files; the server sends it with each message."""
        cfg = RunConfig.from_flower(context.run_config)
        node = NodeConfig.from_flower(context.node_config)
        device = pick_device()
        bundle = shared_model(cfg, device, node.cache_dir)
        data = shard(cfg, node.partition_id, node.num_partitions, node.data_dir, bundle)
        namespace = namespace or cfg.experiment_name or f"run-{context.run_id}"
        store = PrivateStateStore(
            context.state, node.resolved_state_dir(cfg), namespace, node.partition_id, model_fingerprint(cfg)
        )
        return cls(cfg, node, device, bundle, data, store)

    def load_adapters(self, shared: ArrayRecord) -> str:
        """Global shared tensors from the message, private ones from the store (or the init)."""
        load_role_state(self.bundle.model, Role.SHARED, from_record(shared))
        private, source = self.store.load()
        load_role_state(self.bundle.model, Role.PRIVATE, private if private is not None else initial_private(self.cfg))
        return source

    def loader(self, dataset: Dataset, shuffle: bool, server_round: int) -> DataLoader:
        generator = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + self.node.partition_id * 1009 + server_round)
        return DataLoader(
            dataset, batch_size=self.cfg.batch_size, shuffle=shuffle, generator=generator,
            pin_memory=self.device.type == "cuda",
        )

    def classifier(self, class_names: list[str]) -> PromptClassifier:
        return PromptClassifier(self.bundle.model, self.bundle.tokenizer, class_names, self.device)


def _shared_arrays(msg: Message) -> ArrayRecord:
    records = msg.content.array_records
    if len(records) != 1:
        raise ValueError(f"expected one ArrayRecord of shared tensors, got {sorted(records)}")
    return next(iter(records.values()))


def _config(msg: Message) -> dict:
    config = msg.content.config_records.get("config")
    return dict(config) if config else {}


def _round(msg: Message) -> int:
    return int(_config(msg).get("server-round", 0))


@app.train()
def train_handler(msg: Message, context: Context) -> Message:
    job = ClientJob.from_context(context, str(_config(msg).get("state-namespace", "")))
    source = job.load_adapters(_shared_arrays(msg))
    server_round = _round(msg)
    log.info("client %d round %d: private adapters from %s", job.node.partition_id, server_round, source)
    model = job.bundle.model
    optimizer = build_optimizer(model, job.cfg.learning_rate, job.cfg.momentum, job.cfg.weight_decay)
    loader = job.loader(job.data.train, shuffle=True, server_round=server_round)
    result = train(job.classifier(job.data.class_names), loader, optimizer, job.cfg.local_epochs, job.device, job.cfg.amp)
    job.store.save(role_state(model, Role.PRIVATE))
    # The reply is built from the shared role alone: private tensors never enter a Message.
    content = RecordDict(
        {
            "arrays": to_record(role_state(model, Role.SHARED)),
            "metrics": MetricRecord(
                {
                    "num-examples": result.num_examples,
                    "train-loss": result.loss,
                    "train-accuracy": result.accuracy,
                    "partition-id": job.node.partition_id,
                    "num-partitions": job.node.num_partitions,
                    # Where the private adapters came from (0 init, 1 context.state, 2 disk):
                    # lets the server see a restarted node resume rather than re-initialise.
                    "private-source": PRIVATE_SOURCES.index(source),
                }
            ),
        }
    )
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate_handler(msg: Message, context: Context) -> Message:
    """Local accuracy every time; Base/Novel when the server asks for the full protocol."""
    job = ClientJob.from_context(context, str(_config(msg).get("state-namespace", "")))
    job.load_adapters(_shared_arrays(msg))
    full = bool(_config(msg).get("full-eval", True))
    wanted = ("local", "val", "base", "novel") if full else ("local", "val")
    metrics = MetricRecord({"partition-id": job.node.partition_id})
    for name in wanted:
        if name not in job.data.evals:
            continue
        eval_set = job.data.evals[name]
        loader = job.loader(eval_set.dataset, shuffle=False, server_round=_round(msg))
        # A fresh classifier per set: text features come from this client's current adapters.
        result = evaluate(job.classifier(eval_set.class_names), loader, job.device, job.cfg.amp)
        metrics[f"{name}-accuracy"] = result.accuracy
        if name == "local":
            metrics["local-loss"] = result.loss
            metrics["num-examples"] = result.num_examples
    content = RecordDict({"metrics": metrics})
    if job.data.domain is not None:
        content["client"] = ConfigRecord({"domain": job.data.domain})
    return Message(content=content, reply_to=msg)
