"""pFedMoAP's gating network: attention from an image over a class's expert text features.

For each class, the query is the image feature and the keys and values are that class's text
features under the local prompt and the non-local (expert) prompts; the output is a gated class
feature. Features are first sub-sampled to ``dim`` by taking every (D / dim)-th dimension, as in
the authors' code (Luo et al., ICLR 2025; ljaiverson/pFedMoAP ``trainers/pfedmoap.py``).
"""

from __future__ import annotations

import torch
from torch import nn


def pool_stride(feature_dim: int, gate_dim: int) -> int:
    """The sub-sampling stride that takes ``feature_dim`` features to about ``gate_dim``."""
    if gate_dim > feature_dim:
        raise ValueError(
            f"pfedmoap-gate-dim={gate_dim} exceeds the model's feature width {feature_dim}; "
            f"use at most {feature_dim}"
        )
    return feature_dim // gate_dim


def pooled_dim(feature_dim: int, gate_dim: int) -> int:
    return len(range(0, feature_dim, pool_stride(feature_dim, gate_dim)))


class ExpertGate(nn.Module):
    """Multi-head attention with a fixed score scale (the authors' ``scaling``, 10 by default).

    ``dropout`` applies to the attention weights in training, with masks drawn from the
    generator passed to :meth:`forward` (never torch's global RNG), so runs repeat exactly.
    """

    def __init__(self, dim: int, heads: int, scaling: float, dropout: float) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"pfedmoap-gate-heads={heads} must divide the gate width {dim}")
        self.dim, self.heads, self.scaling, self.dropout = dim, heads, scaling, dropout
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, _ = x.shape
        return x.view(batch, length, self.heads, self.dim // self.heads).transpose(1, 2)

    def forward(self, query: torch.Tensor, experts: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """``query`` (C, B, dim), ``experts`` (C, E, dim) -> gated features (C, B, dim)."""
        q, k, v = self._split(self.q(query)), self._split(self.k(experts)), self._split(self.v(experts))
        weights = torch.softmax(q @ k.transpose(-2, -1) * self.scaling, dim=-1)
        if self.training and self.dropout > 0:
            if generator is None:
                raise ValueError("gate dropout in training needs a seeded generator (never the global RNG)")
            keep = torch.rand(weights.shape, generator=generator, device="cpu").to(weights.device) >= self.dropout
            weights = weights * keep / (1.0 - self.dropout)
        mixed = (weights @ v).transpose(1, 2).reshape(query.shape[0], query.shape[1], self.dim)
        return self.out(mixed)
