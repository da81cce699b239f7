"""A client's private tensors, kept only in a file on the node's disk.

Not in ``context.state``: Flower ships a node's context between the SuperNode and every
ClientApp process over its runtime API (plain HTTP between containers in compose.yaml), so
private tensors there would travel. Order of restoration: the node's state file (a later
round, a restarted node, a resumed experiment) -> the common initialisation.

Files are written atomically (temporary file, fsync, rename), so a crash mid-write leaves the
previous file intact, never a truncated one, and only finite tensors are ever written: a round
that diverged leaves the last good state in place. One run at a time may use a namespace:
see :mod:`client.state_lock`.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from common.errors import PermanentError, disk_full, is_disk_full

log = logging.getLogger(__name__)


class PrivateStateError(PermanentError, RuntimeError):
    """A stored private state exists but does not belong to this method and model."""


class DivergedError(RuntimeError):
    """Training produced a NaN or Inf: nothing is saved or sent; the last good state stays."""


class PrivateStateStore:
    """Private tensors of one client (``partition_id``) in one experiment namespace. The
    fingerprint (method, model, seed and the method's shape-defining keys) must match the
    stored one for a file to be loaded."""

    def __init__(self, directory: Path, namespace: str, partition_id: int, fingerprint: Mapping[str, str]):
        self.path = directory / namespace / f"client-{partition_id}.safetensors"
        self.fingerprint = dict(fingerprint)

    @property
    def lock_path(self) -> Path:
        """``client-<N>.lock`` beside the state file: the run that holds it (client.state_lock)."""
        return self.path.with_suffix(".lock")

    def load(self) -> tuple[dict[str, torch.Tensor] | None, str]:
        """The stored private tensors and where they came from ("disk"), or (None, "init")."""
        if self.path.exists():
            return self._read_file(), "disk"
        return None, "init"

    def save(self, tensors: Mapping[str, torch.Tensor]) -> None:
        if not tensors:  # a method with nothing private (promptfl, fedavg-mma) keeps nothing
            return
        bad = sorted(name for name, t in tensors.items() if not bool(torch.isfinite(t).all()))
        if bad:
            kept = f"the last good state in {self.path} is kept" if self.path.exists() else "nothing is saved"
            raise DivergedError(f"training produced NaN or Inf in private tensor(s) {bad}; {kept}, and no update is sent")
        self._write_file(tensors)

    def _check(self, stored: Mapping[str, object], where: str) -> None:
        if stored != self.fingerprint:
            raise PrivateStateError(
                f"{where} holds private tensors for {dict(stored)}, but this run has {self.fingerprint}; "
                "use another experiment-name or state-dir, or remove the file to start from the common init"
            )

    def _read_file(self) -> dict[str, torch.Tensor]:
        try:
            with safe_open(str(self.path), framework="pt") as f:
                meta = f.metadata() or {}
            stored = json.loads(meta.get("fingerprint", "{}"))
            tensors = load_file(str(self.path))
        except (SafetensorError, OSError, ValueError) as err:  # a bad header, a short file, bad JSON metadata
            raise PrivateStateError(
                f"private-state file {self.path} is unreadable ({type(err).__name__}: {err}): truncated, or not "
                f"a safetensors file. To start this client over from the common initialisation, remove it "
                f"(`python -m client.reset_state --state-dir {self.path.parent.parent} --experiment "
                f"{self.path.parent.name} --client {self.path.stem.removeprefix('client-')}`), or use another "
                "experiment-name or state-dir"
            ) from None
        self._check(stored, str(self.path))
        return tensors

    def _write_file(self, tensors: Mapping[str, torch.Tensor]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".safetensors", dir=self.path.parent)
        os.close(fd)
        try:
            cpu = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
            save_file(cpu, tmp, metadata={"fingerprint": json.dumps(self.fingerprint, sort_keys=True)})
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException as err:
            Path(tmp).unlink(missing_ok=True)
            if is_disk_full(err):
                raise disk_full(
                    self.path, "the private state",
                    "free space there, or set state-dir (run or node config) to another file system; "
                    "the previous file, if any, is intact",
                ) from None
            raise
