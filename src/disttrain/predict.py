"""`python -m disttrain.predict --checkpoint PATH INPUT...`: predictions of a trained model for new inputs.

Inputs are image files and folders (searched recursively for the extensions torchvision's ImageFolder
reads) for image models, and CSV/Parquet files (one prediction per row) for table models. Every input gets
exactly the training transform, read from model.json:
- images: `data.images.decode` (Pillow decoding, alpha dropped, converted to the model's channels,
  antialiased bilinear resize to its input size; the same function that fills the imagefolder cache), then
  `data.normalize_uint8` with the run's mean/std, the function training and evaluation use;
- tables: `data.tables.features`, the saved standardisation and one-hot categories (unseen values: zeros).
No other transform is applied: Fashion-MNIST images are light objects on a black background, and a photo
must look like that too to be classified sensibly. A classifier answers for any input, noise included: the
output shows the probability of its answer. An input that cannot be read is reported (one line each on
stderr) and the others are still predicted; the exit status is then 2.

The model is rebuilt like `disttrain.evaluate` does: weights from `checkpoint.load_weights` (a run directory,
its model.safetensors or a checkpoints/step_* directory) and the model.json beside them; a plug-in model is
imported only with `--trust-plugins` or an explicit `--model`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

from disttrain.errors import EXIT_USAGE, UsageError, cut
from disttrain.safe_io import check_entry, write_json


MODES = {1: "L", 3: "RGB"}
TABLE_SUFFIXES = {".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}


def _parser() -> argparse.ArgumentParser:
    from disttrain.config import _Parser

    p = _Parser(prog="python -m disttrain.predict", allow_abbrev=False,
                description="Predict with a trained disttrain model: image files and folders (image models), "
                            "CSV/Parquet files (table models).")
    p.add_argument("--checkpoint", required=True,
                   help="run directory, its model.safetensors, or a checkpoints/step_* directory")
    p.add_argument("files", nargs="+", metavar="INPUT", help="image files or folders; CSV/Parquet files")
    p.add_argument("--top-k", type=int, default=1, help="print the K most probable classes")
    p.add_argument("--model", help="rebuild with this model (module:function or built-in) instead of the saved one")
    p.add_argument("--trust-plugins", action="store_true", help="import a plug-in model named in model.json")
    p.add_argument("--batch-size", type=int, default=256, help="inputs per forward pass")
    p.add_argument("--json", help="also write the predictions to this JSON file")
    p.add_argument("--output", help="also write the predictions to this .csv or .json file (one row per input; "
                                    "classification: class, probability and every class's probability)")
    return p


def load_model(checkpoint: str, model: str | None = None, trust_plugins: bool = False) -> tuple[Any, Any, dict]:
    """(model in eval mode on CPU/GPU, DataSpec, model.json) of a model predict can feed (images, table rows)."""
    net, spec, meta = load_saved_model(checkpoint, model, trust_plugins)
    if spec.vocab:
        raise UsageError(f"--checkpoint {checkpoint}: a language model; use python -m disttrain.generate")
    if _kind(spec) == "image":
        if spec.task != "classification":
            raise UsageError(f"--checkpoint {checkpoint}: a {spec.task} model of images; predict classifies images")
    elif _kind(spec) is None:
        raise UsageError(f"--checkpoint {checkpoint}: the model takes inputs of shape {spec.input_shape}, neither "
                         "1- or 3-channel images [C, H, W] nor a table's rows")
    return net, spec, meta


def load_saved_model(checkpoint: str, model: str | None = None, trust_plugins: bool = False) -> tuple[Any, Any, dict]:
    """(model in eval mode on CPU/GPU, DataSpec, model.json) from a run dir, model file or checkpoint;
    any kind of model (predict and generate share it)."""
    from disttrain import checkpoint as ckpt
    from disttrain import schema
    from disttrain.config import is_plugin
    from disttrain.data import DataSpec
    from disttrain.models import build_model

    sd, meta, _ = ckpt.load_weights(checkpoint)
    if not meta or "spec" not in meta:
        raise UsageError(f"--checkpoint {checkpoint}: no model.json beside the weights; cannot rebuild the model")
    name = model or meta["model"]
    if is_plugin(name) and not trust_plugins and not model:
        raise UsageError(f"the saved model is the plug-in {name}: importing it runs its code; pass --trust-plugins "
                         "or --model to allow it")
    spec = DataSpec(**meta["spec"])
    net = build_model(name, meta.get("model_kwargs") or {}, spec)
    schema.check_weights_fit(net, sd, f"--checkpoint {checkpoint}")
    net.load_state_dict(sd)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    net.to(device).eval()
    return net, spec, meta


def _kind(spec: Any) -> str | None:
    """"image", "table" or None (a model predict cannot feed)."""
    kind = (spec.preprocess or {}).get("kind")
    if kind in ("image", "table"):
        return kind
    if len(spec.input_shape) == 3 and spec.input_shape[0] in MODES:
        return "image"
    return None


def read_image(path: str | Path, input_shape: list[int]) -> torch.Tensor:
    """An image file as a uint8 tensor [C, H, W] of the model's channels and size (data.images.decode)."""
    from disttrain.data.images import ImageError, decode

    c, h, w = input_shape
    try:
        return decode(path, c, (h, w))
    except ImageError as e:  # (safe_io's reasons already start with the path)
        raise UsageError(str(e) if str(e).startswith(str(path)) else f"{path}: {e}") from None


