"""Where and in what precision a client computes, and what it tells the server about it.

One room for every device decision, used by the ClientApp, the scripts and the tests:

* :func:`pick_device` takes CUDA when this process sees a GPU, and warns loudly when the machine
  has NVIDIA GPUs that this process was not given (Ray sets ``CUDA_VISIBLE_DEVICES=""`` for a
  simulated client that asked for no GPU share, and training then silently runs on the CPU).
* :func:`precision` resolves ``amp``: bf16 autocast where the GPU computes bf16 natively
  (compute capability 8.0 and up: A100, H100, L4, ...), fp16 autocast with a gradient scaler
  where it does not (T4, V100), fp32 on the CPU or with ``amp = false``.
* :func:`configure_determinism` sets PyTorch's backend flags explicitly, both ways, so a run's
  GPU arithmetic is a recorded choice rather than whatever a previous run in the process left.
* :func:`device_report` is what a client replies about itself: device type, GPU name, dtype and
  peak memory; the server records it per client (``device`` in metrics.jsonl and summary.json).
* :func:`gpus_per_client` is the simulation's GPU share per client when CUDA is present.
"""

from __future__ import annotations

import contextlib
import glob
import logging
import math
import os
import sys
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)

# Clients sharing one GPU when the share is chosen automatically. An estimate, not measured on a GPU:
# a ViT-B/16 client holds its fp32 backbone (0.6 GB), its activations and its evaluation cache, so
# four should fit on a 16 GB card (scripts/gpu_check.sh measures a step's peak memory).
CLIENTS_PER_GPU = 4
# cuBLAS needs a fixed workspace for deterministic results (PyTorch's reproducibility notes).
CUBLAS_WORKSPACE = ":4096:8"


def gpu_hardware_visible() -> bool:
    """Whether this machine has NVIDIA GPUs, whatever ``CUDA_VISIBLE_DEVICES`` says: the driver
    lists them under /proc, and containers given a GPU have its device node."""
    return bool(glob.glob("/proc/driver/nvidia/gpus/*") or glob.glob("/dev/nvidia[0-9]*"))


_WARNED: set[str] = set()


def pick_device(requested: str = "auto") -> torch.device:
    """``requested`` is ``"auto"`` (CUDA when visible, else CPU), ``"cpu"`` or ``"cuda[:N]"``."""
    if requested not in ("auto", "cpu") and not requested.startswith("cuda"):
        raise ValueError(f"device {requested!r}: expected 'auto', 'cpu' or 'cuda[:N]'")
    if requested.startswith("cuda"):
        if not torch.cuda.is_available():
            raise RuntimeError(f"device {requested!r} asked for, but this process sees no CUDA device")
        return torch.device(requested)
    if requested == "cpu":
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda")
    if gpu_hardware_visible() and "no-gpu" not in _WARNED:
        _WARNED.add("no-gpu")
        log.warning(
            "this machine has NVIDIA GPUs but this client was given none (CUDA_VISIBLE_DEVICES=%r): it trains "
            "on the CPU. In simulation pass a GPU share, e.g. --federation-config \"num-supernodes=10 "
            "client-resources-num-gpus=0.25\" (pfedmma-compare chooses one itself); in Docker, reserve a "
            "GPU for the clientapp service",
            os.environ.get("CUDA_VISIBLE_DEVICES"),
        )
    return torch.device("cpu")


@dataclass(frozen=True)
class Precision:
    """How a step computes: ``name`` as recorded (``bf16``, ``fp16``, ``fp32``)."""

    name: str
    autocast_dtype: torch.dtype | None  # None: no autocast
    scaled: bool  # fp16 needs a GradScaler: its gradients underflow without one

    def autocast(self, device: torch.device) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=self.autocast_dtype)

    def scaler(self, device: torch.device) -> torch.amp.GradScaler:
        """A GradScaler that scales only for fp16 (disabled, an identity, otherwise)."""
        return torch.amp.GradScaler(device.type, enabled=self.scaled)


FP32 = Precision("fp32", None, False)


def native_bf16(device: torch.device) -> bool:
    """bf16 in hardware (compute capability 8.0+), not the emulation older GPUs offer."""
    if device.type != "cuda":
        return False
    major, _ = torch.cuda.get_device_capability(device)
    return major >= 8


