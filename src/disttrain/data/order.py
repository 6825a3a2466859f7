"""The per-rank order of every dataset, in one place, and the batches that follow it.

Two paths feed the loop with the same (x, y) batches in the same order:
- in-memory datasets (ArrayDataset: the built-in torchvision ones, decoded once into a uint8 tensor cache,
  and the synthetic ones) are gathered by index on the device and normalised/augmented batch-wise;
- any other dataset goes through a DataLoader whose batch sampler yields the very same index batches.
The order always comes from a torch DistributedSampler (seed, epoch, rank, world size) and is never
sharded a second time (we do not `accelerator.prepare()` loaders, see README "Accelerate traps").
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DistributedSampler

from disttrain.config import Config
from disttrain.data.base import ArrayDataset, DataSpec, normalize_uint8

class Data:
    """Train/val/eval sets of one run plus the per-rank batch order. Built by `load_data`."""

    def __init__(self, cfg: Config, train: Any, val: Any, test: Any, spec: DataSpec,
                 rank: int, world_size: int, device: torch.device):
        self.cfg, self.spec = cfg, spec
        self.train, self.val, self.test = train, val, test
        self.rank, self.world_size, self.device = rank, world_size, device
        self.in_memory = isinstance(train, ArrayDataset)
        self._loader: Any = None
        self.wait_s = 0.0  # seconds the loop waited for batches (throughput logs)
        self.channels_last = False
        self._augment_cache: tuple[int, Any] | None = None
        if self.in_memory and device.type != "cpu":  # keep the whole uint8 set on the GPU; gather there
            for ds in (train, val, test):
                if ds is not None:
                    ds.x, ds.y = ds.x.to(device), ds.y.to(device)
        mean, std = spec.mean, spec.std
        shape = (1, -1) + (1,) * (len(spec.input_shape) - 1)
        self._mean = torch.tensor(mean, device=device).view(shape) if mean else None
        self._std = torch.tensor(std, device=device).view(shape) if std else None

    # ------------------------------------------------------------------ order
    def sampler(self, epoch: int) -> DistributedSampler:
        s = DistributedSampler(self.train, num_replicas=self.world_size, rank=self.rank, shuffle=True,
                               seed=self.cfg.seed, drop_last=False)
        s.set_epoch(epoch)
        return s

    def epoch_batches(self, epoch: int) -> list[torch.Tensor]:
        """This rank's micro-batches of dataset indices for the epoch, in training order."""
        idx = torch.tensor(list(self.sampler(epoch)), dtype=torch.int64)
        return list(idx.split(self.cfg.batch_size))

    def steps_per_epoch(self) -> int:
        per_rank = math.ceil(len(self.train) / self.world_size)
        return math.ceil(math.ceil(per_rank / self.cfg.batch_size) / self.cfg.grad_accum)

    def train_windows(self, epoch: int, start: int = 0) -> Iterator[Window]:
        """One Window (grad-accum micro-batches) per optimizer step, from window `start` on."""
        k = self.cfg.grad_accum
        batches = self.epoch_batches(epoch)
        windows = [batches[i:i + k] for i in range(0, len(batches), k)][start:]
        flat = [b for w in windows for b in w]
        if self.in_memory:
            params = self._augment_params(epoch)
            batch_iter = (self._fetch(self.train, b, params) for b in flat)
        else:
            batch_iter = self._loader_iter(flat)
        for w in windows:
            yield Window(batch_iter, [len(b) for b in w], self)

    # ------------------------------------------------------------------ fetching
    def _fetch(self, ds: ArrayDataset, idx: torch.Tensor, aug: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
        idx = idx.to(ds.x.device)
        x, y = ds.x[idx], ds.y[idx]
        return self.prepare(x, aug, idx), y

    def prepare(self, x: torch.Tensor, aug: Any = None, idx: torch.Tensor | None = None) -> torch.Tensor:
        """uint8 images -> normalised float on the device (augmented when training)."""
        x = x.to(self.device, non_blocking=True)
        if x.dtype == torch.uint8:
            x = normalize_uint8(x, self._mean, self._std)
        if aug is not None:
            x = augment_batch(x, aug, idx)
        if self.channels_last and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def _augment_params(self, epoch: int) -> Any:
        """Per-sample augmentation draws for the whole epoch, from (seed, epoch) only: the same sample
        gets the same crop and flip on any world size and after any resume."""
        mode = self.cfg.augment
        if mode == "none" or len(self.spec.input_shape) != 3:
            return None
        g = torch.Generator().manual_seed(self.cfg.seed * 100_003 + epoch)
        n = len(self.train)
        pad = 4 if self.spec.input_shape[-1] >= 32 else 2
        shifts = torch.randint(-pad, pad + 1, (n, 2), generator=g) if "crop" in mode else None
        flips = torch.rand(n, generator=g) < 0.5 if "flip" in mode else None
        dev = self.train.x.device
        return (pad, shifts.to(dev) if shifts is not None else None, flips.to(dev) if flips is not None else None)

    def _loader_iter(self, flat: list[torch.Tensor]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        from torch.utils.data import DataLoader

        if self._loader is None:
            workers = self.cfg.num_workers if self.cfg.num_workers is not None else min(4, os.cpu_count() or 1)
            self._batches = _BatchList()
            self._loader = DataLoader(
                self.train, batch_sampler=self._batches, num_workers=workers,
                pin_memory=self.device.type == "cuda", persistent_workers=workers > 0,
                prefetch_factor=4 if workers > 0 else None,
                generator=torch.Generator(),  # its own generator: iterators must not draw from the global RNG
                worker_init_fn=_ignore_stop_signals,
            )
        self._batches.batches = [b.tolist() for b in flat]
        for x, y in self._loader:
            yield self.prepare(x), y.to(self.device, non_blocking=True)

    # ------------------------------------------------------------------ evaluation
    def eval_batches(self, split: str) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's contiguous shard of the val/test set, no padding: every sample counted once."""
        ds = self.val if split == "val" else self.test
        shard = torch.arange(len(ds)).tensor_split(self.world_size)[self.rank]
        for idx in shard.split(self.cfg.eval_batch_size):
            if self.in_memory:
                yield self._fetch(ds, idx)
            else:
                items = [ds[int(i)] for i in idx]
                x = torch.stack([torch.as_tensor(a) for a, _ in items])
                y = torch.stack([torch.as_tensor(b) for _, b in items])
                yield self.prepare(x), y.to(self.device)


def _ignore_stop_signals(_: int) -> None:
    """Loader workers leave stop signals to the trainer (Slurm may signal every process of a step);
    they still exit with it, since the DataLoader watches its parent."""
    import signal

    for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
        signal.signal(s, signal.SIG_IGN)


class _BatchList:
    """A batch sampler whose batches the Data object sets before each epoch (persistent workers)."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class Window:
    """The micro-batches of one optimizer step; `n_samples` is this rank's sample count in it."""

    def __init__(self, batch_iter: Iterator[tuple[torch.Tensor, torch.Tensor]], sizes: list[int], data: Data):
        self._it, self.sizes, self.n_samples, self._data = batch_iter, sizes, sum(sizes), data

    def __len__(self) -> int:
        return len(self.sizes)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for _ in self.sizes:
            t = time.perf_counter()
            batch = next(self._it)
            self._data.wait_s += time.perf_counter() - t
            yield batch


def augment_batch(x: torch.Tensor, aug: Any, idx: torch.Tensor) -> torch.Tensor:
    """Random crop (zero padding) and horizontal flip, per sample, as one batched gather."""
    pad, shifts, flips = aug
    if shifts is not None:
        n, c, h, w = x.shape
        xp = torch.nn.functional.pad(x, (pad, pad, pad, pad))
        s = shifts[idx]
        rows = (torch.arange(h, device=x.device) + pad)[None, :] + s[:, :1]
        cols = (torch.arange(w, device=x.device) + pad)[None, :] + s[:, 1:]
        b = torch.arange(n, device=x.device)[:, None, None, None]
        ch = torch.arange(c, device=x.device)[None, :, None, None]
        x = xp[b, ch, rows[:, None, :, None], cols[:, None, None, :]]
    if flips is not None:
        x = torch.where(flips[idx][:, None, None, None], x.flip(-1), x)
    return x


