"""Which safetensors files hold a folder's weights, checked without reading them: the serve
command checks this before it starts Ray, so a folder without weights is one line of error,
not a replica failing to load on every retry."""

from __future__ import annotations

import json
from pathlib import Path

from model_folder.errors import ModelFolderError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def sharded_weight_map(folder: str | Path) -> dict[str, str] | None:
    """Tensor name -> shard file from the index, every shard present; None for a single-file
    checkpoint. A folder with neither raises ModelFolderError naming what is missing."""
    folder = Path(folder)
    index_path = folder / INDEX_FILE
    if index_path.is_file():
        return _files_from_index(index_path)
    if (folder / SINGLE_FILE).is_file():
        return None
    raise ModelFolderError(f"{folder}: neither {SINGLE_FILE} nor {INDEX_FILE} is present "
                           "(only safetensors checkpoints are supported)")


def _files_from_index(index_path: Path) -> dict[str, str]:
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise ModelFolderError(f"{index_path}: no valid 'weight_map' ({error})") from error
    for file_name in sorted(set(weight_map.values())):
        if not (index_path.parent / file_name).is_file():
            raise ModelFolderError(f"{index_path.parent / file_name}: safetensors shard listed in "
                                   f"{INDEX_FILE} is missing")
    return dict(weight_map)
