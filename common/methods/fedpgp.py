"""FedPGP (Cui et al., ICML 2024; TianyuCuiOvO/FedPGP ``trainers/fedpgp.py``): personalised
prompts with a global guide. Each of ``fedpgp-prompts`` prompts has context ``sigma + U V``:
``sigma`` (shared, averaged by the server) and a low-rank ``U V`` (private; U: n x r, V: r x width).
Loss = cross-entropy + mu * a 2-way InfoNCE that pulls the sigma-only prompt's text features
towards those of the un-tuned ``"X ... X {class}."`` and pushes them from the full prompt's.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from open_clip import CLIP
from torch import nn

from common.methods.base import Method, StepInputs
from common.methods.classifiers import Classifier, ContextPromptClassifier
from common.model.clip import ModelDims
from common.model.prompts import ContextVectors, LowRankContext
from common.model.roles import Role, Roles


class PGPContext(nn.Module):
    def __init__(self, prompts: int, length: int, rank: int, width: int) -> None:
        super().__init__()
        self.sigma = ContextVectors(prompts, length, width)
        self.low_rank = LowRankContext(prompts, length, rank, width)

    def full(self) -> torch.Tensor:
        return self.sigma.ctx + self.low_rank()


class FedPGPClassifier(ContextPromptClassifier):
    """Class logits from ``sigma + U V`` (mean over prompts); the loss adds the contrastive term."""

    def __init__(
        self,
        model: CLIP,
        tokenizer: Callable,
        class_names: Sequence[str],
        device: torch.device | str,
        context: PGPContext,
        length: int,
        mu: float,
        temperature: float,
    ) -> None:
        super().__init__(model, tokenizer, class_names, device, context.full, length)
        self.parts, self.mu, self.temperature = context, mu, temperature

    @functools.cached_property
    def untuned(self) -> torch.Tensor:
        """Features of the un-tuned prompt: frozen weights only, so encoded once, and only for training."""
        with torch.no_grad():
            return F.normalize(self.template.tower.from_embeddings(self.template.embedding), dim=-1)

    def loss(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        sigma = self.parts.sigma.ctx
        full = self.prompt_features(sigma + self.parts.low_rank())  # (P, C, D)
        guide = self.prompt_features(sigma)
        logits = self.scale() * self.image_features(images) @ full.mean(dim=0).T
        positive = (self.untuned.unsqueeze(0) * guide).sum(dim=-1)  # cosines: features are unit-norm
        negative = (guide * full).sum(dim=-1)
        pairs = torch.stack([positive, negative], dim=-1).reshape(-1, 2).float() / self.temperature
        contrastive = F.cross_entropy(pairs, torch.zeros(len(pairs), dtype=torch.long, device=pairs.device))
        return F.cross_entropy(logits.float(), labels) + self.mu * contrastive, logits


class FedPGP(Method):
    name = "fedpgp"
    summary = "CoOp contexts sigma + U V: sigma averaged by the server, the low-rank U V private"
    roles = Roles({ContextVectors: Role.SHARED, LowRankContext: Role.PRIVATE})
    attribute = "prompt"
    model_keys = ("prompt-tokens", "fedpgp-prompts", "fedpgp-rank")
    setting_keys = ("fedpgp-learning-rate", "fedpgp-mu", "fedpgp-temperature")
    learning_rate_key = "fedpgp-learning-rate"

    def build_modules(self, dims: ModelDims) -> nn.Module:
        return PGPContext(self.cfg.fedpgp_prompts, self.cfg.prompt_tokens, self.cfg.fedpgp_rank, dims.text_width)

    def classifier(
        self, model: CLIP, tokenizer: Callable, class_names: Sequence[str], device: torch.device | str, inputs: StepInputs
    ) -> Classifier:
        context = model.get_submodule(self.attribute)
        assert isinstance(context, PGPContext)
        return FedPGPClassifier(
            model, tokenizer, class_names, device, context, self.cfg.prompt_tokens,
            self.cfg.fedpgp_mu, self.cfg.fedpgp_temperature,
        )
