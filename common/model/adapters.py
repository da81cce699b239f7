"""The MMA adapter (Yang et al., CVPR 2024) as used by pFedMMA, wrapped around open_clip blocks.

For every adapted block k of both towers::

    out = Block(x) + alpha * up_k(shared_k(down_k(ln_1(x))))

``down``/``up`` (:class:`TowerProjection`) belong to one tower; ``shared_k``
(:class:`CrossTowerProjection`) is one module per block used by both towers. Which of them the
server averages is the method's choice (``common/methods``): pFedMMA averages only the
cross-tower projections. Open_clip is never edited: ``attach_mma`` swaps selected ``resblocks``
entries for an :class:`AdaptedBlock` that calls the original block.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

import torch
from open_clip import CLIP
from open_clip.transformer import ResidualAttentionBlock
from torch import nn

TOWERS = ("text", "image")


class _GradScale(torch.autograd.Function):
    """Identity forward; multiplies the incoming gradient by ``scale`` on the way back."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float) -> torch.Tensor:  # type: ignore[override]
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        return grad * ctx.scale, None


def grad_scale(x: torch.Tensor, scale: float) -> torch.Tensor:
    return _GradScale.apply(x, scale)


def _init_linear(linear: nn.Linear) -> nn.Linear:
    nn.init.kaiming_normal_(linear.weight, mode="fan_out", nonlinearity="relu")
    nn.init.zeros_(linear.bias)
    return linear


class TowerProjection(nn.Module):
    """A down or up projection of one tower (private in pFedMMA)."""

    def __init__(self, d_in: int, d_out: int, relu: bool) -> None:
        super().__init__()
        self.linear = _init_linear(nn.Linear(d_in, d_out))
        self.act: nn.Module = nn.ReLU() if relu else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.linear(x))


class CrossTowerProjection(nn.Module):
    """The r x r projection of a block, used by both towers (the averaged part in pFedMMA)."""

    def __init__(self, rank: int) -> None:
        super().__init__()
        self.linear = _init_linear(nn.Linear(rank, rank))
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.linear(x))


class MMAAdapters(nn.Module):
    """Every adapter module of the model, registered once (so each tensor has one name)."""

    def __init__(self, blocks: Sequence[int], d_text: int, d_image: int, rank: int) -> None:
        super().__init__()
        self.blocks = list(blocks)
        keys = [str(k) for k in self.blocks]
        dims = {"text": d_text, "image": d_image}
        self.shared = nn.ModuleDict({k: CrossTowerProjection(rank) for k in keys})
        self.down = nn.ModuleDict(
            {t: nn.ModuleDict({k: TowerProjection(dims[t], rank, relu=True) for k in keys}) for t in TOWERS}
        )
        self.up = nn.ModuleDict(
            {t: nn.ModuleDict({k: TowerProjection(rank, dims[t], relu=False) for k in keys}) for t in TOWERS}
        )

    def branch(self, tower: str, block: int, h: torch.Tensor) -> torch.Tensor:
        k = str(block)
        down = cast(nn.ModuleDict, self.down[tower])[k]
        up = cast(nn.ModuleDict, self.up[tower])[k]
        return up(self.shared[k](down(h)))


