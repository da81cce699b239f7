"""Images/s of the training input pipeline per DataLoader worker count, and the evaluation's decodes
and seconds per round with the evaluation cache's disk tier against decoding every time, in one run.

    python scripts/bench_loader.py --quick                  # small counts, CPU, under a minute
    python scripts/bench_loader.py                          # more images, 3 timings per worker count
    python scripts/bench_loader.py --data-dir /data/pets    # also an image folder (root/<class>/*.jpg)
    python scripts/bench_loader.py --quick --json out.json

Training: ``SeededAugmentation(LabeledDataset(source, train transform))`` through a DataLoader,
one epoch per timing with the workers started inside it, as a client's loader starts them every
round. The procedural ``shapes`` images (at 224 px) are drawn once before the timings, so that the
figure is the pipeline's (copy, random resized crop, flip, normalise) and not the renderer's; an
image folder decodes its files every time.

Evaluation: 3 simulated rounds of one test set, each with a fresh source object and in-memory
tier, as a new process would have them. With the disk tier on (in a fresh directory under
``--cache-dir``), round 1 decodes every image and later rounds decode none; the baseline, decoding
every time, decodes every image every round.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from torch.utils.data import DataLoader

from common.data import eval_cache
from common.data.base import ImageSource, LabeledDataset, SeededAugmentation
from common.data.eval_cache import Budget, DecodedImages, eval_batches
from common.data.files import FileImageSource
from common.data.image_store import DiskImages
from common.data.imagefolder import load_imagefolder
from common.data.shapes import ShapesSource
from common.transforms import test_transform, train_transform

# CLIP's normalisation (open_clip's OPENAI_DATASET_MEAN/STD), spelled out to keep open_clip's
# import (seconds) out of a data benchmark.
MEAN, STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
SHAPES_CLASSES = 48


def _fresh(source: ImageSource) -> ImageSource:
    """The same source built anew, as another process builds it: nothing decoded yet."""
    if isinstance(source, ShapesSource):
        styles = tuple(dict.fromkeys(str(s) for s in source.domains)) if source.domains is not None else ("solid",)
        per_class = len(source) // (SHAPES_CLASSES * len(styles))
        return ShapesSource(source.split, per_class, styles, source.seed, source.size)
    if isinstance(source, FileImageSource):
        return FileImageSource(source.paths, source.labels, source.class_names, root=source.root)
    raise TypeError(f"no way to rebuild a {type(source).__name__}")


def bench_training(name: str, source: ImageSource, count: int, args: argparse.Namespace) -> dict[str, float]:
    dataset = SeededAugmentation(
        LabeledDataset(source, range(min(count, len(source))), train_transform(args.size, MEAN, STD)), args.seed
    )
    if isinstance(source, ShapesSource):
        for i in range(len(dataset)):
            source.image(i)  # drawn once here; forked workers inherit the drawings
    rates: dict[str, float] = {}
    runs = [(str(w), w, torch.get_num_threads()) for w in args.workers]
    if 0 in args.workers and torch.get_num_threads() > 1:
        # The main process's pipeline with torch's intra-op threads and with one (what a worker
        # uses): on a loaded machine the threads' contention can cost more than the decode.
        runs.append(("0 (1 thread)", 0, 1))
    for label, workers, threads in runs:
        times = []
        default_threads = torch.get_num_threads()
        torch.set_num_threads(threads)
        for epoch in range(args.repeats):
            dataset.set_epoch(epoch)
            loader = DataLoader(
                dataset,
                batch_size=args.batch,
                shuffle=True,
                num_workers=workers,
                generator=torch.Generator().manual_seed(epoch),
            )
            start = time.perf_counter()
            for _ in loader:
                pass
            times.append(time.perf_counter() - start)
        torch.set_num_threads(default_threads)
        rates[label] = len(dataset) / statistics.median(times)
        print(
            f"train {name:>11}  {len(dataset):5d} images at {args.size} px  workers {label:12}  "
            f"{rates[label]:8.1f} images/s",
            flush=True,
        )
    return rates


def _round(dataset: LabeledDataset, images: DecodedImages, batch: int) -> tuple[int, float]:
    before, start = eval_cache.decode_count(), time.perf_counter()
    for _ in eval_batches(dataset, batch, images):
        pass
    return eval_cache.decode_count() - before, time.perf_counter() - start


def bench_evaluation(name: str, source: ImageSource, count: int, args: argparse.Namespace) -> dict[str, Any]:
    indices = range(min(count, len(source)))
    transform = test_transform(args.size, MEAN, STD)
    modes: dict[str, Callable[[str], DecodedImages]] = {
        "decode every time": lambda _: DecodedImages(Budget(0)),
        "disk tier": lambda folder: DecodedImages(Budget(args.memory_mb << 20), DiskImages(folder, 1 << 40)),
    }
    rounds: dict[str, list[dict[str, float]]] = {mode: [] for mode in modes}
    with tempfile.TemporaryDirectory(prefix="bench-loader-", dir=args.cache_dir) as folder:
        for r in range(1, args.rounds + 1):
            for mode, tiers in modes.items():  # interleaved, so a change of machine load hits both
                dataset = LabeledDataset(_fresh(source), indices, transform)
                decodes, seconds = _round(dataset, tiers(folder), args.batch)
                rounds[mode].append({"round": r, "decodes": decodes, "seconds": seconds})
                print(
                    f"eval  {name:>11}  {len(indices):5d} images at {args.size} px  round {r}  {mode:17}  "
                    f"decodes {decodes:5d}  {seconds:7.2f} s  ({len(indices) / seconds:8.1f} images/s)",
                    flush=True,
                )
        disk_mb = sum(f.stat().st_blocks * 512 for f in Path(folder).glob("*.u8")) / 2**20
    print(f"eval  {name:>11}  disk tier: {disk_mb:.1f} MB on disk for {len(indices)} images", flush=True)
    return {"images": len(indices), "rounds": rounds, "disk_mb": disk_mb}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="96 training and 96 test images, one timing each")
    parser.add_argument("--data-dir", default="", help="an image folder (root/<class>/... or root/{train,test}/...)")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--train-images", type=int, default=480)
    parser.add_argument("--eval-images", type=int, default=480)
    parser.add_argument("--workers", nargs="+", type=int, default=[0, 1, 2, 4])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--memory-mb", type=int, default=2048, help="the in-memory tier's budget (eval-cache-mb)")
    parser.add_argument("--cache-dir", default=None, help="where the disk tier's fresh directory goes (default: temp)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default="", help="write the figures here")
    args = parser.parse_args()
    # More workers than cores is one of the points measured, not a mistake to warn about.
    warnings.filterwarnings("ignore", message="This DataLoader will create")
    if args.quick:
        args.train_images, args.eval_images, args.repeats = 96, 96, 1
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs; torch {torch.__version__}, {torch.get_num_threads()} "
        f"threads; load average {os.getloadavg()[0]:.2f}; {'quick' if args.quick else 'full'} mode; batch "
        f"{args.batch}; median of {args.repeats} timing(s) per worker count",
        flush=True,
    )
    sets: dict[str, tuple[ImageSource, ImageSource]] = {}
    per_class = max(1, -(-max(args.train_images, args.eval_images) // SHAPES_CLASSES))
    sets["shapes"] = (
        ShapesSource("train", per_class, seed=args.seed, size=args.size),
        ShapesSource("test", per_class, seed=args.seed, size=args.size),
    )
    if args.data_dir:
        folder = load_imagefolder(args.data_dir, seed=args.seed)
        sets["imagefolder"] = (folder.train, folder.test)
    results: dict[str, Any] = {"quick": args.quick, "size": args.size, "cpus": os.cpu_count(), "sets": {}}
    for name, (train, test) in sets.items():
        results["sets"][name] = {
            "train_images_per_s": bench_training(name, train, args.train_images, args),
            "eval": bench_evaluation(name, test, args.eval_images, args),
        }
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    for name, figures in results["sets"].items():
        cached = figures["eval"]["rounds"]["disk tier"]
        plain = figures["eval"]["rounds"]["decode every time"]
        later = [r["seconds"] for r in cached[1:]]
        if later:
            speedup = statistics.median(r["seconds"] for r in plain[1:]) / statistics.median(later)
            print(
                f"{name}: decodes per round with the disk tier {[r['decodes'] for r in cached]} "
                f"(decoding every time {[r['decodes'] for r in plain]}); rounds 2+ {speedup:.1f}x faster"
            )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
