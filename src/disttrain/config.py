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
MODELS = ("linear", "mlp", "cnn", "lenet", "resnet18")
LOSSES = ("cross_entropy", "mse", "l1", "bce_with_logits")
OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULERS = ("constant", "cosine", "onecycle", "step")
PRECISIONS = ("no", "bf16", "fp16")
AUGMENTS = ("none", "flip", "crop", "crop_flip")
ON_NONFINITE = ("stop", "skip")
RESUME_WORDS = ("auto", "none")
SHARDINGS = ("auto", "none", "fsdp")
PLUGIN_RE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")

# Keys a resume may change: run length, cadence, logging and where things live.
RESUMABLE_KEYS = frozenset({
    "config", "epochs", "max_steps", "log_every", "save_every_steps", "keep_last", "resume",
    "overwrite", "progress", "output_dir", "data_dir", "num_workers", "log_with", "dry_run",
    "eval_batch_size", "init_from", "allow_batch_change", "compile", "max_nonfinite_skips",
    "shm_allreduce", "sharding", "fsdp_reshard_after_forward",
})


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
    dataset: str = _f("fashion_mnist", f"built-in {DATASETS} or module:function")
    dataset_kwargs: dict = _f({}, "JSON object of keyword arguments for the dataset factory")
    data_dir: str = _f("./data", "where datasets live")
    val_fraction: float = _f(0.0, "deterministic hold-out of the training set for validation")
    augment: str = _f("none", "batch-wise augmentation for image datasets", choices=AUGMENTS)
    num_workers: int | None = _f(None, "DataLoader workers for non-tensor datasets (auto)")
    # model
    model: str = _f("cnn", f"built-in {MODELS} or module:function")
    model_kwargs: dict = _f({}, "JSON object of keyword arguments for the model factory")
    sync_batchnorm: bool = _f(False, "SyncBatchNorm across processes")
    compile: bool = _f(False, "torch.compile the model")
    channels_last: bool = _f(True, "channels_last memory format for conv nets on 4-D inputs")
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
    # run length and batching
    epochs: int = _f(10, "number of epochs")
    max_steps: int | None = _f(None, "stop after this many optimizer steps")
    batch_size: int = _f(64, "per-process batch size")
    eval_batch_size: int = _f(256, "per-process evaluation batch size")
    grad_accum: int = _f(1, "micro-batches per optimizer step")
    mixed_precision: str | None = _f(None, "no/bf16/fp16 (default: the launch config's, else no)",
                                     choices=PRECISIONS)
    seed: int = _f(0, "seeds everything, and the DistributedSampler")
    # outputs, checkpoints, resume
    output_dir: str | None = _f(None, "run directory (default runs/<dataset>-<model>-<timestamp>)")
    save_every_steps: int = _f(0, "checkpoint every N optimizer steps (0: epoch ends only)")
    keep_last: int = _f(3, "keep this many step checkpoints (plus best/)")
    resume: str = _f("none", "auto, none or a checkpoint path")
    overwrite: bool = _f(False, "start fresh in a run directory that has checkpoints or metrics")
    init_from: str | None = _f(None, "start from these weights; fresh optimizer and step count")
    allow_batch_change: bool = _f(False, "allow a resume whose global batch differs")
    # logging
    log_every: int = _f(50, "step-log cadence in optimizer steps")
    progress: bool = _f(True, "tqdm progress bar on the main process (terminals only)")
    log_with: str | None = _f(None, "experiment tracker", choices=("tensorboard",))
    dry_run: bool = _f(False, "resolve everything, run one batch forward, write nothing")
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
            return int(value) if not isinstance(value, str) else int(value.strip(), 10)
        except (TypeError, ValueError, OverflowError):
            raise UsageError(f"{flag} must be an integer, got {value!r}") from None
    if tp is float:
        if isinstance(value, bool):
            raise UsageError(f"{flag} must be a number, got {value!r}")
        try:
            out = float(value)
        except (TypeError, ValueError):
            raise UsageError(f"{flag} must be a number, got {value!r}") from None
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
            raise UsageError(f"{flag} must be a JSON object / mapping, got {value!r}")
        return value
    if tp is str:
        if isinstance(value, (dict, list, bool)):
            raise UsageError(f"{flag} must be a string, got {value!r}")
        return str(value)
    raise AssertionError(f"unhandled type {tp} for {name}")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> typing.NoReturn:  # argparse prints usage + exits; we want one line
        if message.startswith(("unrecognized arguments", "argument ")):
            message += "; see --help for the flags and what they take"
        raise UsageError(message)


def build_parser(prog: str = "python -m disttrain.train") -> argparse.ArgumentParser:
    """Flags generated from the dataclass; defaults suppressed so only given flags override YAML."""
    p = _Parser(prog=prog, description="disttrain: the plain PyTorch loop, distributed.",
                argument_default=argparse.SUPPRESS, allow_abbrev=False)
    for name, f in FIELDS.items():
        tp, _ = _base_type(name)
        flag = "--" + name.replace("_", "-")
        help = f.metadata["help"] + f" (default: {f.default if f.default is not dataclasses.MISSING else '{}'})"
        if tp is bool:
            p.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, help=help)
        else:
            p.add_argument(flag, dest=name, metavar=name.upper(), help=help)
    return p


