"""The user's own files, `--dataset PREFIX:PATH`: which family module reads them.

- `imagefolder:DIR`  data/images.py (torchvision's ImageFolder layout, uint8 cache)
- `csv:FILE`, `parquet:FILE`  data/tables.py (pandas/pyarrow; standardised numbers, one-hot text)
- `hf:PATH`  data/hf.py (Hugging Face `datasets`: save_to_disk folders, local data files)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from disttrain.config import Config
from disttrain.data import hf, images, tables
from disttrain.data.base import DataSpec
from disttrain.errors import UsageError


def load_files(cfg: Config, spec: DataSpec | None = None) -> tuple[Any, Any, Any, DataSpec, list[str]]:
    """(train, val, test, spec, warnings) of `--dataset PREFIX:PATH`; with a trained model's `spec`, the
    whole of PATH is the test set, transformed as that model's training data was (evaluate --dataset)."""
    name, prefix, data_dir = cfg.dataset, cfg.dataset.partition(":")[0], Path(cfg.data_dir)
    path = name.partition(":")[2]
    feats = [c.strip() for c in cfg.features.split(",")] if cfg.features else None
    if spec is not None:
        have = (spec.preprocess or {}).get("kind")
        kind = {"imagefolder": "image", "csv": "table", "parquet": "table"}.get(prefix, have)
        if have is None or kind != have:
            raise UsageError(f"--dataset {name}: the model was trained on "
                             f"{'a ' + have + ' dataset' if have else cfg.dataset}, not on files of this kind")
        if prefix == "imagefolder":
            test, warnings = images.load_eval(path, data_dir, spec)
        elif prefix == "hf":
            test, warnings = hf.load_eval(name, data_dir, spec)
        else:
            test, warnings = tables.load_eval(name, spec.preprocess)
        return None, None, test, spec, warnings
    if prefix == "imagefolder":
        return images.load_train(path, data_dir, cfg.image_size, cfg.val_fraction, cfg.seed)
    if prefix == "hf":
        return hf.load_train(name, data_dir, cfg.target, feats, cfg.task, cfg.image_size, cfg.val_fraction, cfg.seed)
    return tables.load_train(name, cfg.target, feats, cfg.task, cfg.val_fraction, cfg.seed)
