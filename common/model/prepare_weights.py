"""``pfedmma-weights``: released CLIP weights -> one safetensors file that records its architecture.

OpenAI released CLIP as TorchScript archives (``ViT-B-16.pt``) trained with QuickGELU; open_clip
distributes state dicts (``.bin``, ``.pt``, ``.safetensors``) for its model names. No file says
which activation its weights need, and ``model-name='ViT-B-16'`` loads OpenAI's weights into GELU
blocks without any error: every feature is then subtly wrong. This command reads either kind as
tensors only (TorchScript through ``torch.jit.load``, which rebuilds tensors and TorchScript code
without importing Python objects, and of which only ``state_dict()`` is used; state dicts through
``torch.load(weights_only=True)`` or safetensors), loads them strictly into the open_clip model
they belong to, and writes one safetensors file whose metadata records that model name, whether
it uses QuickGELU, the source file and its sha256, and the library versions. The run's loader refuses the file under any other
``model-name`` (``common.model.clip.resolve_pretrained``).

OpenAI's files go through open_clip's own OpenAI route (``build_model_from_openai_state_dict``),
which infers the architecture from the tensors and sets QuickGELU; the file is recorded under the
``-quickgelu`` model name where open_clip has one (``ViT-B-16-quickgelu``), else under the plain
name with ``quick_gelu=true``, which the loader forces (the project's tiny configs have no
``-quickgelu`` twin). Before the file is put in place it is loaded back through the run's loader
and must compute what open_clip's OpenAI model (or, for open_clip files, the source) computes.
"""

from __future__ import annotations

import argparse
import difflib
import hashlib
import os
import re
import sys
import tempfile
import warnings
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import open_clip
import torch
from open_clip.model import build_model_from_openai_state_dict
from open_clip.pretrained import get_pretrained_url, list_pretrained_models_by_tag
from open_clip.transformer import QuickGELU
from safetensors.torch import load_file, save_file
from torch import nn

from common.errors import CheckpointError, disk_full, is_disk_full
from common.model import checkpoint
from common.model.backbone_cache import skipped_init
from common.model.clip import activation, available_models, build_clip, state_shapes, weights_loaded_elsewhere

PROG = "pfedmma-weights"
FORMATS = ("auto", "openai", "open_clip")
WEIGHTS_DIR = "~/.cache/pfedmma/weights"  # where the paper presets look (docs/deployment.md)
TORCHSCRIPT = "TorchScript archive"
# Attributes OpenAI's archives keep beside the weights; open_clip drops them too.
OPENAI_ATTRIBUTES = ("input_resolution", "context_length", "vocab_size")
ACCEPTED = (
    "expected OpenAI's released file (a TorchScript archive such as ViT-B-16.pt) or a state dict of tensors "
    "(.safetensors, or a torch.save file of tensors); files are only read as tensors, never unpickled"
)
_TAG = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


class WeightsError(Exception):
    """Bad input to the command; the message names the value and what is allowed."""


@dataclass
class Source:
    """The tensors of ``--source``, read safely."""

    path: Path
    kind: str  # TORCHSCRIPT, "safetensors file" or "torch state dict"
    tensors: dict[str, torch.Tensor]
    sha256: str
    openai_attributes: bool  # it carried OpenAI's archive attributes, so it is OpenAI's layout


@dataclass
class Prepared:
    """What is written, and the model that the written file must reproduce."""

    model_name: str
    quick_gelu: bool
    tensors: dict[str, torch.Tensor]
    reference: nn.Module
    reference_name: str  # says what the reference is, for the report
    notes: list[str] = field(default_factory=list)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_source(path: Path) -> Source:
    """The file's tensors, without unpickling anything; :class:`WeightsError` when it is not weights."""
    if not path.is_file():
        raise WeightsError(f"--source {str(path)!r}: no such file")
    try:
        if checkpoint.is_torchscript(path):
            kind = TORCHSCRIPT
            with warnings.catch_warnings():
                # torch deprecates TorchScript for new exports; OpenAI's released files are TorchScript.
                warnings.simplefilter("ignore", FutureWarning)
                content: object = torch.jit.load(str(path), map_location="cpu").state_dict()
        elif path.name.endswith(".safetensors"):
            kind = "safetensors file"
            content = load_file(str(path))
        else:
            kind = "torch state dict"
            content = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as err:  # noqa: BLE001 - torch and safetensors fail in many types; each is the file's
        raise WeightsError(f"--source {str(path)!r}: cannot read it as weights ({checkpoint.reason(err)}); {ACCEPTED}") from None
    tensors, attributes = _tensors(path, content)
    return Source(path=path, kind=kind, tensors=tensors, sha256=sha256_of(path), openai_attributes=attributes)