def preprocess(images: torch.Tensor, spec: Any, device: torch.device) -> torch.Tensor:
    """uint8 [N, C, H, W] -> the normalised float batch the model was trained on (data.normalize_uint8)."""
    from disttrain.data import normalize_uint8

    shape = (1, -1, 1, 1)
    mean = torch.tensor(spec.mean, device=device).view(shape) if spec.mean else None
    std = torch.tensor(spec.std, device=device).view(shape) if spec.std else None
    return normalize_uint8(images.to(device), mean, std)


def expand_inputs(inputs: list[str], kind: str) -> tuple[list[str], list[str]]:
    """(files, errors): folders become their image files (sorted, recursive); missing paths are errors."""
    from torchvision.datasets.folder import IMG_EXTENSIONS

    files, errors = [], []
    for i in inputs:
        p = Path(i)
        if p.is_dir() and kind == "image":
            found = sorted(str(f) for f in p.rglob("*") if f.suffix.lower() in IMG_EXTENSIONS and f.is_file())
            if not found:
                errors.append(f"{i}: no image files in this folder")
            files += found
        elif not p.exists():
            errors.append(f"{i}: no such file")
        elif p.is_dir():
            errors.append(f"{i}: a folder; a table model takes CSV/Parquet files")
        else:
            files.append(i)
    return files, errors


def _rows(net: Any, spec: Any, x: torch.Tensor, top_k: int, meta: dict | None) -> list[dict[str, Any]]:
    """Model outputs for a float batch: class, probability and top-k, or the regression value."""
    device = next(net.parameters()).device
    x = x.to(device)
    if meta and meta.get("channels_last") and x.ndim == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        out = net(x).float().cpu()
    if spec.task != "classification":
        vals = out.reshape(len(out), -1).tolist()
        return [{"prediction": v[0] if len(v) == 1 else v} for v in vals]
    names = spec.classes or [str(i) for i in range(spec.num_outputs)]
    probs = torch.softmax(out, dim=1)
    p, idx = probs.topk(max(1, min(top_k, spec.num_outputs)), dim=1)
    rows = []
    for pr, ix, full in zip(p.tolist(), idx.tolist(), probs.tolist()):
        top = [{"class": names[j], "index": j, "probability": q} for j, q in zip(ix, pr)]
        rows.append({**top[0], "top_k": top, "probabilities": dict(zip(names, full))})
    return rows


def predict(net: Any, spec: Any, files: list[str], top_k: int = 1, batch_size: int = 256,
            meta: dict | None = None) -> list[dict[str, Any]]:
    """Predictions for image files (or CSV/Parquet rows); UsageError on the first unreadable input.
    `predict_all` is the forgiving version the command uses."""
    preds, errors = predict_all(net, spec, files, top_k, batch_size, meta)
    if errors:
        raise UsageError(errors[0])
    return preds


def predict_all(net: Any, spec: Any, files: list[str], top_k: int = 1, batch_size: int = 256,
                meta: dict | None = None) -> tuple[list[dict[str, Any]], list[str]]:
    """(predictions, one error line per input that could not be read): a bad input never stops the others."""
    out: list[dict[str, Any]] = []
    errors: list[str] = []
    if _kind(spec) == "table":
        from disttrain.data import tables

        for f in files:
            try:
                df = tables.read_table(f, TABLE_SUFFIXES.get(Path(f).suffix.lower(), "csv"))
                x = tables.features(df, spec.preprocess, f)
            except UsageError as e:
                errors.append(cut(e))
                continue
            for i in range(0, len(x), batch_size):
                rows = _rows(net, spec, x[i:i + batch_size], top_k, meta)
                out += [{"file": f, "row": i + j, **r} for j, r in enumerate(rows)]
        return out, errors
    for i in range(0, len(files), batch_size):
        good, imgs = [], []
        for f in files[i:i + batch_size]:
            try:
                imgs.append(read_image(f, spec.input_shape))
                good.append(f)
            except UsageError as e:
                errors.append(cut(e))
        if imgs:
            rows = _rows(net, spec, preprocess(torch.stack(imgs), spec, torch.device("cpu")), top_k, meta)
            out += [{"file": str(f), **r} for f, r in zip(good, rows)]
    return out, errors


