"""Tensors by name <-> Flower ``ArrayRecord`` (never by position)."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from flwr.app import ArrayRecord


def to_record(state: Mapping[str, torch.Tensor]) -> ArrayRecord:
    return ArrayRecord({name: tensor.detach().cpu().contiguous() for name, tensor in state.items()})


def from_record(record: ArrayRecord) -> dict[str, torch.Tensor]:
    return {name: torch.from_numpy(array.numpy().copy()) for name, array in record.items()}
