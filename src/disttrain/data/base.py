"""What every dataset family shares: the data spec saved with the model, the in-memory dataset, the one
normalisation formula, and plug-in import."""

from __future__ import annotations

import importlib
import os
import random
import sys
from collections.abc import Mapping, Sequence
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
    # how raw inputs become model inputs, for data read from files (images.py, tables.py): saved in model.json
    # so that evaluate and predict apply exactly the training transform; None for built-in and plug-in sets
    preprocess: dict[str, Any] | None = None


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



def holdout_indices(n: int, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train indices, validation indices), sorted, for --val-fraction: depends on the seed and n only,
    never on the world size."""
    n_val = int(round(n * fraction))
    if n_val == 0 or n_val == n:
        raise UsageError(f"--val-fraction {fraction} leaves {n - n_val} training and {n_val} validation samples")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 7919))
    return perm[n_val:].sort().values, perm[:n_val].sort().values


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


EVAL_EPOCH = -1  # the "epoch" of evaluation reads in SeededItems keys


def item_seed(seed: int, epoch: int, index: int) -> int:
    """The seed of one read of one sample: a function of (run seed, epoch, sample index) only, through
    numpy's SeedSequence (well-mixed 64 bits), so a sample's random augmentation is the same on any world
    size, in any worker, after any resume, and differs between samples, epochs and seeds."""
    import numpy as np

    return int(np.random.SeedSequence([seed % 2**63, epoch % 2**63, index]).generate_state(1, np.uint64)[0]) >> 1


class SeededItems(Dataset):
    """A map-style dataset read by (epoch, index) keys: every item is read with torch's, numpy's and Python's
    global RNGs seeded from item_seed(seed, epoch, index), and the reader's RNG states are put back after
    each batch. So a `__getitem__` that draws random numbers (random crops, noise) draws a function of
    (seed, epoch, sample), in DataLoader workers (whose own seeding would replay after a resume and ignore
    the rank and --seed) as in the main process (where it would otherwise consume the training streams)."""

    def __init__(self, dataset: Any, seed: int):
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> Any:
        return self.__getitems__([key])[0]

    def __getitems__(self, keys: list[tuple[int, int]]) -> list[Any]:
        import numpy as np

        saved = torch.get_rng_state(), np.random.get_state(), random.getstate()
        try:
            out = []
            for epoch, i in keys:
                s = item_seed(self.seed, epoch, i)
                torch.manual_seed(s)  # (CPU generator; a dataset item is made on the CPU)
                np.random.seed(s % 2**32)
                random.seed(s)
                out.append(self.dataset[i])
            return out
        finally:
            torch.set_rng_state(saved[0])
            np.random.set_state(saved[1])
            random.setstate(saved[2])


INPUT_KEYS = ("x", "input", "inputs", "image", "pixel_values")
TARGET_KEYS = ("y", "label", "labels", "target", "targets")


class PairDataset(Dataset):
    """Mapping items ({"image": ..., "label": ...}) as (input, target) pairs, by the documented keys:
    input = the one of INPUT_KEYS present, target = the one of TARGET_KEYS present."""

    def __init__(self, dataset: Any, input_key: str, target_key: str):
        self.dataset, self.input_key, self.target_key = dataset, input_key, target_key

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> tuple[Any, Any]:
        item = self.dataset[i]
        return item[self.input_key], item[self.target_key]


def as_pairs(dataset: Any, what: str) -> Any:
    """`dataset` whose items are (input, target) pairs: pairs as they are, mappings through PairDataset;
    UsageError (one line) for any other item shape."""
    if dataset is None or len(dataset) == 0:
        return dataset
    item = dataset[0]
    if isinstance(item, Mapping):
        found = [k for k in INPUT_KEYS if k in item], [k for k in TARGET_KEYS if k in item]
        if len(found[0]) != 1 or len(found[1]) != 1:
            raise UsageError(f"{what}: items are mappings with keys {sorted(map(str, item))[:8]}; need exactly one "
                             f"input key of {list(INPUT_KEYS)} and one target key of {list(TARGET_KEYS)}")
        return PairDataset(dataset, found[0][0], found[1][0])
    if isinstance(item, Sequence) and not isinstance(item, (str, bytes)) and len(item) == 2:
        return dataset
    raise UsageError(f"{what}: items must be (input, target) pairs or mappings with an input key of "
                     f"{list(INPUT_KEYS)} and a target key of {list(TARGET_KEYS)}; got {type(item).__name__}"
                     + (f" of length {len(item)}" if isinstance(item, Sequence) else ""))
