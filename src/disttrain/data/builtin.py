"""The torchvision image datasets (Fashion-MNIST, MNIST, CIFAR-10), decoded once into a uint8 tensor cache."""

from __future__ import annotations

import gzip
import os
import shutil
from pathlib import Path

import torch

from disttrain.checkpoint import apply_umask
from disttrain.config import Config
from disttrain.data.base import ArrayDataset, DataSpec
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
        apply_umask(tmp)
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


