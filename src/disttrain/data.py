"""Datasets and the order in which each rank sees them.

Two paths feed the loop with the same (x, y) batches in the same order:
- in-memory datasets (the built-in torchvision ones, decoded once into a uint8 tensor cache in the data
  dir, and the synthetic ones) are gathered by index on the device and normalised/augmented batch-wise;
- any other dataset goes through a DataLoader whose batch sampler yields the very same index batches.
The order always comes from a torch DistributedSampler (seed, epoch, rank, world size) and is never
sharded a second time (we do not `accelerator.prepare()` loaders, see README "Accelerate traps").
"""

from __future__ import annotations

import gzip
import importlib
import math
import os
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset, DistributedSampler, Subset, TensorDataset

from disttrain.config import Config
from disttrain.errors import UsageError, one_line

# Where Debian (and similar) packages put datasets, so the default job runs with no internet.
LOCAL_SOURCES = {
    "fashion_mnist": [Path("/usr/share/datasets/fashion-mnist")],
    "mnist": [Path("/usr/share/datasets/mnist")],
    "cifar10": [],
}
IMAGE_DATASETS = {
    # name: (torchvision class, folder, mean, std, class names)
    "fashion_mnist": ("FashionMNIST", "FashionMNIST", (0.2860,), (0.3530,),
                      ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                       "Sneaker", "Bag", "Ankle boot"]),
    "mnist": ("MNIST", "MNIST", (0.1307,), (0.3081,), [str(i) for i in range(10)]),
    "cifar10": ("CIFAR10", "cifar-10-batches-py", (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616),
                ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]),
}
IDX_FILES = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
             "t10k-labels-idx1-ubyte"]


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


# --------------------------------------------------------------------------- built-in datasets


def _idx_source(name: str, data_dir: Path) -> Path | None:
    """The folder holding the four IDX files (plain or .gz), in the data dir or a local source."""
    folder = data_dir / IMAGE_DATASETS[name][1] / "raw"
    for d in [folder, *LOCAL_SOURCES[name]]:
        if all((d / f).is_file() or (d / f"{f}.gz").is_file() for f in IDX_FILES):
            return d
    return None


def _cache_path(name: str, data_dir: Path, split: str) -> Path:
    return data_dir / "disttrain-cache" / f"{name}-{split}.safetensors"


def locate(cfg: Config) -> str:
    """Where a built-in image dataset will come from ('cache', 'raw', 'download'). No writes.

    Runs on every rank before the first barrier so a missing dataset stops all ranks alike.
    """
    name, data_dir = cfg.dataset, Path(cfg.data_dir)
    if all(_cache_path(name, data_dir, s).is_file() for s in ("train", "test")):
        return "cache"
    if name == "cifar10":
        if (data_dir / "cifar-10-batches-py").is_dir():
            return "raw"
    elif _idx_source(name, data_dir) is not None:
        return "raw"
    if os.environ.get("DISTTRAIN_OFFLINE") == "1":
        raise UsageError(_not_found(name, data_dir, "downloads disabled by DISTTRAIN_OFFLINE=1"))
    return "download"


def _not_found(name: str, data_dir: Path, why: str) -> str:
    places = [str(data_dir / IMAGE_DATASETS[name][1])] + [str(p) for p in LOCAL_SOURCES[name]]
    hint = {"fashion_mnist": "apt-get install dataset-fashion-mnist, or copy the IDX files into "
                             f"{data_dir / 'FashionMNIST' / 'raw'}",
            "mnist": f"copy the MNIST IDX files into {data_dir / 'MNIST' / 'raw'}",
            "cifar10": f"extract cifar-10-python.tar.gz into {data_dir}"}[name]
    return f"--dataset {name}: not found (looked in {', '.join(places)}; {why}); to get it: {hint}"


