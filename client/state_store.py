"""A client's private tensors: kept in ``context.state`` and on the node's disk.

Order of restoration: ``context.state`` (same run, same SuperNode process) -> the node's
state file (restarted node, resumed experiment) -> the common initialisation. Files are
written atomically (temporary file, fsync, rename), so a crash mid-write leaves the
previous file intact, never a truncated one.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch
from flwr.app import ConfigRecord, RecordDict
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from common.arrays import from_record, to_record
from common.errors import PermanentError, disk_full, is_disk_full

log = logging.getLogger(__name__)

STATE_KEY = "pfedmma.private-state"


def state_key(namespace: str) -> str:
    """The ``context.state`` key of one namespace's private tensors.

    Flower's simulation can hand a node's ``context.state`` to a later run; keying by the
    namespace keeps a new experiment from picking up another's tensors.
    """
    return f"{STATE_KEY}.{namespace}"


class PrivateStateError(PermanentError, RuntimeError):
    """A stored private state exists but does not belong to this method and model."""


class PrivateStateStore:
    """Private tensors of one client (``partition_id``) in one experiment namespace."""

    def __init__(self, state: RecordDict, directory: Path, namespace: str, partition_id: int, fingerprint: Mapping[str, str]):
        self.state = state
        self.key = state_key(namespace)
        self.path = directory / namespace / f"client-{partition_id}.safetensors"
        self.fingerprint = dict(fingerprint)

    def load(self) -> tuple[dict[str, torch.Tensor] | None, str]:
        """The stored private tensors and where they came from ("context", "disk"), or (None, "init")."""
        if self.key in self.state.array_records:
            # The same namespace may have been used by another method or model in this process.
            stored = dict(self.state.config_records.get(self._fingerprint_key, ConfigRecord()))
            self._check(stored, f"context.state[{self.key!r}]")
            return from_record(self.state.array_records[self.key]), "context"
        if self.path.exists():
            return self._read_file(), "disk"
        return None, "init"

    def save(self, tensors: Mapping[str, torch.Tensor]) -> None:
        if not tensors:  # a method with nothing private (promptfl, fedavg-mma) keeps nothing
            return
        self.state.array_records[self.key] = to_record(tensors)
        self.state.config_records[self._fingerprint_key] = ConfigRecord(dict(self.fingerprint))
        self._write_file(tensors)

    @property
    def _fingerprint_key(self) -> str:
        return f"{self.key}.fingerprint"

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
