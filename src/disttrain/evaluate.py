"""Exact evaluation, and `python -m disttrain.evaluate --checkpoint PATH`.

Each rank evaluates a contiguous shard of the set with no padding, so every sample is counted once;
the sums are all-reduced, so the result is the same on any world size.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

import torch

from disttrain.distributed import sync_buffers
from disttrain.errors import EXIT_USAGE, UsageError, cut


def evaluate(model: Any, data: Any, loss_fn: Any, acc: Any, split: str, prefix: str = "eval",
             confusion: bool = False) -> dict[str, Any]:
    """{prefix}_loss (exact sample mean; per token for text, every window having the same number of tokens)
    and, for classification, {prefix}_accuracy (per token for text); for text also {prefix}_perplexity
    = exp(loss) and {prefix}_bits_per_char = loss / ln 2 (the loss is in nats per character)."""
    net = acc.unwrap_model(model)  # no DDP collectives inside: ranks may have different batch counts
    sync_buffers(acc, net)  # every rank evaluates the model a checkpoint holds (rank 0's BN statistics)
    net.eval()
    classes = data.spec.num_outputs if data.spec.task == "classification" else 0
    loss_sum = torch.zeros((), dtype=torch.float64, device=acc.device)
    counts = torch.zeros(3, dtype=torch.float64, device=acc.device)  # samples, correct, targets
    cm = torch.zeros(classes, classes, dtype=torch.int64, device=acc.device) if confusion and classes else None
    with torch.inference_mode(), acc.autocast():
        for x, y in data.eval_batches(split):
            out = net(x)
            loss_sum += loss_fn(out.float(), y).sum(dtype=torch.float64)
            counts[0] += len(y)
            if classes:
                pred = out.argmax(-1)
                counts[1] += (pred == y).sum()
                counts[2] += y.numel()
                if cm is not None and y.ndim == 1:
                    cm += torch.bincount(y * classes + pred, minlength=classes * classes).view(classes, classes)
    net.train()
    loss_sum, counts = acc.reduce(loss_sum, "sum"), acc.reduce(counts, "sum")
    n = max(1.0, float(counts[0]))
    out_d: dict[str, Any] = {f"{prefix}_loss": float(loss_sum) / n}
    if classes:
        out_d[f"{prefix}_accuracy"] = float(counts[1]) / max(1.0, float(counts[2]))
    if data.spec.vocab:
        out_d[f"{prefix}_perplexity"] = math.exp(min(out_d[f"{prefix}_loss"], 700.0))
        out_d[f"{prefix}_bits_per_char"] = out_d[f"{prefix}_loss"] / math.log(2)
    if cm is not None and not data.spec.vocab:
        out_d["confusion_matrix"] = acc.reduce(cm, "sum").cpu().tolist()
    return out_d


def _parser() -> argparse.ArgumentParser:
    from disttrain.config import _Parser

    p = _Parser(prog="python -m disttrain.evaluate", description="Evaluate a trained disttrain model.",
                allow_abbrev=False)
    p.add_argument("--checkpoint", required=True,
                   help="run directory, its model.safetensors, or a checkpoints/step_* directory")
    p.add_argument("--data-dir", help="override the saved data dir")
    p.add_argument("--eval-batch-size", type=int, help="override the evaluation batch size")
    p.add_argument("--split", choices=("test", "val"), default="test", help="which split")
    p.add_argument("--dataset", help="evaluate on another labelled set instead: imagefolder:DIR, csv:FILE, "
                                     "parquet:FILE or hf:PATH (transformed as the training data was; all of it), "
                                     "or a built-in/plug-in name (its test split)")
    p.add_argument("--model", help="rebuild with this model (module:function or built-in) instead of the saved one")
    p.add_argument("--trust-plugins", action="store_true", help="import plug-ins named in the saved config")
    p.add_argument("--json", help="also write the results to this JSON file")
    return p


def _saved_config(ckpt_dir: Path, meta_dir: Path) -> dict[str, Any]:
    """The run's config: its config.yaml (safe_io.read_yaml: plain data, bounded), else the checkpoint's
    state.json (schema-checked by checkpoint.load_checkpoint). A mapping, or UsageError naming the file."""
    from disttrain.checkpoint import MAX_JSON_BYTES
    from disttrain.safe_io import read_json, read_yaml

    for d in (meta_dir, meta_dir.parent.parent):  # run dir, or a checkpoint's run dir
        f = d / "config.yaml"
        if f.exists() or f.is_symlink():
            data = read_yaml(f)
            if data is not None and not isinstance(data, dict):
                raise UsageError(f"{f}: must be a mapping of keys to values, got {type(data).__name__}")
            return data or {}
    state = ckpt_dir / "state.json"
    if state.exists() or state.is_symlink():
        st = read_json(state, MAX_JSON_BYTES)
        if not isinstance(st, dict) or not isinstance(st.get("config"), dict):
            raise UsageError(f"{state}: has no config mapping")
        return st["config"]
    raise UsageError(f"--checkpoint {ckpt_dir}: no config.yaml beside it; cannot rebuild the data")


def run_evaluate(args: argparse.Namespace) -> dict[str, Any]:
    from disttrain import checkpoint as ckpt
    from disttrain import schema
    from disttrain.config import from_saved, is_plugin
    from disttrain.data import load_data
    from disttrain.models import build_model
    from disttrain.optim import build_loss

    from disttrain.config import FILE_DATASETS, validate
    from disttrain.data import DataSpec

    sd, meta, where = ckpt.load_weights(args.checkpoint)
    cfg = from_saved({k: v for k, v in _saved_config(where, where).items() if k != "config"})
    saved_spec = DataSpec(**meta["spec"]) if meta and isinstance(meta.get("spec"), dict) else None
    new_files = bool(args.dataset) and args.dataset.startswith(FILE_DATASETS)
    if args.dataset:
        cfg.dataset, cfg.val_fraction = args.dataset, 0.0 if new_files else cfg.val_fraction
        if new_files:
            args.split = "test"
            if saved_spec is None or saved_spec.preprocess is None:
                raise UsageError(f"--dataset {args.dataset}: the checkpoint's model was not trained on files "
                                 "(imagefolder/csv/parquet/hf); evaluate it on its own --dataset kind")
        else:
            cfg.image_size = cfg.target = cfg.features = None
            cfg.task = "auto"
            validate(cfg)
    for name in ("dataset", "model"):
        value = getattr(cfg, name)
        explicit = name == "model" and args.model
        if is_plugin(value) and not args.trust_plugins and not explicit:
            raise UsageError(f"the saved config names the plug-in --{name} {value}: importing it runs its code; "
                             f"pass --trust-plugins{' or --model' if name == 'model' else ''} to allow it")
    if args.model:
        cfg.model = args.model
    if args.data_dir:
        cfg.data_dir = args.data_dir
    if args.eval_batch_size:
        cfg.eval_batch_size = args.eval_batch_size
    cfg.resume, cfg.overwrite, cfg.init_from, cfg.log_with = "none", False, None, None
    from accelerate import Accelerator

    acc = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=cfg.mixed_precision or "no")
    data = load_data(cfg, acc, saved_spec if new_files else None)
    if saved_spec is not None and (data.spec.classes, data.spec.input_shape, data.spec.preprocess) != \
            (saved_spec.classes, saved_spec.input_shape, saved_spec.preprocess):
        raise UsageError(f"--checkpoint {args.checkpoint}: the data now differs from what the model was trained on "
                         f"(classes, input shape or preprocessing; were the training files changed?)")
    model = build_model(cfg.model, cfg.model_kwargs, saved_spec or data.spec).to(acc.device)
    schema.check_weights_fit(model, sd, f"--checkpoint {args.checkpoint}")
    model.load_state_dict(sd)
    if meta and meta.get("channels_last"):
        model = model.to(memory_format=torch.channels_last)
        data.channels_last = True
    if (data.val if args.split == "val" else data.test) is None:
        raise UsageError(f"--split {args.split}: this run has no {args.split} set")
    loss_fn = build_loss(cfg, data.spec.task)
    res = evaluate(model, data, loss_fn, acc, args.split, prefix="eval", confusion=not data.spec.vocab)
    if data.spec.task == "classification" and not data.spec.vocab:
        cm = torch.tensor(res["confusion_matrix"])
        per = (cm.diag().float() / cm.sum(1).clamp(min=1).float()).tolist()
        names = data.spec.classes or [str(i) for i in range(len(per))]
        res["per_class_accuracy"] = dict(zip(names, per))
        res["classes"] = names
    else:
        res.pop("confusion_matrix", None)
    res["samples"] = len(data.val if args.split == "val" else data.test)
    res["checkpoint"] = str(args.checkpoint)
    return res


def format_report(res: dict[str, Any]) -> str:
    lines = [f"loss {res['eval_loss']:.6f}"]
    if "eval_perplexity" in res:  # text: per-token loss, perplexity, bits per character, token accuracy
        lines[0] += (f" per token  perplexity {res['eval_perplexity']:.4f}  bits/char {res['eval_bits_per_char']:.4f}"
                     f"  accuracy {res['eval_accuracy']:.4f}  ({res['samples']} windows)")
        return lines[0]
    if "eval_accuracy" in res:
        lines[0] += f"  accuracy {res['eval_accuracy']:.4f}  ({res['samples']} samples)"
        width = max(len(c) for c in res["classes"])
        lines.append("per-class accuracy:")
        lines += [f"  {c:<{width}}  {a:.4f}" for c, a in res["per_class_accuracy"].items()]
        lines.append("confusion matrix (rows: true class, columns: predicted):")
        lines += ["  " + " ".join(f"{v:5d}" for v in row) for row in res["confusion_matrix"]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from disttrain.predict import check_target
    from disttrain.safe_io import write_json

    try:
        args = _parser().parse_args(argv)
        check_target("--json", args.json)
        res = run_evaluate(args)
        print(format_report(res))
        if args.json:
            write_json(Path(args.json), res)
    except UsageError as e:
        print(f"disttrain.evaluate: error: {cut(e)}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as e:
        print(f"disttrain.evaluate: error: I/O error: {cut(e)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
