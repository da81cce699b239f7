"""A per-node cache of prepared backbone weights, memory-mapped on load.

In a deployment every message starts a new ClientApp process, so the frozen CLIP would be
built (random init, then a checkpoint read) once per message. The first build on a node
writes the final weights to ``<cache-dir>/<key>.pt``; later processes construct the model
without initialising it and map that file into memory (``torch.load(mmap=True)``), so
weights are paged in lazily and shared through the page cache by concurrent processes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import open_clip
import torch
from torch import nn

from common.errors import disk_full, is_disk_full

_INIT_FUNCTIONS = (
    "uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_", "eye_", "dirac_",
    "xavier_uniform_", "xavier_normal_", "kaiming_uniform_", "kaiming_normal_", "orthogonal_",
)


@contextlib.contextmanager
def skipped_init() -> Iterator[None]:
    """Make torch.nn.init a no-op: every value is about to be overwritten by the cache."""
    saved = {name: getattr(nn.init, name) for name in _INIT_FUNCTIONS}
    try:
        for name in _INIT_FUNCTIONS:
            setattr(nn.init, name, lambda tensor, *args, **kwargs: tensor)
        yield
    finally:
        for name, fn in saved.items():
            setattr(nn.init, name, fn)


def cache_key(model_name: str, weights: str | None, quick_gelu: bool, init_seed: int) -> str:
    """Changes whenever the weights could: the model, the source (file size and mtime), versions."""
    source: dict[str, object] = {"model": model_name, "weights": weights, "quick_gelu": quick_gelu}
    if weights is None:
        source["init_seed"] = init_seed
    elif Path(weights).is_file():
        stat = Path(weights).stat()
        source.update(path=str(Path(weights).resolve()), size=stat.st_size, mtime=stat.st_mtime_ns)
    source.update(open_clip=open_clip.__version__, torch=torch.__version__.split("+")[0])
    digest = hashlib.sha256(json.dumps(source, sort_keys=True).encode()).hexdigest()[:16]
    return f"{model_name}-{digest}"


def load_cached(path: Path, model_name: str, quick_gelu: bool) -> nn.Module | None:
    if not path.is_file():
        return None
    from common.model.clip import weights_loaded_elsewhere  # clip imports this module

    with skipped_init(), weights_loaded_elsewhere():
        model = open_clip.create_model(model_name, pretrained=None, force_quick_gelu=quick_gelu)
    state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    model.load_state_dict(state, assign=True)  # parameters now view the mapped file
    return model


def store(path: Path, model: nn.Module) -> None:
    """Write atomically, so a concurrent reader never maps a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="tmp-", suffix=".partial.pt", dir=path.parent)
    os.close(fd)
    try:
        torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, tmp)
        os.replace(tmp, path)
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        if is_disk_full(err):
            raise disk_full(path, "the backbone cache", "free space there, or set cache-dir (node config) to "
                            "another file system") from None
        raise
