"""Build real Flower Messages and Contexts for calling the ClientApp directly."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import torch
from flwr.app import ConfigRecord, Context, Message, Metadata, RecordDict
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

from common.arrays import to_record

RUN_ID = 42


def instruction(shared: Mapping[str, torch.Tensor], message_type: str, server_round: int, node_id: int) -> Message:
    content = RecordDict(
        {"arrays": to_record(shared), "config": ConfigRecord({"server-round": server_round})}
    )
    metadata = Metadata(
        run_id=RUN_ID,
        message_id=f"{message_type}-{server_round}-{node_id}",
        src_node_id=1,
        dst_node_id=node_id,
        reply_to_message_id="",
        group_id=str(server_round),
        created_at=time.time(),
        ttl=3600.0,
        message_type=message_type,
    )
    return Message(content=content, metadata=metadata)


def context(run_config: Mapping[str, Any], partition_id: int, num_partitions: int = 3, state: RecordDict | None = None) -> Context:
    return Context(
        run_id=RUN_ID,
        node_id=100 + partition_id,
        node_config={"partition-id": partition_id, "num-partitions": num_partitions},
        state=state if state is not None else RecordDict(),
        run_config=dict(run_config),
    )


def wire_bytes(msg: Message) -> bytes:
    """Everything a message puts on the wire: each nested object as Flower serialises it."""
    return b"".join(obj.deflate() for obj in get_all_nested_objects(msg).values())


def private_on_disk(run_config: Mapping[str, Any], partition_id: int) -> dict[str, torch.Tensor]:
    """What the ClientApp stored as ``partition_id``'s private tensors (the only place it keeps them)."""
    from pathlib import Path

    from client.state_store import PrivateStateStore
    from common.config import RunConfig
    from common.methods import method_for

    cfg = RunConfig.from_flower(run_config)
    store = PrivateStateStore(Path(cfg.state_dir), cfg.experiment_name or f"run-{RUN_ID}", partition_id, method_for(cfg).fingerprint())
    tensors, source = store.load()
    assert tensors is not None and source == "disk", f"client {partition_id} has no private state on disk"
    return tensors
