"""Image folders (`--dataset imagefolder:PATH`), decoded once into a uint8 tensor cache.

The layout is torchvision's ImageFolder: `PATH/<class>/<image>`, class names are the folder names (sorted,
torchvision's `find_classes`), files are those torchvision's `make_dataset` lists (its IMG_EXTENSIONS).
`PATH` is the training folder, or a folder holding `train/`; when the training folder is named `train`,
its siblings `val/` (or `valid/`, `validation/`) and `test/` are the validation and test sets.

Every image is decoded with Pillow, as torchvision's ImageFolder default loader does (torchvision.io's
decoders are deprecated since torchvision 0.29), converted to grey or RGB by Pillow (alpha dropped; an RGB
image for a grey model by ITU-R 601-2 luma), resized with antialiased bilinear interpolation
(`torchvision.transforms.v2.functional.resize`) to `--image-size` (default: the first training image's size),
and stored as uint8 [N, C, H, W] in `<data-dir>/disttrain-cache/imagefolder-<hash of the folder>.safetensors`.
C is 1 when every training image is grey, else 3 (grey images are repeated to RGB). The cache is keyed by the
sorted file list with sizes and mtimes plus the settings, so an added, removed or edited image rebuilds it;
otherwise the next start reads it back (the in-memory fast path). An unreadable image is skipped, counted
and named in a warning (also on every later start, from the cache); a folder left with no image is an error.
`disttrain.predict` uses `decode()`, the same function, for image files.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path

import torch

from disttrain.data.base import ArrayDataset, DataSpec, holdout_indices
from disttrain.errors import UsageError, one_line

PREFIX = "imagefolder:"
VAL_NAMES = ("val", "valid", "validation")
CACHE_VERSION = 1
MAX_FILE_BYTES = 64 << 20  # a bigger "image" is refused, not read
MAX_PIXELS = 1 << 26  # width x height by the header, checked before decoding (below PIL's 89 M bomb limit)
GREY_MODES = ("1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "F")  # Pillow modes without colour


class ImageError(Exception):
    """One image could not be used; the message names why (the caller adds the path)."""


# --------------------------------------------------------------------------- one image


def decode(path: str | Path, channels: int | None = None, size: tuple[int, int] | None = None) -> torch.Tensor:
    """An image file as uint8 [C, H, W]: C = `channels` (1 or 3; None keeps grey as 1 and colour as 3),
    resized (bilinear, antialiased) to `size` = (H, W) when given. Raises ImageError."""
    from disttrain.safe_io import UnsafeInput, read_bytes

    p = Path(path)
    try:  # a regular file only (never a FIFO or device), at most MAX_FILE_BYTES; the user's own data may
        data = read_bytes(p, MAX_FILE_BYTES, follow=True)  # be links to image files (docs/security.md)
    except FileNotFoundError:
        raise ImageError("no such file") from None
    except UnsafeInput as e:  # (its message starts with the path; ours are read after the path)
        raise ImageError(one_line(e).removeprefix(f"{p}: ")) from None
    except OSError as e:
        raise ImageError(f"unreadable ({one_line(e)})") from None
    return decode_bytes(data, str(p), channels, size)


def decode_bytes(data: bytes | None, name: str | None, channels: int | None = None,
                 size: tuple[int, int] | None = None) -> torch.Tensor:
    """decode() for the bytes of an image file (`name` only for messages)."""
    import numpy as np
    from PIL import Image, UnidentifiedImageError
    from torchvision.transforms.v2.functional import resize

    if not data:
        raise ImageError("empty" if data is not None else "no image data")
    if len(data) > MAX_FILE_BYTES:
        raise ImageError(f"larger than {MAX_FILE_BYTES >> 20} MiB")
    try:
        with Image.open(io.BytesIO(data)) as im:  # reads the header only: refuse decompression bombs first
            w, h = im.size
            if w * h > MAX_PIXELS:
                raise ImageError(f"{w}x{h} pixels, more than {MAX_PIXELS}")
            grey = im.mode in GREY_MODES
            mode = {1: "L", 3: "RGB"}.get(channels or 0, "L" if grey else "RGB")
            a = np.asarray(im.convert(mode), dtype=np.uint8)  # decodes; RGBA/LA lose alpha, P/CMYK become RGB
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError("not a readable image (not an image format Pillow knows, or corrupt)") from None
    except Exception as e:  # noqa: BLE001 - PIL raises many kinds for a bad file
        raise ImageError(f"not a readable image ({type(e).__name__}: {one_line(e)[:160]})") from None
    img = torch.from_numpy(a.copy())
    img = img.unsqueeze(0) if img.ndim == 2 else img.permute(2, 0, 1)
    if size is not None and tuple(img.shape[-2:]) != tuple(size):
        img = resize(img, list(size), antialias=True)
    return img.contiguous()


def parse_size(text: str | None) -> tuple[int, int] | None:
    """--image-size: "N" (N x N) or "HxW", in pixels; None when not given."""
    if text is None:
        return None
    parts = str(text).lower().split("x")
    try:
        hw = [int(v) for v in parts]
    except ValueError:
        hw = []
    if len(hw) not in (1, 2) or min(hw) < 1 or max(hw) > 4096:
        raise UsageError(f"--image-size {text!r}: expected N or HxW in pixels (1..4096), e.g. 28 or 32x48")
    return (hw[0], hw[-1])


# --------------------------------------------------------------------------- folders


def split_roots(path: str) -> dict[str, Path | None]:
    """{"train", "val", "test"} -> folder (or None) for `imagefolder:PATH`; UsageError if PATH is no folder."""
    root = Path(path)
    if not root.is_dir():
        raise UsageError(f"--dataset {PREFIX}{path}: {'not a directory' if root.exists() else 'no such directory'}; "
                         "expected PATH/<class>/<image> (torchvision's ImageFolder layout)")
    if (root / "train").is_dir():
        root = root / "train"
    out: dict[str, Path | None] = {"train": root, "val": None, "test": None}
    if root.name == "train":
        out["val"] = next((root.parent / n for n in VAL_NAMES if (root.parent / n).is_dir()), None)
        out["test"] = root.parent / "test" if (root.parent / "test").is_dir() else None
    return out


def _listing(root: Path, classes: list[str] | None) -> tuple[list[str], list[tuple[str, int]]]:
    """(class names, [(file, class index)]) with torchvision's find_classes/make_dataset. With `classes`
    given (a test set, or a trained model's), every class folder must be one of them."""
    from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

    try:
        found, _ = find_classes(str(root))
    except (FileNotFoundError, OSError) as e:
        raise UsageError(f"--dataset {PREFIX}{root}: no class folders ({one_line(e)}); expected "
                         f"{root}/<class>/<image>") from None
    if classes is None:
        classes = found
    else:
        extra = [c for c in found if c not in classes]
        if extra:
            raise UsageError(f"--dataset {PREFIX}{root}: class folder(s) {', '.join(extra[:5])} are not among the "
                             f"model's classes ({', '.join(classes[:10])}{', ...' if len(classes) > 10 else ''})")
    samples = make_dataset(str(root), {c: i for i, c in enumerate(classes)}, IMG_EXTENSIONS, allow_empty=True)
    if not samples:
        raise UsageError(f"--dataset {PREFIX}{root}: no images found (extensions: {', '.join(IMG_EXTENSIONS)})")
    return classes, samples


def _cache_file(data_dir: Path, root: Path) -> Path:
    tag = hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:16]
    return data_dir / "disttrain-cache" / f"imagefolder-{tag}.safetensors"


