"""Hugging Face datasets on disk (`--dataset hf:PATH`), read offline with the `datasets` library.

PATH is a folder written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk` (read with
`datasets.load_from_disk`), or local data files that `datasets.load_dataset(PATH)` reads without the hub
(a folder of CSV/JSON/Parquet files, or a data file itself). Nothing is downloaded (HF_DATASETS_OFFLINE=1).
Splits: `train` (or the only split) trains; `validation`/`val`/`valid` validates, `test` tests.

`--target` names the label column (default `label`), `--features` the input columns (default all others):
- one `Image` column: images, handled like an image folder (images.decode: the same decoding, channels and
  `--image-size` resizing; mean/std from the training images); a `ClassLabel` target gives the class names;
- otherwise a table, handled by tables.py (standardised numbers, one-hot text, the task from the target),
  a `ClassLabel` target keeps its names and order.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from disttrain.data import images, tables
from disttrain.data.base import ArrayDataset, DataSpec, holdout_indices
from disttrain.errors import UsageError, one_line

PREFIX = "hf:"
SPLITS = {"train": ("train",), "val": ("validation", "val", "valid"), "test": ("test",)}


def open_dataset(path: str, data_dir: Path) -> dict[str, Any]:
    """{"train", "val"?, "test"?} -> datasets.Dataset, from a save_to_disk folder or local data files
    (whose Arrow cache goes to <data_dir>/disttrain-cache/hf, not the user's Hugging Face cache)."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # never the hub (read when datasets is imported)
    try:
        import datasets
    except ImportError:
        raise UsageError("--dataset hf: needs the datasets package: pip install 'disttrain[data]'") from None
    datasets.disable_progress_bars()
    p = Path(path)
    if not p.exists():
        raise UsageError(f"--dataset {PREFIX}{path}: no such file or directory")
    saved = p.is_dir() and any((p / f).is_file() for f in ("dataset_dict.json", "state.json", "dataset_info.json"))
    try:
        ds = datasets.load_from_disk(str(p)) if saved else \
            datasets.load_dataset(str(p), cache_dir=str(data_dir / "disttrain-cache" / "hf"))
    except Exception as e:  # noqa: BLE001 - the datasets library raises many kinds for a bad folder
        raise UsageError(f"--dataset {PREFIX}{path}: not a dataset saved with save_to_disk nor local data files "
                         f"that datasets.load_dataset reads ({type(e).__name__}: {one_line(e)[:200]})") from None
    if isinstance(ds, datasets.Dataset):
        return {"train": ds}
    out = {split: next((ds[n] for n in names if n in ds), None) for split, names in SPLITS.items()}
    if out["train"] is None:
        if len(ds) != 1:
            raise UsageError(f"--dataset {PREFIX}{path}: no 'train' split (splits: {', '.join(ds)})")
        out["train"] = next(iter(ds.values()))
    return out


def _columns(ds: Any, target: str | None, feature_list: list[str] | None, where: str) -> tuple[str, list[str]]:
    cols = list(ds.column_names)
    target = target or ("label" if "label" in cols else None)
    if target is None or target not in cols:
        raise UsageError(f"{where}: no label column {target!r}; pass --target (columns: {', '.join(cols)})")
    feats = feature_list or [c for c in cols if c != target]
    missing = [c for c in feats if c not in cols]
    if missing:
        raise UsageError(f"{where}: no column(s) {', '.join(missing)} (columns: {', '.join(cols)})")
    return target, feats


def _class_names(ds: Any, target: str) -> list[str] | None:
    import datasets

    feat = ds.features[target]
    return list(feat.names) if isinstance(feat, datasets.ClassLabel) else None


def _image_column(ds: Any, feats: list[str]) -> str | None:
    import datasets

    kinds = [isinstance(ds.features[c], datasets.Image) for c in feats]
    if any(kinds) and len(feats) > 1:
        raise UsageError(f"image column {feats[kinds.index(True)]!r} with other inputs ({', '.join(feats)}): "
                         "pass --features with the image column alone")
    return feats[0] if any(kinds) else None


def _images(ds: Any, column: str, target: str, channels: int | None, size: tuple[int, int] | None,
            where: str) -> tuple[torch.Tensor, torch.Tensor, list[list[str]]]:
    """Decode an Image column with images.decode (raw bytes, no PIL round trip): (x uint8, y, skipped)."""
    import datasets

    raw = ds.cast_column(column, datasets.Image(decode=False))
    xs, ys, skipped = [], [], []
    for i, row in enumerate(raw):
        item = row[column] or {}
        try:
            img = images.decode_bytes(item.get("bytes"), item.get("path"), channels, size)
        except images.ImageError as e:
            skipped.append([f"{where} row {i}", str(e)])
            continue
        size = size or (int(img.shape[1]), int(img.shape[2]))
        xs.append(img)
        ys.append(row[target])
    if not xs:
        raise UsageError(f"{where}: no readable image in column {column!r}")
    if channels is None and any(x.shape[0] == 3 for x in xs):
        xs = [x.expand(3, -1, -1) for x in xs]
    return torch.stack(xs).contiguous(), torch.as_tensor(ys, dtype=torch.int64), skipped


def load_train(name: str, data_dir: Path, target: str | None, feature_list: list[str] | None, task: str,
               image_size: str | None, val_fraction: float, seed: int
               ) -> tuple[ArrayDataset, ArrayDataset | None, ArrayDataset | None, DataSpec, list[str]]:
    path = name[len(PREFIX):]
    splits = open_dataset(path, data_dir)
    where = {s: f"--dataset {name} ({s} split)" for s in splits}
    tgt, feats = _columns(splits["train"], target, feature_list, where["train"])
    classes = _class_names(splits["train"], tgt)
    column = _image_column(splits["train"], feats)
    if column is None:
        frames = {s: d.select_columns([*feats, tgt]).to_pandas() if d is not None else None for s, d in splits.items()}
        if classes is not None:  # ClassLabel: the class names, in the dataset's order
            for df in frames.values():
                if df is not None:
                    df[tgt] = [classes[i] if i is not None and i >= 0 else None for i in df[tgt]]
        return tables.from_frames(frames, where, tgt, feats, task, val_fraction, seed, classes)
    if splits["val"] is not None and val_fraction > 0:
        raise UsageError(f"--val-fraction {val_fraction} with a validation split in {path}: choose one")
    x, y, skipped = _images(splits["train"], column, tgt, None, images.parse_size(image_size), where["train"])
    if classes is None:
        classes = [str(i) for i in range(int(y.max()) + 1)]
    train = ArrayDataset(x, y)
    c, hw = int(x.shape[1]), (int(x.shape[2]), int(x.shape[3]))
    out: dict[str, ArrayDataset | None] = {"val": None, "test": None}
    for s in ("val", "test"):
        if splits[s] is not None:
            xs, ys, sk = _images(splits[s], column, tgt, c, hw, where[s])
            out[s], skipped = ArrayDataset(xs, ys), skipped + sk
    if val_fraction > 0:
        keep, held = holdout_indices(len(train), val_fraction, seed)
        train, out["val"] = train.subset(keep), train.subset(held)
    mean, std = images.channel_stats(train.x)
    spec = DataSpec("classification", [c, *hw], len(classes), [], classes, mean, std,
                    preprocess={"kind": "image", "channels": c, "size": list(hw), "column": column, "target": tgt})
    return train, out["val"], out["test"], spec, images.warnings_for(skipped)


def load_eval(name: str, data_dir: Path, spec: DataSpec) -> tuple[ArrayDataset, list[str]]:
    """The test split (else the only/train split) of another dataset, with a trained model's preprocessing."""
    splits = open_dataset(name[len(PREFIX):], data_dir)
    ds = splits["test"] if splits["test"] is not None else splits["train"]
    where = f"--dataset {name}"
    pre = spec.preprocess or {}
    if pre.get("kind") == "table":
        tgt = pre["target"]
        df = ds.to_pandas()
        names = _class_names(ds, tgt) if tgt in ds.column_names else None
        if names is not None:
            df[tgt] = [names[i] if i is not None and i >= 0 else None for i in df[tgt]]
        warnings: list[str] = []
        df = tables._drop_missing_target(df, tgt, where, warnings)
        return ArrayDataset(tables.features(df, pre, where), tables.targets(df, pre, where)), warnings
    column, tgt = pre.get("column", "image"), pre.get("target", "label")
    _columns(ds, tgt, [column], where)
    names = _class_names(ds, tgt)
    if names is not None and spec.classes and names != spec.classes:
        raise UsageError(f"{where}: its classes ({', '.join(names[:10])}) differ from the model's "
                         f"({', '.join(spec.classes[:10])})")
    c, h, w = spec.input_shape
    x, y, skipped = _images(ds, column, tgt, c, (h, w), where)
    return ArrayDataset(x, y), images.warnings_for(skipped)
