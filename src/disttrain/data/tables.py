"""Tables (`--dataset csv:PATH`, `parquet:PATH`): read with pandas (Parquet through pyarrow), one row a sample.

`--target COLUMN` is what to predict; the features are `--features A,B,...` or every other column. The
preprocessing is fitted on the training rows only (after a `--val-fraction` hold-out) and saved in
model.json (DataSpec.preprocess), so `disttrain.evaluate` and `disttrain.predict` apply exactly the same
transform:

- numeric columns (numbers, booleans) are standardised, (x - mean) / std with the training mean and the
  population std (scikit-learn's StandardScaler); a constant column gets std 1; a missing value becomes the
  mean (0 after standardising);
- string (and pandas categorical) columns are one-hot encoded over the categories seen in training, sorted;
  a value not seen in training, or a missing one, is all zeros (scikit-learn's OneHotEncoder with
  handle_unknown="ignore"); more than MAX_CATEGORIES categories is refused (an identifier or free text:
  leave it out with --features);
- the task follows the target: strings, booleans and integers with at most MAX_INT_CLASSES distinct values
  are classification (class names: the sorted distinct values as text), anything else regression (targets
  used as they are, so losses are in the target's units); `--task` overrides. Rows whose target is missing
  are dropped, with a warning.

Validation and test tables: when the file name contains `train`, the same name with `val` (or `valid`,
`validation`) and `test` in its place, beside it, if they exist (`wine_train.csv` -> `wine_test.csv`).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from disttrain.data.base import ArrayDataset, DataSpec, holdout_indices
from disttrain.errors import UsageError, one_line

PREFIXES = ("csv:", "parquet:")
MAX_CATEGORIES = 1000
MAX_INT_CLASSES = 50
MAX_FILE_BYTES = 4 << 30
TASKS = ("auto", "classification", "regression")


def read_table(path: str | Path, fmt: str | None = None) -> Any:
    """A CSV or Parquet file as a pandas DataFrame (format from `fmt` or the suffix). UsageError if unreadable."""
    try:
        import pandas as pd
    except ImportError:
        raise UsageError("tables need pandas and pyarrow: pip install 'disttrain[data]'") from None
    p = Path(path)
    fmt = fmt or ("parquet" if p.suffix.lower() in (".parquet", ".pq") else "csv")
    if not p.is_file():
        raise UsageError(f"{fmt} table {path}: {'not a file' if p.exists() else 'no such file'}")
    if p.stat().st_size > MAX_FILE_BYTES:
        raise UsageError(f"{fmt} table {path}: larger than {MAX_FILE_BYTES >> 30} GiB")
    try:
        df = pd.read_parquet(p) if fmt == "parquet" else pd.read_csv(p)
    except Exception as e:  # noqa: BLE001 - pandas/pyarrow raise many kinds for a malformed file
        raise UsageError(f"{fmt} table {path}: unreadable ({type(e).__name__}: {one_line(e)[:200]})") from None
    if len(df) == 0:
        raise UsageError(f"{fmt} table {path}: no rows")
    return df


def siblings(path: str) -> dict[str, Path | None]:
    """{"val", "test"} tables beside a training table whose name contains `train`."""
    p = Path(path)
    out: dict[str, Path | None] = {"val": None, "test": None}
    if "train" in p.name:
        for split, names in (("val", ("val", "valid", "validation")), ("test", ("test",))):
            out[split] = next((q for n in names if (q := p.with_name(p.name.replace("train", n, 1))).is_file()),
                              None)
    return out


def _column(df: Any, name: str, where: str) -> Any:
    if name not in df.columns:
        import difflib

        near = difflib.get_close_matches(name, [str(c) for c in df.columns], n=1)
        hint = f" (did you mean {near[0]}?)" if near else ""
        cols = ", ".join(map(str, list(df.columns)[:20]))
        raise UsageError(f"{where}: no column {name!r}{hint}; columns: {cols}")
    return df[name]


def _is_categorical(col: Any) -> bool:
    import pandas as pd

    return (pd.api.types.is_object_dtype(col) or pd.api.types.is_string_dtype(col)
            or isinstance(col.dtype, pd.CategoricalDtype))


def fit(df: Any, target: str, features: list[str] | None, task: str, where: str,
        classes: list[str] | None = None) -> dict[str, Any]:
    """The preprocessing (a JSON-able dict) fitted on training rows `df`. `classes` fixes the class order
    (e.g. a Hugging Face ClassLabel); otherwise the sorted distinct target values."""
    import pandas as pd

    y = _column(df, target, where)
    names = features if features else [str(c) for c in df.columns if str(c) != target]
    if target in names:
        raise UsageError(f"--features: includes the target column {target!r}")
    if not names:
        raise UsageError(f"{where}: no feature columns besides the target {target!r}")
    columns = []
    for name in names:
        col = _column(df, name, where)
        if pd.api.types.is_bool_dtype(col) or pd.api.types.is_numeric_dtype(col):
            v = col.astype("float64")
            mean = float(v.mean()) if v.notna().any() else 0.0
            std = float(v.std(ddof=0)) if v.notna().sum() > 1 else 0.0
            columns.append({"name": name, "type": "numeric", "mean": mean,
                            "std": std if std > 0 and math.isfinite(std) else 1.0})
        elif _is_categorical(col):
            cats = sorted({str(v) for v in col.dropna()})
            if len(cats) > MAX_CATEGORIES:
                raise UsageError(f"{where}: column {name!r} has {len(cats)} distinct text values (more than "
                                 f"{MAX_CATEGORIES}: an identifier or free text?); leave it out with --features")
            columns.append({"name": name, "type": "categorical", "categories": cats})
        else:
            raise UsageError(f"{where}: column {name!r} has type {col.dtype}, neither numbers nor text; "
                             "leave it out with --features")
    if task == "auto":
        discrete = _is_categorical(y) or pd.api.types.is_bool_dtype(y) or \
            (pd.api.types.is_integer_dtype(y) and y.nunique() <= MAX_INT_CLASSES)
        task = "classification" if discrete or classes is not None else "regression"
    pre: dict[str, Any] = {"kind": "table", "target": target, "task": task, "columns": columns}
    if task == "classification":
        pre["classes"] = classes if classes is not None else sorted({_label(v) for v in y.dropna()})
        if len(pre["classes"]) < 2:
            raise UsageError(f"{where}: target {target!r} has {len(pre['classes'])} class(es); "
                             "classification needs at least 2 (or pass --task regression)")
    elif not (pd.api.types.is_numeric_dtype(y) or pd.api.types.is_bool_dtype(y)):
        raise UsageError(f"{where}: --task regression needs a numeric target; {target!r} has type {y.dtype}")
    return pre


def _label(v: Any) -> str:
    """A class value as its name: integral floats as integers (a CSV column 0/1 with a gap reads as 0.0/1.0)."""
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return str(v)


def width(pre: dict[str, Any]) -> int:
    """Model input features after encoding."""
    return sum(1 if c["type"] == "numeric" else len(c["categories"]) for c in pre["columns"])


def features(df: Any, pre: dict[str, Any], where: str) -> torch.Tensor:
    """float32 [rows, width(pre)]: the saved preprocessing applied to `df`'s feature columns."""
    import numpy as np
    import pandas as pd

    parts = []
    for c in pre["columns"]:
        col = _column(df, c["name"], where)
        if c["type"] == "numeric":
            v = pd.to_numeric(col, errors="coerce") if not pd.api.types.is_bool_dtype(col) else col.astype("float64")
            bad = v.isna() & col.notna()
            if bad.any():
                raise UsageError(f"{where}: column {c['name']!r} row {int(np.flatnonzero(bad.to_numpy())[0])} "
                                 f"holds {col[bad].iloc[0]!r}, not a number")
            a = ((v.astype("float64").to_numpy() - c["mean"]) / c["std"])
            parts.append(np.nan_to_num(a, nan=0.0)[:, None])
        else:
            index = {k: i for i, k in enumerate(c["categories"])}
            codes = np.array([index.get(str(v), -1) if pd.notna(v) else -1 for v in col], dtype=np.int64)
            onehot = np.zeros((len(col), len(index)), dtype=np.float64)
            hit = codes >= 0
            onehot[np.flatnonzero(hit), codes[hit]] = 1.0
            parts.append(onehot)
    return torch.from_numpy(np.concatenate(parts, axis=1).astype(np.float32))