def _tensors(path: Path, content: object) -> tuple[dict[str, torch.Tensor], bool]:
    if isinstance(content, Mapping) and "state_dict" in content:  # a training checkpoint, as open_clip reads it
        content = content["state_dict"]
    if not isinstance(content, Mapping) or not content:
        raise WeightsError(f"--source {str(path)!r} holds a {type(content).__name__}, not a dict of tensors; {ACCEPTED}")
    attributes = any(k in content for k in OPENAI_ATTRIBUTES)
    content = {k: v for k, v in content.items() if k not in OPENAI_ATTRIBUTES}
    others = {str(k): type(v).__name__ for k, v in content.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)}
    if others:
        raise WeightsError(f"--source {str(path)!r} holds values that are not tensors: {dict(list(others.items())[:3])}; {ACCEPTED}")
    if all(k.startswith("module.") for k in content):  # DataParallel's prefix, which open_clip strips
        content = {k.removeprefix("module."): v for k, v in content.items()}
    return dict(content), attributes


def choose_format(requested: str, source: Source, model_name: str | None) -> tuple[str, list[str]]:
    """The format to read ``source`` as, and a note when it was inferred."""
    if requested != "auto":
        return requested, []
    if source.kind == TORCHSCRIPT or source.openai_attributes:
        what = "a TorchScript archive" if source.kind == TORCHSCRIPT else "a state dict with OpenAI's archive attributes"
        return "openai", [f"--format auto: {what}, read as OpenAI's release (QuickGELU); pass --format open_clip if it is not"]
    if model_name is None:
        raise WeightsError(
            f"--source {str(source.path)!r} is a state dict, which does not say whose weights it holds: pass "
            "--format openai for OpenAI's weights (QuickGELU), or --model-name NAME for open_clip's weights of model NAME"
        )
    note = (f"--format auto: a state dict, read as open_clip's weights of {model_name!r} ({activation(model_name)}, "
            "its config's activation); pass --format openai if these are OpenAI's weights")
    return "open_clip", [note]


def check_model_name(name: str) -> None:
    models = available_models()
    if name not in models:
        close = difflib.get_close_matches(name, models, n=3)
        hint = f"did you mean {', '.join(map(repr, close))}? " if close else ""
        raise WeightsError(f"--model-name {name!r} is not an open_clip model name; {hint}valid names: {models}")


def _quiet_model(name: str, quick_gelu: bool = False) -> nn.Module:
    """An eval-mode model whose values are about to be overwritten by a strict load."""
    with skipped_init(), weights_loaded_elsewhere():
        return open_clip.create_model(name, pretrained=None, force_quick_gelu=quick_gelu).eval()


def _shapes(tensors: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in tensors.items()}


def _load_strictly(model: nn.Module, tensors: dict[str, torch.Tensor], source: Source, name: str) -> None:
    difference = checkpoint.mismatch(_shapes(tensors), _shapes(model.state_dict()))
    if difference:
        raise WeightsError(
            f"--source {str(source.path)!r} does not fit model {name!r}: {difference}; give --model-name the "
            "open_clip model these weights were saved from"
        )
    model.load_state_dict(tensors, strict=True)


def _heads(model: nn.Module) -> list[int]:
    return [m.num_heads for m in model.modules() if isinstance(m, nn.MultiheadAttention)]


