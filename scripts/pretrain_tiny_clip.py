"""Pretrain the tiny CLIP (``pfedmma-tiny``) on procedural shapes, offline, on a CPU.

No CLIP weights can be downloaded here, and a frozen *random* backbone makes federated
adapter tuning meaningless. This script gives the offline miniature benchmark a backbone
with real (if small) zero-shot ability: contrastive image-text pretraining on the 48
compositions in all four styles (``--compositions base`` keeps the federated novel classes
of :mod:`common.data.novel_split` out), then a zero-shot report on the federated base and
novel classes. ``--logit-scale 100`` fixes CLIP's temperature at its trained value instead of
learning it from CLIP's initial 14.3 (a 600-step run cannot move it far).

    python scripts/pretrain_tiny_clip.py            # 600 steps; docs/miniature-benchmark.md
    python scripts/pretrain_tiny_clip.py --eval-only   # re-evaluate the shipped checkpoint

Captions are the dataset's styled caption or the federated prompt "a photo of a {name}.";
``--attribute-fraction`` adds one-attribute captions ("a photo of a red shape.").
Those raised accuracy on held-out compositions but made the model prefer seen
compositions whenever a classifier mixes both (as the federated base and novel
classifiers do), so they are off by default; the doc has the measurements.

Writes an fp16 state dict (``.safetensors``) that ``build_clip("pfedmma-tiny", PATH)``
loads, and a JSON of the run (command, steps, wall time, zero-shot accuracies).
Repeated short runs with the same script revision, arguments and thread count gave
bit-identical weights (``weights_sha256``; the file hash differs because safetensors writes
metadata keys in arbitrary order). Different thread counts or script revisions drift apart.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import platform
import random
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torchvision.transforms import v2

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a plain script

from common.data.novel_split import BASE_LABELS, NOVEL_LABELS
from common.data.shapes import COLOURS, SHAPES, STYLES, ShapesSource, caption, class_names
from common.model.clip import build_clip

MODEL_NAME = "pfedmma-tiny"
DEFAULT_OUT = Path(__file__).resolve().parent.parent / "common" / "weights" / "pfedmma-tiny-shapes.safetensors"
EVAL_TEMPLATE = "a photo of a {}."  # the federated prompt (docs/paper.md section 1)
ALL_LABELS = list(range(len(class_names())))
# Text kinds; a caption is a positive for every image it truly describes (see _positives).
STYLED, PLAIN, COLOUR, SHAPE = 0, 1, 2, 3
NUM_COLOURS = len(COLOURS)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=600, help="optimiser steps (default: 600)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3, help="peak lr of the one-cycle schedule")
    p.add_argument("--weight-decay", type=float, default=0.1, help="AdamW decay of matrices only")
    p.add_argument(
        "--plain-fraction",
        type=float,
        default=0.5,
        help="share of captions that are the plain eval prompt instead of the styled caption",
    )
    p.add_argument(
        "--attribute-fraction",
        type=float,
        default=0.0,
        help="share of captions naming one attribute only ('a photo of a red shape.', "
        "'a photo of a circle.'), half each",
    )
    p.add_argument(
        "--compositions",
        choices=("all", "base"),
        default="all",
        help="pretrain on all 48 compositions, or on the 24 federated base ones only (default: all)",
    )
    p.add_argument(
        "--logit-scale",
        type=float,
        default=0.0,
        help="fix the logit scale at this value (CLIP ends at 100); 0 = learn it from 14.3, capped at 100",
    )
    p.add_argument("--crop-scale-min", type=float, default=0.6, help="random resized crop scale lower bound")
    p.add_argument(
        "--train-per-class", type=int, default=500, help="distinct training images per (composition, style) drawn from"
    )
    p.add_argument("--test-per-class", type=int, default=25, help="test images per (class, style)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="checkpoint path (.safetensors)")
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument(
        "--eval-only", action="store_true", help="only re-evaluate the checkpoint at --out and update its JSON"
    )
    args = p.parse_args(argv)
    if args.out.suffix != ".safetensors":
        p.error(f"--out={str(args.out)!r}: expected a .safetensors file")
    if not 0.0 <= args.logit_scale <= 100.0:
        p.error(f"--logit-scale={args.logit_scale}: expected 0 (learned) or a value in (0, 100]")
    for name in ("plain_fraction", "attribute_fraction"):
        if not 0.0 <= getattr(args, name) <= 1.0:
            p.error(f"--{name.replace('_', '-')}={getattr(args, name)}: expected a value in [0, 1]")
    return args


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class CaptionTable:
    """Every training text tokenised once, looked up by what it describes."""

    def __init__(self, tokenizer: open_clip.tokenizer.SimpleTokenizer, labels: Sequence[int]) -> None:
        names = class_names()
        texts: dict[tuple[int, int, int], str] = {}
        for label in labels:
            for s, style in enumerate(STYLES):
                texts[(STYLED, label, s)] = caption(names[label], style)
            texts[(PLAIN, label, -1)] = EVAL_TEMPLATE.format(names[label])
        for c, colour in enumerate(COLOURS):
            texts[(COLOUR, c, -1)] = EVAL_TEMPLATE.format(f"{colour} shape")
        for s, shape in enumerate(SHAPES):
            texts[(SHAPE, s, -1)] = EVAL_TEMPLATE.format(shape)
        self.index = {key: i for i, key in enumerate(texts)}
        self.texts = list(texts.values())
        self.tokens = tokenizer(self.texts)

    def text_id(self, kind: int, label: int, style: int) -> int:
        """The text of ``kind`` describing an image of class ``label`` in style ``style``."""
        if kind == STYLED:
            return self.index[(kind, label, style)]
        if kind == PLAIN:
            return self.index[(kind, label, -1)]
        attribute = label % NUM_COLOURS if kind == COLOUR else label // NUM_COLOURS
        return self.index[(kind, attribute, -1)]


def _positives(labels: torch.Tensor, styles: torch.Tensor, kinds: torch.Tensor) -> torch.Tensor:
    """``P[i, j] = 1`` when text ``j`` (made from image ``j``) truly describes image ``i``.

    Same-class pairs are positives (CLIP's one-hot target would push apart two images of
    the same composition); a styled caption also requires the same style, and a
    one-attribute caption only that attribute.
    """
    colour, shape = labels % NUM_COLOURS, labels // NUM_COLOURS
    same_colour = colour[:, None] == colour[None, :]
    same_shape = shape[:, None] == shape[None, :]
    same_style = styles[:, None] == styles[None, :]
    kind = kinds[None, :]
    pos = torch.where(kind == STYLED, same_colour & same_shape & same_style, same_colour & same_shape)
    pos = torch.where(kind == COLOUR, same_colour, pos)
    pos = torch.where(kind == SHAPE, same_shape, pos)
    return pos.float()


def contrastive_loss(image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE with soft targets spread evenly over each row's positives."""
    logits = scale * image @ text.T
    loss_i = -(pos / pos.sum(1, keepdim=True) * F.log_softmax(logits, 1)).sum(1).mean()
    loss_t = -(pos.T / pos.T.sum(1, keepdim=True) * F.log_softmax(logits.T, 1)).sum(1).mean()
    return (loss_i + loss_t) / 2


