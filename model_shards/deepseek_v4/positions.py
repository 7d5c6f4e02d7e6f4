"""Positions of a step's tokens (and of the entries it closes), built on the host from host ints
and moved to the device without a wait: several sequences' chunks sit side by side in one pass,
each at its own positions, and small host-built tensors replace a device op per sequence."""

from __future__ import annotations

import torch

from model_shards.device import host_to_device


def span_positions(spans: list[tuple[int, int]], device: torch.device) -> torch.Tensor:
    """(sum count,) long: for each (start, count) the positions start .. start+count-1, one
    after another (one span: an arange on the device, no copy)."""
    if len(spans) == 1:
        start, count = spans[0]
        return torch.arange(start, start + count, device=device)
    return host_to_device(torch.cat([torch.arange(start, start + count) for start, count in spans]), device)
