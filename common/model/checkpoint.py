"""Read a local checkpoint file (``pretrained``) as tensors only, before open_clip does.

open_clip 3.3 reads a checkpoint path with safetensors (by the ``.safetensors`` suffix) or with
``torch.load(weights_only=True)``. But when that ``torch.load`` raises a TypeError, which a
crafted pickle can make it do, open_clip retries with torch's default, and that unpickles, so
runs, the file's content wherever ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` is set. Reading the file
here first, with the same safe reader, means open_clip only ever gets a file that its first,
safe read accepts. What is read here also explains a file that does not fit the model.

A safetensors file may also record the architecture its weights need, in its metadata (written
by ``pfedmma-weights``, ``common/model/prepare_weights.py``): the open_clip model name to load it
as, and whether that model uses QuickGELU. The file's weights do not show their activation, so
without this record OpenAI's QuickGELU weights load into a GELU model without any error.
"""

from __future__ import annotations

import math
import pickle
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from common.errors import CheckpointError

Shapes = dict[str, tuple[int, ...]]

EXPECTED = (
    "expected a safetensors file (safetensors.torch.save_file(model.state_dict(), path)) or a torch "
    "state dict of tensors (torch.save(model.state_dict(), path)); files are only read as tensors, "
    "never unpickled"
)


# The metadata keys that record the architecture. ``model_name`` is also what
# scripts/pretrain_tiny_clip.py writes into the bundled checkpoint.
MODEL_NAME_KEY = "model_name"
QUICK_GELU_KEY = "quick_gelu"
_BOOLEANS = {"true": True, "false": False}


@dataclass(frozen=True)
class Architecture:
    """What a checkpoint file says it must be loaded as."""

    model_name: str  # the open_clip model name
    quick_gelu: bool | None  # None: not recorded, the model config's own activation applies


def architecture_metadata(model_name: str, quick_gelu: bool) -> dict[str, str]:
    """The safetensors metadata entries that :func:`read_architecture` reads back."""
    return {MODEL_NAME_KEY: model_name, QUICK_GELU_KEY: "true" if quick_gelu else "false"}


def read_architecture(pretrained: str, path: Path) -> Architecture | None:
    """The architecture recorded in a safetensors file's metadata; None when the file records
    none (or is not a safetensors file, whose format has no metadata). Only the file's header
    is read."""
    if not path.name.endswith(".safetensors"):
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except Exception as err:  # noqa: BLE001 - safetensors fails in several types; each is the file's
        raise unreadable(pretrained, path, err) from None
    name = metadata.get(MODEL_NAME_KEY)
    if not name:
        return None
    flag = metadata.get(QUICK_GELU_KEY)
    if flag is not None and flag.lower() not in _BOOLEANS:
        raise CheckpointError(
            f"pretrained={pretrained!r}: {path} records {QUICK_GELU_KEY}={flag!r} in its metadata; "
            "expected 'true' or 'false'. Re-create the file with pfedmma-weights"
        )
    return Architecture(model_name=name, quick_gelu=None if flag is None else _BOOLEANS[flag.lower()])


def is_torchscript(path: Path) -> bool:
    """A TorchScript archive (the format of OpenAI's released CLIP files): a zip file holding
    compiled code, which ``torch.save`` files never do. Only the zip's directory is read."""
    try:
        with zipfile.ZipFile(path) as archive:
            return any(n.endswith("/constants.pkl") or "/code/" in n for n in archive.namelist())
    except (zipfile.BadZipFile, OSError):  # not a zip, or a broken one: the readers say why
        return False


def read_shapes(pretrained: str, path: Path) -> Shapes:
    """Name -> shape of every tensor in the file; :class:`CheckpointError` when it is not a
    checkpoint of tensors (garbage, truncated, a pickled object)."""
    try:
        return _shapes(path)
    except Exception as err:  # noqa: BLE001 - torch and safetensors fail in many types; each is the file's
        raise unreadable(pretrained, path, err) from None


def _shapes(path: Path) -> Shapes:
    if path.name.endswith(".safetensors"):  # open_clip picks its reader by this suffix too
        with safe_open(str(path), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118 - safe_open is not iterable
    if is_torchscript(path):
        # Loading it would need torch.jit.load, which the run's loader never does (see prepare_weights).
        raise TypeError("it is a TorchScript archive (OpenAI's released format): convert it once with "
                        "`pfedmma-weights --source FILE --format openai`")
    # mmap: tensors of a zip-format file are mapped, not read; an older file is read whole.
    content = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    if isinstance(content, Mapping) and "state_dict" in content:  # a training checkpoint, as open_clip reads it
        content = content["state_dict"]
    if not isinstance(content, Mapping) or not content:
        raise TypeError(f"it holds a {type(content).__name__}, not a non-empty dict of tensors")
    others = {k: type(v).__name__ for k, v in content.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)}
    if others:
        raise TypeError(f"it holds values that are not tensors: {dict(list(others.items())[:3])}")
    strip = next(iter(content)).startswith("module")  # DataParallel's prefix, which open_clip strips
    return {(k[7:] if strip else k): tuple(v.shape) for k, v in content.items()}


def unreadable(pretrained: str, path: Path, err: BaseException) -> CheckpointError:
    return CheckpointError(
        f"pretrained={pretrained!r}: cannot read {path} as model weights ({reason(err)}); {EXPECTED}. "
        "Re-export the weights in one of these formats, or set pretrained to another file, an open_clip "
        "tag or a bundled checkpoint name"
    )


def does_not_fit(pretrained: str, path: Path, model_name: str, found: Mapping[str, tuple[int, ...]],
                 expected: Mapping[str, tuple[int, ...]], err: BaseException) -> CheckpointError:
    """The error for a readable file that open_clip could not load into ``model_name``."""
    differences = mismatch(found, expected)
    if not differences:  # names and shapes fit: the load failed for another reason
        return unreadable(pretrained, path, err)
    return CheckpointError(
        f"pretrained={pretrained!r}: {path} does not fit model-name={model_name!r}: {differences}. "
        "Give a checkpoint saved from this model, or set model-name to the model it was saved from"
    )


def mismatch(found: Mapping[str, tuple[int, ...]], expected: Mapping[str, tuple[int, ...]]) -> str:
    """What differs between the file's tensors and the model's, a few examples each; "" if nothing."""
    missing = [k for k in expected if k not in found]
    extra = [k for k in found if k not in expected]
    # open_clip reshapes a one-element logit_scale/logit_bias itself, so only a size change counts there.
    other = [k for k in found if k in expected and found[k] != expected[k]
             and not (k.startswith("logit_") and math.prod(found[k]) == math.prod(expected[k]) == 1)]
    parts = []
    if missing:
        parts.append(f"tensors missing from the file: {len(missing)} (e.g. {missing[:3]})")
    if extra:
        parts.append(f"tensors the model does not have: {len(extra)} (e.g. {extra[:3]})")
    if other:
        examples = ", ".join(f"{k!r}: file {list(found[k])}, model {list(expected[k])}" for k in other[:3])
        parts.append(f"tensors of another shape: {len(other)} (e.g. {examples})")
    return "; ".join(parts)


def reason(err: BaseException) -> str:
    """Why a file could not be read, on one line, without torch's advice to unpickle it."""
    # torch's own text for a refused pickle recommends weights_only=False, i.e. running the file.
    text = str(err).strip()
    if isinstance(err, pickle.UnpicklingError) or "weights_only" in text:
        return "not a torch file of tensors: it is something else, or holds pickled objects"
    first = text.splitlines()[0][:200] if text else ""
    return f"{type(err).__name__}: {first}" if first else type(err).__name__
