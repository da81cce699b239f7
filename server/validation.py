"""Checks a client's training reply before its tensors may be averaged.

A reply is accepted only if its arrays are exactly the shared key set, with the global
shapes and dtypes, all finite, and it reports a positive ``num-examples``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from flwr.app import Array, Message


@dataclass(frozen=True)
class TensorSpec:
    shape: tuple[int, ...]
    dtype: str


def specs_of(arrays: Mapping[str, Array]) -> dict[str, TensorSpec]:
    return {name: TensorSpec(tuple(a.shape), a.dtype) for name, a in arrays.items()}


def reply_problem(msg: Message, expected: Mapping[str, TensorSpec], weight_key: str = "num-examples") -> str | None:
    """Why ``msg`` must not be aggregated, or None when it is valid."""
    if msg.has_error():
        return f"error reply: {msg.error.reason}"
    content = msg.content
    if len(content.array_records) != 1:
        return f"expected exactly one ArrayRecord, got {len(content.array_records)}"
    if len(content.metric_records) != 1:
        return f"expected exactly one MetricRecord, got {len(content.metric_records)}"
    arrays = next(iter(content.array_records.values()))
    metrics = next(iter(content.metric_records.values()))
    weight = metrics.get(weight_key)
    if not isinstance(weight, (int, float)) or isinstance(weight, bool) or not weight > 0:
        return f"{weight_key}={weight!r}; expected a positive number"
    extra, missing = sorted(set(arrays) - set(expected)), sorted(set(expected) - set(arrays))
    if extra:
        return f"unexpected keys (not shared tensors): {extra}"
    if missing:
        return f"missing shared keys: {missing}"
    for name, spec in expected.items():
        array = arrays[name]
        if tuple(array.shape) != spec.shape:
            return f"{name}: shape {tuple(array.shape)}, expected {spec.shape}"
        if array.dtype != spec.dtype:
            return f"{name}: dtype {array.dtype}, expected {spec.dtype}"
        if not np.isfinite(array.numpy()).all():
            return f"{name}: contains NaN or Inf"
    return None


def reply_bytes(msg: Message) -> int:
    """Bytes of array payload a reply carried (zero for error replies)."""
    if msg.has_error():
        return 0
    return sum(record.count_bytes() for record in msg.content.array_records.values())
