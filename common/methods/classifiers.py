"""Classifiers: class logits for images from a CLIP and the method's current trainable state.

Text features depend on the trainable state (text adapters, learned prompts), so they are
computed from the current model every time: every training step, and once per evaluation set.
Caching them across clients or rounds was the reference implementation's worst bug (docs/paper.md §6.1).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from open_clip import CLIP
from torch import nn

from common.model.adapters import AdaptedBlock
from common.model.prompts import ContextTemplate, handcrafted_prompts
from common.model.text import TextTower


class Classifier(ABC):
    """Logits of images among ``class_names``; a method's loss and train/eval switches."""

    def __init__(self, model: CLIP, class_names: Sequence[str], device: torch.device | str) -> None:
        self.model = model
        self.class_names = list(class_names)
        self.device = device

    def modules(self) -> list[nn.Module]:
        """Trainable modules whose train/eval mode matters (dropout)."""
        return []

    def set_training(self, training: bool) -> None:
        for module in self.modules():
            module.train(training)

    @abstractmethod
    def class_features(self) -> Any:
        """Per-class state computed once per evaluation set (normalised text features)."""

    @abstractmethod
    def logits_from_features(self, image_features: torch.Tensor, classes: Any = None) -> torch.Tensor:
        """(B, C) logits of normalised image features; ``classes`` from :meth:`class_features`,
        recomputed when None."""

    def logits(self, images: torch.Tensor, classes: Any = None) -> torch.Tensor:
        return self.logits_from_features(self.image_features(images), classes)

    def image_tower_fixed(self) -> bool:
        """Whether nothing in the image tower trains: an image's feature is then the same every
        round, and an evaluation may reuse it (``common.data.eval_cache``)."""
        visual = self.model.visual
        adapted = any(isinstance(m, AdaptedBlock) for m in visual.modules())
        return not adapted and not any(p.requires_grad for p in visual.parameters())

    def loss(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The training loss of one batch and its logits (cross-entropy unless a method adds terms)."""
        logits = self.logits(images)
        return F.cross_entropy(logits.float(), labels), logits

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.model.encode_image(images), dim=-1)

    def scale(self) -> torch.Tensor:
        return self.model.logit_scale.exp()


class HandcraftedPromptClassifier(Classifier):
    """``"a photo of a {class}."`` through ``encode_text`` (text adapters, if any, included)."""

    def __init__(self, model: CLIP, tokenizer: Callable, class_names: Sequence[str], device: torch.device | str) -> None:
        super().__init__(model, class_names, device)
        self.tokens = tokenizer(handcrafted_prompts(self.class_names)).to(device)
        # Exact shortcuts: EOT truncation and the frozen blocks' output cached (common.model.text).
        self.tower = TextTower(model, self.tokens)

    def class_features(self) -> torch.Tensor:
        return F.normalize(self.tower.from_tokens(), dim=-1)

    def logits_from_features(self, image_features: torch.Tensor, classes: Any = None) -> torch.Tensor:
        text = self.class_features() if classes is None else classes
        return self.scale() * image_features @ text.T


class ContextPromptClassifier(Classifier):
    """CoOp: ``"X ... X {class}."`` with the X embeddings replaced by ``context()`` (P, n, width).

    With P > 1 prompts the class logit is the mean over prompts of the per-prompt logits.
    """

    def __init__(
        self,
        model: CLIP,
        tokenizer: Callable,
        class_names: Sequence[str],
        device: torch.device | str,
        context: Callable[[], torch.Tensor],
        length: int,
    ) -> None:
        super().__init__(model, class_names, device)
        self.context = context
        self.template = ContextTemplate(model, tokenizer, self.class_names, length, device)

    def prompt_features(self, ctx: torch.Tensor) -> torch.Tensor:
        """Normalised (P, C, D) text features of every class under each of the P contexts."""
        return F.normalize(self.template.encode(self.model, ctx), dim=-1)

    def class_features(self) -> torch.Tensor:
        return self.prompt_features(self.context())

    def logits_from_features(self, image_features: torch.Tensor, classes: Any = None) -> torch.Tensor:
        text = self.class_features() if classes is None else classes
        return self.scale() * image_features @ text.mean(dim=0).T