class TrainStream:
    """Shuffled, endless batches of training images of the chosen compositions, with captions."""

    def __init__(self, args: argparse.Namespace, mean: Sequence[float], std: Sequence[float]) -> None:
        self.source = ShapesSource("train", args.train_per_class, STYLES, seed=args.seed)
        allowed = np.isin(self.source.labels, pretrain_labels(args))
        self.pool = np.flatnonzero(allowed)
        assert self.source.domains is not None  # ShapesSource records every image's style
        self.domains: np.ndarray = self.source.domains
        self.rng = np.random.default_rng(args.seed)
        self.order = self.rng.permutation(self.pool)
        self.pos = 0
        self.batch_size = args.batch_size
        self.plain_fraction = args.plain_fraction
        self.attribute_fraction = args.attribute_fraction
        self.style_id = {s: i for i, s in enumerate(STYLES)}
        # Light augmentation: shapes vary in size and place already; the crop also
        # prepares the backbone for the federated random-resized-crop training transform.
        # No colour jitter: colour is half of every class name.
        self.augment = v2.Compose(
            [
                v2.RandomResizedCrop(32, scale=(args.crop_scale_min, 1.0), antialias=True),
                v2.RandomHorizontalFlip(),
            ]
        )
        self.normalise = v2.Normalize(list(mean), list(std))

    def _next_indices(self) -> np.ndarray:
        if self.pos + self.batch_size > len(self.order):
            self.order = self.rng.permutation(self.pool)
            self.pos = 0
        batch = self.order[self.pos : self.pos + self.batch_size]
        self.pos += self.batch_size
        return batch

    def _kinds(self, n: int) -> np.ndarray:
        kinds = np.where(self.rng.random(n) < self.plain_fraction, PLAIN, STYLED).astype(np.int64)
        if self.attribute_fraction > 0:  # no extra draws otherwise: keeps earlier runs reproducible
            u = self.rng.random(n)
            one_attribute = np.where(u < self.attribute_fraction / 2, COLOUR, SHAPE)
            kinds = np.where(u < self.attribute_fraction, one_attribute, kinds)
        return kinds

    def next(
        self, captions: CaptionTable
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        idx = self._next_indices()
        images = torch.stack([self.augment(to_tensor(self.source.image(int(i)))) for i in idx])
        labels = torch.as_tensor(self.source.labels[idx])
        styles = torch.as_tensor([self.style_id[str(d)] for d in self.domains[idx]])
        kinds = torch.as_tensor(self._kinds(len(idx)))
        text_ids = [
            captions.text_id(int(k), int(lab), int(sty)) for lab, sty, k in zip(labels, styles, kinds, strict=True)
        ]
        return self.normalise(images), captions.tokens[text_ids], labels, styles, kinds


def pretrain_labels(args: argparse.Namespace) -> list[int]:
    return ALL_LABELS if args.compositions == "all" else BASE_LABELS


def to_tensor(image: object) -> torch.Tensor:
    array = np.asarray(image, dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, object]]:
    # As open_clip's trainer: decay matrices, not gains, biases or the logit scale.
    trained = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in trained if p.ndim >= 2]
    rest = [p for p in trained if p.ndim < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


def train(args: argparse.Namespace) -> tuple[open_clip.CLIP, dict[str, object]]:
    bundle = build_clip(MODEL_NAME, "")
    model = bundle.model
    for p in model.parameters():  # build_clip freezes; pretraining trains everything
        p.requires_grad_(True)
    model.train()
    if args.logit_scale:
        model.logit_scale.data.fill_(math.log(args.logit_scale))
        model.logit_scale.requires_grad_(False)
    captions = CaptionTable(bundle.tokenizer, pretrain_labels(args))
    stream = TrainStream(args, bundle.mean, bundle.std)
    optimiser = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=args.lr, betas=(0.9, 0.98), eps=1e-6)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=args.lr, total_steps=args.steps, pct_start=0.15)
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"{MODEL_NAME}: {n_params:,} parameters; {len(stream.pool):,} training images "
        f"({len(pretrain_labels(args))} compositions x {len(STYLES)} styles)",
        flush=True,
    )
    start = time.perf_counter()
    running = 0.0
    for step in range(1, args.steps + 1):
        images, tokens, labels, styles, kinds = stream.next(captions)
        image_f = F.normalize(model.encode_image(images), dim=-1)
        text_f = F.normalize(model.encode_text(tokens), dim=-1)
        loss = contrastive_loss(image_f, text_f, model.logit_scale.exp(), _positives(labels, styles, kinds))
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        schedule.step()
        with torch.no_grad():  # CLIP's clamp: temperature at most 100
            model.logit_scale.clamp_(0, math.log(100))
        running += loss.item()
        if step % args.log_every == 0 or step == args.steps:
            n = step % args.log_every or args.log_every
            print(
                f"step {step:5d}/{args.steps}  loss {running / n:.4f}  "
                f"logit_scale {model.logit_scale.exp().item():6.2f}  "
                f"lr {schedule.get_last_lr()[0]:.2e}  elapsed {time.perf_counter() - start:7.1f}s",
                flush=True,
            )
            running = 0.0
    model.eval()
    return model, {"train_seconds": round(time.perf_counter() - start, 1), "final_loss": round(loss.item(), 4)}