def openai_release(digest: str) -> str | None:
    """The OpenAI model whose released file has this sha256: open_clip's download URLs for the
    ``openai`` tag carry the file's sha256 as their last folder, which open_clip checks too."""
    for name in list_pretrained_models_by_tag("openai"):
        url = get_pretrained_url(name, "openai")
        if "openaipublic" in url and digest.startswith(url.split("/")[-2]):
            return name.removesuffix("-quickgelu")
    return None


def _plausible(name: str, tensors: Mapping[str, torch.Tensor]) -> bool:
    """A quick look at the config, so only likely models are built (on the meta device) to compare."""
    config = open_clip.get_model_config(name) or {}
    vision = config.get("vision_cfg", {})
    vit = "visual.proj" in tensors  # as open_clip's OpenAI route tells a ViT from a ResNet
    if config.get("embed_dim") != tensors["text_projection"].shape[1] or vit != isinstance(vision.get("layers"), int):
        return False
    return not vit or vision.get("patch_size") == tensors["visual.conv1.weight"].shape[-1]


def _infer_openai_model(source: Source, tensors: Mapping[str, torch.Tensor]) -> str:
    released = sorted({n.removesuffix("-quickgelu") for n in list_pretrained_models_by_tag("openai")})
    shapes = _shapes(tensors)
    fits = [n for n in released if _plausible(n, tensors) and not checkpoint.mismatch(shapes, state_shapes(n))]
    if len(fits) > 1:  # same shapes, another name: prefer the one the file is named after
        fits = [n for n in fits if n == source.path.stem] or fits
    if len(fits) != 1:
        found = f"fit several ({fits})" if fits else "fit none"
        raise WeightsError(
            f"--source {str(source.path)!r}: its tensors {found} of the models OpenAI released ({', '.join(released)}); "
            "pass --model-name, the open_clip model name they belong to"
        )
    return fits[0]


def from_openai(source: Source, model_name: str | None) -> Prepared:
    """OpenAI's weights through open_clip's OpenAI route, recorded under the QuickGELU model name."""
    if model_name is not None:
        check_model_name(model_name)
    tensors = {k: v for k, v in source.tensors.items() if k != "attn_mask"}  # a scripted model's causal mask
    try:
        with skipped_init():
            reference = build_model_from_openai_state_dict(dict(tensors), quick_gelu=True, cast_dtype=None)
    except Exception as err:  # noqa: BLE001 - a missing key or shape surfaces in several types
        raise WeightsError(
            f"--source {str(source.path)!r} is not in OpenAI CLIP's key layout ({checkpoint.reason(err)}); --format "
            "openai expects OpenAI's released file or a state dict with its keys (visual.conv1.weight, "
            "transformer.resblocks.0..., text_projection); for open_clip's weights use --format open_clip --model-name NAME"
        ) from None
    # The route casts to fp16 as OpenAI's archives are; back to fp32, with the file's exact values.
    reference.float().load_state_dict(tensors, strict=True)
    notes = []
    release = openai_release(source.sha256)
    if release is not None:
        notes.append(f"sha256 matches OpenAI's released {release} (the hash in open_clip's download URL for it)")
    base = (model_name or release or _infer_openai_model(source, tensors)).removesuffix("-quickgelu")
    # open_clip's -quickgelu configs are the plain ones with QuickGELU; where none exists the
    # recorded quick_gelu=true is forced by the loader instead.
    recorded = f"{base}-quickgelu" if f"{base}-quickgelu" in available_models() else base
    if recorded != (model_name or recorded):
        notes.append(f"recorded as {recorded!r}, not {model_name!r}: OpenAI's weights use QuickGELU")
    target = _quiet_model(recorded, quick_gelu=True)
    _load_strictly(target, tensors, source, recorded)
    name = "open_clip's OpenAI model (open_clip.model.build_model_from_openai_state_dict)"
    if _heads(reference) != _heads(target):
        # Shapes do not show how a width splits into heads; OpenAI's route assumes 64-wide heads,
        # as every OpenAI release has. Given a model name with others, that name decides.
        notes.append(
            f"attention heads per block: {recorded!r} has {sorted(set(_heads(target)))}, open_clip's OpenAI route "
            f"assumes {sorted(set(_heads(reference)))} (64-wide, as in every OpenAI release); the file cannot say, "
            f"so {recorded!r}'s are used"
        )
        reference, name = target, f"the source loaded into {recorded!r}"
    return Prepared(recorded, True, tensors, reference, name, notes)


