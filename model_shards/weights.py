"""Lazy, memory-mapped reads of a safetensors checkpoint, one rank's slice at a time.

Each tensor is read straight into the parameter that owns it and the read copy is dropped at
once, so a model never holds its weights twice; with tensor parallelism a rank reads only its own
rows or columns (`get_slice`), never the other ranks' parts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from model_folder.errors import ModelFolderError
from model_folder.weight_files import SINGLE_FILE, sharded_weight_map



class WeightReader:
    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self._file_of = _tensor_files(self.folder)  # tensor name -> file name
        self._handles: dict[str, Any] = {}
        self._read: set[str] = set()

    def __enter__(self) -> WeightReader:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self._handles.clear()  # drops the memory maps

    def names(self) -> list[str]:
        return sorted(self._file_of)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._open_slice(name).get_shape())

    def stored_dtype(self, name: str) -> str:
        """The dtype as safetensors spells it: "BF16", "F8_E4M3", "I8", ..."""
        return self._open_slice(name).get_dtype()

    def get(self, name: str, *, shard_dim: int | None = None, rank: int = 0, world_size: int = 1,
            dtype: torch.dtype | None = None,
            device: torch.device | str | None = None) -> torch.Tensor:
        """The tensor, or with shard_dim this rank's contiguous 1/world_size of it along that dim."""
        if shard_dim is None:
            tensor = self._open_slice(name)[:]
        else:
            start, stop = _shard_range(name, self.shape(name), shard_dim, rank, world_size)
            tensor = self._read_range(name, shard_dim, start, stop)
        self._read.add(name)
        return tensor.to(device=device, dtype=dtype)

    def copy_rows_into(self, destination: torch.Tensor, name: str, start: int, stop: int) -> None:
        """Rows start .. stop of `name` (clipped to its end) into the first rows of destination;
        for a vocabulary split over ranks that it does not divide (the last rank's tail is padding)."""
        shape = self.shape(name)
        stop = min(stop, shape[0])
        rows = max(0, stop - start)
        if tuple(destination.shape[1:]) != shape[1:] or rows > destination.shape[0]:
            raise ModelFolderError(f"{self._file_of[name]}: tensor {name!r} has shape {shape} (rows {start}..{stop} "
                                   f"for this rank) but the model expects {tuple(destination.shape)}")
        if rows:
            destination[:rows].copy_(self._read_range(name, 0, start, stop).to(destination.device))
        self._read.add(name)

    def _read_range(self, name: str, dim: int, start: int, stop: int) -> torch.Tensor:
        return self._open_slice(name)[(slice(None),) * dim + (slice(start, stop),)]

    def copy_into(self, destination: torch.Tensor, name: str, *, shard_dim: int | None = None,
                  rank: int = 0, world_size: int = 1) -> None:
        """Check the shape, then copy (and cast) this rank's part of `name` into destination."""
        expected = _sharded_shape(name, self.shape(name), shard_dim, rank, world_size)
        if expected != tuple(destination.shape):
            raise ModelFolderError(
                f"{self._file_of[name]}: tensor {name!r} has shape {self.shape(name)} "
                f"(this rank's part {expected}) but the model expects {tuple(destination.shape)}")
        destination.copy_(self.get(name, shard_dim=shard_dim, rank=rank, world_size=world_size,
                                   device=destination.device))

    def unread(self) -> list[str]:
        """Tensors in the checkpoint that no `get` asked for (yet)."""
        return sorted(set(self._file_of) - self._read)

    def _open_slice(self, name: str) -> Any:
        if name not in self._file_of:
            raise ModelFolderError(f"{self.folder}: tensor {name!r} is missing from the checkpoint")
        file_name = self._file_of[name]
        if file_name not in self._handles:
            self._handles[file_name] = _open(self.folder / file_name)
        return self._handles[file_name].get_slice(name)


def _tensor_files(folder: Path) -> dict[str, str]:
    weight_map = sharded_weight_map(folder)
    if weight_map is not None:
        return weight_map
    return {name: SINGLE_FILE for name in _open(folder / SINGLE_FILE).keys()}


def _open(path: Path) -> Any:
    try:
        return safe_open(str(path), framework="pt")
    except Exception as error:  # safetensors raises its own error types for bad headers
        raise ModelFolderError(f"{path}: cannot be opened as safetensors ({error})") from error


def _shard_range(name: str, shape: tuple[int, ...], shard_dim: int, rank: int,
                 world_size: int) -> tuple[int, int]:
    if shard_dim >= len(shape) or shape[shard_dim] % world_size:
        raise ModelFolderError(f"tensor {name!r} of shape {shape} cannot be split {world_size} "
                               f"ways along dim {shard_dim}")
    part = shape[shard_dim] // world_size
    return rank * part, (rank + 1) * part


def _sharded_shape(name: str, shape: tuple[int, ...], shard_dim: int | None, rank: int,
                   world_size: int) -> tuple[int, ...]:
    if shard_dim is None:
        return shape
    start, stop = _shard_range(name, shape, shard_dim, rank, world_size)
    return shape[:shard_dim] + (stop - start,) + shape[shard_dim + 1:]
