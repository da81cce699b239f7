"""The wire contract between the ServerApp and the ClientApp: every record name, every key, and
how a client's reported identifiers are read. Both sides import these names; a reply is read by
the names given here, never by position.

Instruction (server -> client), a ``RecordDict`` of:

* ``SHARED``: the global shared tensors (``ArrayRecord``, keyed by state-dict names);
* ``CONFIG``: ``SERVER_ROUND``, ``STATE_NAMESPACE``, ``STATE_OWNERS``, ``FULL_EVAL`` (evaluate), and
  whatever Flower's DP wrappers add;
* ``EXPERTS`` (pFedMoAP only): other clients' prompts, keyed ``client-<partition id>``.

Training reply (client -> server): ``SHARED`` (the trained shared tensors, nothing else), ``METRICS``
(``NUM_EXAMPLES``, ``TRAIN_LOSS``, ``TRAIN_ACCURACY`` and the identifiers below) and ``DEVICE`` (where
it ran, common.device). Evaluation reply: ``METRICS`` (``<split>-accuracy``, ``LOCAL_LOSS``,
``NUM_EXAMPLES``, the identifiers), ``DEVICE``, and ``CLIENT`` (``DOMAIN``) for feature-shift data.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

# -- record names ----------------------------------------------------------------------------------
SHARED = "arrays"  # Flower's FedAvg default ``arrayrecord_key``
CONFIG = "config"  # Flower's FedAvg default ``configrecord_key``
METRICS = "metrics"
DEVICE = "device"
CLIENT = "client"
EXPERTS = "experts"

# -- instruction config keys -----------------------------------------------------------------------
SERVER_ROUND = "server-round"
STATE_NAMESPACE = "state-namespace"  # names the private-state files, so a resumed run finds them
STATE_OWNERS = "state-owners"  # comma-separated run ids a resumed run may take the state lock from
FULL_EVAL = "full-eval"  # Base/Novel besides Local

# -- reply metric keys -----------------------------------------------------------------------------
NUM_EXAMPLES = "num-examples"
TRAIN_LOSS = "train-loss"
TRAIN_ACCURACY = "train-accuracy"
LOCAL_LOSS = "local-loss"
PARTITION_ID = "partition-id"
NUM_PARTITIONS = "num-partitions"
PRIVATE_SOURCE = "private-source"
SKIPPED_IMAGES = "skipped-images"
ACCURACY_SUFFIX = "-accuracy"
DOMAIN = "domain"
# Identifiers and per-client counts: never averaged.
PER_CLIENT_KEYS = (PARTITION_ID, NUM_PARTITIONS, PRIVATE_SOURCE, SKIPPED_IMAGES)
# Where a client's private tensors came from, by index: PRIVATE_SOURCES[metrics[PRIVATE_SOURCE]].
# "context" (Flower's context.state) is no longer used: private state lives on the node's disk.
PRIVATE_SOURCES = ("init", "context", "disk")


# The DEVICE record's fields (common.device.device_report); the server keeps only these.
DEVICE_TEXT = ("type", "dtype", "name", "capability", "torch", "cuda")
PEAK_MEMORY = "peak-memory-mb"
DEVICE_NUMBERS = (PEAK_MEMORY, "total-memory-mb")
DEVICE_FLAGS = ("deterministic", "gpus-unused")


def accuracy_key(split: str) -> str:
    """``local`` -> ``local-accuracy``."""
    return f"{split}{ACCURACY_SUFFIX}"


# -- reading what a client reported ----------------------------------------------------------------
MAX_IDENTIFIER = 2**31 - 1  # partition ids and counts a client reports are read up to this


def scalar(metrics: Mapping[str, object], key: str) -> float | None:
    """A reported number, or None when absent or not a scalar (lists are allowed in records)."""
    value = metrics.get(key)
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def identifier(metrics: Mapping[str, object], key: str) -> int | None:
    """A reported id or count (partition id, number of partitions, private source): an integral,
    non-negative, bounded number, else None. A client's ``inf`` or ``1.5`` must not reach ``int()``."""
    value = scalar(metrics, key)
    if value is None or not math.isfinite(value) or value != int(value) or not 0 <= value <= MAX_IDENTIFIER:
        return None
    return int(value)