def from_open_clip(source: Source, model_name: str | None) -> Prepared:
    """open_clip's weights of ``model_name``, with that config's activation."""
    if model_name is None:
        raise WeightsError("--format open_clip needs --model-name, the open_clip model the weights belong to")
    check_model_name(model_name)
    model = _quiet_model(model_name)
    tensors = dict(source.tensors)
    if "attn_mask" in tensors and "attn_mask" not in model.state_dict():
        del tensors["attn_mask"]  # a scripted model's causal mask, not a weight
    _load_strictly(model, tensors, source, model_name)
    quick_gelu = activation(model_name) == "QuickGELU"
    return Prepared(model_name, quick_gelu, tensors, model, f"the source loaded into {model_name!r}")


def default_out(model_name: str, tag: str) -> Path:
    return Path(WEIGHTS_DIR).expanduser() / f"{model_name}-{tag}.safetensors"


def _write(path: Path, tensors: Mapping[str, torch.Tensor], metadata: dict[str, str]) -> None:
    try:
        save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    except Exception as err:
        if is_disk_full(err):
            raise disk_full(path, "the weights", "free space there, or give --out on another file system") from None
        raise


def _readable_by_all(path: Path) -> None:
    umask = os.umask(0)
    os.umask(umask)
    path.chmod(0o644 & ~umask)


@torch.no_grad()
def verify(path: Path, prepared: Prepared) -> int:
    """Load ``path`` as a run does and compare it with the reference; the parameter count."""
    loaded = build_clip(prepared.model_name, str(path)).model
    for p in prepared.reference.parameters():  # frozen as the loaded model is: torch's attention
        p.requires_grad_(False)  # takes another kernel path for trainable weights
    if any(isinstance(m, QuickGELU) for m in loaded.modules()) != prepared.quick_gelu:
        raise WeightsError(f"{path} loads into {prepared.model_name!r} with the wrong activation")  # an internal slip
    size = loaded.visual.image_size
    size = size if isinstance(size, tuple) else (size, size)
    images = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(0))
    text = open_clip.get_tokenizer(prepared.model_name)(["a photo of a dog.", "a photo of a cat."])
    for what, run in (("image", lambda m: m.encode_image(images)), ("text", lambda m: m.encode_text(text))):
        got, want = run(loaded), run(prepared.reference)
        if not torch.allclose(got, want, rtol=1e-4, atol=1e-5):
            raise WeightsError(
                f"{path} loaded as {prepared.model_name!r} computes other {what} features than {prepared.reference_name} "
                f"(largest difference {(got - want).abs().max().item():.3g}); the model name does not fit these weights"
            )
    return sum(p.numel() for p in loaded.parameters())


