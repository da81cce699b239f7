"""Classifiers: class logits for images from a CLIP and the method's current trainable state.

Text features depend on the trainable state (text adapters, learned prompts), so they are
computed from the current model every time: every training step, and once per evaluation set.
Caching them across clients or rounds was the reference implementation's worst bug (SPEC §6.1).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from open_clip import CLIP
from torch import nn

from common.model.prompts import ContextTemplate, handcrafted_prompts


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
    def logits(self, images: torch.Tensor, classes: Any = None) -> torch.Tensor:
        """(B, C) logits; ``classes`` from :meth:`class_features`, recomputed when None."""

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

    def class_features(self) -> torch.Tensor:
        return F.normalize(self.model.encode_text(self.tokens), dim=-1)

    def logits(self, images: torch.Tensor, classes: Any = None) -> torch.Tensor:
        text = self.class_features() if classes is None else classes
        return self.scale() * self.image_features(images) @ text.T


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

    def logits(self, images: torch.Tensor, classes: Any = None) -> torch.Tensor:
        text = self.class_features() if classes is None else classes
        return self.scale() * self.image_features(images) @ text.mean(dim=0).T
