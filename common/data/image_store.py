"""Decoded test images on the node's disk: decoded once per node, memory-mapped by every process.

The in-process cache (``common.data.eval_cache``) lives as long as its process, and a process is
short: every message in a deployment, every Ray actor in a simulation. Here the uint8 pixels of a
test set (after resize and centre crop) go to one file per (source content, transform geometry)
under the node's ``eval-cache-dir``, which every later process maps and reads without decoding.

A file is ``header | one uint64 check per image | the images' rows``, created at its full size
(sparse: a row takes disk space when it is written) and published atomically by a rename, so a
reader never sees a half-made header. A row counts only once its check, ``2**32 | crc32(row)``,
is written after it and matches what the reader copied out: a row cut short by a crash, or one
still being written by another process, fails the check and is decoded again. Several processes
may fill the same file at once; they write identical bytes, so a double write is harmless.

The files hold the node's data: directories are made 0700 and files 0600. All files together stay
within ``eval-disk-cache-mb``; a set that does not fit in what is left is not stored (logged once)
and only the in-process tier serves it. Nothing is evicted: a file whose dataset changed gets a new
name (its key covers the files' sizes and times) and the old one stays until someone deletes it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import mmap
import os
import secrets
import shutil
import stat
import struct
import zlib
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common.data.base import ImageSource
from common.transforms import TestTransform

log = logging.getLogger(__name__)

MAGIC = b"PFEDIMG\x01"
FORMAT_VERSION = 1
SUFFIX = ".u8"
_PAGE = 4096
_HEADER_BYTES = _PAGE
_WRITTEN = 1 << 32  # a check's high bit: "written"; the low 32 bits are the row's crc32 (0 = never written)


def _round_up(n: int) -> int:
    return -(-n // _PAGE) * _PAGE


def store_identity(source: ImageSource, transform: TestTransform) -> dict[str, Any] | None:
    """What a file's pixels are a function of; None when the source has no stable key.

    PIL (which decodes and resizes) and torchvision (which drives the resize and the crop) are part
    of it: another release may round a pixel differently, and the tier must stay bit-identical to
    decoding.
    """
    key = source.cache_key()
    if key is None or len(source) == 0:
        return None
    return {
        "format": FORMAT_VERSION,
        "source": key,
        "geometry": list(transform.geometry_key),
        "libraries": {name: metadata.version(name) for name in ("pillow", "torchvision")},
        "count": len(source),
        "shape": [3, transform.size, transform.size],
    }


def _layout(identity: dict[str, Any]) -> tuple[int, int, int]:
    """(bytes per row, where the rows start, file size) of a store for ``identity``."""
    count, row_bytes = int(identity["count"]), int(np.prod(identity["shape"]))
    rows_at = _HEADER_BYTES + _round_up(8 * count)
    return row_bytes, rows_at, rows_at + count * row_bytes


def _header(identity: dict[str, Any]) -> bytes:
    meta = json.dumps(identity, sort_keys=True).encode()
    header = MAGIC + struct.pack("<I", len(meta)) + meta
    assert len(header) <= _HEADER_BYTES, "an identity is a few short keys"
    return header.ljust(_HEADER_BYTES, b"\0")


class ImageStore:
    """One test set's rows in one memory-mapped file; safe to share between processes."""

    def __init__(self, path: Path, identity: dict[str, Any]) -> None:
        self.path, self.identity = path, identity
        self.count, self.shape = int(identity["count"]), tuple(int(s) for s in identity["shape"])
        self.row_bytes, self._rows_at, self.size = _layout(identity)
        self._checks_at = _HEADER_BYTES
        self.torn = 0  # rows that failed their check when read (crashed or in-flight writes)
        self.writable = True
        try:
            self._fd = os.open(path, os.O_RDWR)
        except PermissionError:  # a file made read-only: read what is there, add nothing
            self._fd, self.writable = os.open(path, os.O_RDONLY), False
        if os.fstat(self._fd).st_size != self.size or os.pread(self._fd, _HEADER_BYTES, 0) != _header(identity):
            os.close(self._fd)
            raise ValueError(f"{path}: not an image store for {identity} (expected {self.size} bytes and its header)")
        self._map = mmap.mmap(self._fd, self.size, access=mmap.ACCESS_READ)
        self._checks = np.frombuffer(self._map, dtype="<u8", count=self.count, offset=self._checks_at)
        self._rows = np.frombuffer(self._map, dtype=np.uint8, count=self.count * self.row_bytes, offset=self._rows_at)
        self._rows = self._rows.reshape(self.count, *self.shape)

    def read(self, index: int) -> torch.Tensor | None:
        """Row ``index`` as a uint8 tensor of its own, or None if it is not (completely) there."""
        check = int(self._checks[index])
        if not check & _WRITTEN:
            return None
        # Copy first, then check the copy: what was checked is what is returned, even while another
        # process rewrites the row (with the same bytes) under the mapping.
        row = np.array(self._rows[index])
        if zlib.crc32(row.data) != check & 0xFFFFFFFF:
            self.torn += 1
            return None
        return torch.from_numpy(row)

    def write(self, index: int, pixels: torch.Tensor) -> bool:
        """Store row ``index``: the pixels, then their check. False if it cannot be stored."""
        if not self.writable:
            return False
        row = pixels.contiguous().numpy()
        if row.dtype != np.uint8 or row.shape != self.shape:  # e.g. a source that returned a grey image
            log.warning(
                "%s: row %d is %s %s, expected uint8 %s: not stored", self.path, index, row.dtype, row.shape, self.shape
            )
            return False
        check = struct.pack("<Q", _WRITTEN | zlib.crc32(row.data))
        try:
            # pwrite, not a store into a writable mapping: the row reaches the page cache (which every
            # process's mapping reads) before its check does; a reader that still sees an older row
            # (another CPU's memory ordering) fails the crc and decodes it.
            if os.pwrite(self._fd, row.data, self._rows_at + index * self.row_bytes) != self.row_bytes:
                raise OSError(errno.ENOSPC, "short write")
            os.pwrite(self._fd, check, self._checks_at + 8 * index)
        except OSError as exc:  # a full or read-only disk: keep serving what is there
            self.writable = False
            log.warning(
                "cannot add to the evaluation image store %s (%s): rows past this are not stored", self.path, exc
            )
            return False
        return True


