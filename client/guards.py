"""What a client checks in what the server sends it, and the clipping it applies for DP.

A client trusts the server no more than the server trusts it: a global state holding a NaN, an
Inf or a value beyond ``max-parameter-abs`` is refused before any training, so that a poisoned
global cannot turn this client's private adapters into NaN (they are saved only when finite
anyway: :class:`client.state_store.DivergedError`).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM as CLIPPING_NORM_KEY
from flwr.supercore.differential_privacy import compute_clip_model_update

from common.config import DP_CLIENT_SIDE


class UntrustedGlobalStateError(ValueError):
    """The server sent tensors no honest server would: refused with an error reply."""


def check_received(tensors: Mapping[str, torch.Tensor], max_abs: float, what: str) -> None:
    for name, tensor in tensors.items():
        if not bool(torch.isfinite(tensor).all()):
            raise UntrustedGlobalStateError(f"{what} {name} holds NaN or Inf; refused, nothing trained or saved")
        largest = float(tensor.abs().max()) if tensor.numel() else 0.0
        if largest > max_abs:
            raise UntrustedGlobalStateError(
                f"{what} {name} holds |value| {largest:.3g} > max-parameter-abs={max_abs:g}; refused, nothing trained or saved"
            )


def clip_for_dp(
    trained: Mapping[str, torch.Tensor], sent: Mapping[str, torch.Tensor], config: Mapping[str, object], dp: str
) -> dict[str, torch.Tensor]:
    """Client-side DP clipping with Flower's function: the update (trained - sent) scaled down
    to the clipping norm the server's DP wrapper put in the config. The server checks the norm
    of what arrives, so it needs no word from the client on whether it clipped."""
    if dp not in DP_CLIENT_SIDE:
        return dict(trained)
    if CLIPPING_NORM_KEY not in config:
        raise ValueError(f"dp={dp!r} but the server sent no {CLIPPING_NORM_KEY!r}; refusing to send an unclipped update")
    clip = float(config[CLIPPING_NORM_KEY])  # type: ignore[arg-type]
    names = list(sent)
    params = [trained[n].detach().cpu().numpy().astype(np.float32, copy=True) for n in names]
    reference = [sent[n].detach().cpu().numpy().astype(np.float32) for n in names]
    if not any(np.any(p != r) for p, r in zip(params, reference, strict=True)):
        return dict(trained)  # nothing to clip; Flower's clipping would divide by this zero norm
    compute_clip_model_update(params, reference, clip)
    return {n: torch.from_numpy(np.asarray(p)) for n, p in zip(names, params, strict=True)}
