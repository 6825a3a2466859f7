"""What every dataset family shares: the data spec saved with the model, the in-memory dataset, the one
normalisation formula, and plug-in import."""

from __future__ import annotations

import importlib
import os
import sys
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import Dataset

from disttrain.errors import UsageError, one_line


@dataclass
class DataSpec:
    """What the model and loss need to know about the data; saved next to the model."""

    task: str  # "classification" or "regression"
    input_shape: list[int]
    num_outputs: int  # classes, or the flattened target size
    target_shape: list[int] = field(default_factory=list)
    classes: list[str] | None = None
    mean: list[float] | None = None  # set for uint8 images: x/255, then (x - mean) / std
    std: list[float] | None = None
    vocab: list[str] | None = None  # text datasets: the string of each token id (data/text.py)


def normalize_uint8(x: torch.Tensor, mean: torch.Tensor | None, std: torch.Tensor | None) -> torch.Tensor:
    """uint8 images -> float: x/255, then (x - mean) / std (per-channel tensors shaped to broadcast, or None).
    The one place of this formula: training, evaluation and `disttrain.predict` all go through it."""
    x = x.float().div_(255)
    if mean is not None:
        x = x.sub_(mean).div_(std)
    return x


class ArrayDataset(Dataset):
    """A dataset held as two tensors; items are raw (uint8 images stay uint8)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        if len(x) != len(y):
            raise UsageError(f"dataset has {len(x)} inputs but {len(y)} targets")
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[i], self.y[i]

    def subset(self, idx: torch.Tensor) -> ArrayDataset:
        return ArrayDataset(self.x[idx], self.y[idx])



def import_plugin(spec: str, flag: str) -> Any:
    """Import `module:function` (the current directory is on the path, like `python file.py`)."""
    module, _, fn = spec.partition(":")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        mod = importlib.import_module(module)
    except Exception as e:  # noqa: BLE001 - any import failure is the user's plug-in
        raise UsageError(f"{flag} {spec}: cannot import {module} ({type(e).__name__}: {one_line(e)})") from None
    if not callable(getattr(mod, fn, None)):
        raise UsageError(f"{flag} {spec}: {module} has no callable {fn}")
    return getattr(mod, fn)


