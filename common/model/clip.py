"""Build a frozen open_clip CLIP from a (model name, pretrained) pair.

`pretrained` is one of: an open_clip tag (``"openai"``, ``"laion2b_s34b_b79k"``...),
the name of a checkpoint shipped in ``common/weights/`` (``"pfedmma-tiny-shapes"``, the
offline default), a path to a local checkpoint file, or empty / ``"none"`` for random
initialisation.

A file written by ``pfedmma-weights`` records the model name it must be loaded as (and its
activation); a different ``model-name`` is refused, because the weights would load without
error into blocks with the wrong activation.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import open_clip
import torch
from torch import nn

from common.errors import CheckpointError
from common.model import backbone_cache, checkpoint

log = logging.getLogger(__name__)

# Project model configs (small towers for the offline miniature) live beside this file;
# registering them makes them ordinary open_clip model names.
_CONFIG_DIR = Path(__file__).parent / "model_configs"
open_clip.add_model_config(_CONFIG_DIR)

NO_PRETRAINED = ("", "none")


@dataclass(frozen=True)
class ClipBundle:
    """A frozen CLIP with what classification needs besides the weights."""

    model: open_clip.CLIP
    tokenizer: open_clip.tokenizer.SimpleTokenizer
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


def available_models() -> list[str]:
    return open_clip.list_models()


@dataclass(frozen=True)
class ModelDims:
    """What a method needs to know of a CLIP to build its modules, without building the CLIP."""

    embed_dim: int  # joint image-text feature width
    text_width: int  # token embedding / text transformer width
    image_width: int
    text_depth: int
    image_depth: int
    context_length: int  # text tokens, SOS and EOT included


def model_dims(model_name: str) -> ModelDims:
    """Read from open_clip's model config, so the server can size tensors without weights."""
    config = open_clip.get_model_config(model_name)
    if config is None:
        raise ValueError(f"model-name={model_name!r} is unknown; valid names: {available_models()}")
    text, vision = config.get("text_cfg", {}), config.get("vision_cfg", {})
    if "timm_model_name" in vision or "hf_model_name" in text or not isinstance(vision.get("layers"), int):
        raise ValueError(
            f"model-name={model_name!r} is not an open_clip CLIP with a ViT image tower and a text "
            "transformer, which every method here adapts or prompts"
        )
    return ModelDims(
        embed_dim=int(config["embed_dim"]),
        text_width=int(text.get("width", 512)),
        image_width=int(vision.get("width", 768)),
        text_depth=int(text.get("layers", 12)),
        image_depth=int(vision["layers"]),
        context_length=int(text.get("context_length", 77)),
    )


BUNDLED_SUFFIXES = (".safetensors", ".pt")


def bundled_checkpoint(name: str) -> Path | None:
    """A checkpoint shipped in ``common/weights/`` under ``name`` (without suffix), if any.

    Searched on every ``sys.path`` entry rather than beside this file: Flower runs the app
    from an unpacked bundle (FAB) that carries only source files, while the installed
    project (``pip install``) carries the weights.
    """
    if not name or any(sep in name for sep in "/\\") or name.startswith("."):
        return None
    roots = [Path(__file__).resolve().parents[2], *(Path(p) for p in sys.path if p)]
    for root in roots:
        for suffix in BUNDLED_SUFFIXES:
            candidate = root / "common" / "weights" / f"{name}{suffix}"
            if candidate.is_file():
                return candidate
    return None


def resolve_pretrained(model_name: str, pretrained: str) -> tuple[str | None, bool]:
    """Return (open_clip pretrained argument, force_quick_gelu); raise :class:`CheckpointError`
    for a missing file, an unknown tag, or a file that records another model name."""
    if pretrained.lower() in NO_PRETRAINED:
        return None, False
    path = Path(pretrained).expanduser()
    if not path.is_file():
        path = bundled_checkpoint(pretrained) or path
    if path.is_file():
        return str(path), _file_quick_gelu(model_name, pretrained, path)
    tags = open_clip.list_pretrained_tags_by_model(model_name)
    if pretrained not in tags:
        looks_like_path = any(sep in pretrained for sep in ("/", "\\", "."))
        if looks_like_path:
            raise CheckpointError(
                f"pretrained={pretrained!r}: no such checkpoint file "
                f"(and not an open_clip tag of {model_name!r}); give the path of a checkpoint present on every node "
                "(pfedmma-weights makes one from OpenAI's or open_clip's released weights; docs/deployment.md)"
            )
        raise CheckpointError(
            f"pretrained={pretrained!r} is not a tag of model {model_name!r}; "
            f"valid tags: {sorted(tags) or 'none'}, a bundled checkpoint name, a checkpoint file path, "
            "or '' for random init"
        )
    # OpenAI's weights were trained with QuickGELU; loading them into a GELU model runs
    # without error but every activation is subtly wrong.
    quick_gelu = pretrained == "openai" and not model_name.endswith("-quickgelu")
    return pretrained, quick_gelu


def activation(model_name: str, quick_gelu: bool = False) -> str:
    """The MLP activation ``model_name`` builds ("QuickGELU" or "GELU")."""
    config = open_clip.get_model_config(model_name) or {}
    return "QuickGELU" if quick_gelu or config.get("quick_gelu", False) else "GELU"


_UNCHECKED: set[str] = set()  # files already warned about, so a process warns once per file