def precision(device: torch.device, amp: bool) -> Precision:
    if not amp or device.type != "cuda":
        return FP32
    if native_bf16(device):
        return Precision("bf16", torch.bfloat16, False)
    return Precision("fp16", torch.float16, True)


def configure_determinism(deterministic: bool) -> None:
    """Set the backend flags that decide GPU reproducibility, every time, in both directions.

    Deterministic: PyTorch's deterministic algorithms (an op without one raises), no cuDNN
    autotuning, and no TF32 (whose rounding differs from fp32). Otherwise TF32 matmuls and cuDNN
    autotuning are on: faster, and runs then differ at rounding level on a GPU (never on a CPU,
    whose kernels are deterministic at a fixed thread count).
    """
    if deterministic:
        # Must be in the environment before cuBLAS creates its handle; harmless once set.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
    torch.use_deterministic_algorithms(deterministic)
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = not deterministic
    torch.backends.cuda.matmul.allow_tf32 = not deterministic
    torch.backends.cudnn.allow_tf32 = not deterministic


_BOUNDED: set[str] = set()


def assigned_gpu_share() -> float | None:
    """The GPU share Ray gave this process (a simulated client), or None outside Ray."""
    ray = sys.modules.get("ray")  # only a Ray worker has imported it; never imported here
    if ray is None or not ray.is_initialized():
        return None
    share = ray.get_runtime_context().get_assigned_resources().get("GPU")
    return float(share) if share else None


def bound_gpu_share(device: torch.device) -> float | None:
    """Hold a simulated client to its share of the GPU's memory (Ray shares compute, not memory:
    without this one client's caches could take the card from the others). Once per process."""
    if device.type != "cuda" or str(device) in _BOUNDED:
        return None
    _BOUNDED.add(str(device))
    share = assigned_gpu_share()
    if share is None or share >= 1.0:
        return None
    torch.cuda.set_per_process_memory_fraction(share, device)
    log.info("GPU memory held to this client's share: %.2f of %s", share, torch.cuda.get_device_name(device))
    return share


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def device_report(device: torch.device, chosen: Precision, deterministic: bool) -> dict[str, str | float | int | bool]:
    """What a client says about where it ran: strings and numbers only (a ConfigRecord)."""
    report: dict[str, str | float | int | bool] = {
        "type": device.type, "dtype": chosen.name, "deterministic": deterministic, "name": "cpu",
        "peak-memory-mb": 0.0, "torch": torch.__version__,
        # The server repeats pick_device's warning in the run's own output, where people look.
        "gpus-unused": device.type == "cpu" and gpu_hardware_visible(),
    }
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        major, minor = torch.cuda.get_device_capability(index)
        report.update({
            "name": torch.cuda.get_device_name(index),
            "capability": f"{major}.{minor}",
            "peak-memory-mb": round(torch.cuda.max_memory_allocated(index) / 2**20, 1),
            "total-memory-mb": round(torch.cuda.get_device_properties(index).total_memory / 2**20, 1),
            "cuda": str(torch.version.cuda),
        })
    return report


def gpus_per_client(num_clients: int, gpu_count: int | None = None) -> float:
    """The GPU share of each simulated client: all clients at once when they fit, at most
    :data:`CLIENTS_PER_GPU` per GPU otherwise (Ray then queues the rest); 0 without CUDA."""
    gpus = torch.cuda.device_count() if gpu_count is None else gpu_count
    if gpus <= 0 or num_clients <= 0:
        return 0.0
    per_gpu = min(CLIENTS_PER_GPU, math.ceil(num_clients / gpus))
    return round(1.0 / per_gpu, 4)


def simulation_resources(num_clients: int, gpus: float | None = None, cpus: int | None = None) -> str:
    """The ``client-resources-*`` part of ``--federation-config`` for ``num_clients`` clients;
    ``gpus=None`` chooses the share with :func:`gpus_per_client`."""
    share = gpus_per_client(num_clients) if gpus is None else gpus
    parts = []
    if cpus is not None:
        parts.append(f"client-resources-num-cpus={cpus}")
    if share > 0:
        parts.append(f"client-resources-num-gpus={share}")
    return " ".join(parts)
