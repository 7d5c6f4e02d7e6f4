"""Choosing the device and dtype a worker runs in, from the config's "auto" defaults."""

from __future__ import annotations

import torch

from model_folder.hf_config import ModelArchitecture

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def host_to_device(values: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """A host tensor on `device`; on a GPU from pinned memory, without waiting. A plain
    `.to(device)` of pageable memory synchronizes the stream: the host then waits for every kernel
    queued so far, and the GPU idles while the host builds the rest of the step. The caching host
    allocator keeps the pinned buffer until the copy has read it."""
    if torch.device(device).type != "cuda":
        return values.to(device)
    return values.pin_memory().to(device, non_blocking=True)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"model.device={name!r} but CUDA is not available on this machine")
    return device


def resolve_dtype(name: str, architecture: ModelArchitecture, device: torch.device) -> torch.dtype:
    """auto: the checkpoint's dtype on a GPU; float32 on the CPU (CPU half precision is slow)."""
    if name != "auto":
        return _DTYPES[name]
    if device.type != "cuda":
        return torch.float32
    return _DTYPES.get(str(architecture.torch_dtype).removeprefix("torch."), torch.bfloat16)