def save_fp16(model: torch.nn.Module, path: Path, metadata: dict[str, str]) -> None:
    """fp16 halves the file (the 49,408-token embedding is most of it); fp32 models load it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path), metadata=metadata)


@torch.no_grad()
def encode_test_set(
    model: open_clip.CLIP, source: ShapesSource, mean: Sequence[float], std: Sequence[float]
) -> torch.Tensor:
    # Test images are already at the model's 32x32 resolution, so the federated test
    # transform (resize + center crop) is the identity and only normalisation remains.
    normalise = v2.Normalize(list(mean), list(std))
    feats = []
    for lo in range(0, len(source), 512):
        batch = torch.stack([normalise(to_tensor(source.image(i))) for i in range(lo, min(lo + 512, len(source)))])
        feats.append(F.normalize(model.encode_image(batch), dim=-1))
    return torch.cat(feats)


@torch.no_grad()
def zero_shot_report(
    model: open_clip.CLIP,
    tokenizer: open_clip.tokenizer.SimpleTokenizer,
    source: ShapesSource,
    image_f: torch.Tensor,
    groups: dict[str, list[int]],
    seen_labels: Sequence[int],
) -> dict[str, dict[str, object]]:
    """Per group: a classifier over the group's classes only, accuracy per style and overall."""
    names = class_names()
    labels = torch.as_tensor(source.labels)
    domains = np.asarray(source.domains)
    seen = set(seen_labels)
    report: dict[str, dict[str, object]] = {}
    for group, classes in groups.items():
        text_f = F.normalize(model.encode_text(tokenizer([EVAL_TEMPLATE.format(names[c]) for c in classes])), dim=-1)
        mask = torch.as_tensor(np.isin(source.labels, classes))
        pred = torch.as_tensor(classes)[(image_f[mask] @ text_f.T).argmax(1)]
        correct = (pred == labels[mask]).numpy()
        dom, lab = domains[mask.numpy()], source.labels[mask.numpy()]
        entry: dict[str, object] = {
            "num_classes": len(classes),
            "chance": round(1 / len(classes), 4),
            "num_images": int(mask.sum()),
            "overall": round(float(correct.mean()), 4),
            "per_style": {s: round(float(correct[dom == s].mean()), 4) for s in STYLES},
        }
        in_seen = np.isin(lab, list(seen))
        if in_seen.any() and not in_seen.all():  # the group mixes seen and held-out compositions
            entry["seen_in_pretraining"] = round(float(correct[in_seen].mean()), 4)
            entry["unseen_in_pretraining"] = round(float(correct[~in_seen].mean()), 4)
        report[group] = entry
    return report