def prepare(source_path: Path, fmt: str, model_name: str | None, out: Path | None, tag: str | None,
            overwrite: bool) -> list[str]:
    """Convert, write, verify; the report's lines."""
    if out is not None and not out.name.endswith(".safetensors"):
        raise WeightsError(f"--out {str(out)!r}: the file name must end in .safetensors (the loader reads by suffix)")
    source = read_source(source_path.expanduser())
    fmt, notes = choose_format(fmt, source, model_name)
    prepared = (from_openai if fmt == "openai" else from_open_clip)(source, model_name)
    tag = tag or ("openai" if fmt == "openai" else re.sub(r"[^A-Za-z0-9._-]+", "-", source.path.stem).strip("-._"))
    if not _TAG.fullmatch(tag):
        raise WeightsError(f"--tag {tag!r}: use letters, digits, '.', '_' and '-' (it names the file)")
    out = (out or default_out(prepared.model_name, tag)).expanduser()
    if out.exists() and not overwrite:
        raise WeightsError(f"--out {str(out)!r} exists; pass --overwrite to replace it, or give another --out")
    metadata = {
        "format": "pt",  # what safetensors files saved from PyTorch carry
        **checkpoint.architecture_metadata(prepared.model_name, prepared.quick_gelu),
        "tag": tag,
        "source_file": source.path.name,
        "source_sha256": source.sha256,
        "source_format": fmt,
        "open_clip_version": open_clip.__version__,
        "torch_version": torch.__version__,
        "written_by": PROG,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    # Written beside the target and verified before it is renamed into place: a node never
    # sees a half-written or unverified file under the name the presets use.
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.stem}-", suffix=".partial.safetensors", dir=out.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        _write(tmp, prepared.tensors, metadata)
        _readable_by_all(tmp)  # mkstemp makes it private; a container may read it as another user
        parameters = verify(tmp, prepared)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    act = "QuickGELU" if prepared.quick_gelu else "GELU"
    return [
        f"read {source.path} ({source.kind}, {fmt} format), sha256 {source.sha256}",
        *(f"note: {n}" for n in notes + prepared.notes),
        f"wrote {out}",
        f"  model-name  {prepared.model_name} ({act})",
        f"  tensors     {len(prepared.tensors)}",
        f"  parameters  {parameters:,}",
        f"  bytes       {out.stat().st_size:,}",
        f"  sha256      {sha256_of(out)}",
        f"verified: loads strictly as model-name {prepared.model_name!r}, and computes what {prepared.reference_name} computes",
        f'run config: model-name = "{prepared.model_name}"  pretrained = "{out}"',
    ]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=(
            "Turn OpenAI's released CLIP file or an open_clip download into one safetensors file that\n"
            "records the open_clip model name it must be loaded as and whether that model uses QuickGELU\n"
            "(OpenAI's weights do: loaded into a GELU model they give wrong features without any error).\n"
            "A run with another model-name refuses the file. Nothing is downloaded, nothing is unpickled."
        ),
        epilog=(
            f"examples:\n  {PROG} --source ViT-B-16.pt --format openai\n"
            f"      -> {WEIGHTS_DIR}/ViT-B-16-quickgelu-openai.safetensors; run with model-name='ViT-B-16-quickgelu'\n"
            f"  {PROG} --source open_clip_model.safetensors --model-name ViT-B-16 --tag laion2b_s34b_b88k\n"
            "see docs/deployment.md, 'Weights offline (air-gapped sites)'"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--source", required=True, type=Path, metavar="FILE",
                        help="OpenAI's released file (TorchScript, e.g. ViT-B-16.pt) or a state dict (.safetensors, "
                             ".bin, .pt) in OpenAI's or open_clip's key layout")
    parser.add_argument("--format", default="auto", choices=FORMATS,
                        help="openai: OpenAI's weights (QuickGELU; the architecture is inferred, recorded as the "
                             "'-quickgelu' model name); open_clip: open_clip's weights of --model-name, with its "
                             "config's activation; auto (default): a TorchScript archive is openai, a state dict "
                             "needs --model-name and is open_clip")
    parser.add_argument("--model-name", default=None, metavar="NAME",
                        help="the open_clip model name (e.g. ViT-B-16); needed for open_clip weights, optional for "
                             "OpenAI's (inferred from the tensors)")
    parser.add_argument("--out", default=None, type=Path, metavar="FILE",
                        help=f"the .safetensors file to write (default: {WEIGHTS_DIR}/<model-name>-<tag>.safetensors)")
    parser.add_argument("--tag", default=None,
                        help="where the weights come from, for the default file name and the metadata (default: "
                             "'openai' for OpenAI's weights, else the source file's name)")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        lines = prepare(args.source, args.format, args.model_name, args.out, args.tag, args.overwrite)
    except (WeightsError, CheckpointError) as err:
        parser.exit(2, f"{PROG}: error: {err}\n")
    print("\n".join(lines), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
