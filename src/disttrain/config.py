"""The run configuration: one dataclass, built from defaults < --config YAML < flags.

Every field is a flag (kebab-case) and a YAML key (snake_case). Unknown keys and flags are errors,
YAML values are converted to the field's type (`lr: 1e-3` is a float, not a string), and every
check that needs no data or hardware happens here so bad input fails before anything is written.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import math
import os
import re
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from disttrain.errors import UsageError, one_line

DATASETS = ("fashion_mnist", "mnist", "cifar10", "synthetic_regression", "synthetic_classification")
MODELS = ("linear", "mlp", "cnn", "lenet", "resnet18", "gpt")
LOSSES = ("cross_entropy", "mse", "l1", "bce_with_logits")
OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULERS = ("constant", "cosine", "onecycle", "step")
PRECISIONS = ("no", "bf16", "fp16", "auto")
AUGMENTS = ("none", "flip", "crop", "crop_flip")
ON_NONFINITE = ("stop", "skip")
RESUME_WORDS = ("auto", "none")
SHARDINGS = ("auto", "none", "fsdp")
MAX_KWARGS_BYTES = 64 << 10  # one *-kwargs value as JSON (saved in config.yaml and every state.json)
MAX_DIST_TIMEOUT = 7 * 24 * 3600  # seconds (datetime.timedelta overflows near 1e14)
PLUGIN_RE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
# --dataset PREFIX:PATH reads the user's own files (data/images.py, tables.py, hf.py); these prefixes are
# taken before plug-ins, so a plug-in module cannot be named like one of them
FILE_DATASETS = ("imagefolder:", "csv:", "parquet:", "hf:")
TASKS = ("auto", "classification", "regression")
TEXT_PREFIX = "text:"  # --dataset text:PATH, a UTF-8 file or folder of files (data/text.py)

# Keys a resume may change: run length, cadence, logging and where things live.
RESUMABLE_KEYS = frozenset({
    "config", "epochs", "max_steps", "log_every", "save_every_steps", "keep_last", "resume",
    "overwrite", "progress", "output_dir", "data_dir", "num_workers", "log_with", "dry_run",
    "eval_batch_size", "init_from", "allow_batch_change", "compile", "max_nonfinite_skips",
    "shm_allreduce", "find_unused_parameters", "save_every_minutes", "sharding", "fsdp_reshard_after_forward",
    "eval_every_steps", "early_stop_patience",
})


def is_plugin(value: str) -> bool:
    """`module:function` (user code), as opposed to a built-in name or a PREFIX:PATH of the user's files."""
    return bool(PLUGIN_RE.match(value)) and not value.startswith(FILE_DATASETS + (TEXT_PREFIX,))