def _file_quick_gelu(model_name: str, pretrained: str, path: Path) -> bool:
    """force_quick_gelu for a checkpoint file, from the architecture it records.

    The recorded activation is forced rather than trusted to the config, so that a model without
    a ``-quickgelu`` config (the project's tiny ones) still gets the activation its weights need.
    """
    recorded = checkpoint.read_architecture(pretrained, path)
    if recorded is None:
        key = str(path.resolve())
        if key not in _UNCHECKED and not checkpoint.is_torchscript(path):  # that one is refused, with the way out
            _UNCHECKED.add(key)
            log.warning(
                "pretrained=%r: %s records no architecture, so whether model-name=%r (%s) has the activation "
                "its weights were trained with cannot be checked (OpenAI's weights need QuickGELU); "
                "pfedmma-weights writes files that record it",
                pretrained, path, model_name, activation(model_name),
            )
        return False
    if recorded.model_name != model_name:
        needs, builds = activation(recorded.model_name, bool(recorded.quick_gelu)), activation(model_name)
        why = (f"its {builds} blocks would load these {needs} weights without any error and compute wrong features"
               if needs != builds else "it is another architecture")
        raise CheckpointError(
            f"pretrained={pretrained!r}: {path} records that its weights are for model-name={recorded.model_name!r} "
            f"({needs}), not model-name={model_name!r}: {why}. Set model-name={recorded.model_name!r}"
        )
    return bool(recorded.quick_gelu)


def build_clip(
    model_name: str,
    pretrained: str = "",
    device: str | torch.device = "cpu",
    cache_dir: Path | None = None,
    init_seed: int = 0,
) -> ClipBundle:
    """Create the CLIP, load its weights and freeze every parameter.

    Without pretrained weights the backbone is initialised from ``init_seed``, so every
    process (every client) gets the same frozen model. With ``cache_dir`` the prepared
    weights are cached there and memory-mapped by later calls (see ``backbone_cache``).
    """
    models = available_models()
    if model_name not in models:
        raise ValueError(f"model-name={model_name!r} is unknown; valid names: {models}")
    weights, quick_gelu = resolve_pretrained(model_name, pretrained)
    cached = None
    if cache_dir is not None:
        cached = cache_dir.expanduser() / f"{backbone_cache.cache_key(model_name, weights, quick_gelu, init_seed)}.pt"
        model = backbone_cache.load_cached(cached, model_name, quick_gelu)
    if cached is None or model is None:
        model = _create(model_name, pretrained, weights, quick_gelu, init_seed)
        if cached is not None:
            backbone_cache.store(cached, model)
    model = model.to(device)
    if not isinstance(model, open_clip.CLIP):
        raise ValueError(  # noqa: TRY004 - a bad model-name value, not a caller type error
            f"model-name={model_name!r} builds {type(model).__name__}; "
            "pFedMMA needs an open_clip CLIP with a ViT image tower and a text transformer"
        )
    freeze(model)
    model.eval()
    cfg = model.visual.preprocess_cfg
    size = model.visual.image_size
    return ClipBundle(
        model=model,
        tokenizer=open_clip.get_tokenizer(model_name),
        image_size=size[0] if isinstance(size, tuple) else int(size),
        mean=tuple(cfg["mean"]),
        std=tuple(cfg["std"]),
    )


def _create(model_name: str, pretrained: str, weights: str | None, quick_gelu: bool, init_seed: int) -> nn.Module:
    """open_clip's model with its weights; a checkpoint file is first read safely here (see
    ``checkpoint``), and any failure to use it becomes a :class:`CheckpointError` naming
    ``pretrained``, the file and what was expected."""
    path = Path(weights) if weights is not None and Path(weights).is_file() else None
    found = checkpoint.read_shapes(pretrained, path) if path is not None else None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(init_seed)
        try:
            return open_clip.create_model(
                model_name, pretrained=weights, force_quick_gelu=quick_gelu, require_pretrained=weights is not None
            )
        except Exception as err:
            if path is None or found is None:
                raise
            raise checkpoint.does_not_fit(pretrained, path, model_name, found, state_shapes(model_name), err) from None


class _NoWeightsWarning(logging.Filter):
    """Drops open_clip's "No pretrained weights loaded" warning, from this thread only: another
    thread's model may really be randomly initialised."""

    def __init__(self) -> None:
        super().__init__()
        self.thread = threading.get_ident()

    def filter(self, record: logging.LogRecord) -> bool:
        return record.thread != self.thread or not record.getMessage().startswith("No pretrained weights loaded")


@contextlib.contextmanager
def weights_loaded_elsewhere() -> Iterator[None]:
    """For a model built empty and then filled (backbone cache, meta-device shapes): open_clip
    warns that it is randomly initialised, which is not so. open_clip logs through the root
    logger itself (``logging.warning``), so the filter sits there, for this call only."""
    root, quiet = logging.getLogger(), _NoWeightsWarning()
    root.addFilter(quiet)
    try:
        yield
    finally:
        root.removeFilter(quiet)


def _meta_model(model_name: str) -> nn.Module:
    """The model's structure on the meta device: shapes without memory or weights."""
    with weights_loaded_elsewhere():
        return open_clip.create_model(model_name, pretrained=None, device="meta")


def state_shapes(model_name: str) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor in the model's state dict, from the meta device."""
    return {k: tuple(v.shape) for k, v in _meta_model(model_name).state_dict().items()}


def backbone_parameter_count(model_name: str) -> int:
    """Parameters of the (frozen) CLIP, counted on the meta device."""
    return sum(p.numel() for p in _meta_model(model_name).parameters())


def freeze(module: nn.Module) -> None:
    for p in module.parameters():
        p.requires_grad_(False)