def _key(root: Path, samples: list[tuple[str, int]], classes: list[str], channels: int | None,
         size: tuple[int, int] | None) -> str:
    """What the cached tensors depend on: every file's path (relative to the folder), size and mtime, the
    classes and the settings."""
    h = hashlib.sha256(json.dumps([CACHE_VERSION, classes, channels, size]).encode())
    for f, c in samples:
        rel = os.path.relpath(f, root)
        try:
            st = os.stat(f)
            h.update(f"{rel}\0{c}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        except OSError:
            h.update(f"{rel}\0{c}\0gone\n".encode())
    return h.hexdigest()


def _read_cache(path: Path, key: str) -> tuple[ArrayDataset, list[list[str]]] | None:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("key") != key:
                return None
            ds = ArrayDataset(f.get_tensor("x"), f.get_tensor("y"))
            return ds, json.loads(meta.get("skipped", "[]"))
    except Exception:  # noqa: BLE001 - a missing, stale or damaged cache is simply rebuilt
        return None


def _write_cache(path: Path, key: str, ds: ArrayDataset, skipped: list[list[str]]) -> None:
    from safetensors.torch import save_file

    from disttrain.checkpoint import apply_umask

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    save_file({"x": ds.x.contiguous(), "y": ds.y}, str(tmp), metadata={"key": key, "skipped": json.dumps(skipped)})
    apply_umask(tmp)
    os.replace(tmp, path)


def load_folder(root: Path, data_dir: Path, classes: list[str] | None, channels: int | None,
                size: tuple[int, int] | None) -> tuple[ArrayDataset, list[str], list[list[str]]]:
    """One split as (uint8 ArrayDataset, class names, [[path, why] skipped]), from the cache when its key
    matches, else decoded and cached."""
    classes, samples = _listing(root, classes)
    key = _key(root, samples, classes, channels, size)
    cache = _cache_file(data_dir, root)
    hit = _read_cache(cache, key)
    if hit is not None:
        return hit[0], classes, hit[1]
    images, labels, skipped = [], [], []
    for f, c in samples:
        try:
            img = decode(f, channels, size)
        except ImageError as e:
            skipped.append([f, str(e)])
            continue
        if size is None:  # the first readable training image sets the size of all
            size = (int(img.shape[1]), int(img.shape[2]))
        images.append(img)
        labels.append(c)
    if not images:
        raise UsageError(f"--dataset {PREFIX}{root}: none of its {len(samples)} images is readable "
                         f"(first: {skipped[0][0]}: {skipped[0][1]})")
    if channels is None and any(im.shape[0] == 3 for im in images):
        images = [im.expand(3, -1, -1) for im in images]
    ds = ArrayDataset(torch.stack(images), torch.tensor(labels, dtype=torch.int64))
    _write_cache(cache, key, ds, skipped)
    return ds, classes, skipped


def channel_stats(x: torch.Tensor) -> tuple[list[float], list[float]]:
    """Per-channel mean and (population) std of uint8 images [N, C, H, W] scaled to [0, 1]: exact, from
    each channel's 256-bin histogram (one pass over the bytes, no float copy of the set)."""
    mean, std = [], []
    levels = torch.arange(256, dtype=torch.float64) / 255
    for c in range(x.shape[1]):
        counts = torch.bincount(x[:, c].reshape(-1), minlength=256).double()
        n = counts.sum()
        m = float((counts * levels).sum() / n)
        var = float((counts * (levels - m).square()).sum() / n)
        mean.append(round(m, 6))
        std.append(round(max(var, 0.0) ** 0.5 or 1.0, 6))
    return mean, std


def load_train(path: str, data_dir: Path, image_size: str | None, val_fraction: float, seed: int
               ) -> tuple[ArrayDataset, ArrayDataset | None, ArrayDataset | None, DataSpec, list[str]]:
    """(train, val, test, spec, warnings) for `imagefolder:PATH`. The normalisation statistics come from the
    training images only (after a --val-fraction hold-out)."""
    roots = split_roots(path)
    if roots["val"] is not None and val_fraction > 0:
        raise UsageError(f"--val-fraction {val_fraction} with a validation folder {roots['val']}: choose one")
    train, classes, skipped = load_folder(roots["train"], data_dir, None, None, parse_size(image_size))
    if len(classes) < 2:
        raise UsageError(f"--dataset {PREFIX}{path}: found {len(classes)} class folder ({', '.join(classes)}); "
                         "classification needs at least 2")
    channels, hw = int(train.x.shape[1]), (int(train.x.shape[2]), int(train.x.shape[3]))
    sets: dict[str, ArrayDataset | None] = {"val": None, "test": None}
    for split in ("val", "test"):
        if roots[split] is not None:
            sets[split], _, sk = load_folder(roots[split], data_dir, classes, channels, hw)
            skipped += sk
    if val_fraction > 0:
        keep, held = holdout_indices(len(train), val_fraction, seed)
        train, sets["val"] = train.subset(keep), train.subset(held)
    mean, std = channel_stats(train.x)
    spec = DataSpec("classification", [channels, *hw], len(classes), [], classes, mean, std,
                    preprocess={"kind": "image", "channels": channels, "size": list(hw)})
    return train, sets["val"], sets["test"], spec, warnings_for(skipped)


def load_eval(path: str, data_dir: Path, spec: DataSpec) -> tuple[ArrayDataset, list[str]]:
    """A whole labelled folder (`PATH/<class>/<image>`) for a trained model: its classes, channels, size."""
    root = Path(path)
    if not root.is_dir():
        raise UsageError(f"--dataset {PREFIX}{path}: {'not a directory' if root.exists() else 'no such directory'}")
    c, h, w = spec.input_shape
    ds, _, skipped = load_folder(root, data_dir, list(spec.classes or []), c, (h, w))
    return ds, warnings_for(skipped)


def warnings_for(skipped: list[list[str]]) -> list[str]:
    if not skipped:
        return []
    shown = "; ".join(f"{f}: {why}" for f, why in skipped[:3])
    more = f" (and {len(skipped) - 3} more)" if len(skipped) > 3 else ""
    return [f"disttrain: warning: skipped {len(skipped)} unreadable image(s): {shown}{more}"]


def export_folders(x: torch.Tensor, y: torch.Tensor, classes: list[str], out: Path) -> None:
    """Write uint8 images [N, C, H, W] as PNG files out/<class>/<index>.png (class names made path-safe)."""
    import re

    from PIL import Image

    names = [re.sub(r"[^A-Za-z0-9_.-]+", "_", c).strip("._") or f"class{i}" for i, c in enumerate(classes)]
    for n in names:
        (out / n).mkdir(parents=True, exist_ok=True)
    for i, (img, label) in enumerate(zip(x, y.tolist())):
        a = img.permute(1, 2, 0).numpy()
        Image.fromarray(a[:, :, 0] if a.shape[2] == 1 else a, "L" if a.shape[2] == 1 else "RGB").save(
            out / names[label] / f"{i:05d}.png")


def export_builtin(name: str, out: str | Path, data_dir: str | Path = "./data", limit: int | None = None) -> Path:
    """Write a built-in dataset (fashion_mnist, mnist, cifar10) as PNG folders out/{train,test}/<class>/,
    e.g. to try `--dataset imagefolder:` on real images: `python -c "from disttrain.data.images import
    export_builtin; export_builtin('fashion_mnist', 'fmnist_png')"`. `limit`: at most this many per split."""
    from disttrain.data.builtin import IMAGE_DATASETS, _load_image_dataset, _prepare_image_dataset

    if name not in IMAGE_DATASETS:
        raise UsageError(f"export_builtin: {name!r} is not one of {', '.join(IMAGE_DATASETS)}")
    _prepare_image_dataset(name, Path(data_dir))
    train, test, spec = _load_image_dataset(name, Path(data_dir))
    for split, ds in (("train", train), ("test", test)):
        export_folders(ds.x[:limit], ds.y[:limit], list(spec.classes or []), Path(out) / split)
    return Path(out)
