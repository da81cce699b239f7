"""Zero-shot style classification with CLIP: class names -> prompts -> cosine logits.

Text features depend on the text adapters, so they are computed from the current model
every time (every training step, every evaluation). Caching them across clients or rounds
was the reference implementation's worst bug (SPEC §6.1).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from open_clip import CLIP

PROMPT_TEMPLATE = "a photo of a {}."


def prompts(class_names: Sequence[str]) -> list[str]:
    return [PROMPT_TEMPLATE.format(name.replace("_", " ")) for name in class_names]


class PromptClassifier:
    """Classifies images among ``class_names`` with the model's current adapters."""

    def __init__(self, model: CLIP, tokenizer, class_names: Sequence[str], device: torch.device | str) -> None:
        self.model = model
        self.class_names = list(class_names)
        self.tokens = tokenizer(prompts(self.class_names)).to(device)

    def text_features(self) -> torch.Tensor:
        return F.normalize(self.model.encode_text(self.tokens), dim=-1)

    def logits(self, images: torch.Tensor, text_features: torch.Tensor | None = None) -> torch.Tensor:
        """``exp(logit_scale) * cos(image, text)``; text features recomputed unless given."""
        if text_features is None:
            text_features = self.text_features()
        image_features = F.normalize(self.model.encode_image(images), dim=-1)
        return self.model.logit_scale.exp() * image_features @ text_features.T