class DiskImages:
    """The node's disk tier: one :class:`ImageStore` per (source content, geometry), all of them
    within ``limit_bytes`` in ``directory``."""

    def __init__(self, directory: str | Path, limit_bytes: int) -> None:
        self.directory, self.limit_bytes = Path(directory).expanduser(), limit_bytes
        # id(source), geometry -> (source, its store or None); the source is held so its id stays its own
        self._stores: dict[tuple[int, tuple], tuple[ImageSource, ImageStore | None]] = {}
        self._usable: bool | None = None
        self._refused: set[str] = set()  # stores that did not fit: said once

    def store_for(self, source: ImageSource, transform: TestTransform) -> ImageStore | None:
        memo_key = (id(source), transform.geometry_key)
        memo = self._stores.get(memo_key)
        if memo is not None and memo[0] is source:
            return memo[1]
        store = self._open(source, transform)
        self._stores[memo_key] = (source, store)
        return store

    def used_bytes(self) -> int:
        """What the stores in the directory take once full (their size; a file is sparse until then)."""
        total = 0
        with contextlib.suppress(FileNotFoundError):
            for entry in os.scandir(self.directory):
                if entry.name.endswith(SUFFIX) and not entry.name.startswith("."):
                    with contextlib.suppress(FileNotFoundError):
                        total += entry.stat().st_size
        return total

    def _ready(self) -> bool:
        if self._usable is None:
            try:
                if not self.directory.is_dir():
                    self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
                    os.chmod(self.directory, 0o700)  # mkdir's mode is masked by the umask
                # Whoever else can write here could swap in other pixels: such a folder is not used.
                info = os.stat(self.directory)
                if info.st_uid != os.getuid() or info.st_mode & 0o022:
                    log.warning(
                        "evaluation image store off: %s is not this user's alone (owner uid %d, mode %o); "
                        "expected a folder only its owner can write, e.g. mode 700",
                        self.directory, info.st_uid, stat.S_IMODE(info.st_mode),
                    )  # fmt: skip
                    self._usable = False
                    return False
                self._usable = True
            except OSError as exc:
                log.warning("evaluation image store off: cannot create %s (%s)", self.directory, exc)
                self._usable = False
        return self._usable

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """One process at a time decides what fits in the directory and creates files."""
        fd = os.open(self.directory / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            with contextlib.suppress(OSError):  # a file system without locks: the budget may overshoot a little
                fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    def _open(self, source: ImageSource, transform: TestTransform) -> ImageStore | None:
        identity = store_identity(source, transform)
        if identity is None or not self._ready():
            return None
        name = hashlib.blake2b(json.dumps(identity, sort_keys=True).encode(), digest_size=16).hexdigest() + SUFFIX
        path = self.directory / name
        if name in self._refused:
            return None
        try:
            if not path.exists():
                with self._locked():
                    if not path.exists() and not self._create(path, identity):
                        self._refused.add(name)
                        return None
            return ImageStore(path, identity)
        except (OSError, ValueError) as exc:
            log.warning("evaluation image store %s unusable (%s): that set is cached in memory only", path, exc)
            return None

    def _create(self, path: Path, identity: dict[str, Any]) -> bool:
        store_bytes = _layout(identity)[2]
        used, free = self.used_bytes(), shutil.disk_usage(self.directory).free
        if used + store_bytes > self.limit_bytes or store_bytes > free:
            log.info(
                "evaluation images of %s (%d images, %d MB) not stored on disk: %d of %d MB of eval-disk-cache-mb "
                "used, %d MB free on %s",
                identity["source"],
                identity["count"],
                store_bytes >> 20,
                used >> 20,
                self.limit_bytes >> 20,
                free >> 20,
                self.directory,
            )
            return False
        temporary = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        fd = os.open(temporary, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, store_bytes)
            os.pwrite(fd, _header(identity), 0)
            os.fsync(fd)  # the header is on disk before the name is: a published file is never headless
            os.replace(temporary, path)  # under the lock, nobody else has created ``path`` since we looked
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
            raise
        finally:
            os.close(fd)
        return True