def _prepare_image_dataset(name: str, data_dir: Path) -> None:
    """Decode once into the uint8 cache (main process of each node only)."""
    from safetensors.torch import save_file

    if all(_cache_path(name, data_dir, s).is_file() for s in ("train", "test")):
        return
    import torchvision

    cls_name, folder = IMAGE_DATASETS[name][:2]
    cls = getattr(torchvision.datasets, cls_name)
    download = False
    if name != "cifar10":
        src = _idx_source(name, data_dir)
        raw = data_dir / folder / "raw"
        if src is not None and src != raw:  # copy from a local source such as Debian's package
            raw.mkdir(parents=True, exist_ok=True)
            for f in IDX_FILES:
                gz = src / f"{f}.gz"
                with (gzip.open(gz) if gz.is_file() else open(src / f, "rb")) as fin, \
                        open(raw / f".{f}.part", "wb") as fout:
                    shutil.copyfileobj(fin, fout)
                os.replace(raw / f".{f}.part", raw / f)
        download = src is None
    elif not (data_dir / folder).is_dir():
        download = True
    for split in ("train", "test"):
        try:
            ds = cls(str(data_dir), train=split == "train", download=download)
        except Exception as e:  # noqa: BLE001 - torchvision raises many kinds; all mean "no usable data"
            why = f"download failed: {one_line(e)[:200]}" if download else f"unreadable: {one_line(e)[:200]}"
            raise UsageError(_not_found(name, data_dir, why) if download else
                             f"--dataset {name} in {data_dir}: {why}; expected complete {cls_name} files "
                             f"(truncated or corrupted? copy them again)") from None
        x = torch.as_tensor(ds.data)
        x = x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2)  # N,C,H,W uint8
        y = torch.as_tensor(ds.targets, dtype=torch.int64)
        out = _cache_path(name, data_dir, split)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(f".tmp{os.getpid()}")
        save_file({"x": x.contiguous(), "y": y}, str(tmp))
        os.replace(tmp, out)


def _load_image_dataset(name: str, data_dir: Path) -> tuple[ArrayDataset, ArrayDataset, DataSpec]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    sets = []
    for split in ("train", "test"):
        path = _cache_path(name, data_dir, split)
        try:
            t = load_file(str(path))
            sets.append(ArrayDataset(t["x"], t["y"]))
        except (SafetensorError, KeyError, OSError) as e:
            raise UsageError(f"--dataset {name}: cache {path} is unreadable ({one_line(e)}); delete it") from None
    _, _, mean, std, classes = IMAGE_DATASETS[name]
    spec = DataSpec("classification", list(sets[0].x.shape[1:]), len(classes), [], classes,
                    list(mean), list(std))
    return sets[0], sets[1], spec


