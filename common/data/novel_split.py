"""Which shape compositions the tiny CLIP is pretrained on, and which it never sees.

The procedural dataset (:mod:`common.data.shapes`) has 48 classes ``"{colour} {shape}"``,
label = ``shape_index * 8 + colour_index``. To pretrain a small CLIP offline that can
still be tested on *unseen* classes, half the compositions are held out in a Latin-square
pattern: for shape ``s`` the colours ``(s + j) mod 8`` for ``j in 0..3`` are
pretrain-base, the other four colours pretrain-novel. So every shape appears with four
colours and every colour with three shapes among the 24 pretrain-base compositions (and
likewise among the 24 pretrain-novel ones): each attribute is learnt, only some of its
combinations are seen.

    colour:    red green blue yellow magenta cyan orange white
    circle      B    B     B    B      .      .     .     .
    square      .    B     B    B      B      .     .     .
    triangle    .    .     B    B      B      B     .     .
    diamond     .    .     .    B      B      B     B     .
    cross       .    .     .    .      B      B     B     B
    ring        B    .     .    .      .      B     B     B

Relation to the federated base-to-novel split (SPEC section 3, ``common/data/partition.py``):
that split sorts classes by label and takes the first ceil(48/2) = 24 as base
(labels 0..23: circle, square, triangle) and the rest as novel (labels 24..47: diamond,
cross, ring). The two splits cut across each other on purpose: each federated half holds
12 pretrain-base and 12 pretrain-novel compositions. Hence the pretrained backbone *has*
seen images and captions of half the federated-novel classes; a held-out-composition
score (pretrain-novel) and the federated-novel score must be reported separately, and the
former is the honest zero-shot generalisation number.
"""

from __future__ import annotations

from common.data.shapes import COLOURS, SHAPES

_NUM_COLOURS = len(COLOURS)
_BASE_COLOURS_PER_SHAPE = 4


def _is_pretrain_base(label: int) -> bool:
    shape, colour = divmod(label, _NUM_COLOURS)
    return (colour - shape) % _NUM_COLOURS < _BASE_COLOURS_PER_SHAPE


_ALL_LABELS = range(len(SHAPES) * _NUM_COLOURS)
PRETRAIN_BASE_LABELS: list[int] = sorted(label for label in _ALL_LABELS if _is_pretrain_base(label))
PRETRAIN_NOVEL_LABELS: list[int] = sorted(label for label in _ALL_LABELS if not _is_pretrain_base(label))
