"""`python -m disttrain.predict --checkpoint PATH FILE...`: classify image files with a trained model.

Each image gets the training preprocessing: read with PIL, converted to the model's channels (L for 1,
RGB for 3, from model.json's input_shape), resized (bilinear) to the input size when it differs, made a
uint8 [C, H, W] tensor, then normalised by `data.normalize_uint8` with the run's mean/std, the function
training and evaluation use. No other transform is applied: Fashion-MNIST and MNIST images are light
objects on a black background, and a photo must look like that too to be classified sensibly.

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

from disttrain.errors import EXIT_USAGE, UsageError, one_line

MODES = {1: "L", 3: "RGB"}


def _parser() -> argparse.ArgumentParser:
    from disttrain.config import _Parser

    p = _Parser(prog="python -m disttrain.predict", allow_abbrev=False,
                description="Classify image files (PNG, JPEG, ...) with a trained disttrain model.")
    p.add_argument("--checkpoint", required=True,
                   help="run directory, its model.safetensors, or a checkpoints/step_* directory")
    p.add_argument("files", nargs="+", metavar="FILE", help="image files")
    p.add_argument("--top-k", type=int, default=1, help="print the K most probable classes (default 1)")
    p.add_argument("--model", help="rebuild with this model (module:function or built-in) instead of the saved one")
    p.add_argument("--trust-plugins", action="store_true", help="import a plug-in model named in model.json")
    p.add_argument("--batch-size", type=int, default=256, help="images per forward pass (default 256)")
    p.add_argument("--json", help="also write the predictions to this JSON file")
    return p


def load_model(checkpoint: str, model: str | None = None, trust_plugins: bool = False) -> tuple[Any, Any, dict]:
    """(model in eval mode on CPU/GPU, DataSpec, model.json) of an image classifier."""
    net, spec, meta = load_saved_model(checkpoint, model, trust_plugins)
    if spec.task != "classification":
        raise UsageError(f"--checkpoint {checkpoint}: a {spec.task} model; predict classifies images")
    if len(spec.input_shape) != 3 or spec.input_shape[0] not in MODES:
        raise UsageError(f"--checkpoint {checkpoint}: the model takes inputs of shape {spec.input_shape}, not "
                         "1- or 3-channel images [C, H, W]" + ("; for text models use python -m "
                                                               "disttrain.generate" if spec.vocab else ""))
    return net, spec, meta


def load_saved_model(checkpoint: str, model: str | None = None, trust_plugins: bool = False) -> tuple[Any, Any, dict]:
    """(model in eval mode on CPU/GPU, DataSpec, model.json) from a run dir, model file or checkpoint;
    any kind of model (predict and generate share it)."""
    from disttrain import checkpoint as ckpt
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
    missing = set(net.state_dict()) ^ set(sd)
    if missing:
        raise UsageError(f"--checkpoint {checkpoint}: weights do not fit --model {name} "
                         f"(keys differ: {sorted(missing)[:3]})")
    net.load_state_dict(sd)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    net.to(device).eval()
    return net, spec, meta


def read_image(path: str | Path, input_shape: list[int]) -> torch.Tensor:
    """An image file as a uint8 tensor [C, H, W] of the model's channels and size."""
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    c, h, w = input_shape
    try:
        with Image.open(path) as img:
            img = img.convert(MODES[c])
            if img.size != (w, h):
                img = img.resize((w, h), Image.Resampling.BILINEAR)
            a = np.asarray(img, dtype=np.uint8)
    except (OSError, UnidentifiedImageError, ValueError) as e:
        raise UsageError(f"{path}: not a readable image ({one_line(e)})") from None
    t = torch.from_numpy(a.copy())
    return t.unsqueeze(0) if t.ndim == 2 else t.permute(2, 0, 1).contiguous()


def preprocess(images: torch.Tensor, spec: Any, device: torch.device) -> torch.Tensor:
    """uint8 [N, C, H, W] -> the normalised float batch the model was trained on (data.normalize_uint8)."""
    from disttrain.data import normalize_uint8

    shape = (1, -1, 1, 1)
    mean = torch.tensor(spec.mean, device=device).view(shape) if spec.mean else None
    std = torch.tensor(spec.std, device=device).view(shape) if spec.std else None
    return normalize_uint8(images.to(device), mean, std)


def predict(net: Any, spec: Any, files: list[str], top_k: int = 1, batch_size: int = 256,
            meta: dict | None = None) -> list[dict[str, Any]]:
    device = next(net.parameters()).device
    names = spec.classes or [str(i) for i in range(spec.num_outputs)]
    k = max(1, min(top_k, spec.num_outputs))
    out: list[dict[str, Any]] = []
    for i in range(0, len(files), batch_size):
        chunk = files[i:i + batch_size]
        x = preprocess(torch.stack([read_image(f, spec.input_shape) for f in chunk]), spec, device)
        if meta and meta.get("channels_last"):
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            probs = torch.softmax(net(x).float(), dim=1).cpu()
        p, idx = probs.topk(k, dim=1)
        for f, pr, ix in zip(chunk, p.tolist(), idx.tolist()):
            top = [{"class": names[j], "index": j, "probability": q} for j, q in zip(ix, pr)]
            out.append({"file": str(f), **top[0], "top_k": top})
    return out


def format_predictions(preds: list[dict[str, Any]]) -> str:
    width = max(len(p["file"]) for p in preds)
    lines = []
    for p in preds:
        rest = "".join(f"   ({t['class']} {t['probability']:.4f})" for t in p["top_k"][1:])
        lines.append(f"{p['file']:<{width}}  {p['class']}  {p['probability']:.4f}{rest}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    try:
        args = _parser().parse_args(argv)
        if args.top_k < 1 or args.batch_size < 1:
            raise UsageError("--top-k and --batch-size must be >= 1")
        net, spec, meta = load_model(args.checkpoint, args.model, args.trust_plugins)
        preds = predict(net, spec, args.files, args.top_k, args.batch_size, meta)
    except UsageError as e:
        print(f"disttrain.predict: error: {one_line(e)}", file=sys.stderr)
        return EXIT_USAGE
    print(format_predictions(preds))
    if args.json:
        Path(args.json).write_text(json.dumps({"checkpoint": str(args.checkpoint), "predictions": preds},
                                              indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