def _f(default: Any, help: str, **kw: Any) -> Any:
    """A dataclass field carrying its help text (and optional choices) for the CLI."""
    meta = {"help": help, **kw}
    if isinstance(default, dict):
        return field(default_factory=dict, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class Config:
    """Everything a run needs. Defaults are the plain tutorial loop; recipes live in recipes/*.yaml."""

    config: str | None = _f(None, "YAML file of the same keys (snake_case)")
    # data
    dataset: str = _f("fashion_mnist", f"built-in {', '.join(DATASETS)}; your files: "
                                       "imagefolder:DIR, csv:FILE, parquet:FILE, hf:PATH, text:PATH (UTF-8 file or "
                                       "folder, language modelling); or module:function")
    dataset_kwargs: dict = _f({}, "JSON object of keyword arguments for the dataset factory")
    data_dir: str = _f("./data", "where datasets live")
    val_fraction: float = _f(0.0, "deterministic hold-out of the training set for validation")
    augment: str = _f("none", "batch-wise augmentation for image datasets", choices=AUGMENTS)
    num_workers: int | None = _f(None, "DataLoader workers for non-tensor datasets (auto)")
    block_size: int = _f(64, "text datasets: tokens per training window (the model's context length)")
    image_size: str | None = _f(None, "imagefolder/hf images: resize to N or HxW pixels (default: the first "
                                      "training image's size)")
    target: str | None = _f(None, "csv/parquet/hf: the column to predict (hf default: label)")
    features: str | None = _f(None, "csv/parquet/hf: comma-separated input columns (default: all but the target)")
    task: str = _f("auto", "csv/parquet/hf: classification or regression (auto: from the target column)",
                   choices=TASKS)
    # model
    model: str = _f("cnn", f"built-in {MODELS} or module:function")
    model_kwargs: dict = _f({}, "JSON object of keyword arguments for the model factory")
    sync_batchnorm: bool = _f(False, "SyncBatchNorm across processes")
    compile: bool = _f(False, "torch.compile the model")
    channels_last: bool = _f(True, "channels_last memory format for conv nets on 4-D inputs")
    find_unused_parameters: bool = _f(False, "DDP looks for parameters without a gradient every step (auto when "
                                             "the pre-flight batch leaves some unused; force it for a model "
                                             "that skips parameters only on some steps)")
    # objective and optimizer
    loss: str | None = _f(None, "loss (default: cross_entropy for classification, mse otherwise)",
                          choices=LOSSES)
    label_smoothing: float = _f(0.0, "label smoothing for cross_entropy")
    optimizer: str = _f("adam", "optimizer", choices=OPTIMIZERS)
    lr: float = _f(1e-3, "peak learning rate")
    momentum: float = _f(0.0, "SGD momentum")
    nesterov: bool = _f(False, "Nesterov momentum (SGD)")
    weight_decay: float = _f(0.0, "weight decay")
    scheduler: str = _f("constant", "LR schedule", choices=SCHEDULERS)
    scheduler_kwargs: dict = _f({}, "JSON: step {step_size, gamma}; cosine {min_lr_ratio}; "
                                    "onecycle {pct_start, div_factor, final_div_factor}")
    warmup_steps: int = _f(0, "linear warmup, in optimizer steps")
    max_grad_norm: float | None = _f(None, "clip gradients to this global norm")
    ema_decay: float = _f(0.0, "keep an exponential moving average of the weights with this decay (e.g. 0.999); "
                               "it is what is evaluated, selected, exported (0: off)")
    # run length and batching
    epochs: int = _f(10, "number of epochs")
    max_steps: int | None = _f(None, "stop after this many optimizer steps")
    batch_size: int = _f(64, "per-process batch size")
    eval_batch_size: int = _f(256, "per-process evaluation batch size")
    grad_accum: int = _f(1, "micro-batches per optimizer step")
    mixed_precision: str | None = _f(None, "no/bf16/fp16/auto (auto: bf16 where the device computes it "
                                     "natively, fp16 on older GPUs, else no; default: the launch config's, else no)",
                                     choices=PRECISIONS)
    seed: int = _f(0, "seeds everything: weights, epoch order, per-rank streams, dataset reads")
    # outputs, checkpoints, resume
    output_dir: str | None = _f(None, "run directory (default runs/<dataset>-<model>-<timestamp>)")
    save_every_steps: int = _f(0, "checkpoint every N optimizer steps (0: epoch ends only)")
    keep_last: int = _f(3, "keep this many step checkpoints (plus best/)")
    resume: str = _f("none", "auto, none or a checkpoint path")
    overwrite: bool = _f(False, "start fresh in a run directory that has checkpoints or metrics")
    init_from: str | None = _f(None, "start from these weights; fresh optimizer and step count")
    allow_batch_change: bool = _f(False, "allow a resume whose global batch differs")
    save_every_minutes: float = _f(5.0, "also checkpoint when this many minutes passed since the last "
                                        "checkpoint, bounding the work a crash loses (0: off)")
    # logging
    log_every: int = _f(50, "step-log cadence in optimizer steps")
    progress: bool = _f(True, "tqdm progress bar on the main process (terminals only)")
    log_with: str | None = _f(None, "experiment tracker", choices=("tensorboard",))
    dry_run: bool = _f(False, "resolve everything, run one batch forward, write nothing")
    eval_every_steps: int = _f(0, "also evaluate the validation set every N optimizer steps (0: epoch ends only)")
    early_stop_patience: int = _f(0, "stop (completed) after N epoch ends without a better val_loss (or eval/train "
                                     "loss without a val set); best/ keeps the best (0: off)")
    # failure policy
    on_nonfinite: str = _f("stop", "stop, or skip steps with a non-finite loss", choices=ON_NONFINITE)
    max_nonfinite_skips: int = _f(10, "with --on-nonfinite skip: give up after this many skips")
    dist_timeout: int = _f(600, "seconds a collective may wait before the process group gives up")
    shm_allreduce: bool = _f(True, "average gradients through shared memory when all CPU processes share "
                                   "one machine (else gloo)")
    sharding: str = _f("auto", "none (DDP replicas), fsdp (FSDP2: parameters, gradients and optimizer state "
                               "sharded over processes), or auto: fsdp if the launch config asks for FSDP, else none",
                       choices=SHARDINGS)
    fsdp_reshard_after_forward: bool | None = _f(None, "FSDP: free each block's gathered parameters after "
                                                       "forward (default: the launch config's, else true)")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def task_loss(self) -> str | None:
        return self.loss


FIELDS = {f.name: f for f in dataclasses.fields(Config)}
_TYPES = typing.get_type_hints(Config)


def _base_type(name: str) -> tuple[type, bool]:
    """(underlying type, optional?) of a field."""
    tp = _TYPES[name]
    args = typing.get_args(tp)
    if args and type(None) in args:
        return next(a for a in args if a is not type(None)), True
    return tp, False


def convert(name: str, value: Any, source: str) -> Any:
    """Convert a YAML or flag value to the field's type, or raise UsageError naming it."""
    tp, optional = _base_type(name)
    flag = f"--{name.replace('_', '-')}" if source == "flag" else f"{name!r} in {source}"
    if source != "flag" and isinstance(value, str) and tp in (int, float, bool) and \
            not (optional and value.lower() in ("none", "null")):
        kind = {int: "an integer", float: "a number", bool: "true or false"}[tp]
        raise UsageError(f"{flag} must be {kind}, got the string {value!r} (YAML: write the value without quotes)")
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null")):
        if optional:
            return None
        raise UsageError(f"{flag} must be a {tp.__name__}, got null")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no"):
            return value.lower() in ("true", "yes")
        raise UsageError(f"{flag} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or isinstance(value, float) and not value.is_integer():
            raise UsageError(f"{flag} must be an integer, got {value!r}")
        try:
            out = int(value) if not isinstance(value, str) else int(value.strip(), 10)
        except (TypeError, ValueError, OverflowError):
            raise UsageError(f"{flag} must be an integer, got {_short(value)}") from None
        if abs(out) >= 10**30:  # (each field's own range is checked in validate())
            raise UsageError(f"{flag} must be an integer below 10**30, got {_short(value)}")
        return out
    if tp is float:
        if isinstance(value, bool):
            raise UsageError(f"{flag} must be a number, got {value!r}")
        try:
            out = float(value)
        except (TypeError, ValueError, OverflowError):
            raise UsageError(f"{flag} must be a number, got {_short(value)}") from None
        if not math.isfinite(out):
            raise UsageError(f"{flag} must be a finite number, got {value!r}")
        return out
    if tp is dict:
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as e:
                raise UsageError(f"{flag} must be a JSON object, got {value!r} ({e.msg})") from None
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise UsageError(f"{flag} must be a JSON object / mapping, got {_short(value)}")
        return _bounded_kwargs(value, flag)
    if tp is str:
        if isinstance(value, (dict, list, bool)):
            raise UsageError(f"{flag} must be a string, got {value!r}")
        return str(value)
    raise AssertionError(f"unhandled type {tp} for {name}")


def _short(value: Any, n: int = 60) -> str:
    """repr(value), cut to n characters (a 5,000-digit number must not become the whole error line)."""
    r = repr(value)
    if len(r) <= n:
        return r
    return f"a {type(value).__name__}" if isinstance(value, (dict, list)) else f"{r[:n]}... ({len(r)} characters)"


def _bounded_kwargs(value: dict, flag: str) -> dict:
    """A *-kwargs mapping as a plain JSON tree within the caps a checkpoint reader applies: aliased YAML
    values are copied out (no sharing), and at most safe_io.MAX_CONFIG_NODES values / MAX_KWARGS_BYTES."""
    from disttrain.safe_io import MAX_CONFIG_NODES, MAX_DEPTH, check_tree

    check_tree(value, flag, MAX_DEPTH - 4, MAX_CONFIG_NODES)  # (a checkpoint nests the config 2 levels down)
    try:
        text = json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise UsageError(f"{flag} must hold JSON values only ({one_line(e)[:100]})") from None
    if len(text) > MAX_KWARGS_BYTES:
        raise UsageError(f"{flag} is {len(text):,} bytes of JSON, more than the {MAX_KWARGS_BYTES:,} allowed")
    return json.loads(text)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> typing.NoReturn:  # argparse prints usage + exits; we want one line
        if message.startswith("unrecognized arguments"):
            known = [o[2:].replace("-", "_") for o in self._option_string_actions if o.startswith("--")]
            hints = [f"{a} (did you mean --{m.replace('_', '-')}?)" for a in message.split(":", 1)[1].split()
                     if a.startswith("--") and (m := suggest(a.split("=", 1)[0], known))]
            message += ("; " + ", ".join(hints) if hints else "") + "; see --help for the flags and what they take"
        elif message.startswith("argument "):
            message += "; see --help for the flags and what they take"
        raise UsageError(message)


def build_parser(prog: str = "python -m disttrain.train") -> argparse.ArgumentParser:
    """Flags generated from the dataclass; defaults suppressed so only given flags override YAML."""
    p = _Parser(prog=prog, usage="%(prog)s [--config FILE.yaml] [FLAGS]",
                description="disttrain: the plain PyTorch loop, distributed. Every flag is also a key of the "
                            "--config YAML file (snake_case); flags win over the file.",
                argument_default=argparse.SUPPRESS, allow_abbrev=False)
    for name, f in FIELDS.items():
        tp, _ = _base_type(name)
        flag = "--" + name.replace("_", "-")
        help, choices = f.metadata["help"], f.metadata.get("choices")
        default = {} if f.default is dataclasses.MISSING else f.default
        if "default" not in help and default is not None:  # (a help text that explains its default says it once)
            help += f" (default: {'on' if default is True else 'off' if default is False else default})"
        if tp is bool:
            p.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, help=help)
        else:
            p.add_argument(flag, dest=name, metavar="{" + ",".join(choices) + "}" if choices else name.upper(),
                           help=help)
    return p


# Names people bring from other trainers (Hugging Face Trainer, Lightning, timm, argparse examples): a key or
# flag that is close to one of these gets "did you mean <ours>?" (difflib alone cannot tie learnig_rate to lr)
SYNONYMS = {
    "learning_rate": "lr", "learningrate": "lr", "num_epochs": "epochs", "n_epochs": "epochs",
    "num_train_epochs": "epochs", "max_epochs": "epochs", "batch": "batch_size", "bs": "batch_size",
    "train_batch_size": "batch_size", "per_device_train_batch_size": "batch_size",
    "per_device_eval_batch_size": "eval_batch_size", "gradient_accumulation_steps": "grad_accum",
    "accumulate_grad_batches": "grad_accum", "accumulation_steps": "grad_accum", "wd": "weight_decay",
    "warmup": "warmup_steps", "clip_grad_norm": "max_grad_norm", "grad_clip": "max_grad_norm",
    "gradient_clip_val": "max_grad_norm", "precision": "mixed_precision", "fp16": "mixed_precision",
    "bf16": "mixed_precision", "workers": "num_workers", "output": "output_dir", "out_dir": "output_dir",
    "logging_steps": "log_every", "log_interval": "log_every", "save_steps": "save_every_steps",
    "save_total_limit": "keep_last", "resume_from_checkpoint": "resume", "val_split": "val_fraction",
    "validation_split": "val_fraction", "label": "target", "label_column": "target", "target_column": "target",
    "img_size": "image_size", "input_size": "image_size", "lr_scheduler": "scheduler",
    "lr_scheduler_type": "scheduler", "optim": "optimizer", "arch": "model", "data": "dataset",
}


def suggest(name: str, known: list[str] | None = None) -> str | None:
    """The key (snake_case) among `known` (default: the Config fields) that a mistyped or foreign key or
    flag most likely means, or None."""
    import difflib

    key = str(name).lstrip("-").replace("-", "_").lower()
    fields = known if known is not None else [f for f in FIELDS if f != "config"]
    synonyms = {k: v for k, v in SYNONYMS.items() if v in fields}
    if key in synonyms:
        return synonyms[key]
    m = difflib.get_close_matches(key, fields + list(synonyms), n=1, cutoff=0.75)
    return synonyms.get(m[0], m[0]) if m else None


def load_yaml(path: str) -> dict[str, Any]:
    """Read a --config file safely as a mapping: plain data only, no duplicate keys, at most 1 MiB, few
    aliases, bounded depth (safe_io.read_yaml)."""
    from disttrain.safe_io import UnsafeInput, read_yaml

    p = Path(path)
    if not (p.exists() or p.is_symlink()) or (p.is_dir() and not p.is_symlink()):
        raise UsageError(f"--config {path}: {'not a file' if p.exists() else 'no such file'}; expected a YAML file")
    try:
        data = read_yaml(p)
    except UnsafeInput as e:
        raise UsageError(f"--config {one_line(e)}") from None
    except OSError as e:
        raise UsageError(f"--config {path}: unreadable ({e.strerror})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UsageError(f"--config {path}: must be a mapping of keys to values, got {type(data).__name__}")
    unknown = [k for k in data if k not in FIELDS or k == "config"]
    if unknown:
        hints = [f"{k} (did you mean {m}?)" if (m := suggest(k)) else str(k) for k in unknown]
        raise UsageError(f"--config {path}: unknown key(s) {', '.join(hints)}; keys are the flags in snake_case")
    return data


def parse_config(argv: list[str] | None = None, prog: str = "python -m disttrain.train") -> Config:
    """defaults < --config YAML < flags, converted and validated. Raises UsageError."""
    args = vars(build_parser(prog).parse_args(argv))
    values: dict[str, Any] = {}
    if "config" in args:
        for k, v in load_yaml(args["config"]).items():
            values[k] = convert(k, v, f"--config {args['config']}")
    for k, v in args.items():
        values[k] = convert(k, v, "flag")
    cfg = Config(**values)
    cfg.explicit = frozenset(values)  # type: ignore[attr-defined]  # what a resume may take from the user
    validate(cfg)
    return cfg


# never taken from a saved config on resume: they say what this invocation does
NOT_RESUMED = frozenset({"config", "resume", "output_dir", "overwrite", "dry_run", "init_from"})


def resumed_config(saved: dict[str, Any], cfg: Config, where: str) -> tuple[Config, list[str]]:
    """A resume continues the saved run: `saved` (a run's config.yaml or a checkpoint's config) with only the
    keys this invocation gave explicitly (flags, --config YAML) replaced. Returns the config and the changes
    as "key: old -> new" (train refuses the changes a resume may not make). UsageError for a bad saved key."""
    explicit = getattr(cfg, "explicit", None)
    if explicit is None:  # built in code, not parsed: what differs from the defaults was given
        default = Config()
        explicit = {k for k in FIELDS if getattr(cfg, k) != getattr(default, k)}
    values = {k: convert(k, v, where) for k, v in saved.items() if k in FIELDS and k not in NOT_RESUMED}
    unknown = sorted(k for k in saved if k not in FIELDS)
    if unknown:
        raise UsageError(f"{where}: unknown key(s) {', '.join(map(str, unknown))}")
    values.update({k: getattr(cfg, k) for k in set(explicit) | NOT_RESUMED})
    new = Config(**values)
    new.explicit = frozenset(explicit)  # type: ignore[attr-defined]
    validate(new)
    changed = [f"{k}: {saved[k]!r} -> {getattr(new, k)!r}" for k in sorted(explicit)
               if k in saved and k not in NOT_RESUMED and saved[k] != getattr(new, k)]
    return new, changed


def _check(ok: bool, msg: str) -> None:
    if not ok:
        raise UsageError(msg)


def validate(cfg: Config) -> None:
    """Checks that need neither data nor hardware."""
    for name in ("dataset", "model"):
        v = getattr(cfg, name)
        builtin = DATASETS if name == "dataset" else MODELS
        files = name == "dataset" and v.startswith(FILE_DATASETS) and len(v.partition(":")[2]) > 0
        text = name == "dataset" and v.startswith(TEXT_PREFIX)
        _check(v in builtin or files or text or bool(PLUGIN_RE.match(v)),
               f"--{name} {v!r}: unknown; expected one of {', '.join(builtin)}, "
               f"{'imagefolder:DIR, csv:FILE, parquet:FILE, hf:PATH, text:PATH ' if name == 'dataset' else ''}"
               "or module:function")
        _check(not text or Path(v[len(TEXT_PREFIX):]).exists(),
               f"--dataset {v}: no such file or directory {v[len(TEXT_PREFIX):]!r}")
    for name, choices in (("loss", LOSSES), ("optimizer", OPTIMIZERS), ("scheduler", SCHEDULERS),
                          ("mixed_precision", PRECISIONS), ("augment", AUGMENTS),
                          ("on_nonfinite", ON_NONFINITE), ("log_with", ("tensorboard",)), ("task", TASKS),
                          ("sharding", SHARDINGS)):
        v = getattr(cfg, name)
        _check(v is None or v in choices,
               f"--{name.replace('_', '-')} {v!r}: unknown; expected one of {', '.join(choices)}")
    positive = ("lr", "batch_size", "eval_batch_size", "epochs", "grad_accum", "log_every", "keep_last",
                "dist_timeout", "max_nonfinite_skips", "block_size")
    for name in positive:
        v = getattr(cfg, name)
        _check(v > 0, f"--{name.replace('_', '-')} must be > 0, got {v}")
    for name in ("max_steps", "max_grad_norm"):
        v = getattr(cfg, name)
        _check(v is None or v > 0, f"--{name.replace('_', '-')} must be > 0, got {v}")
    for name in ("momentum", "weight_decay", "warmup_steps", "save_every_steps", "seed", "save_every_minutes",
                 "eval_every_steps", "early_stop_patience"):
        v = getattr(cfg, name)
        _check(v >= 0, f"--{name.replace('_', '-')} must be >= 0, got {v}")
    _check(cfg.num_workers is None or cfg.num_workers >= 0,
           f"--num-workers must be >= 0, got {cfg.num_workers}")
    _check(cfg.momentum < 1, f"--momentum must be < 1, got {cfg.momentum}")
    _check(0 <= cfg.ema_decay < 1, f"--ema-decay must be in [0, 1), got {cfg.ema_decay}")
    _check(0 <= cfg.val_fraction < 1, f"--val-fraction must be in [0, 1), got {cfg.val_fraction}")
    _check(0 <= cfg.label_smoothing < 1, f"--label-smoothing must be in [0, 1), got {cfg.label_smoothing}")
    _check(not (cfg.nesterov and (cfg.optimizer != "sgd" or cfg.momentum == 0)),
           "--nesterov needs --optimizer sgd with --momentum > 0")
    _check(cfg.seed < 2**32, f"--seed must be < 2**32, got {cfg.seed}")
    _check(cfg.dist_timeout <= MAX_DIST_TIMEOUT, f"--dist-timeout must be at most {MAX_DIST_TIMEOUT} seconds (7 days), "
                                                 f"got {cfg.dist_timeout}")
    _check(cfg.label_smoothing == 0 or cfg.loss in (None, "cross_entropy"),
           f"--label-smoothing {cfg.label_smoothing} needs the cross_entropy loss, got --loss {cfg.loss}")
    r = cfg.resume
    _check(r in RESUME_WORDS or bool(r), f"--resume {r!r}: expected auto, none or a checkpoint path")
    _check(not (cfg.overwrite and r not in RESUME_WORDS),
           f"--resume {r} with --overwrite: overwrite would delete the checkpoint to resume from")
    _check(not (cfg.overwrite and r == "auto"), "--resume auto with --overwrite: choose one")
    _check(not (r == "auto" and cfg.output_dir is None),
           "--resume auto needs --output-dir: the run directory to continue (without it a new timestamped "
           "directory would start a fresh run)")
    _check(not (cfg.init_from and r not in ("none",)),
           f"--init-from {cfg.init_from} with --resume {r}: a resume restores its own weights")
    _check(cfg.init_from is None or Path(cfg.init_from).exists(),
           f"--init-from {cfg.init_from}: no such file or directory")
    _check(r in RESUME_WORDS or Path(r).exists(), f"--resume {r}: no such checkpoint")
    _check(not (cfg.sync_batchnorm and cfg.compile), "--sync-batchnorm with --compile is not supported")
    _check(cfg.log_with != "tensorboard" or importlib.util.find_spec("tensorboard") is not None,
           "--log-with tensorboard: the tensorboard package is not installed; pip install 'disttrain[tensorboard]'")
    _validate_file_dataset(cfg)
    _validate_scheduler_kwargs(cfg)
    _validate_output_dir(cfg)


def _validate_file_dataset(cfg: Config) -> None:
    """--image-size, --target, --features, --task belong to the datasets read from the user's files."""
    family = cfg.dataset.partition(":")[0] + ":" if cfg.dataset.startswith(FILE_DATASETS) else ""
    for name, families in (("image_size", ("imagefolder:", "hf:")), ("target", ("csv:", "parquet:", "hf:")),
                           ("features", ("csv:", "parquet:", "hf:"))):
        _check(getattr(cfg, name) is None or family in families,
               f"--{name.replace('_', '-')} applies to --dataset {' or '.join(f + '...' for f in families)}, "
               f"not {cfg.dataset}")
    _check(cfg.task == "auto" or family in ("csv:", "parquet:", "hf:"),
           f"--task applies to --dataset csv:..., parquet:... or hf:..., not {cfg.dataset}")
    if cfg.image_size is not None:
        from disttrain.data.images import parse_size

        parse_size(cfg.image_size)
    if cfg.features is not None:
        cols = [c.strip() for c in cfg.features.split(",")]
        _check(all(cols) and len(set(cols)) == len(cols),
               f"--features {cfg.features!r}: expected distinct comma-separated column names")
    _check(family not in ("csv:", "parquet:") or bool(cfg.target),
           f"--dataset {cfg.dataset} needs --target COLUMN (the column to predict)")


def _validate_scheduler_kwargs(cfg: Config) -> None:
    allowed = {"constant": set(), "cosine": {"min_lr_ratio"}, "step": {"step_size", "gamma"},
               "onecycle": {"pct_start", "div_factor", "final_div_factor"}}[cfg.scheduler]
    extra = set(cfg.scheduler_kwargs) - allowed
    _check(not extra, f"--scheduler-kwargs {sorted(extra)} not accepted by --scheduler {cfg.scheduler}; "
                      f"expected keys from {sorted(allowed) or 'none'}")
    for k, v in cfg.scheduler_kwargs.items():
        _check(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0,
               f"--scheduler-kwargs {k}={v!r} must be a positive number")
    if "step_size" in cfg.scheduler_kwargs:
        v = cfg.scheduler_kwargs["step_size"]
        _check(isinstance(v, int) or float(v).is_integer(), f"--scheduler-kwargs step_size={v!r} must be a whole "
                                                            "number of optimizer steps (>= 1)")
    if "pct_start" in cfg.scheduler_kwargs:
        _check(cfg.scheduler_kwargs["pct_start"] < 1, "--scheduler-kwargs pct_start must be < 1")


def _validate_output_dir(cfg: Config) -> None:
    if cfg.output_dir is None:
        return
    out = Path(cfg.output_dir)
    _check(not out.exists() or out.is_dir(), f"--output-dir {out}: exists and is not a directory")
    parent = out if out.exists() else next((p for p in out.parents if p.exists()), Path("."))
    _check(parent.is_dir() and os.access(parent, os.W_OK | os.X_OK),
           f"--output-dir {out}: {parent} is not writable")


def default_output_dir(cfg: Config, now: float | None = None) -> str:
    """runs/<dataset>-<model>-<timestamp>, plug-in names made path-safe; for the user's files the prefix and
    the file or folder name (imagefolder:/data/photos -> imagefolder_photos)."""
    safe = lambda s: re.sub(r"[^A-Za-z0-9_.-]+", "_", s).strip("._") or "x"  # noqa: E731
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(now))
    data = cfg.dataset
    if data.startswith(FILE_DATASETS):
        prefix, _, path = data.partition(":")
        data = f"{prefix}_{Path(path.rstrip('/')).name}"
    return str(Path("runs") / f"{safe(data)}-{safe(cfg.model)}-{stamp}")


def to_yaml(cfg: Config) -> str:
    import yaml

    data = {k: v for k, v in cfg.to_dict().items() if k != "config"}
    return yaml.safe_dump(data, sort_keys=False)


def from_saved(data: dict[str, Any]) -> Config:
    """A Config from a run directory's config.yaml (already safe-loaded); unknown keys are errors."""
    unknown = [k for k in data if k not in FIELDS]
    if unknown:
        raise UsageError(f"saved config has unknown key(s) {', '.join(map(str, unknown))}")
    return Config(**{k: convert(k, v, "saved config.yaml") for k, v in data.items()})


def config_diff(saved: dict[str, Any], cfg: Config) -> list[str]:
    """Keys whose values differ between a checkpoint's config and this run, ignoring resumable ones."""
    now = cfg.to_dict()
    ignore = RESUMABLE_KEYS | {"batch_size", "grad_accum"}  # global batch is checked on its own
    return sorted(k for k in now if k not in ignore and k in saved and saved[k] != now[k])
