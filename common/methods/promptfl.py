"""PromptFL (Guo et al., 2023): CoOp prompt learning with FedAvg. One class-agnostic context of
``prompt-tokens`` vectors (N(0, 0.02) init) replaces the X embeddings of ``"X ... X {class}."``;
the whole context is averaged by the server, so nothing is private.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from open_clip import CLIP
from torch import nn

from common.methods.base import Method, StepInputs
from common.methods.classifiers import Classifier, ContextPromptClassifier
from common.model.clip import ModelDims
from common.model.prompts import ContextVectors
from common.model.roles import Role, Roles


class PromptFL(Method):
    name = "promptfl"
    summary = "a learned CoOp context (class-agnostic), averaged by the server; nothing private"
    roles = Roles({ContextVectors: Role.SHARED})
    attribute = "prompt"
    model_keys = ("prompt-tokens",)
    setting_keys = ("promptfl-learning-rate",)
    learning_rate_key = "promptfl-learning-rate"

    def build_modules(self, dims: ModelDims) -> nn.Module:
        return ContextVectors(1, self.cfg.prompt_tokens, dims.text_width)

    def classifier(
        self, model: CLIP, tokenizer: Callable, class_names: Sequence[str], device: torch.device | str, inputs: StepInputs
    ) -> Classifier:
        prompt = model.get_submodule(self.attribute)
        return ContextPromptClassifier(model, tokenizer, class_names, device, lambda: prompt.ctx, self.cfg.prompt_tokens)
