"""Searching a serialised message for the bytes of tensors that must not be in it."""

from __future__ import annotations

from collections.abc import Mapping

import torch


def leaked_rows(blob: bytes, tensors: Mapping[str, torch.Tensor], rows_per_tensor: int = 4) -> list[str]:
    """Names of tensors one of whose first rows appears, byte for byte, in ``blob``.

    Rows whose values are all equal (zero biases, constant LayerNorm weights) carry nothing that
    identifies a tensor and would match any run of the same value, so they are skipped.
    """
    found = []
    for name, tensor in tensors.items():
        flat = tensor.detach().cpu().float()
        rows = flat.reshape(flat.shape[0], -1) if flat.dim() > 1 else flat.reshape(1, -1)
        for row in rows[:rows_per_tensor]:
            if row.numel() < 2 or bool((row == row[0]).all()):
                continue
            if row.numpy().tobytes() in blob:
                found.append(name)
                break
    return found