def load_yaml(path: str) -> dict[str, Any]:
    """Read a --config file safely (yaml.safe_load: no Python objects) as a mapping."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise UsageError(f"--config {path}: {'not a file' if p.exists() else 'no such file'}; expected a YAML file")
    try:
        data = yaml.safe_load(p.read_text())
    except (yaml.YAMLError, UnicodeDecodeError, OSError) as e:
        raise UsageError(f"--config {path}: not valid YAML ({one_line(e)})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UsageError(f"--config {path}: must be a mapping of keys to values, got {type(data).__name__}")
    unknown = [k for k in data if k not in FIELDS or k == "config"]
    if unknown:
        import difflib

        hints = [f"{k} (did you mean {m[0]}?)" if (m := difflib.get_close_matches(str(k).replace("-", "_"),
                 [f for f in FIELDS if f != "config"], n=1)) else str(k) for k in unknown]
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
    validate(cfg)
    return cfg


def _check(ok: bool, msg: str) -> None:
    if not ok:
        raise UsageError(msg)


def validate(cfg: Config) -> None:
    """Checks that need neither data nor hardware."""
    for name in ("dataset", "model"):
        v = getattr(cfg, name)
        builtin = DATASETS if name == "dataset" else MODELS
        _check(v in builtin or bool(PLUGIN_RE.match(v)),
               f"--{name} {v!r}: unknown; expected one of {', '.join(builtin)} or module:function")
    for name, choices in (("loss", LOSSES), ("optimizer", OPTIMIZERS), ("scheduler", SCHEDULERS),
                          ("mixed_precision", PRECISIONS), ("augment", AUGMENTS),
                          ("on_nonfinite", ON_NONFINITE), ("log_with", ("tensorboard",)), ("sharding", SHARDINGS)):
        v = getattr(cfg, name)
        _check(v is None or v in choices,
               f"--{name.replace('_', '-')} {v!r}: unknown; expected one of {', '.join(choices)}")
    positive = ("lr", "batch_size", "eval_batch_size", "epochs", "grad_accum", "log_every", "keep_last",
                "dist_timeout", "max_nonfinite_skips")
    for name in positive:
        v = getattr(cfg, name)
        _check(v > 0, f"--{name.replace('_', '-')} must be > 0, got {v}")
    for name in ("max_steps", "max_grad_norm"):
        v = getattr(cfg, name)
        _check(v is None or v > 0, f"--{name.replace('_', '-')} must be > 0, got {v}")
    for name in ("momentum", "weight_decay", "warmup_steps", "save_every_steps", "seed"):
        v = getattr(cfg, name)
        _check(v >= 0, f"--{name.replace('_', '-')} must be >= 0, got {v}")
    _check(cfg.num_workers is None or cfg.num_workers >= 0,
           f"--num-workers must be >= 0, got {cfg.num_workers}")
    _check(cfg.momentum < 1, f"--momentum must be < 1, got {cfg.momentum}")
    _check(0 <= cfg.val_fraction < 1, f"--val-fraction must be in [0, 1), got {cfg.val_fraction}")
    _check(0 <= cfg.label_smoothing < 1, f"--label-smoothing must be in [0, 1), got {cfg.label_smoothing}")
    _check(not (cfg.nesterov and (cfg.optimizer != "sgd" or cfg.momentum == 0)),
           "--nesterov needs --optimizer sgd with --momentum > 0")
    _check(cfg.seed < 2**32, f"--seed must be < 2**32, got {cfg.seed}")
    _check(cfg.label_smoothing == 0 or cfg.loss in (None, "cross_entropy"),
           f"--label-smoothing {cfg.label_smoothing} needs the cross_entropy loss, got --loss {cfg.loss}")
    r = cfg.resume
    _check(r in RESUME_WORDS or bool(r), f"--resume {r!r}: expected auto, none or a checkpoint path")
    _check(not (cfg.overwrite and r not in RESUME_WORDS),
           f"--resume {r} with --overwrite: overwrite would delete the checkpoint to resume from")
    _check(not (cfg.overwrite and r == "auto"), "--resume auto with --overwrite: choose one")
    _check(not (cfg.init_from and r not in ("none",)),
           f"--init-from {cfg.init_from} with --resume {r}: a resume restores its own weights")
    _check(cfg.init_from is None or Path(cfg.init_from).exists(),
           f"--init-from {cfg.init_from}: no such file or directory")
    _check(r in RESUME_WORDS or Path(r).exists(), f"--resume {r}: no such checkpoint")
    _check(not (cfg.sync_batchnorm and cfg.compile), "--sync-batchnorm with --compile is not supported")
    _check(cfg.log_with != "tensorboard" or importlib.util.find_spec("tensorboard") is not None,
           "--log-with tensorboard: the tensorboard package is not installed; pip install 'disttrain[tensorboard]'")
    _validate_scheduler_kwargs(cfg)
    _validate_output_dir(cfg)


def _validate_scheduler_kwargs(cfg: Config) -> None:
    allowed = {"constant": set(), "cosine": {"min_lr_ratio"}, "step": {"step_size", "gamma"},
               "onecycle": {"pct_start", "div_factor", "final_div_factor"}}[cfg.scheduler]
    extra = set(cfg.scheduler_kwargs) - allowed
    _check(not extra, f"--scheduler-kwargs {sorted(extra)} not accepted by --scheduler {cfg.scheduler}; "
                      f"expected keys from {sorted(allowed) or 'none'}")
    for k, v in cfg.scheduler_kwargs.items():
        _check(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0,
               f"--scheduler-kwargs {k}={v!r} must be a positive number")
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
    """runs/<dataset>-<model>-<timestamp>, plug-in names made path-safe."""
    safe = lambda s: re.sub(r"[^A-Za-z0-9_.-]+", "_", s).strip("._") or "x"  # noqa: E731
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(now))
    return str(Path("runs") / f"{safe(cfg.dataset)}-{safe(cfg.model)}-{stamp}")


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
