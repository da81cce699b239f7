"""CLIP's text path from class names to text features: hand-written or learned prompts.

Hand-written: ``"a photo of a {class}."`` through ``encode_text``. Learned (CoOp, Zhou et al.
2022, used by PromptFL, FedPGP and pFedMoAP): the prompt ``"X X ... X {class}."`` is tokenised
and embedded, and the embeddings of the n "X" tokens are replaced by n learned context vectors
before the text transformer. :func:`encode_embedded` is ``CLIP.encode_text`` from the token
embeddings on, built from open_clip's own modules, so that with the X embeddings put back it
gives exactly ``encode_text`` of the same text (a test checks this).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from open_clip import CLIP
from torch import nn

from common.model.text import TextTower

HANDCRAFTED_TEMPLATE = "a photo of a {}."
CONTEXT_TOKEN = "X"
CONTEXT_INIT_STD = 0.02  # CoOp's N(0, 0.02) initialisation of context vectors

Tokenizer = Callable[[list[str]], torch.Tensor]


def class_text(name: str) -> str:
    return name.replace("_", " ")


def handcrafted_prompts(class_names: Sequence[str]) -> list[str]:
    return [HANDCRAFTED_TEMPLATE.format(class_text(name)) for name in class_names]


class ContextVectors(nn.Module):
    """``prompts`` x ``length`` learned context vectors of the token-embedding width."""

    def __init__(self, prompts: int, length: int, width: int) -> None:
        super().__init__()
        self.ctx = nn.Parameter(torch.empty(prompts, length, width))
        nn.init.normal_(self.ctx, std=CONTEXT_INIT_STD)


class LowRankContext(nn.Module):
    """A rank-``rank`` context term ``U @ V`` per prompt (FedPGP's personalised part)."""

    def __init__(self, prompts: int, length: int, rank: int, width: int) -> None:
        super().__init__()
        self.u = nn.Parameter(torch.empty(prompts, length, rank))
        self.v = nn.Parameter(torch.empty(prompts, rank, width))
        nn.init.normal_(self.u, std=CONTEXT_INIT_STD)
        nn.init.normal_(self.v, std=CONTEXT_INIT_STD)

    def forward(self) -> torch.Tensor:
        return self.u @ self.v


def encode_embedded(model: CLIP, embeddings: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """``model.encode_text`` for token ``embeddings`` (P, L, width) of the token ids ``tokens``.

    ``tokens`` only locates the pooled (end-of-text) position; the content is ``embeddings``.
    """
    return TextTower(model, tokens).from_embeddings(embeddings)


class ContextTemplate:
    """The token ids of ``"X X ... X {class}."`` per class, and their frozen embeddings.

    :meth:`embed` puts context vectors in place of the X embeddings; the rest (SOS, class name,
    full stop, EOT, padding) keeps the frozen token embeddings.
    """

    def __init__(
        self, model: CLIP, tokenizer: Tokenizer, class_names: Sequence[str], length: int, device: torch.device | str
    ) -> None:
        context_length = int(model.positional_embedding.shape[0])
        texts = [" ".join([CONTEXT_TOKEN] * length) + " " + class_text(name) + "." for name in class_names]
        encode = getattr(tokenizer, "encode", None)
        if encode is not None:
            longest = max(texts, key=lambda t: len(encode(t)))
            needed = len(encode(longest)) + 2  # SOS and EOT
            if needed > context_length:
                raise ValueError(
                    f"prompt-tokens={length}: the prompt {longest!r} needs {needed} tokens, but the text "
                    f"tower reads at most {context_length}; lower prompt-tokens to at most "
                    f"{length - (needed - context_length)}"
                )
        self.length = length
        self.tokens = tokenizer(texts).to(device)
        if encode is not None:
            placeholder = encode(CONTEXT_TOKEN)
            if len(placeholder) != 1 or bool((self.tokens[:, 1 : 1 + length] != placeholder[0]).any()):
                raise ValueError(f"the tokenizer does not give one token per {CONTEXT_TOKEN!r} placeholder")
        # Only the positions up to the longest prompt's end-of-text token matter (common.model.text).
        self.tower = TextTower(model, self.tokens)
        with torch.no_grad():
            self.embedding = model.token_embedding(self.tower.tokens).detach()

    def embed(self, ctx: torch.Tensor) -> torch.Tensor:
        """Prompt embeddings (P * C, L, width) for context ``ctx`` of shape (P, length, width).

        Row ``p * C + c`` is prompt ``p`` of class ``c``.
        """
        prompts, length, width = ctx.shape
        classes = self.embedding.shape[0]
        prefix = self.embedding[:, :1].unsqueeze(0).expand(prompts, -1, -1, -1)
        suffix = self.embedding[:, 1 + length :].unsqueeze(0).expand(prompts, -1, -1, -1)
        middle = ctx.to(self.embedding.dtype).unsqueeze(1).expand(-1, classes, -1, -1)
        return torch.cat([prefix, middle, suffix], dim=2).reshape(prompts * classes, -1, width)

    def encode(self, model: CLIP, ctx: torch.Tensor) -> torch.Tensor:
        """Unnormalised text features (P, C, D) of every class under each of the P contexts."""
        features = self.tower.from_embeddings(self.embed(ctx))
        return features.reshape(ctx.shape[0], self.tokens.shape[0], -1)
