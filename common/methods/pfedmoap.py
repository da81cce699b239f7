"""pFedMoAP (Luo et al., ICLR 2025; ljaiverson/pFedMoAP ``trainers/pfedmoap.py``): a CoOp prompt
per client plus a private attention gate over a mixture of prompt experts.

Each round a sampled client starts its prompt from the server's average of the sampled clients'
latest prompts, and receives up to K - 1 other clients' latest prompts as frozen non-local
experts (chosen by the server: ``server/strategies/pfedmoap.py``). Logits::

    lambda * local logits + logit_scale * <pooled image feature, gate(image, class experts)>

where the gate attends, per class, from the image feature over that class's text features
under the local and the non-local prompts. The prompt is uploaded (and so shared with other
clients, by design); the gate never leaves the client.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from open_clip import CLIP
from torch import nn

from common.methods.base import Method, StepInputs
from common.methods.classifiers import Classifier, ContextPromptClassifier
from common.model.clip import ModelDims, model_dims
from common.model.gate import ExpertGate, pool_stride, pooled_dim
from common.model.prompts import ContextVectors
from common.model.roles import Role, Roles
from common.protocol import EXPERTS


class MoAPModules(nn.Module):
    def __init__(self, length: int, width: int, gate_dim: int, heads: int, scaling: float, dropout: float) -> None:
        super().__init__()
        self.prompt = ContextVectors(1, length, width)
        self.gate = ExpertGate(gate_dim, heads, scaling, dropout)


class PFedMoAPClassifier(ContextPromptClassifier):
    def __init__(
        self,
        model: CLIP,
        tokenizer: Callable,
        class_names: Sequence[str],
        device: torch.device | str,
        modules: MoAPModules,
        length: int,
        experts: Sequence[torch.Tensor],
        lam: float,
        stride: int,
        generator: torch.Generator | None,
    ) -> None:
        super().__init__(model, tokenizer, class_names, device, lambda: modules.prompt.ctx, length)
        self.gate, self.lam, self.stride, self.generator = modules.gate, lam, stride, generator
        # Non-local prompts are frozen: their (pooled) class features are computed once.
        with torch.no_grad():
            self.experts = [self.pool(self.prompt_features(ctx.to(device))[0]) for ctx in experts]

    def modules(self) -> list[nn.Module]:
        return [self.gate]

    def pool(self, features: torch.Tensor) -> torch.Tensor:
        return features[..., :: self.stride]

    def class_features(self) -> torch.Tensor:
        return self.prompt_features(self.context())[0]  # (C, D)

    def logits_from_features(self, image: torch.Tensor, classes: Any = None) -> torch.Tensor:
        text = self.class_features() if classes is None else classes
        local = self.scale() * image @ text.T
        if not self.experts:  # a client's first round: no expert yet, the gate is not used
            return local
        query = self.pool(image)  # (B, d)
        experts = torch.stack([self.pool(text), *self.experts], dim=1)  # (C, 1 + E, d)
        mixed = self.gate(query.unsqueeze(0).expand(len(text), -1, -1), experts, self.generator)  # (C, B, d)
        return self.lam * local + self.scale() * torch.einsum("bd,cbd->bc", query, mixed)


class PFedMoAP(Method):
    name = "pfedmoap"
    summary = "a CoOp prompt per client (uploaded, redistributed as experts) and a private attention gate"
    strategy = "pfedmoap"
    roles = Roles({ContextVectors: Role.SHARED, ExpertGate: Role.PRIVATE})
    attribute = "moap"
    model_keys = ("prompt-tokens", "pfedmoap-gate-dim", "pfedmoap-gate-heads")
    setting_keys = (
        "pfedmoap-learning-rate", "pfedmoap-gate-learning-rate", "pfedmoap-experts", "pfedmoap-selection",
        "pfedmoap-lambda", "pfedmoap-gate-scaling", "pfedmoap-gate-dropout",
    )
    extra_records = (EXPERTS,)
    learning_rate_key = "pfedmoap-learning-rate"  # the prompt's; the gate has its own

    def check(self, dims: ModelDims) -> None:
        width = pooled_dim(dims.embed_dim, self.cfg.pfedmoap_gate_dim)
        if width % self.cfg.pfedmoap_gate_heads:
            raise ValueError(
                f"pfedmoap-gate-heads={self.cfg.pfedmoap_gate_heads} must divide the gate width {width} "
                f"(pfedmoap-gate-dim={self.cfg.pfedmoap_gate_dim} on {dims.embed_dim}-wide features)"
            )

    def build_modules(self, dims: ModelDims) -> nn.Module:
        cfg = self.cfg
        width = pooled_dim(dims.embed_dim, cfg.pfedmoap_gate_dim)
        return MoAPModules(
            cfg.prompt_tokens, dims.text_width, width, cfg.pfedmoap_gate_heads, cfg.pfedmoap_gate_scaling,
            cfg.pfedmoap_gate_dropout,
        )

    def param_groups(self, model: nn.Module) -> list[dict]:
        modules = model.get_submodule(self.attribute)
        assert isinstance(modules, MoAPModules)
        return [
            {"params": list(modules.prompt.parameters()), "lr": self.learning_rate},
            {"params": list(modules.gate.parameters()), "lr": self.cfg.pfedmoap_gate_learning_rate},
        ]

    def classifier(
        self, model: CLIP, tokenizer: Callable, class_names: Sequence[str], device: torch.device | str, inputs: StepInputs
    ) -> Classifier:
        modules = model.get_submodule(self.attribute)
        assert isinstance(modules, MoAPModules)
        experts = inputs.extras.get(EXPERTS, {})
        expected = tuple(modules.prompt.ctx.shape)
        for name, ctx in experts.items():
            if tuple(ctx.shape) != expected:
                raise ValueError(f"expert {name!r} has shape {tuple(ctx.shape)}; prompts here are {expected}")
        embed_dim = model_dims(self.cfg.model_name).embed_dim
        return PFedMoAPClassifier(
            model, tokenizer, class_names, device, modules, self.cfg.prompt_tokens,
            [experts[name] for name in sorted(experts)], self.cfg.pfedmoap_lambda,
            pool_stride(embed_dim, self.cfg.pfedmoap_gate_dim), inputs.generator,
        )
