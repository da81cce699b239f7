"""The image tower in two parts, for evaluation: the frozen prefix (patch embedding and the blocks
before the first adapted one), whose output for a test image never changes, and the rest.

The adapter methods adapt blocks ``adapter-start..`` only (the paper: 5..12 of 12), so an
evaluation that reuses each test image's prefix state runs a third less of the tower (a quarter
for the miniature's tiny model), with the same arithmetic: ``encode_image`` is
``VisionTransformer.forward``, which is exactly ``_embeds``, the blocks, ``_pool`` and ``proj``.
"""

from __future__ import annotations

import torch
from open_clip import CLIP
from open_clip.transformer import VisionTransformer
from torch import nn

from common.model.adapters import AdaptedBlock


def _frozen(module: nn.Module) -> bool:
    return not any(p.requires_grad for p in module.parameters(recurse=False))


def frozen_prefix_blocks(model: CLIP) -> int:
    """Leading image blocks that nothing adapts or trains (0 when the tower cannot be split)."""
    visual = model.visual
    if not isinstance(visual, VisionTransformer) or visual.output_tokens or visual.transformer.grad_checkpointing:
        return 0
    if not visual.transformer.batch_first:
        return 0
    embeds = (visual.conv1, visual.ln_pre, visual.patch_dropout)
    if not _frozen(visual) or any(p.requires_grad for m in embeds for p in m.parameters()):
        return 0
    count = 0
    for block in visual.transformer.resblocks:
        if isinstance(block, AdaptedBlock) or any(p.requires_grad for p in block.parameters()):
            break
        count += 1
    return count


def prefix_state(model: CLIP, images: torch.Tensor, blocks: int) -> torch.Tensor:
    """The hidden state after ``_embeds`` and the first ``blocks`` blocks."""
    visual = model.visual
    x = visual._embeds(images)
    for block in visual.transformer.resblocks[:blocks]:
        x = block(x)
    return x


def features_from_prefix(model: CLIP, state: torch.Tensor, blocks: int) -> torch.Tensor:
    """``encode_image`` (unnormalised) from :func:`prefix_state`'s output."""
    visual = model.visual
    x = state
    for block in visual.transformer.resblocks[blocks:]:
        x = block(x)
    pooled, _ = visual._pool(x)
    return pooled @ visual.proj if visual.proj is not None else pooled
