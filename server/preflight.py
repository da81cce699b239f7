"""What the ServerApp checks before round 1: everything decidable without the clients' data.

Each check names the key, the value and what is allowed. A run that cannot work stops here,
before any client builds a model, instead of failing on every client in every round. What
needs the clients' data (their files, their `data-dir`) is checked by the clients themselves.
"""

from __future__ import annotations

import logging
from pathlib import Path

from common.config import ConfigError, RunConfig
from common.data.federated import partition_for, sources_for
from common.data.files import DatasetError
from common.errors import PermanentError
from common.methods import method_for
from common.model.clip import model_dims, resolve_pretrained

log = logging.getLogger(__name__)


def _model_problems(cfg: RunConfig) -> list[str]:
    try:
        dims = model_dims(cfg.model_name)
    except ValueError as err:
        return [str(err)]
    problems = []
    try:
        method_for(cfg).check(dims)  # adapter-start/end against the towers' depth, gate sizes...
    except ValueError as err:
        problems.append(f"method {cfg.method!r}: {err}")
    # A tag or a bundled checkpoint name is checked here. A file path may exist only on the
    # nodes (the presets point at a per-node weights folder): when the server has the file too,
    # its recorded model name is checked here (a header read), else the clients check it.
    on_server = _looks_like_path(cfg.pretrained) and Path(cfg.pretrained).expanduser().is_file()
    if cfg.pretrained and (on_server or not _looks_like_path(cfg.pretrained)):
        try:
            resolve_pretrained(cfg.model_name, cfg.pretrained)
        except (ValueError, PermanentError, OSError) as err:
            problems.append(str(err))
    elif cfg.pretrained:
        log.info("pretrained=%r is not a file on the server: the clients check it", cfg.pretrained)
    return problems


def _looks_like_path(value: str) -> bool:
    return any(sep in value for sep in ("/", "\\")) or Path(value).suffix in (".pt", ".pth", ".bin", ".safetensors")


def data_on_server(cfg: RunConfig) -> bool:
    """Whether the server can read the dataset's labels: generated, or data-dir present here."""
    return cfg.dataset == "shapes" or (bool(cfg.data_dir) and Path(cfg.data_dir).expanduser().is_dir())


def _data_problems(cfg: RunConfig, num_clients: int | None) -> list[str]:
    if not data_on_server(cfg):
        log.info("dataset %r is not readable on the server (data-dir=%r): the clients check it", cfg.dataset, cfg.data_dir)
        return []
    try:
        if num_clients:  # the partition reads (and so checks) the split files first
            partition_for(cfg, num_clients)
        else:
            sources_for(cfg)
    except (DatasetError, ValueError) as err:
        where = f" with {num_clients} clients" if num_clients else ""
        return [f"dataset {cfg.dataset!r}, partition {cfg.partition!r}{where}: {err}"]
    return []


def preflight(cfg: RunConfig, num_clients: int | None) -> None:
    """Raise :class:`ConfigError` listing every problem found; ``num_clients`` None skips the
    partition check (the number of clients is not known yet)."""
    problems = _model_problems(cfg) + _data_problems(cfg, num_clients)
    if problems:
        raise ConfigError("the run cannot start:\n" + "\n".join(f"  - {p}" for p in problems))
