"""The per-rank order of every dataset, in one place, and the batches that follow it.

Two paths feed the loop with the same (x, y) batches in the same order:
- in-memory datasets (ArrayDataset: the built-in torchvision ones, decoded once into a uint8 tensor cache,
  and the synthetic ones) are gathered by index on the device and normalised/augmented batch-wise;
- any other dataset goes through a DataLoader whose batch sampler yields the very same index batches.
The order is DistributedSampler's permutation of (seed, epoch), dealt to ranks without padding (every sample
exactly once per epoch on any world size), and is never sharded a second time (we do not
`accelerator.prepare()` loaders, see README "Accelerate traps").
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import torch

from disttrain.config import Config
from disttrain.data.base import EVAL_EPOCH, ArrayDataset, DataSpec, SeededItems, normalize_uint8

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
    def epoch_order(self, epoch: int) -> torch.Tensor:
        """All ranks' order of the training set for `epoch`: the permutation DistributedSampler draws
        (a generator seeded with seed + epoch), but never padded to a multiple of the world size."""
        g = torch.Generator()
        g.manual_seed(self.cfg.seed + epoch)
        return torch.randperm(len(self.train), generator=g)

    def global_batch(self) -> int:
        return self.cfg.batch_size * self.world_size * self.cfg.grad_accum

    def steps_per_epoch(self) -> int:
        """Optimizer steps per epoch: every sample exactly once, the last step takes what is left."""
        return math.ceil(len(self.train) / self.global_batch())

    def epoch_windows(self, epoch: int) -> list[tuple[list[torch.Tensor], int]]:
        """This rank's micro-batches of dataset indices for every optimizer step of the epoch, with the step's
        sample count over all ranks. Rank r takes positions r, r + W, r + 2W, ... of the epoch order, so
        step s of every rank together covers positions [s*G, (s+1)*G) (G = global batch): the same samples
        on any world size and any split into micro-batches. No padding and no dropping: in the last step a
        rank may hold fewer samples than the others, or none (then its list of micro-batches is empty)."""
        order, n, gb = self.epoch_order(epoch), len(self.train), self.global_batch()
        mine = order[self.rank::self.world_size]
        per_rank = self.cfg.batch_size * self.cfg.grad_accum
        return [([b for b in mine[s * per_rank:(s + 1) * per_rank].split(self.cfg.batch_size) if len(b)],
                 min(gb, n - s * gb)) for s in range(self.steps_per_epoch())]

    def epoch_batches(self, epoch: int, start: int = 0) -> list[torch.Tensor]:
        """This rank's micro-batches of dataset indices from step `start` of the epoch, in training order;
        a step where this rank holds no sample contributes the placeholder batch (the epoch's first sample)."""
        placeholder = self.epoch_order(epoch)[:1]
        return [b for w, _ in self.epoch_windows(epoch)[start:] for b in (w or [placeholder])]

    def train_windows(self, epoch: int, start: int = 0) -> Iterator[Window]:
        """One Window (grad-accum micro-batches) per optimizer step, from window `start` on. A rank with no
        sample in a step still gets one Window: a placeholder batch (one real sample, weight 0, run in eval
        mode) so that it joins the step's gradient all-reduce with zero gradients."""
        windows = self.epoch_windows(epoch)[start:]
        flat = self.epoch_batches(epoch, start)
        if self.in_memory:
            params = self._augment_params(epoch)
            batch_iter = (self._fetch(self.train, b, params) for b in flat)
        else:
            batch_iter = self._loader_iter(flat, epoch)
        for w, n_global in windows:
            yield Window(batch_iter, [len(b) for b in w] or [1], self, n_global, placeholder=not w)

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

    def _loader_iter(self, flat: list[torch.Tensor], epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        from torch.utils.data import DataLoader

        if self._loader is None:
            workers = self.cfg.num_workers if self.cfg.num_workers is not None else min(4, os.cpu_count() or 1)
            self._batches = _BatchList()
            self._loader = DataLoader(
                SeededItems(self.train, self.cfg.seed), batch_sampler=self._batches, num_workers=workers,
                pin_memory=self.device.type == "cuda", persistent_workers=workers > 0,
                prefetch_factor=4 if workers > 0 else None,
                generator=torch.Generator(),  # its own generator: iterators must not draw from the global RNG
                worker_init_fn=_ignore_stop_signals,
            )
        self._batches.batches = [[(epoch, i) for i in b.tolist()] for b in flat]
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
            else:  # random draws of the dataset: a function of (seed, sample), never of the training streams
                items = SeededItems(ds, self.cfg.seed).__getitems__([(EVAL_EPOCH, int(i)) for i in idx])
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
    """The micro-batches of one optimizer step. `n_samples`: this rank's sample count in it; `weight`: what
    each per-sample loss is multiplied by before backward, processes / samples in the step over all ranks,
    so that after DDP's average over ranks every sample of the step weighs 1 / (samples in the step), on any
    world size, micro-batching or partial last step; 0 for a placeholder (a rank with no sample here)."""

    def __init__(self, batch_iter: Iterator[tuple[torch.Tensor, torch.Tensor]], sizes: list[int], data: Data,
                 n_global: int, placeholder: bool = False):
        self._it, self.sizes, self._data = batch_iter, sizes, data
        self.placeholder = placeholder
        self.n_samples = 0 if placeholder else sum(sizes)
        self.weight = 0.0 if placeholder else data.world_size / n_global

    def __len__(self) -> int:
        return len(self.sizes)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for _ in self.sizes:
            t = time.perf_counter()
            batch = next(self._it)
            self._data.wait_s += time.perf_counter() - t
            yield batch

    def mode(self, model: torch.nn.Module) -> Any:
        """Context for the forward and backward of a micro-batch: a placeholder runs in eval mode (no batch-norm
        statistics, no dropout draws: it leaves no trace) and is weighted 0; a real one as it is."""
        return _eval_mode(model) if self.placeholder else nullcontext()


@contextmanager
def _eval_mode(model: torch.nn.Module) -> Iterator[None]:
    model.eval()
    try:
        yield
    finally:
        model.train()


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


