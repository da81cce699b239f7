"""What a client process builds once and reuses: the frozen model and its data shard.

In simulation many virtual clients share one Ray worker and its module globals, so caches
are keyed by everything that determines their content, and nothing client-specific is
cached in the model: each client overwrites every trainable tensor (global shared ones from
the message, its own private ones from its store) before using it.
"""

from __future__ import annotations

import logging
from functools import lru_cache
from pathlib import Path

import torch

from common.config import RunConfig
from common.data.checks import ClientDataCheck, check_client_data
from common.data.federated import client_data
from common.device import pick_device
from common.methods import method_for
from common.model.clip import ClipBundle, build_clip
from common.model.roles import Role

log = logging.getLogger(__name__)

__all__ = ["initial_private", "pick_device", "shard", "shared_model"]


_MODELS: dict[tuple[str, ...], ClipBundle] = {}


def shared_model(cfg: RunConfig, device: torch.device, cache_dir: str = "") -> ClipBundle:
    """The frozen CLIP with the method's modules attached, built once per process.

    ``cache_dir`` (node config) holds prepared backbone weights that later processes map
    into memory instead of rebuilding; in deployment every message is a new process.
    """
    method = method_for(cfg)
    # Settings baked into modules (adapter alpha, gate scaling) are part of the key too.
    key = (*method.fingerprint().values(), *map(str, method.settings().values()), str(device))
    if key not in _MODELS:
        _MODELS.clear()  # one backbone per process at a time is enough, and memory matters
        log.info("building %s (pretrained=%r) for %s on %s", cfg.model_name, cfg.pretrained or "none", cfg.method, device)
        bundle = build_clip(cfg.model_name, cfg.pretrained, device, Path(cache_dir) if cache_dir else None, cfg.seed)
        method.attach(bundle.model)
        _MODELS[key] = bundle
    return _MODELS[key]


def uses_gpu() -> bool:
    """Whether this process has a CUDA context (which only its exit frees)."""
    return torch.cuda.is_initialized()


def holds_device_memory() -> bool:
    """Whether this process has a model or cached rows on a GPU."""
    return uses_gpu() and (any(key[-1].startswith("cuda") for key in _MODELS) or torch.cuda.memory_allocated() > 0)


def release_device_memory() -> None:
    """Drop the models and the evaluation rows this process keeps, and hand CUDA's cached
    blocks back to the driver (an idle warm worker; the next message rebuilds from the node's
    backbone cache). Decoded test images stay: they are on the host or the node's disk."""
    from common.data.eval_cache import IMAGE_FEATURES, IMAGE_PREFIX

    _MODELS.clear()
    IMAGE_FEATURES.clear()
    IMAGE_PREFIX.clear()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@lru_cache(maxsize=2)
def initial_private(cfg: RunConfig) -> dict[str, torch.Tensor]:
    """The common initial private tensors (the same for every client of a run); read-only."""
    return method_for(cfg).initial_state()[Role.PRIVATE]


@lru_cache(maxsize=16)
def _client_data(cfg: RunConfig, partition_id: int, num_partitions: int, data_dir: str, image: tuple) -> ClientDataCheck:
    size, mean, std = image
    # Every file of the shard is checked once per process, before the first step that reads it.
    return check_client_data(client_data(cfg, partition_id, num_partitions, size, mean, std, data_dir), cfg.skip_corrupt)


def shard(cfg: RunConfig, partition_id: int, num_partitions: int, data_dir: str, bundle: ClipBundle) -> ClientDataCheck:
    """The client's data, its files checked (missing or undecodable ones raise, or are left
    out and counted under `skip-corrupt`)."""
    return _client_data(cfg, partition_id, num_partitions, data_dir, (bundle.image_size, bundle.mean, bundle.std))
