"""Images stored as files: a lazily decoding :class:`ImageSource`, plus the checks every loader shares.

A :class:`FileImageSource` holds only paths, labels and class names; a file is opened in
:meth:`FileImageSource.image` and nowhere else, so a client decodes nothing outside its shard.
Every problem with the data on disk raises :class:`DatasetError` naming the path and what was
expected. Unreadable images can be dropped up front (``skip_corrupt=True``), but never silently:
the count is logged and kept on the source.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from common.data.base import ImageSource
from common.errors import PermanentError

logger = logging.getLogger(__name__)

# Lower-case suffixes of files that count as images in class folders (ImageNet's are ".JPEG").
IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


class DatasetError(PermanentError, ValueError):
    """Data on disk is missing or not in the expected layout/format; the message names the path."""


def require_dir(path: Path, what: str) -> Path:
    """Return ``path`` if it is a directory, else raise naming it and what it should hold."""
    if not path.is_dir():
        raise DatasetError(f"expected {what} at {path}, but that directory does not exist")
    return path


def require_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise DatasetError(f"expected {what} at {path}, but that file does not exist")
    return path


def read_text_lines(path: Path, what: str) -> list[str]:
    """Non-empty, stripped lines of a text file (annotation lists end with a newline)."""
    require_file(path, what)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(f"cannot read {what} {path}: {exc}") from exc
    return [line.strip() for line in text.splitlines() if line.strip()]


def list_images(folder: Path) -> list[str]:
    """Image files under ``folder`` (recursively), as sorted paths relative to it.

    Sorted so that indices, and therefore seeded splits and partitions, do not depend on the
    file system's listing order. Hidden files are ignored; other non-image files are counted
    and logged rather than dropped without a word.
    """
    found: list[str] = []
    ignored = 0
    for directory, subdirs, files in os.walk(folder):
        subdirs[:] = [d for d in subdirs if not d.startswith(".")]
        for name in files:
            if name.startswith("."):
                continue
            if name.lower().endswith(IMAGE_EXTENSIONS):
                found.append(os.path.relpath(os.path.join(directory, name), folder))
            else:
                ignored += 1
    if ignored:
        logger.warning("%s: ignored %d non-image file(s) (image suffixes: %s)", folder, ignored, IMAGE_EXTENSIONS)
    return sorted(found)


def open_rgb(path: Path) -> Image.Image:
    """Decode ``path`` fully as RGB; any failure raises :class:`DatasetError` naming the path."""
    try:
        with Image.open(path) as img:
            # convert() forces the full decode here, so truncated files fail now, not in a worker.
            return img.convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        # PIL reports corrupt data as OSError/UnidentifiedImageError, some plugins as SyntaxError.
        raise DatasetError(f"cannot read image {path}: {exc}") from exc


def unreadable_files(paths: Sequence[Path]) -> list[tuple[Path, str]]:
    """The paths that cannot be decoded, each with the reason. Decodes every file: slow."""
    bad: list[tuple[Path, str]] = []
    for path in paths:
        try:
            open_rgb(path)
        except DatasetError as exc:
            bad.append((path, str(exc.__cause__ or exc)))
    return bad


class FileImageSource(ImageSource):
    """Images in files; ``paths[i]`` is relative to ``root`` when one is given.

    Paths are kept as strings relative to one root, which keeps a million-image listing small.
    With ``skip_corrupt=True`` every file is decoded once at construction and the unreadable
    ones are dropped; their paths are kept in :attr:`skipped` and their number is logged.
    """

    def __init__(
        self,
        paths: Sequence[str | Path],
        labels: Sequence[int] | np.ndarray,
        class_names: Sequence[str],
        domains: Sequence[str] | np.ndarray | None = None,
        root: str | Path | None = None,
        skip_corrupt: bool = False,
    ) -> None:
        self.root = Path(root) if root is not None else None
        self.paths = [str(p) for p in paths]
        self.labels = np.asarray(labels, dtype=np.int64).reshape(-1)
        self.class_names = list(class_names)
        self.domains = None if domains is None else np.asarray(domains).reshape(-1)
        self.skipped: list[Path] = []
        if len(self.paths) != len(self.labels):
            raise ValueError(f"{len(self.paths)} paths but {len(self.labels)} labels")
        if self.domains is not None and len(self.domains) != len(self.labels):
            raise ValueError(f"{len(self.domains)} domains but {len(self.labels)} labels")
        if len(self.labels) and (self.labels.min() < 0 or self.labels.max() >= len(self.class_names)):
            raise ValueError(
                f"labels must lie in [0, {len(self.class_names)}), got {self.labels.min()}..{self.labels.max()}"
            )
        if skip_corrupt:
            self.drop_unreadable()

    def path(self, index: int) -> Path:
        rel = self.paths[index]
        return self.root / rel if self.root is not None else Path(rel)

    def image(self, index: int) -> Image.Image:
        return open_rgb(self.path(index))

    def cache_key(self) -> str | None:
        """Every file's path, size and modification time, in order: editing, replacing or adding
        a file gives a new key, so decoded pixels cached under the old one are never served for it.
        One ``stat`` per file, once per source (again if :meth:`drop_unreadable` changed the list)."""
        memo = self.__dict__.get("_cache_key_memo")
        if memo is not None and memo[0] is self.paths:
            return memo[1]
        digest = hashlib.blake2b(digest_size=16)
        digest.update(os.path.abspath(self.root).encode() if self.root is not None else b"")
        key: str | None
        try:
            for i, rel in enumerate(self.paths):
                stat = os.stat(self.path(i))
                name = rel if self.root is not None else os.path.abspath(rel)
                digest.update(f"\0{name}\0{stat.st_size}\0{stat.st_mtime_ns}".encode())
            key = f"files:{len(self.paths)}:{digest.hexdigest()}"
        except OSError:  # a missing file: nothing to key on (reading it will say what is wrong)
            key = None
        self._cache_key_memo = (self.paths, key)
        return key

    def drop_unreadable(self) -> int:
        """Decode every file, drop the unreadable ones, log and return how many were dropped."""
        bad = unreadable_files([self.path(i) for i in range(len(self))])
        if not bad:
            return 0
        bad_paths = {p for p, _ in bad}
        keep = np.array([self.path(i) not in bad_paths for i in range(len(self))], dtype=bool)
        self.paths = [p for p, k in zip(self.paths, keep, strict=True) if k]
        self.labels = self.labels[keep]
        if self.domains is not None:
            self.domains = self.domains[keep]
        self.skipped.extend(p for p, _ in bad)
        shown = "; ".join(f"{p}: {why}" for p, why in bad[:5])
        logger.warning("skipped %d unreadable image(s) of %d (first: %s)", len(bad), len(keep), shown)
        return len(bad)


def require_every_class(source: ImageSource, where: str) -> None:
    """Raise if some class of ``source.class_names`` has no image in ``source``.

    A class without images would silently get a text prompt but no examples, and a
    base/novel split by label would then be off by one class.
    """
    counts = np.bincount(source.labels, minlength=len(source.class_names))
    empty = [f"{source.class_names[k]!r} (label {k})" for k in np.flatnonzero(counts == 0)]
    if empty:
        more = f" and {len(empty) - 10} more" if len(empty) > 10 else ""
        raise DatasetError(f"{where}: no images for class {', '.join(empty[:10])}{more}")
