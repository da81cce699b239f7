"""The shapes dataset's base-to-novel split: held-out compositions, not held-out shapes.

The procedural dataset (:mod:`common.data.shapes`) has 48 classes ``"{colour} {shape}"``,
label = ``shape_index * 8 + colour_index``. As CoOp's base and novel classes share a domain,
the miniature's novel classes share both attributes with base classes: for shape ``s`` the
colours ``(s + j) mod 8`` for ``j in 0..3`` are base, the other four novel (a Latin square).
Every shape appears with four colours and every colour with three shapes on each side, so a
model that adapted to base classes has seen every attribute of every novel class, in other
combinations.

    colour:    red green blue yellow magenta cyan orange white
    circle      B    B     B    B      .      .     .     .
    square      .    B     B    B      B      .     .     .
    triangle    .    .     B    B      B      B     .     .
    diamond     .    .     .    B      B      B     B     .
    cross       .    .     .    .      B      B     B     B
    ring        B    .     .    .      .      B     B     B

The real datasets take the first ceil(C/2) labels as base (docs/paper.md section 3); on shapes that
would make the novel classes three whole unseen shapes, a different question (see
docs/miniature-benchmark.md). The tiny CLIP is pretrained on all 48 compositions in every
style, as CLIP's web data covers both halves of a CoOp dataset.
"""

from __future__ import annotations

from common.data.shapes import COLOURS, SHAPES

_NUM_COLOURS = len(COLOURS)
_BASE_COLOURS_PER_SHAPE = 4


def _is_base(label: int) -> bool:
    shape, colour = divmod(label, _NUM_COLOURS)
    return (colour - shape) % _NUM_COLOURS < _BASE_COLOURS_PER_SHAPE


_ALL_LABELS = range(len(SHAPES) * _NUM_COLOURS)
BASE_LABELS: list[int] = sorted(label for label in _ALL_LABELS if _is_base(label))
NOVEL_LABELS: list[int] = sorted(label for label in _ALL_LABELS if not _is_base(label))