class AdaptedBlock(nn.Module):
    """An open_clip residual block plus the MMA branch on its pre-attention LayerNorm output."""

    def __init__(self, block: nn.Module, adapters: MMAAdapters, tower: str, index: int, alpha: float) -> None:
        super().__init__()
        self.block = block
        # Not registered as a submodule: the adapters belong to the model's ``mma`` module,
        # so the shared projection is one tensor reached by both towers, not two copies.
        object.__setattr__(self, "_adapters", adapters)
        self.tower = tower
        self.index = index
        self.alpha = alpha

    _adapters: MMAAdapters
    block: ResidualAttentionBlock

    def get_weight_dtype(self) -> torch.dtype:  # open_clip's Transformer asks resblocks[0]
        return self.block.get_weight_dtype()

    def forward(
        self,
        q_x: torch.Tensor,
        k_x: torch.Tensor | None = None,
        v_x: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        out = self.block(q_x, k_x=k_x, v_x=v_x, attn_mask=attn_mask)
        # The reference MMA rescales gradients around the branch: its input gradient by
        # alpha and its output gradient by 1/alpha. The residual stream still gets the exact
        # gradient, while adapter parameters get 1/alpha times theirs; without it, SGD at
        # lr 1e-3 barely moves adapters that are scaled by alpha = 1e-3.
        h = grad_scale(self.block.ln_1(q_x), self.alpha)
        branch = self._adapters.branch(self.tower, self.index, h)
        return out + self.alpha * grad_scale(branch, 1.0 / self.alpha)


def _tower_blocks(model: CLIP) -> dict[str, nn.ModuleList]:
    return {"text": model.transformer.resblocks, "image": model.visual.transformer.resblocks}


def seeded_adapters(blocks: Sequence[int], d_text: int, d_image: int, rank: int, seed: int) -> MMAAdapters:
    """Adapters initialised from ``seed`` alone, so every client (and the server) agrees."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return MMAAdapters(blocks, d_text=d_text, d_image=d_image, rank=rank)


def check_block_range(start: int, end: int, text_depth: int, image_depth: int) -> None:
    depth = min(text_depth, image_depth)
    if not 1 <= start <= end <= depth:
        raise ValueError(
            f"adapter-start={start}, adapter-end={end}: need 1 <= start <= end <= {depth} "
            f"(the model's towers have {text_depth} text and {image_depth} image blocks)"
        )


def wrap_blocks(model: CLIP, adapters: MMAAdapters, alpha: float) -> None:
    """Register ``adapters`` as ``model.mma`` and wrap their blocks of both towers.

    Block numbers count in the shallower tower; a deeper tower is aligned at its last block.
    """
    towers = _tower_blocks(model)
    check_block_range(min(adapters.blocks), max(adapters.blocks), len(towers["text"]), len(towers["image"]))
    if hasattr(model, "mma"):
        raise ValueError("model already has MMA adapters attached")
    parameter = next(model.parameters())
    adapters.to(device=parameter.device, dtype=parameter.dtype)
    model.mma = adapters
    depth = min(len(b) for b in towers.values())
    for tower, resblocks in towers.items():
        # Towers of unequal depth (ViT-L-14: 12 text, 24 image blocks) are aligned at the top:
        # block k of the shallower tower pairs with block k + (depth difference) of the deeper.
        offset = len(resblocks) - depth
        for k in adapters.blocks:
            i = k - 1 + offset
            resblocks[i] = AdaptedBlock(resblocks[i], adapters, tower, k, alpha)


def attach_mma(model: CLIP, start: int, end: int, rank: int, alpha: float, seed: int = 0) -> MMAAdapters:
    """Wrap blocks ``start..end`` (1-based, inclusive) of both towers; returns the adapters.

    The adapters are registered on the model as ``model.mma`` and initialised from ``seed``
    (independently of torch's global RNG), so all clients start from the same weights.
    """
    towers = _tower_blocks(model)
    check_block_range(start, end, len(towers["text"]), len(towers["image"]))
    d_text = model.transformer.width
    d_image = model.visual.transformer.width
    adapters = seeded_adapters(list(range(start, end + 1)), d_text, d_image, rank, seed)
    wrap_blocks(model, adapters, alpha)
    return adapters


def adapter_parameter_count(d_text: int, d_image: int, rank: int, num_blocks: int) -> dict[str, int]:
    """Trainable parameter counts from the shapes alone (docs/paper.md §1); tests compare against this."""
    per_tower = lambda d: (d * rank + rank) + (rank * d + d)
    text = num_blocks * per_tower(d_text)
    image = num_blocks * per_tower(d_image)
    shared = num_blocks * (rank * rank + rank)
    return {"text_private": text, "image_private": image, "shared": shared, "total": text + image + shared}
