"""CLIP's text tower, run only as far as the pooled feature needs: exact shortcuts.

Two shortcuts leave every text feature equal to ``CLIP.encode_text`` (up to fp32 rounding, which
a test bounds):

* **Truncation at the end-of-text token.** The text tower's attention is causal, so position p
  reads positions 0..p only, and the feature is pooled at the EOT position. The padding after
  the longest prompt's EOT never reaches any pooled feature: the tower runs on the first
  ``max(EOT) + 1`` positions, not all 77 (about 10 for CIFAR class names).
* **A cache of the frozen prefix.** For a fixed set of prompts (``"a photo of a {class}."``),
  the blocks before the first adapted or trainable one see the same input every step; their
  output is computed once per :class:`TextTower` and reused.

``reference_path()`` turns both off (all positions, no cache), as the authors' code runs; the
step benchmark and the tests compare the two.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

import torch
from open_clip import CLIP
from open_clip.transformer import text_global_pool
from torch import nn

_REFERENCE = contextvars.ContextVar("reference_text_path", default=False)


@contextlib.contextmanager
def reference_path() -> Iterator[None]:
    """Text towers built inside run all positions with no cache (the reference-faithful path)."""
    token = _REFERENCE.set(True)
    try:
        yield
    finally:
        _REFERENCE.reset(token)


def _is_causal(mask: torch.Tensor | None, length: int) -> bool:
    """Whether ``mask`` is the causal mask: -inf strictly above the diagonal, 0 elsewhere."""
    if mask is None or tuple(mask.shape) != (length, length):
        return False
    above = torch.ones(length, length, dtype=torch.bool, device=mask.device).triu(1)
    return bool(torch.isneginf(mask[above]).all()) and bool((mask[~above] == 0).all())


def _pool_positions(model: CLIP, tokens: torch.Tensor) -> torch.Tensor | None:
    """The position each row's feature is pooled at, as open_clip's ``text_global_pool`` picks it."""
    if model.text_pool_type == "argmax":
        return tokens.argmax(dim=-1)
    if model.text_pool_type == "eos" and getattr(model, "text_eos_id", None) is not None:
        return (tokens == model.text_eos_id).int().argmax(dim=-1)
    return None  # "first", "last", none: keep every position


def needed_length(model: CLIP, tokens: torch.Tensor) -> int:
    """How many leading positions the pooled features of ``tokens`` depend on."""
    full = int(tokens.shape[1])
    positions = _pool_positions(model, tokens)
    if _REFERENCE.get() or positions is None or not model.transformer.batch_first:
        return full
    if not _is_causal(model.attn_mask, full):
        return full
    return int(positions.max()) + 1


def _frozen(module: nn.Module) -> bool:
    return not any(p.requires_grad for p in module.parameters())


def frozen_prefix_blocks(model: CLIP) -> int:
    """How many leading text blocks are frozen and unadapted: their output for fixed prompts is fixed."""
    from common.model.adapters import AdaptedBlock  # adapters import open_clip blocks; keep this module light

    if _REFERENCE.get() or model.transformer.grad_checkpointing or not _frozen(model.token_embedding):
        return 0
    if isinstance(model.positional_embedding, nn.Parameter) and model.positional_embedding.requires_grad:
        return 0
    count = 0
    for block in model.transformer.resblocks:
        if isinstance(block, AdaptedBlock) or not _frozen(block):
            break
        count += 1
    return count


class TextTower:
    """Text features of one fixed token set ``tokens`` (C, 77), from its tokens or from token
    embeddings that replace theirs (learned prompts), through ``model``'s current text tower.

    Built per classifier (per message); the frozen prefix it caches is only valid while the
    frozen weights stay as they are, which they do for the classifier's life.
    """

    def __init__(self, model: CLIP, tokens: torch.Tensor) -> None:
        self.model = model
        self.reference = _REFERENCE.get()
        self.length = needed_length(model, tokens)
        self.tokens = tokens[:, : self.length]
        self.mask = model.attn_mask[: self.length, : self.length] if model.attn_mask is not None else None
        self.prefix_blocks = frozen_prefix_blocks(model)
        self._prefix: dict[tuple, torch.Tensor] = {}

    def _embed_tokens(self) -> torch.Tensor:
        cast_dtype = self.model.transformer.get_cast_dtype()
        x = self.model.token_embedding(self.tokens).to(cast_dtype)
        return x + self.model.positional_embedding[: self.length].to(cast_dtype)

    def _run(self, x: torch.Tensor, first_block: int) -> torch.Tensor:
        for block in self.model.transformer.resblocks[first_block:]:
            x = block(x, attn_mask=self.mask)
        return x

    def _prefix_state(self) -> torch.Tensor:
        """The hidden state after the frozen prefix, once per autocast setting (bf16 on GPU differs)."""
        device = self.tokens.device.type
        key = (torch.is_autocast_enabled(device), torch.get_autocast_dtype(device) if device in ("cuda", "cpu") else None)
        if key not in self._prefix:
            with torch.no_grad():
                x = self._embed_tokens()
                for block in self.model.transformer.resblocks[: self.prefix_blocks]:
                    x = block(x, attn_mask=self.mask)
                self._prefix[key] = x
        return self._prefix[key]

    def _head(self, x: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Final LayerNorm, pooling and projection. The norm is per position, so pooling first is exact."""
        model = self.model
        eos = getattr(model, "text_eos_id", None)
        if self.reference:  # as CLIP.encode_text: normalise every position, then pool
            x = text_global_pool(model.ln_final(x), tokens, model.text_pool_type, eos_token_id=eos)
        else:
            x = model.ln_final(text_global_pool(x, tokens, model.text_pool_type, eos_token_id=eos))
        if model.text_projection is not None:
            x = model.text_projection(x) if isinstance(model.text_projection, nn.Linear) else x @ model.text_projection
        return x

    def from_tokens(self) -> torch.Tensor:
        """``encode_text(tokens)`` (unnormalised)."""
        if not self.model.transformer.batch_first:
            return self.model.encode_text(self.tokens)
        if self.prefix_blocks == 0:
            return self._head(self._run(self._embed_tokens(), 0), self.tokens)
        return self._head(self._run(self._prefix_state(), self.prefix_blocks), self.tokens)

    def from_embeddings(self, embeddings: torch.Tensor) -> torch.Tensor:
        """``encode_text`` with token ``embeddings`` (k * C, L >= length, width) in place of the
        tokens' own: row ``j * C + c`` is pooled where prompt ``c`` is."""
        model = self.model
        repeats, rest = divmod(embeddings.shape[0], self.tokens.shape[0])
        if rest:
            raise ValueError(f"{embeddings.shape[0]} prompt embeddings for {self.tokens.shape[0]} token rows")
        tokens = self.tokens.repeat(repeats, 1)
        cast_dtype = model.transformer.get_cast_dtype()
        x = embeddings[:, : self.length].to(cast_dtype) + model.positional_embedding[: self.length].to(cast_dtype)
        x = model.transformer(x, attn_mask=self.mask) if not model.transformer.batch_first else self._run(x, 0)
        return self._head(x, tokens)
