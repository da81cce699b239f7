"""Checks a client's reply before anything in it reaches the global state or the metrics.

Everything a client sends is untrusted. A training reply is accepted only if its arrays are
exactly the shared key set, with the global shapes and dtypes, finite and within
``max-parameter-abs``; its ``num-examples`` is an integer between 1 and the cap; every
number it reports is finite and every accuracy in [0, 1]; and its update (reply minus the
global state it was sent) is within the norm bound, or is clipped to it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from common import protocol as wire

DEFAULT_MAX_EXAMPLES = 1_000_000  # the cap when the server cannot read the partition


@dataclass(frozen=True)
class ReplyLimits:
    """What a client's reply may claim: see the module docstring and docs/robustness.md."""

    max_examples: int = DEFAULT_MAX_EXAMPLES
    max_abs: float = 1000.0  # largest |value| accepted in a tensor
    update_norm_bound: float = 0.0  # relative to the global state's norm; 0 = no bound
    update_norm_action: str = "reject"  # or "clip"


@dataclass(frozen=True)
class TensorSpec:
    shape: tuple[int, ...]
    dtype: str


def specs_of(arrays: Mapping[str, Array]) -> dict[str, TensorSpec]:
    return {name: TensorSpec(tuple(a.shape), a.dtype) for name, a in arrays.items()}


def metrics_problem(metrics: MetricRecord) -> str | None:
    """A reported number that is not finite, or an accuracy outside [0, 1]."""
    for key, value in metrics.items():
        values = value if isinstance(value, list) else [value]
        for v in values:
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                continue
            if not math.isfinite(v):
                return f"{key}={v!r}; expected a finite number"
            if key.endswith(wire.ACCURACY_SUFFIX) and not 0.0 <= v <= 1.0:
                return f"{key}={v!r}; expected an accuracy in [0, 1]"
    return None


# How much of a client's device report (common.device.device_report) is kept.
MAX_DEVICE_TEXT = 64
MAX_MEMORY_MB = 2.0**30  # a petabyte: anything larger is not a memory figure


def device_info(record: ConfigRecord | None) -> dict[str, str | float | bool]:
    """The known fields of a client's device report, bounded: short printable text, finite
    non-negative numbers; anything else is left out. Only ever recorded, never acted on."""
    if record is None:
        return {}
    info: dict[str, str | float | bool] = {}
    for key in wire.DEVICE_TEXT:
        value = record.get(key)
        if isinstance(value, str):
            info[key] = re.sub(r"[^\x20-\x7e]", "?", value[:MAX_DEVICE_TEXT])  # no newline can forge a log line
    for key in wire.DEVICE_NUMBERS:
        value = record.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and 0 <= value <= MAX_MEMORY_MB:
            info[key] = float(value)
    for key in wire.DEVICE_FLAGS:
        if isinstance(record.get(key), bool):
            info[key] = bool(record[key])
    return info


def count_problem(value: object, key: str, cap: int) -> str | None:
    """Why a reported example count is unusable: it must be an integer in [1, cap]."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return f"{key}={value!r}; expected an integer number of examples"
    if not math.isfinite(value) or value != int(value):
        return f"{key}={value!r}; expected an integer number of examples"
    if not 1 <= value <= cap:
        return f"{key}={value!r}; expected 1 to {cap} (max-examples)"
    return None


def _names(keys: Iterable[str]) -> str:
    """A client's record names as a bounded text: a few of them, each cut short."""
    return repr([str(k)[:40] for k in list(keys)[:3]])


def training_records(content: RecordDict) -> tuple[ArrayRecord, MetricRecord] | str:
    """The shared tensors and the metrics of a training reply, read by the contract's names
    (``common.protocol``): exactly one ArrayRecord named SHARED and one MetricRecord named METRICS;
    else why not."""
    if list(content.array_records) != [wire.SHARED]:
        return f"expected one ArrayRecord named {wire.SHARED!r}, got {_names(content.array_records)}"
    if list(content.metric_records) != [wire.METRICS]:
        return f"expected one MetricRecord named {wire.METRICS!r}, got {_names(content.metric_records)}"
    return content.array_records[wire.SHARED], content.metric_records[wire.METRICS]


def reply_problem(
    msg: Message, expected: Mapping[str, TensorSpec], weight_key: str = wire.NUM_EXAMPLES, limits: ReplyLimits | None = None
) -> str | None:
    """Why ``msg`` must not be aggregated, or None when it is valid (the update norm is checked
    separately, against the global state: :func:`update_norm`)."""
    limits = limits or ReplyLimits()
    if msg.has_error():
        return f"error reply: {msg.error.reason}"
    records = training_records(msg.content)
    if isinstance(records, str):
        return records
    arrays, metrics = records
    problem = count_problem(metrics.get(weight_key), weight_key, limits.max_examples) or metrics_problem(metrics)
    if problem:
        return problem
    return state_problem(arrays, expected, limits.max_abs)


def state_problem(arrays: ArrayRecord, expected: Mapping[str, TensorSpec], max_abs: float) -> str | None:
    """Why a set of shared tensors is unusable: other keys, shapes or dtypes than ``expected``,
    a NaN or Inf, or a value above ``max_abs`` in size."""
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
        values = array.numpy()
        if not np.isfinite(values).all():
            return f"{name}: contains NaN or Inf"
        if values.size and float(np.abs(values).max()) > max_abs:
            return f"{name}: |value| up to {float(np.abs(values).max()):.3g}, above max-parameter-abs={max_abs:g}"
    return None


def state_norm(arrays: Mapping[str, np.ndarray]) -> float:
    """L2 norm of all tensors of a state, flattened together (float64: float32 overflows on
    squares of large values)."""
    return math.sqrt(sum(float(np.sum(np.square(a, dtype=np.float64))) for a in arrays.values()))


def update_norm(reply: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray]) -> float:
    """||reply - reference||_2 over the whole shared state."""
    return state_norm({k: reply[k].astype(np.float64) - reference[k].astype(np.float64) for k in reference})


def clip_update(reply: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray], bound: float) -> dict[str, np.ndarray]:
    """``reply`` moved back towards ``reference`` so that its update's norm is at most ``bound``."""
    norm = update_norm(reply, reference)
    scale = 1.0 if norm <= bound else bound / norm
    return {
        k: (reference[k].astype(np.float64) + scale * (reply[k].astype(np.float64) - reference[k].astype(np.float64))).astype(reply[k].dtype)
        for k in reference
    }


def reply_bytes(msg: Message) -> int:
    """Bytes of array payload a reply carried (zero for error replies)."""
    if msg.has_error():
        return 0
    return sum(record.count_bytes() for record in msg.content.array_records.values())
