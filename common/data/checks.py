"""A cheap check of every image file a client will read, run once before it trains or evaluates.

Images are decoded lazily, so without a check a missing or garbage file surfaces mid-epoch, in
whichever round first draws it. Decoding the whole shard up front (the loaders'
``skip_corrupt=True``) is exact but costs a full decode per file; this check only confirms that
each file exists and that PIL recognises its header (format and size), which catches missing,
empty and garbage files at a few tens of microseconds per file. A file whose header is intact
but whose pixel data is truncated passes here; it still fails when it is read, in
:func:`common.data.files.open_rgb`, with a :class:`DatasetError` naming the path.

Bad files either stop the client with one error listing them (the default: the next round
would meet them again), or, with the run-config key ``skip-corrupt = true``, are left out and
counted, never silently.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from common.data.base import ClientData, EvalSet, LabeledDataset
from common.data.files import DatasetError, FileImageSource

logger = logging.getLogger(__name__)

# How many bad files an error or warning lists before "and N more": enough to see a pattern
# (one folder, one extension), short enough to read in a log line.
SHOWN = 10

REMEDY = (
    "fix or restore these files, or set the run-config key `skip-corrupt = true` to leave them out "
    "(the number left out is reported in the run's metrics)"
)


@dataclass(frozen=True)
class ShardCheck:
    """A dataset after the file check: ``dataset`` without the files listed in ``skipped``."""

    dataset: LabeledDataset
    skipped: tuple[str, ...]


@dataclass(frozen=True)
class ClientDataCheck:
    """A client's data after the file check.

    ``skipped`` counts the left-out images per set (``"train"`` and each eval set's name);
    ``skipped_files`` lists each left-out file once, although a file can sit in several eval
    sets (a client's local test images are also in the base set).
    """

    data: ClientData
    skipped: Mapping[str, int]
    skipped_files: tuple[str, ...]


@dataclass(frozen=True)
class _Failure:
    position: int  # into LabeledDataset.indices
    path: Path
    reason: str


def file_problem(path: Path) -> str | None:
    """Why ``path`` fails the cheap check, or None when it exists and PIL reads its header.

    ``Image.open`` reads only the header (format, mode, size); pixel data is decoded later.
    """
    try:
        with Image.open(path) as img:
            width, height = img.size
    except FileNotFoundError:
        return "file does not exist"
    except UnidentifiedImageError:
        return "not an image PIL can identify: empty, garbage or an unsupported format"
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        # Permission errors, directories, headers that start well and then break.
        return f"unreadable header: {exc}"
    if width <= 0 or height <= 0:
        return f"header gives an empty image ({width}x{height})"
    return None


def _failures(dataset: LabeledDataset, memo: dict[Path, str | None]) -> list[_Failure]:
    """The bad files of ``dataset``; ``memo`` keeps each file's verdict across datasets."""
    source = dataset.source
    if not isinstance(source, FileImageSource):
        return []  # in-memory or procedural images: no file to lose
    failures: list[_Failure] = []
    for position, index in enumerate(dataset.indices):
        path = source.path(index)
        if path not in memo:
            memo[path] = file_problem(path)
        reason = memo[path]
        if reason is not None:
            failures.append(_Failure(position, path, reason))
    return failures


def _listing(bad: Sequence[tuple[Path, str]]) -> str:
    """``path (reason); ...`` on one line: the server shows a client's error as one line."""
    shown = "; ".join(f"{path} ({reason})" for path, reason in bad[:SHOWN])
    return shown + (f"; and {len(bad) - SHOWN} more" if len(bad) > SHOWN else "")


def _check_error(bad: Sequence[tuple[Path, str]], checked: int, where: str) -> DatasetError:
    return DatasetError(
        f"{len(bad)} of {checked} image file(s) in {where} failed the file check "
        f"(the file must exist and have a readable image header): {_listing(bad)}. To go on, {REMEDY}"
    )


def _without(dataset: LabeledDataset, failures: Sequence[_Failure], where: str) -> LabeledDataset:
    """``dataset`` minus the failed positions; labels follow, since they are read per index."""
    if not failures:
        return dataset
    dropped = {f.position for f in failures}
    kept = [index for position, index in enumerate(dataset.indices) if position not in dropped]
    if not kept:
        bad = [(f.path, f.reason) for f in failures]
        raise DatasetError(
            f"every one of the {len(dataset)} image(s) of {where} failed the file check, so "
            f"skip-corrupt would leave it empty: {_listing(bad)}. Fix or restore these files"
        )
    return LabeledDataset(dataset.source, kept, dataset.transform, dataset.label_map)


def check_dataset(dataset: LabeledDataset, skip: bool, where: str = "the dataset") -> ShardCheck:
    """Check that every image file of ``dataset`` exists and has a readable header.

    Bad files raise one :class:`DatasetError` listing them, or with ``skip`` are left out of
    the returned dataset (logged as a warning). ``where`` names the dataset in messages.
    """
    failures = _failures(dataset, {})
    if not failures:
        return ShardCheck(dataset, ())
    bad = [(f.path, f.reason) for f in failures]
    if not skip:
        raise _check_error(bad, len(dataset), where)
    kept = _without(dataset, failures, where)
    logger.warning(
        "skip-corrupt: left out %d of %d image(s) of %s that failed the file check: %s",
        len(failures), len(dataset), where, _listing(bad),
    )
    return ShardCheck(kept, tuple(str(f.path) for f in failures))


def check_client_data(data: ClientData, skip: bool) -> ClientDataCheck:
    """:func:`check_dataset` over a client's training set and every eval set, each file once.

    Without ``skip`` one error lists every bad file of the shard, so a single round shows all
    of them rather than one set at a time.
    """
    memo: dict[Path, str | None] = {}
    sets = {"train": data.train, **{name: ev.dataset for name, ev in data.evals.items()}}
    failures = {name: _failures(dataset, memo) for name, dataset in sets.items()}
    # Each bad file once, in the order first met (a dict keeps insertion order).
    bad = {f.path: f.reason for found in failures.values() for f in found}
    if not bad:
        return ClientDataCheck(data, {name: 0 for name in sets}, ())
    where = "this client's shard (training and evaluation images)"
    if not skip:
        raise _check_error(list(bad.items()), len(memo), where)
    train = _without(data.train, failures["train"], "this client's training set")
    evals = {
        name: EvalSet(_without(ev.dataset, failures[name], f"this client's {name!r} eval set"), ev.class_names)
        for name, ev in data.evals.items()
    }
    counts = {name: len(found) for name, found in failures.items()}
    logger.warning(
        "skip-corrupt: left out %d of %d image file(s) of %s that failed the file check (per set: %s): %s",
        len(bad), len(memo), where, ", ".join(f"{k} {v}" for k, v in counts.items() if v), _listing(list(bad.items())),
    )
    return ClientDataCheck(
        dataclasses.replace(data, train=train, evals=evals), counts, tuple(str(path) for path in bad)
    )