def format_predictions(preds: list[dict[str, Any]]) -> str:
    names = [p["file"] + (f":{p['row']}" if "row" in p else "") for p in preds]
    width = max((len(n) for n in names), default=0)
    lines = []
    for n, p in zip(names, preds):
        if "class" not in p:
            lines.append(f"{n:<{width}}  {p['prediction']}")
            continue
        rest = "".join(f"   ({t['class']} {t['probability']:.4f})" for t in p["top_k"][1:])
        lines.append(f"{n:<{width}}  {p['class']}  {p['probability']:.4f}{rest}")
    return "\n".join(lines)


def write_output(path: str, preds: list[dict[str, Any]], checkpoint: str) -> None:
    """--output: .json (the predictions with top-k and all probabilities) or .csv (one row per input)."""
    from disttrain.checkpoint import write_atomic

    out = Path(path)
    if out.suffix.lower() == ".json":
        write_atomic(out, (json.dumps({"checkpoint": checkpoint, "predictions": preds}, indent=1) + "\n").encode())
        return
    import csv
    import io

    buf = io.StringIO()
    keys = ["file"] + (["row"] if preds and "row" in preds[0] else [])
    if preds and "class" in preds[0]:
        header = keys + ["class", "probability"] + [f"p({c})" for c in preds[0]["probabilities"]]
        rows = [[p.get(k) for k in keys] + [p["class"], p["probability"], *p["probabilities"].values()]
                for p in preds]
    else:
        header = keys + ["prediction"]
        rows = [[p.get(k) for k in keys] + [p["prediction"]] for p in preds]
    w = csv.writer(buf)
    w.writerow(header)
    w.writerows(rows)
    write_atomic(out, buf.getvalue().encode())


def main(argv: list[str] | None = None) -> int:
    """Exit 0; 2 for bad input, also when some FILEs were unreadable (one line each on stderr; the others
    are still predicted and printed)."""
    errors: list[str] = []
    try:
        args = _parser().parse_args(argv)
        if args.top_k < 1 or args.batch_size < 1:
            raise UsageError("--top-k and --batch-size must be >= 1")
        for flag, value in (("--json", args.json), ("--output", args.output)):
            check_target(flag, value)
        if args.output and Path(args.output).suffix.lower() not in (".csv", ".json"):
            raise UsageError(f"--output {args.output}: expected a .csv or .json file name")
        net, spec, meta = load_model(args.checkpoint, args.model, args.trust_plugins)
        files, errors = expand_inputs(args.files, _kind(spec) or "image")
        preds, bad = predict_all(net, spec, files, args.top_k, args.batch_size, meta)
        errors += bad
    except UsageError as e:
        print(f"disttrain.predict: error: {cut(e)}", file=sys.stderr)
        return EXIT_USAGE
    if args.json:  # files first: a closed stdout (| head) must not lose them
        try:
            write_json(Path(args.json), {"checkpoint": str(args.checkpoint), "predictions": preds, "errors": errors})
            if args.output:
                write_output(args.output, preds, str(args.checkpoint))
        except OSError as e:
            print(f"disttrain.predict: error: I/O error: {cut(e)}", file=sys.stderr)
            return 1
    elif args.output:
        try:
            write_output(args.output, preds, str(args.checkpoint))
        except OSError as e:
            print(f"disttrain.predict: error: I/O error: {cut(e)}", file=sys.stderr)
            return 1
    for e in errors:
        print(f"disttrain.predict: error: {e}", file=sys.stderr)
    if preds:
        print(format_predictions(preds))
    return EXIT_USAGE if errors else 0


def check_target(flag: str, path: str | None) -> None:
    """--json/--output PATH: its folder exists and PATH is not a link nor a folder, checked before any work."""
    if path is None:
        return
    p = Path(path)
    if not p.parent.is_dir():
        raise UsageError(f"{flag} {path}: the folder {p.parent} does not exist")
    check_entry(p, "file")


if __name__ == "__main__":
    sys.exit(main())
