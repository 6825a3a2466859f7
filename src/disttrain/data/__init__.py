"""Datasets: one module per family, and `load_data`, which picks the family and builds the run's `Data`.

- base.py: DataSpec (saved with the model), ArrayDataset (the in-memory fast path), normalisation, plug-ins
- builtin.py: torchvision's Fashion-MNIST, MNIST, CIFAR-10 (uint8 tensor cache)
- synthetic.py: generated regression/classification sets
- text.py: text:PATH, character-level language-model windows (uint8/uint16 token cache)
- images.py, tables.py, hf.py: the user's own files (imagefolder:DIR, csv:FILE / parquet:FILE, hf:PATH)
- order.py: the per-rank order (one DistributedSampler) and the batches that follow it
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset, Subset, TensorDataset

from disttrain.config import FILE_DATASETS, TEXT_PREFIX, Config
from disttrain.data.base import ArrayDataset, DataSpec, as_pairs, holdout_indices, import_plugin, normalize_uint8
from disttrain.data.builtin import IMAGE_DATASETS, _load_image_dataset, _prepare_image_dataset, locate
from disttrain.data.files import load_files
from disttrain.data.order import Data, Window, augment_batch
from disttrain.data.synthetic import synthetic_classification, synthetic_regression
from disttrain.data.text import load_text
from disttrain.errors import UsageError, one_line

__all__ = ["ArrayDataset", "Data", "DataSpec", "IMAGE_DATASETS", "Window", "augment_batch", "import_plugin",
           "load_data", "normalize_uint8", "synthetic_classification", "synthetic_regression"]


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


def _declared_classes(ds: Any, name: str, task: str, n_out: int) -> list[str] | None:
    """Class names a plug-in dataset declares as a `classes` attribute (a list of strings, index = label),
    as torchvision datasets do; looked up through Subset wrappers."""
    while isinstance(ds, Subset) and not hasattr(ds, "classes"):
        ds = ds.dataset
    classes = getattr(ds, "classes", None)
    if classes is None:
        return None
    if task != "classification" or not isinstance(classes, (list, tuple)) or \
            not all(isinstance(c, str) for c in classes) or len(classes) < n_out:
        raise UsageError(f"--dataset {name}: its `classes` must be a list of at least {n_out} class names "
                         f"(strings, index = label) for integer targets; got {str(classes)[:100]}")
    return list(classes)


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



def _split_val(train: Any, fraction: float, seed: int) -> tuple[Any, Any]:
    """A deterministic hold-out: depends on the seed and the dataset size, never on world size."""
    if fraction <= 0:
        return train, None
    train_idx, val_idx = holdout_indices(len(train), fraction, seed)
    if isinstance(train, ArrayDataset):
        return train.subset(train_idx), train.subset(val_idx)
    return Subset(train, train_idx.tolist()), Subset(train, val_idx.tolist())


def load_data(cfg: Config, accelerator: Any, spec: DataSpec | None = None) -> Data:
    """Build the run's datasets. Only the main process of each node prepares files; the others wait.
    `spec`: a trained model's (evaluate --dataset on files of the user's)."""
    name, data_dir = cfg.dataset, Path(cfg.data_dir)
    if name.startswith(TEXT_PREFIX):  # split by position, not by _split_val's random hold-out
        train, val, spec = load_text(cfg, accelerator)
        return Data(cfg, train, val, None, spec, accelerator.process_index, accelerator.num_processes,
                    accelerator.device)
    val = None
    if name.startswith(FILE_DATASETS):
        with accelerator.local_main_process_first():
            train, val, test, spec, warnings = load_files(cfg, spec)
        if accelerator.is_main_process:
            for w in warnings:
                print(w, file=sys.stderr, flush=True)
        if train is None:  # evaluation only
            return Data(cfg, test, None, test, spec, accelerator.process_index, accelerator.num_processes,
                        accelerator.device)
    elif name in IMAGE_DATASETS:
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
        raw_train = train  # (its `classes`, before any wrapping)
        train, test = as_pairs(train, f"--dataset {name}"), as_pairs(test, f"--dataset {name} (eval set)")
        train, test = _as_array_dataset(train), _as_array_dataset(test)
        task, n_out, tshape = _target_info(train)
        classes = _declared_classes(raw_train, name, task, n_out)
        n_out = max(n_out, len(classes)) if classes else n_out
        spec = DataSpec(task, list(torch.as_tensor(train[0][0]).shape), n_out, tshape, classes)
        if task == "classification" and n_out < 2:
            raise UsageError(f"--dataset {name}: classification targets need at least 2 classes, got {n_out}")
    if cfg.augment != "none" and not (isinstance(train, ArrayDataset) and len(spec.input_shape) == 3):
        raise UsageError(f"--augment {cfg.augment} applies to in-memory image datasets (built-in, or a plug-in "
                         f"returning a TensorDataset of [N, C, H, W] images); --dataset {name} is not one")
    if not name.startswith(FILE_DATASETS):  # (file datasets hold out before fitting their preprocessing)
        train, val = _split_val(train, cfg.val_fraction, cfg.seed)
    if test is not None and len(test) == 0:
        test = None
    return Data(cfg, train, val, test, spec, accelerator.process_index, accelerator.num_processes,
                accelerator.device)
