"""Local training and evaluation of a method's trainable tensors on one client's data."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from common.data.eval_cache import IMAGE_FEATURES, IMAGE_PREFIX, EvalBatch
from common.device import Precision, precision
from common.methods.classifiers import Classifier
from common.model.image import features_from_prefix, frozen_prefix_blocks, prefix_state


@dataclass(frozen=True)
class LoopResult:
    loss: float
    accuracy: float
    num_examples: int
    hits: torch.Tensor | None = None  # evaluation: whether each example was right, in loader order


Amp = bool | Precision  # ``amp`` of the run config, or a precision already resolved for the device


def _resolved(device: torch.device, amp: Amp) -> Precision:
    return amp if isinstance(amp, Precision) else precision(device, amp)


def train(
    classifier: Classifier,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    epochs: int,
    device: torch.device,
    amp: Amp = True,
) -> LoopResult:
    """``epochs`` passes over ``loader`` minimising the method's loss; text features are
    recomputed every step (text adapters and prompts train too). In fp16 the loss is scaled
    (a skipped step on an overflow is the GradScaler's rule, counted in its scale)."""
    chosen = _resolved(device, amp)
    scaler = chosen.scaler(device)
    total_loss, correct, seen = 0.0, 0, 0
    classifier.set_training(True)
    for epoch in range(epochs):
        set_epoch = getattr(loader.dataset, "set_epoch", None)
        if set_epoch is not None:  # seeded augmentation draws per (epoch, image)
            set_epoch(epoch)
        for images, labels in loader:
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            with chosen.autocast(device):
                loss, logits = classifier.loss(images, labels)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)  # optimizer.step() itself when not scaling
            scaler.update()
            total_loss += loss.item() * len(labels)
            correct += (logits.argmax(dim=1) == labels).sum().item()
            seen += len(labels)
    classifier.set_training(False)
    if seen == 0:
        raise ValueError("the training loader yielded no examples")
    return LoopResult(total_loss / seen, correct / seen, seen // epochs)


def _image_features(classifier: Classifier, batch: EvalBatch, device: torch.device, chosen: Precision) -> torch.Tensor:
    """The batch's normalised image features, reusing what never changes for a test image: the
    whole feature when nothing in the image tower trains (prompt methods, zero-shot), else the
    hidden state after the frozen blocks before the first adapter (``common.model.image``)."""
    model, setting = classifier.model, (str(device), chosen.name)
    if classifier.image_tower_fixed():
        features = IMAGE_FEATURES.lookup(model, setting, batch.keys)
        if features is None:
            features = classifier.image_features(batch.images.to(device, non_blocking=True))
            IMAGE_FEATURES.store(model, setting, batch.keys, features)
        return features
    blocks = frozen_prefix_blocks(model)
    if blocks == 0:
        return classifier.image_features(batch.images.to(device, non_blocking=True))
    state = IMAGE_PREFIX.lookup(model, (*setting, blocks), batch.keys)
    if state is None:
        state = prefix_state(model, batch.images.to(device, non_blocking=True), blocks)
        IMAGE_PREFIX.store(model, (*setting, blocks), batch.keys, state)
    return F.normalize(features_from_prefix(model, state, blocks), dim=-1)


@torch.no_grad()
def class_features(classifier: Classifier, device: torch.device, amp: Amp = True) -> Any:
    """The classifier's per-class state for evaluation, computed as :func:`evaluate` would."""
    classifier.set_training(False)
    with _resolved(device, amp).autocast(device):
        return classifier.class_features()


@torch.no_grad()
def evaluate(
    classifier: Classifier,
    batches: Iterable[EvalBatch | tuple[torch.Tensor, torch.Tensor]],
    device: torch.device,
    amp: Amp = True,
    classes: Any = None,
) -> LoopResult:
    """Loss and accuracy with the current trainable state; the class features are ``classes``
    (from :func:`class_features`, for sets that share a class list) or computed once here.

    ``batches``: :class:`EvalBatch` es from ``common.data.eval_cache`` (decoded images and frozen
    image features reused across rounds), or (images, labels) pairs from a DataLoader.
    """
    total_loss, hits = 0.0, []
    chosen = _resolved(device, amp)
    classifier.set_training(False)
    with chosen.autocast(device):
        classes = classifier.class_features() if classes is None else classes
        for batch in batches:
            if isinstance(batch, EvalBatch):
                features, labels = _image_features(classifier, batch, device, chosen), batch.labels.to(device)
            else:
                images, labels = batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True)
                features = classifier.image_features(images)
            logits = classifier.logits_from_features(features, classes).float()
            total_loss += F.cross_entropy(logits, labels, reduction="sum").item()
            hits.append((logits.argmax(dim=1) == labels).cpu())
    if not hits:
        raise ValueError("the evaluation loader yielded no examples")
    right = torch.cat(hits)
    return LoopResult(total_loss / len(right), right.float().mean().item(), len(right), right)
