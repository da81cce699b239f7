"""Images/s of a pFedMMA client's training step and evaluation: the optimised path against the
reference-faithful one (all 77 text positions, no caches, as the authors' code) and against the
floor (a no-grad forward of the image tower alone), in one run, interleaved.

    python scripts/bench_step.py                        # ViT-B-16 (random weights) and the tiny model, C = 10, 50
    python scripts/bench_step.py --models pfedmma-tiny --classes 10 --repeats 5
    python scripts/bench_step.py --device cuda          # the ClientApp's autocast (bf16, or fp16 without native bf16)

Both paths run on one model with the same adapters, so a step of either updates the same
tensors; the logits (and adapter gradients) of the two paths are compared on one batch before
any step. The last line is the headline: ViT-B-16 at C = 50 (or the last model and C measured).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F

from common.config import RunConfig
from common.device import precision
from common.methods import StepInputs, method_for
from common.model.clip import build_clip, model_dims
from common.model.text import reference_path

# Everyday class names (CIFAR-100's first 50), so prompts tokenise to realistic lengths.
CLASS_NAMES = [
    "apple", "aquarium_fish", "baby", "bear", "beaver", "bed", "bee", "beetle", "bicycle", "bottle", "bowl",
    "boy", "bridge", "bus", "butterfly", "camel", "can", "castle", "caterpillar", "cattle", "chair",
    "chimpanzee", "clock", "cloud", "cockroach", "couch", "crab", "crocodile", "cup", "dinosaur", "dolphin",
    "elephant", "flatfish", "forest", "fox", "girl", "hamster", "house", "kangaroo", "keyboard", "lamp",
    "lawn_mower", "leopard", "lion", "lizard", "lobster", "man", "maple_tree", "motorcycle", "mountain",
]

# The paper's adapter blocks for 12-block towers; the tiny model's defaults.
ADAPTERS = {"ViT-B-16": (5, 12), "pfedmma-tiny": (2, 4)}
PRETRAINED = {"ViT-B-16": "", "pfedmma-tiny": "pfedmma-tiny-shapes"}
# Work per timed measurement (training steps, evaluation images): the tiny model's step takes
# milliseconds, so one step would time the clock's and the allocator's noise.
WORK = {"pfedmma-tiny": (20, 1024)}


def _timed(fn: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def _setup(model_name: str, classes: int, device: torch.device, seed: int):
    start, end = ADAPTERS.get(model_name, (1, model_dims(model_name).text_depth))
    cfg = RunConfig.from_flower(
        {"method": "pfedmma", "model-name": model_name, "pretrained": PRETRAINED.get(model_name, ""),
         "adapter-start": start, "adapter-end": end, "seed": seed}
    )
    method = method_for(cfg)
    bundle = build_clip(cfg.model_name, cfg.pretrained, device, init_seed=seed)
    method.attach(bundle.model)
    names = CLASS_NAMES[:classes]
    optimised = method.classifier(bundle.model, bundle.tokenizer, names, device, StepInputs())
    with reference_path():
        reference = method.classifier(bundle.model, bundle.tokenizer, names, device, StepInputs())
    return method, bundle, optimised, reference


def _adapter_grads(method, model, classifier, images, labels) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    loss, _ = classifier.loss(images, labels)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


def bench(model_name: str, classes: int, args: argparse.Namespace, device: torch.device) -> dict[str, float]:
    gen = torch.Generator().manual_seed(args.seed)
    method, bundle, optimised, reference = _setup(model_name, classes, device, args.seed)
    model, size = bundle.model, bundle.image_size
    steps, eval_count = WORK.get(model_name, (1, args.eval_images))
    images = torch.randn(args.batch, 3, size, size, generator=gen).to(device)
    labels = torch.randint(0, classes, (args.batch,), generator=gen).to(device)
    eval_images = torch.randn(eval_count, 3, size, size, generator=gen).to(device)
    autocast = lambda: precision(device, True).autocast(device)  # bf16/fp16 on CUDA as the ClientApp, none on CPU

    with torch.no_grad(), autocast():
        fast_logits, ref_logits = optimised.logits(images).float(), reference.logits(images).float()
    logit_diff = (fast_logits - ref_logits).abs().max().item()
    with autocast():
        fast_g = _adapter_grads(method, model, optimised, images, labels)
        ref_g = _adapter_grads(method, model, reference, images, labels)
    grad_rel = max(((fast_g[n] - ref_g[n]).norm() / ref_g[n].norm().clamp_min(1e-30)).item() for n in ref_g)

    optimizer = method.optimizer(model)

    def step(classifier) -> Callable[[], None]:
        def run() -> None:
            for _ in range(steps):
                with autocast():
                    loss, _ = classifier.loss(images, labels)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
        return run

    def evaluation(classifier) -> Callable[[], None]:
        @torch.no_grad()
        def run() -> None:
            with autocast():
                text = classifier.class_features()
                for batch in eval_images.split(args.eval_batch):
                    classifier.logits(batch, text)
        return run

    def floor(batch: torch.Tensor, repeats: int) -> Callable[[], None]:
        @torch.no_grad()
        def run() -> None:
            with autocast():
                for _ in range(repeats):
                    for part in batch.split(args.eval_batch):
                        F.normalize(model.encode_image(part), dim=-1)
        return run

    jobs = {
        "train optimised": (step(optimised), args.batch * steps),
        "train reference": (step(reference), args.batch * steps),
        "train floor": (floor(images, steps), args.batch * steps),
        "eval optimised": (evaluation(optimised), eval_count),
        "eval reference": (evaluation(reference), eval_count),
        "eval floor": (floor(eval_images, 1), eval_count),
    }
    for fn, _ in jobs.values():  # warm-up: allocator, kernels, the text prefix cache
        fn()
    times: dict[str, list[float]] = {name: [] for name in jobs}
    for _ in range(args.repeats):  # interleaved, so a change of machine load hits every path
        for name, (fn, _) in jobs.items():
            times[name].append(_timed(fn, device))
    rate = {name: jobs[name][1] / statistics.median(t) for name, t in times.items()}
    for mode in ("train", "eval"):
        opt, ref, flo = rate[f"{mode} optimised"], rate[f"{mode} reference"], rate[f"{mode} floor"]
        print(
            f"{model_name:>13} C={classes:<3} {mode:5}  optimised {opt:8.2f} img/s  reference {ref:8.2f} img/s  "
            f"floor {flo:8.2f} img/s  speed-up {opt / ref:5.2f}x  floor/optimised {flo / opt:5.2f}x",
            flush=True,
        )
    print(
        f"{model_name:>13} C={classes:<3} text positions {optimised.tower.length} of {reference.tower.length}, "
        f"cached frozen text blocks {optimised.tower.prefix_blocks}; max |logit diff| {logit_diff:.2e}, "
        f"max relative adapter-gradient diff {grad_rel:.2e}",
        flush=True,
    )
    return {"speed-up": rate["train optimised"] / rate["train reference"], "logit-diff": logit_diff}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["pfedmma-tiny", "ViT-B-16"])
    parser.add_argument("--classes", nargs="+", type=int, default=[10, 50])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--eval-images", type=int, default=32, help="ViT-B-16's (the tiny model evaluates 1024)")
    parser.add_argument("--eval-batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    if max(args.classes) > len(CLASS_NAMES):
        parser.error(f"--classes: at most {len(CLASS_NAMES)}")
    device = torch.device(args.device)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "none"
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs, GPU {gpu}; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; load average {os.getloadavg()[0]:.2f}; batch {args.batch}; "
        f"median of {args.repeats} interleaved timings",
        flush=True,
    )
    headline = {}
    for model_name in args.models:
        for classes in args.classes:
            headline = bench(model_name, classes, args, device)
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    print(f"speed-up over the reference path: {headline['speed-up']:.2f}x")


if __name__ == "__main__":
    main()