def synthetic_regression(n_train: int = 1024, n_eval: int = 256, features: int = 1, weight: float = 0.7,
                         bias: float = 0.3, noise: float = 0.01, seed: int = 0, **_: Any):
    """y = weight * x + bias (+ noise), like the PyTorch linear-regression tutorial."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n_train + n_eval, features, generator=g)
    y = weight * x.sum(1, keepdim=True) + bias + noise * torch.randn(n_train + n_eval, 1, generator=g)
    return TensorDataset(x[:n_train], y[:n_train]), TensorDataset(x[n_train:], y[n_train:])


def synthetic_classification(n_train: int = 2048, n_eval: int = 512, features: int = 16,
                             num_classes: int = 4, noise: float = 1.0, seed: int = 0, **_: Any):
    """Gaussian blobs around random class centres: learnable, generated from the seed."""
    g = torch.Generator().manual_seed(seed)
    centres = 2.0 * torch.randn(num_classes, features, generator=g)
    y = torch.randint(0, num_classes, (n_train + n_eval,), generator=g)
    x = centres[y] + noise * torch.randn(n_train + n_eval, features, generator=g)
    return TensorDataset(x[:n_train], y[:n_train]), TensorDataset(x[n_train:], y[n_train:])


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


def _as_array_dataset(ds: Any) -> Any:
    if isinstance(ds, TensorDataset) and len(ds.tensors) == 2:
        return ArrayDataset(*ds.tensors)
    return ds


def _target_info(ds: Dataset) -> tuple[str, int, list[int]]:
    """(task, num_outputs, per-sample target shape) from the targets themselves."""
    if isinstance(ds, ArrayDataset):
        y = ds.y
    elif isinstance(getattr(ds, "targets", None), (torch.Tensor, list)):
        y = torch.as_tensor(ds.targets)
    else:
        y = torch.stack([torch.as_tensor(ds[i][1]) for i in range(len(ds))])
    if not y.is_floating_point() and not y.is_complex() and y.ndim == 1 and y.dtype != torch.bool:
        if len(y) and y.min() < 0:
            raise UsageError(f"dataset targets are integers but include {int(y.min())}; "
                             "class labels must be 0..C-1")
        return "classification", int(y.max()) + 1 if len(y) else 0, []
    shape = list(y.shape[1:])
    return "regression", math.prod(shape), shape


def _dataset_from_factory(cfg: Config, fn: Any) -> tuple[Any, Any]:
    try:
        out = fn(data_dir=cfg.data_dir, **cfg.dataset_kwargs)
    except UsageError:
        raise
    except Exception as e:  # noqa: BLE001 - the factory is user code
        raise UsageError(f"--dataset {cfg.dataset} raised {type(e).__name__}: {one_line(e)}") from None
    if not (isinstance(out, tuple) and len(out) == 2 and isinstance(out[0], Dataset)
            and (out[1] is None or isinstance(out[1], Dataset))):
        raise UsageError(f"--dataset {cfg.dataset} must return (train_dataset, eval_dataset or None), "
                         f"got {type(out).__name__}")
    if len(out[0]) == 0:
        raise UsageError(f"--dataset {cfg.dataset}: the training set is empty")
    return out


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


def _split_val(train: Any, fraction: float, seed: int) -> tuple[Any, Any]:
    """A deterministic hold-out: depends on the seed and the dataset size, never on world size."""
    if fraction <= 0:
        return train, None
    n = len(train)
    n_val = int(round(n * fraction))
    if n_val == 0 or n_val == n:
        raise UsageError(f"--val-fraction {fraction} leaves {n - n_val} training and {n_val} validation samples")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 7919))
    val_idx, train_idx = perm[:n_val].sort().values, perm[n_val:].sort().values
    if isinstance(train, ArrayDataset):
        return train.subset(train_idx), train.subset(val_idx)
    return Subset(train, train_idx.tolist()), Subset(train, val_idx.tolist())


def load_data(cfg: Config, accelerator: Any) -> Data:
    """Build the run's datasets. Only the main process of each node prepares files; the others wait."""
    name, data_dir = cfg.dataset, Path(cfg.data_dir)
    if name in IMAGE_DATASETS:
        locate(cfg)  # every rank: fail alike before the barrier
        with accelerator.local_main_process_first():
            if accelerator.is_local_main_process:
                _prepare_image_dataset(name, data_dir)
        train, test, spec = _load_image_dataset(name, data_dir)
    else:
        if name == "synthetic_regression":
            fn = lambda **kw: synthetic_regression(seed=cfg.seed, **{k: v for k, v in kw.items() if k != "data_dir"})  # noqa: E731
        elif name == "synthetic_classification":
            fn = lambda **kw: synthetic_classification(seed=cfg.seed, **{k: v for k, v in kw.items() if k != "data_dir"})  # noqa: E731
        else:
            fn = import_plugin(name, "--dataset")
        with accelerator.local_main_process_first():
            train, test = _dataset_from_factory(cfg, fn)
        train, test = _as_array_dataset(train), _as_array_dataset(test)
        task, n_out, tshape = _target_info(train)
        x0 = torch.as_tensor(train[0][0])
        spec = DataSpec(task, list(x0.shape), n_out, tshape)
        if task == "classification" and n_out < 2:
            raise UsageError(f"--dataset {name}: classification targets need at least 2 classes, got {n_out}")
    if cfg.augment != "none" and not (isinstance(train, ArrayDataset) and len(spec.input_shape) == 3):
        raise UsageError(f"--augment {cfg.augment} applies to in-memory image datasets (built-in, or a plug-in "
                         f"returning a TensorDataset of [N, C, H, W] images); --dataset {name} is not one")
    train, val = _split_val(train, cfg.val_fraction, cfg.seed)
    if test is not None and len(test) == 0:
        test = None
    return Data(cfg, train, val, test, spec, accelerator.process_index, accelerator.num_processes,
                accelerator.device)