def targets(df: Any, pre: dict[str, Any], where: str) -> torch.Tensor:
    """int64 class indices [rows] or float32 values [rows, 1]; UsageError for a class not seen in training."""
    y = _column(df, pre["target"], where)
    if pre["task"] == "classification":
        index = {k: i for i, k in enumerate(pre["classes"])}
        labels = [_label(v) for v in y]
        unseen = sorted({v for v in labels if v not in index})
        if unseen:
            raise UsageError(f"{where}: target {pre['target']!r} holds {', '.join(map(repr, unseen[:5]))}, not "
                             f"among the training classes ({', '.join(pre['classes'][:10])})")
        return torch.tensor([index[v] for v in labels], dtype=torch.int64)
    import pandas as pd

    v = pd.to_numeric(y, errors="coerce")
    if v.isna().any():
        raise UsageError(f"{where}: target {pre['target']!r} has non-numeric or missing values")
    return torch.tensor(v.to_numpy(dtype="float64"), dtype=torch.float32).unsqueeze(1)


def _drop_missing_target(df: Any, target: str, where: str, warnings: list[str]) -> Any:
    y = _column(df, target, where)
    if y.isna().any():
        warnings.append(f"disttrain: warning: {where}: dropped {int(y.isna().sum())} row(s) with no {target!r}")
        df = df[y.notna()].reset_index(drop=True)
    if len(df) == 0:
        raise UsageError(f"{where}: no row has a value in the target column {target!r}")
    return df


