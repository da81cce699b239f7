"""Zero-shot CLIP: the frozen model with ``"a photo of a {class}."``. Nothing is attached,
trained or sent but the evaluation request; its Local, Base and Novel are the reference every
other method is judged against.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from open_clip import CLIP

from common.methods.base import Method, StepInputs
from common.methods.classifiers import Classifier, HandcraftedPromptClassifier


class ZeroShot(Method):
    name = "zeroshot"
    summary = "frozen CLIP with the hand-written prompt; nothing trained, only evaluated"
    strategy = "evaluate-only"
    trains = False

    def classifier(
        self, model: CLIP, tokenizer: Callable, class_names: Sequence[str], device: torch.device | str, inputs: StepInputs
    ) -> Classifier:
        return HandcraftedPromptClassifier(model, tokenizer, class_names, device)
