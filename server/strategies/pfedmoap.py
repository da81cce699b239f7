"""pFedMoAP's server (Luo et al., ICLR 2025): FedAvg of the sampled clients' prompts, plus a
per-client choice of non-local prompt experts.

The server keeps every client's latest uploaded prompt (the "bank"). A sampled client is sent
the averaged prompt to start from and up to K - 1 other clients' latest prompts as experts:
the nearest to its own last upload by L2 distance, or a seeded random pick. A client that has
not uploaded yet gets none. For evaluation every client is sent its own latest prompt (the
global one until it has trained) and its experts. A client is never sent its own prompt as an
expert.

Messages are addressed to node ids, the bank is keyed by partition id: a node the server has not
heard from yet (a resumed run, a restarted node) is asked who it is with a query message first.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.common import MessageType
from flwr.serverapp import Grid

from common import protocol as wire
from common.config import RunConfig
from common.protocol import EXPERTS, identifier
from server.strategies.shared_fedavg import SharedFedAvg


def select_experts(client: int, bank: Mapping[int, np.ndarray], k: int, how: str, rng: np.random.Generator) -> list[int]:
    """Up to ``k - 1`` partition ids other than ``client`` whose prompts serve as its experts."""
    if client not in bank:
        return []
    others = sorted(p for p in bank if p != client)
    wanted = k - 1
    if len(others) <= wanted:
        return others
    if how == "nearest":
        distance = {p: float(np.linalg.norm(bank[p] - bank[client])) for p in others}
        return sorted(sorted(others, key=lambda p: (distance[p], p))[:wanted])
    if how == "random":
        return sorted(int(p) for p in rng.choice(others, size=wanted, replace=False))
    raise ValueError(f"pfedmoap-selection={how!r} is unknown; valid: nearest, random")


class PFedMoAPStrategy(SharedFedAvg):
    def __init__(self, *args, experts: int, selection: str, query_timeout: float = 600.0, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.query_timeout = query_timeout
        if len(self.shared_specs) != 1:
            raise ValueError(f"pFedMoAP shares exactly one prompt tensor, got {sorted(self.shared_specs)}")
        (self.prompt_key,) = self.shared_specs
        self.k, self.selection = experts, selection
        self.bank: dict[int, np.ndarray] = {}  # partition id -> its latest uploaded prompt
        self.sent_experts: dict[tuple[int, bool], dict[int, list[int]]] = {}  # (round, training) -> client -> experts

    @classmethod
    def from_config(cls, cfg: RunConfig, *args, **kwargs) -> PFedMoAPStrategy:
        return cls(
            *args, experts=cfg.pfedmoap_experts, selection=cfg.pfedmoap_selection,
            query_timeout=cfg.round_timeout, **{**cls.config_kwargs(cfg), **kwargs},
        )

    def identify(self, grid: Grid) -> None:
        """Learn the partition id of connected nodes not heard from, once there are experts to send."""
        unknown = [n for n in grid.get_node_ids() if n not in self.partition_of]
        if not unknown or not self.bank:
            return
        queries = [
            Message(RecordDict({wire.CONFIG: ConfigRecord(dict(self.client_config))}), dst_node_id=n, message_type=MessageType.QUERY)
            for n in unknown
        ]
        for reply in grid.send_and_receive(queries, timeout=self.query_timeout):
            metrics = None if reply.has_error() else reply.content.metric_records.get(wire.METRICS)
            client = None if metrics is None else identifier(metrics, wire.PARTITION_ID)
            if client is not None:
                self.partition_of[reply.metadata.src_node_id] = client

    def configure_train(self, server_round, arrays, config, grid):  # type: ignore[no-untyped-def]
        self.identify(grid)
        return super().configure_train(server_round, arrays, config, grid)

    def configure_evaluate(self, server_round, arrays, config, grid):  # type: ignore[no-untyped-def]
        self.identify(grid)
        return super().configure_evaluate(server_round, arrays, config, grid)

    def experts_for(self, client: int, server_round: int, training: bool) -> list[int]:
        rng = np.random.default_rng([self.seed, client, server_round, int(training)])
        return select_experts(client, self.bank, self.k, self.selection, rng)

    def personalise(self, msg: Message, server_round: int, training: bool) -> Message:
        client = self.partition_of.get(msg.metadata.dst_node_id)
        chosen = [] if client is None else self.experts_for(client, server_round, training)
        if client is not None:
            self.sent_experts.setdefault((server_round, training), {})[client] = chosen
        records = dict(msg.content.items())
        if not training and client in self.bank:  # evaluate the client's own latest prompt
            records[wire.SHARED] = ArrayRecord({self.prompt_key: Array(self.bank[client])})
        records[EXPERTS] = ArrayRecord({f"client-{p}": Array(self.bank[p]) for p in chosen})
        return Message(
            content=RecordDict(records), dst_node_id=msg.metadata.dst_node_id, message_type=msg.metadata.message_type
        )

    def record_accepted(self, server_round: int, accepted: list[Message]) -> None:
        super().record_accepted(server_round, accepted)
        for msg in accepted:
            client = self.partition_of.get(msg.metadata.src_node_id)
            if client is not None:
                self.bank[client] = msg.content.array_records[wire.SHARED][self.prompt_key].numpy().copy()

    def round_record(self, server_round: int) -> dict[str, object]:
        """Which experts each client was sent this round, for metrics.jsonl."""
        return {
            **super().round_record(server_round),
            "experts": {
                phase: {str(c): e for c, e in sorted(self.sent_experts.get((server_round, training), {}).items())}
                for phase, training in (("train", True), ("evaluate", False))
            }
        }

    def server_state(self) -> tuple[dict[str, np.ndarray], dict[str, str]]:
        arrays = {f"client-{p}": prompt for p, prompt in sorted(self.bank.items())}
        return arrays, {"partition-of-node": json.dumps({str(n): p for n, p in sorted(self.partition_of.items())})}

    def load_server_state(self, arrays: Mapping[str, np.ndarray], metadata: Mapping[str, str]) -> None:
        self.bank = {int(name.removeprefix("client-")): np.asarray(a) for name, a in arrays.items()}
        # Node ids survive a resume in deployments with SuperNode authentication; other nodes
        # are asked who they are (identify) before they are sent anything.
        self.partition_of.update({int(n): int(p) for n, p in json.loads(metadata.get("partition-of-node", "{}")).items()})