def spec_for(pre: dict[str, Any]) -> DataSpec:
    cls = pre["task"] == "classification"
    return DataSpec(pre["task"], [width(pre)], len(pre["classes"]) if cls else 1, [] if cls else [1],
                    pre.get("classes"), preprocess=pre)


def from_frames(frames: dict[str, Any], where: dict[str, str], target: str | None, feature_list: list[str] | None,
                task: str, val_fraction: float, seed: int, classes: list[str] | None = None
                ) -> tuple[ArrayDataset, ArrayDataset | None, ArrayDataset | None, DataSpec, list[str]]:
    """(train, val, test, spec, warnings) from DataFrames {"train", "val"?, "test"?}; shared with hf.py."""
    if not target:
        raise UsageError(f"{where['train']}: tables need --target COLUMN (the column to predict); columns: "
                         f"{', '.join(map(str, list(frames['train'].columns)[:20]))}")
    if frames.get("val") is not None and val_fraction > 0:
        raise UsageError(f"--val-fraction {val_fraction} with a validation table {where['val']}: choose one")
    warnings: list[str] = []
    train = _drop_missing_target(frames["train"], target, where["train"], warnings)
    if val_fraction > 0:
        keep, held = holdout_indices(len(train), val_fraction, seed)
        frames = {**frames, "val": train.iloc[held.numpy()].reset_index(drop=True)}
        where = {**where, "val": f"{where['train']} (--val-fraction hold-out)"}
        train = train.iloc[keep.numpy()].reset_index(drop=True)
    pre = fit(train, target, feature_list, task, where["train"], classes)
    out: dict[str, ArrayDataset | None] = {"train": ArrayDataset(features(train, pre, where["train"]),
                                                                 targets(train, pre, where["train"]))}
    for split in ("val", "test"):
        df = frames.get(split)
        if df is not None:
            df = _drop_missing_target(df, target, where[split], warnings)
            out[split] = ArrayDataset(features(df, pre, where[split]), targets(df, pre, where[split]))
        else:
            out[split] = None
    return out["train"], out["val"], out["test"], spec_for(pre), warnings


def load_train(name: str, target: str | None, feature_list: list[str] | None, task: str, val_fraction: float,
               seed: int) -> tuple[ArrayDataset, ArrayDataset | None, ArrayDataset | None, DataSpec, list[str]]:
    """`csv:PATH` / `parquet:PATH` and its val/test siblings."""
    fmt, _, path = name.partition(":")
    frames: dict[str, Any] = {"train": read_table(path, fmt)}
    where = {"train": f"--dataset {name}"}
    for split, p in siblings(path).items():
        if p is not None:
            frames[split], where[split] = read_table(p, fmt), f"{fmt} table {p}"
    return from_frames(frames, where, target, feature_list, task, val_fraction, seed)


def load_eval(name: str, pre: dict[str, Any]) -> tuple[ArrayDataset, list[str]]:
    """A whole labelled table for a trained model: its saved preprocessing."""
    fmt, _, path = name.partition(":")
    where = f"--dataset {name}"
    warnings: list[str] = []
    df = _drop_missing_target(read_table(path, fmt), pre["target"], where, warnings)
    return ArrayDataset(features(df, pre, where), targets(df, pre, where)), warnings