def print_table(report: dict[str, dict[str, object]]) -> None:
    header = f"{'group':<18}{'classes':>8}{'chance':>8}" + "".join(f"{s:>9}" for s in STYLES) + f"{'overall':>9}"
    print(header)
    print("-" * len(header))
    for group, e in report.items():
        per_style = e["per_style"]
        assert isinstance(per_style, dict)
        cells = "".join(f"{100 * per_style[s]:9.1f}" for s in STYLES)
        print(f"{group:<18}{e['num_classes']:>8}{100 * float(e['chance']):8.1f}{cells}{100 * float(e['overall']):9.1f}")  # type: ignore[arg-type]


def evaluate(path: Path, test_per_class: int, seed: int, seen_labels: Sequence[int]) -> dict[str, dict[str, object]]:
    """Zero-shot report of the checkpoint file, loaded through the project's own path."""
    bundle = build_clip(MODEL_NAME, str(path))
    source = ShapesSource("test", test_per_class, STYLES, seed=seed)
    image_f = encode_test_set(bundle.model, source, bundle.mean, bundle.std)
    groups = {"federated-base": BASE_LABELS, "federated-novel": NOVEL_LABELS, "all-48": ALL_LABELS}
    report = zero_shot_report(bundle.model, bundle.tokenizer, source, image_f, groups, seen_labels)
    print(f"\nzero-shot accuracy (%), prompt {EVAL_TEMPLATE!r}, {test_per_class} test images per class and style")
    print_table(report)
    return report


