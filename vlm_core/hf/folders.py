"""Read a local Hugging Face model folder: its config and its safetensors tensors (never pickles)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import safe_open

if TYPE_CHECKING:
    from transformers import PretrainedConfig


class HFImportError(ValueError):
    """A Hugging Face folder that cannot be imported: missing, of an unsupported kind, or incomplete."""


def load_hf_config(folder: Path) -> PretrainedConfig:
    """``AutoConfig`` of a local folder, without touching the network."""
    from transformers import AutoConfig

    if not (folder / "config.json").is_file():
        raise HFImportError(f"{folder} has no config.json; expected a folder written by save_pretrained")
    try:
        return AutoConfig.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise HFImportError(f"{folder}/config.json cannot be read by transformers' AutoConfig: {exc}") from exc


def read_json(path: Path) -> dict[str, Any] | None:
    """The JSON object in ``path``, or None when the file does not exist."""
    if not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8"))


class SafetensorsFolder:
    """The tensors of a folder's ``model.safetensors`` (or its sharded index), read lazily by name.

    ``prefix`` is stripped from stored names when every name that matters carries it (CLIPModel folders
    store ``vision_model.embeddings...``; transformers 5 writes a CLIPVisionModel as ``embeddings...``).
    """

    def __init__(self, folder: Path, prefix: str = "") -> None:
        self.folder = folder
        index = read_json(folder / "model.safetensors.index.json")
        if index is not None:
            self._file_of = {name: folder / file for name, file in index["weight_map"].items()}
        elif (folder / "model.safetensors").is_file():
            with safe_open(str(folder / "model.safetensors"), framework="pt") as handle:
                names = handle.keys()  # safe_open's own method, not a dict's
            self._file_of = dict.fromkeys(names, folder / "model.safetensors")
        else:
            found = sorted(p.name for p in folder.glob("*.bin")) or sorted(p.name for p in folder.iterdir())[:8]
            raise HFImportError(
                f"{folder} has no model.safetensors or model.safetensors.index.json (found {found}); weights are "
                "read with safetensors only, never unpickled: re-save the model with "
                "save_pretrained(..., safe_serialization=True)"
            )
        self.prefix = prefix if prefix and any(name.startswith(prefix) for name in self._file_of) else ""

    def has(self, name: str) -> bool:
        return self.prefix + name in self._file_of

    def get(self, name: str) -> torch.Tensor:
        stored = self.prefix + name
        if stored not in self._file_of:
            raise HFImportError(
                f"{self.folder}: tensor {stored!r} is missing from the safetensors files; the weights do not match "
                "config.json (a truncated download, or a model of another architecture)"
            )
        with safe_open(str(self._file_of[stored]), framework="pt") as handle:
            return handle.get_tensor(stored)