def weights_sha256(path: Path) -> str:
    """Digest of the tensors alone: safetensors writes metadata keys in arbitrary order, so
    the file's own hash differs between bit-identical runs while this one does not."""
    digest = hashlib.sha256()
    for name, tensor in sorted(load_file(str(path)).items()):
        digest.update(name.encode())
        digest.update(tensor.reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def reloads_identically(model: open_clip.CLIP, path: Path) -> bool:
    """The saved file, loaded by ``build_clip``, computes exactly what the fp16-rounded model does."""
    loaded = build_clip(MODEL_NAME, str(path))
    in_memory = model.half().float()  # the same fp16 rounding, in fp32
    tokens = loaded.tokenizer([EVAL_TEMPLATE.format(n) for n in class_names()[:8]])
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        same_text = torch.equal(in_memory.encode_text(tokens), loaded.model.encode_text(tokens))
        same_image = torch.equal(in_memory.encode_image(images), loaded.model.encode_image(images))
    return same_text and same_image


def command_line() -> str:
    return "python " + shlex.join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]])


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    seed_everything(args.seed)
    json_path = args.out.with_suffix(".json")
    if args.eval_only:
        if not args.out.is_file():
            raise FileNotFoundError(f"--eval-only: no checkpoint at {args.out}")
        result = json.loads(json_path.read_text()) if json_path.is_file() else {}
        seen = result.get("pretrain_labels", ALL_LABELS)
        report = evaluate(args.out, args.test_per_class, args.seed, seen)
        result = json.loads(json_path.read_text()) if json_path.is_file() else {}
        result["zero_shot"] = report
        result.setdefault("checkpoint", {})["weights_sha256"] = weights_sha256(args.out)
        result["eval_command"] = command_line()
        json_path.write_text(json.dumps(result, indent=2) + "\n")
        print(f"\nupdated the zero-shot report in {json_path}")
        return

    t0 = time.perf_counter()
    model, train_info = train(args)
    metadata = {
        "model_name": MODEL_NAME,
        "steps": str(args.steps),
        "seed": str(args.seed),
        "pretrain_labels": json.dumps(pretrain_labels(args)),
    }
    save_fp16(model, args.out, metadata)
    identical = reloads_identically(model, args.out)
    if not identical:
        raise RuntimeError(f"{args.out}: the reloaded model differs from the trained one")
    report = evaluate(args.out, args.test_per_class, args.seed, pretrain_labels(args))

    size = args.out.stat().st_size
    result = {
        "command": command_line(),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "checkpoint": {
            "file": args.out.name,
            "format": "safetensors, fp16 state dict",
            "bytes": size,
            "sha256": hashlib.sha256(args.out.read_bytes()).hexdigest(),
            "weights_sha256": weights_sha256(args.out),
            "reload_identical": identical,
        },
        **train_info,
        "total_seconds": round(time.perf_counter() - t0, 1),
        "pretrain_labels": pretrain_labels(args),
        "federated_base_labels": BASE_LABELS,
        "federated_novel_labels": NOVEL_LABELS,
        "logit_scale": round(float(model.logit_scale.exp()), 3),
        "eval_prompt": EVAL_TEMPLATE,
        "zero_shot": report,
        "environment": {
            "torch": torch.__version__,
            "open_clip": open_clip.__version__,
            "python": platform.python_version(),
            "threads": torch.get_num_threads(),
            "machine": platform.machine(),
        },
    }
    json_path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.out} ({size / 1e6:.1f} MB) and {json_path}; total {result['total_seconds']} s")


if __name__ == "__main__":
    main()
