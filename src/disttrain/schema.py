"""What a checkpoint's files and a model.json may contain, and how much a file may ask for.

A manifest proves only that files were not changed after it was written; whoever can write a checkpoint
can write a matching manifest. So every value is checked here before anything uses it (and before the run
directory is written), and the sizes a file may ask for are bounded: the same bounds apply when a run
starts (models.build_model, config.convert), so a run never writes what a reader would refuse.
Every failure is a UsageError naming the file and the value (docs/security.md).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from disttrain.errors import UsageError

MAX_PARAMETERS = 1_000_000_000  # 4 GB of fp32 weights; ResNet-50 has 25.6 M, ViT-L 304 M
MAX_INPUT_ELEMENTS = 1 << 26  # one sample's input values (67 M: a 4096x4096 RGB image is 50 M)
MAX_IMAGE_PIXELS = 1 << 26  # an image file's width x height (below PIL's 89 M decompression-bomb limit)
MAX_OUTPUTS = 1_000_000  # classes, or target values per sample
MAX_DIMS = 8
TASKS = ("classification", "regression")
MODEL_META_KEYS = {"model", "model_kwargs", "dataset", "loss", "spec", "channels_last"}
SPEC_KEYS = {"task", "input_shape", "num_outputs", "target_shape", "classes", "mean", "std", "preprocess", "vocab"}
# Position fields (train.Position): which must be there, and their types
POSITION_INTS = ("epoch", "window", "step", "epoch_count", "nonfinite_skips", "resumes", "checkpoints",
                 "metrics_lines")
POSITION_FLOATS = ("epoch_loss", "epoch_train_s", "elapsed_s", "last_lr")
POSITION_REQUIRED = ("epoch", "window", "step", "metrics_lines")


def _fail(what: str, msg: str) -> UsageError:
    return UsageError(f"{what}: {msg}")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _int_list(v: Any, lo: int = 1) -> bool:
    return isinstance(v, list) and len(v) <= MAX_DIMS and all(_is_int(x) and x >= lo for x in v)


# --------------------------------------------------------------------------- model.json and the data spec


def check_shape(input_shape: list[int], num_outputs: int, what: str) -> None:
    """Bounds on what a model may be asked to take and give (the writer and every reader use these)."""
    if not _int_list(input_shape) or not input_shape:
        raise _fail(what, f"input_shape {input_shape!r} must be a list of 1 to {MAX_DIMS} positive integers")
    if math.prod(input_shape) > MAX_INPUT_ELEMENTS:
        raise _fail(what, f"input_shape {input_shape} asks for {math.prod(input_shape):,} values per sample, more "
                          f"than the {MAX_INPUT_ELEMENTS:,} disttrain allows")
    if not _is_int(num_outputs) or not 1 <= num_outputs <= MAX_OUTPUTS:
        raise _fail(what, f"num_outputs {num_outputs!r} must be an integer in [1, {MAX_OUTPUTS:,}]")


def check_spec(spec: Any, what: str) -> None:
    if not isinstance(spec, dict):
        raise _fail(what, f"spec must be a mapping, got {type(spec).__name__}")
    extra, missing = set(spec) - SPEC_KEYS, {"task", "input_shape", "num_outputs"} - set(spec)
    if extra or missing:
        raise _fail(what, f"spec has unknown keys {sorted(extra)} / lacks {sorted(missing)}")
    if spec["task"] not in TASKS:
        raise _fail(what, f"spec task {spec['task']!r} must be one of {', '.join(TASKS)}")
    check_shape(spec["input_shape"], spec["num_outputs"], what)
    if not _int_list(spec.get("target_shape", []), lo=0):
        raise _fail(what, f"spec target_shape {spec.get('target_shape')!r} must be a list of integers")
    classes = spec.get("classes")
    if classes is not None and not (isinstance(classes, list) and len(classes) == spec["num_outputs"]
                                    and all(isinstance(c, str) and len(c) <= 200 for c in classes)):
        raise _fail(what, f"spec classes must be {spec['num_outputs']} names (strings)")
    for k in ("mean", "std"):
        v = spec.get(k)
        if v is not None and not (isinstance(v, list) and len(v) == spec["input_shape"][0]
                                  and all(_is_num(x) for x in v) and (k == "mean" or all(x > 0 for x in v))):
            raise _fail(what, f"spec {k} {v!r} must be one finite number per channel{' (> 0)' if k == 'std' else ''}")
    vocab = spec.get("vocab")  # text datasets: one string (a character) per token id
    if vocab is not None and not (isinstance(vocab, list) and len(vocab) == spec["num_outputs"]
                                  and all(isinstance(c, str) and 0 < len(c) <= 8 for c in vocab)):
        raise _fail(what, f"spec vocab must be {spec['num_outputs']} strings of 1-8 characters")
    check_preprocess(spec, what)


def check_preprocess(spec: dict[str, Any], what: str) -> None:
    """spec.preprocess (data/images.py, data/tables.py): None, or exactly the transform that fits the spec's
    input shape; a column's categories are bounded like the writer's (tables.MAX_CATEGORIES)."""
    from disttrain.data.tables import MAX_CATEGORIES

    pre = spec.get("preprocess")
    if pre is None:
        return
    bad = lambda msg: _fail(what, f"spec preprocess {msg}")  # noqa: E731
    if not isinstance(pre, dict) or pre.get("kind") not in ("image", "table"):
        raise bad("must be a mapping with kind image or table")
    shape = spec["input_shape"]
    if pre["kind"] == "image":
        if not (set(pre) <= {"kind", "channels", "size", "column", "target"} and pre.get("channels") in (1, 3)
                and _int_list(pre.get("size")) and len(pre["size"]) == 2 and [pre["channels"], *pre["size"]] == shape
                and all(isinstance(pre.get(k, ""), str) for k in ("column", "target"))):
            raise bad(f"of an image model must be channels 1 or 3 and size [H, W] matching input_shape {shape}")
        return
    cols = pre.get("columns")
    if not (set(pre) <= {"kind", "target", "task", "columns", "classes"} and isinstance(pre.get("target"), str)
            and pre.get("task") == spec["task"] and isinstance(cols, list) and cols and len(shape) == 1):
        raise bad("of a table model must name its target, task and columns")
    width = 0
    for c in cols:
        ok = isinstance(c, dict) and isinstance(c.get("name"), str)
        if ok and c.get("type") == "numeric":
            ok = set(c) == {"name", "type", "mean", "std"} and _is_num(c["mean"]) and _is_num(c["std"]) and c["std"] > 0
            width += 1
        elif ok and c.get("type") == "categorical":
            cats = c.get("categories")
            ok = (set(c) == {"name", "type", "categories"} and isinstance(cats, list) and len(cats) <= MAX_CATEGORIES
                  and all(isinstance(v, str) and len(v) <= 1000 for v in cats))
            width += len(cats) if ok else 0
        else:
            ok = False
        if not ok:
            raise bad(f"column {str(c)[:80]} must be numeric (mean, std > 0) or categorical (a list of names)")
    if width != shape[0]:
        raise bad(f"columns encode {width} features but input_shape is {shape}")
    if spec["task"] == "classification" and pre.get("classes") != spec.get("classes"):
        raise bad("classes must be the spec's classes")


def check_model_meta(meta: Any, what: str) -> dict[str, Any]:
    """model.json: exactly its keys, of their types, a spec within bounds."""
    if not isinstance(meta, dict):
        raise _fail(what, f"must be a JSON object, got {type(meta).__name__}")
    extra, missing = set(meta) - MODEL_META_KEYS, {"model", "spec"} - set(meta)
    if extra or missing:
        raise _fail(what, f"unknown keys {sorted(extra)} / missing keys {sorted(missing)}; expected "
                          f"{sorted(MODEL_META_KEYS)}")
    if not isinstance(meta["model"], str) or not meta["model"]:
        raise _fail(what, f"model {meta['model']!r} must be a name")
    if not isinstance(meta.get("model_kwargs", {}), dict):
        raise _fail(what, "model_kwargs must be a JSON object")
    for k in ("dataset", "loss"):
        if not isinstance(meta.get(k, ""), (str, type(None))):
            raise _fail(what, f"{k} must be a string")
    if not isinstance(meta.get("channels_last", False), bool):
        raise _fail(what, "channels_last must be true or false")
    check_spec(meta["spec"], what)
    return meta


# --------------------------------------------------------------------------- checkpoint files


def check_checkpoint(files: dict[str, Any], where: Path) -> None:
    """Types and ranges of a checkpoint's JSON files and tensor names (sizes against the model: fits())."""
    from disttrain.config import FIELDS, convert

    def what(name: str) -> str:
        return f"checkpoint {where / name}"

    meta = files.get("model.json")
    check_model_meta(meta, what("model.json"))
    st = files.get("state.json")
    w = what("state.json")
    if not isinstance(st, dict):
        raise _fail(w, f"must be a JSON object, got {type(st).__name__}")
    for k in ("position", "config", "world_size", "global_batch"):
        if k not in st:
            raise _fail(w, f"lacks {k!r}")
    for k in ("world_size", "global_batch"):
        if not _is_int(st[k]) or not 1 <= st[k] <= 1 << 30:
            raise _fail(w, f"{k} {st[k]!r} must be a positive integer")
    pos = st["position"]
    if not isinstance(pos, dict):
        raise _fail(w, "position must be a JSON object")
    for k in POSITION_REQUIRED:
        if k not in pos:
            raise _fail(w, f"position lacks {k!r}")
    for k in POSITION_INTS:
        if k in pos and not (_is_int(pos[k]) and 0 <= pos[k] < 1 << 62):
            raise _fail(w, f"position {k} {pos[k]!r} must be a non-negative integer")
    for k in POSITION_FLOATS:
        if k in pos and not _is_num(pos[k]):
            raise _fail(w, f"position {k} {pos[k]!r} must be a finite number")
    best = pos.get("best")
    if best is not None and not (isinstance(best, dict) and isinstance(best.get("metric"), str)
                                 and _is_num(best.get("value")) and _is_int(best.get("step"))):
        raise _fail(w, f"position best {best!r} must be null or {{metric, value, step, epoch}}")
    cfg = st["config"]
    if not isinstance(cfg, dict):
        raise _fail(w, f"config must be a JSON object, got {type(cfg).__name__}")
    unknown = [k for k in cfg if k not in FIELDS]
    if unknown:
        raise _fail(w, f"config has unknown keys {unknown[:5]}")
    for k, v in cfg.items():
        convert(k, v, f"checkpoint {where / 'state.json'} config")  # UsageError naming key and value
    opt = files.get("optimizer.json")
    w = what("optimizer.json")
    if opt is not None:
        if not (isinstance(opt, dict) and isinstance(opt.get("param_groups"), list) and isinstance(opt.get("scalars"), dict)):
            raise _fail(w, "must be {param_groups: [...], scalars: {...}}")
        # a sharded checkpoint (parallel.FullyShardedDataParallel) names parameters ("keyed_by": "fqn"),
        # an unsharded one numbers them (their position in the optimizer)
        by_name = opt.get("keyed_by") == "fqn"
        if opt.get("keyed_by", "fqn") != "fqn":
            raise _fail(w, f"keyed_by {opt['keyed_by']!r} must be \"fqn\" or absent")
        ok_id = (lambda p: isinstance(p, str) and 0 < len(p) <= 1000) if by_name else (lambda p: _is_int(p) and p >= 0)
        for g in opt["param_groups"]:
            if not (isinstance(g, dict) and isinstance(g.get("params"), list) and all(ok_id(p) for p in g["params"])):
                raise _fail(w, "every param group needs params: a list of parameter "
                               + ("names" if by_name else "indices"))
        for pid, vals in opt["scalars"].items():
            if not ((by_name or pid.isdigit()) and isinstance(vals, dict)
                    and all(_is_num(v) or isinstance(v, bool) for v in vals.values())):
                raise _fail(w, f"scalars {pid!r} must map a parameter {'name' if by_name else 'index'} to numbers")
    tied = files.get("sharding.json")
    if tied is not None and not (isinstance(tied, dict) and isinstance(tied.get("tied"), dict)
                                 and all(isinstance(k, str) and isinstance(v, str) for k, v in tied["tied"].items())
                                 and set(tied) <= {"tied", "ema"} and isinstance(tied.get("ema", False), bool)):
        raise _fail(what("sharding.json"), "must be {tied: {name: name}, ema: true/false}")
    ten = files.get("optimizer.safetensors")
    if ten is not None:
        bad = [k for k in ten if not (k.partition(".")[0].isdigit() and k.partition(".")[2])]
        if bad:
            raise _fail(what("optimizer.safetensors"), f"tensor names {bad[:3]} are not <param index>.<name>")
    sch = files.get("scheduler.json")
    if sch is not None and not isinstance(sch, dict):
        raise _fail(what("scheduler.json"), f"must be a JSON object, got {type(sch).__name__}")
    rng = files.get("rng.safetensors")
    if rng is not None:
        check_rng(rng, st["world_size"], what("rng.safetensors"))


def _rng_sizes() -> dict[str, int]:
    from disttrain.checkpoint import rng_state

    return {k: v.numel() for k, v in rng_state().items() if k != "cuda"}


def check_rng(rng: dict[str, torch.Tensor], world_size: int, what: str) -> None:
    sizes = _rng_sizes()
    for r in range(world_size):
        for part, n in sizes.items():
            t = rng.get(f"rank{r}.{part}")
            if t is None or t.dtype != torch.int64 or t.ndim != 1 or t.numel() != n:
                raise _fail(what, f"rank{r}.{part} must be {n} int64 values, got "
                                  f"{'nothing' if t is None else f'{t.numel()} {t.dtype}'}")
        cuda = rng.get(f"rank{r}.cuda")
        if cuda is None or cuda.ndim != 1 or cuda.dtype != torch.int64:
            raise _fail(what, f"rank{r}.cuda must be int64 values")
    if bool(torch.cat([rng[f"rank{r}.torch"] for r in range(world_size)]).lt(0).any()) or \
            bool(torch.cat([rng[f"rank{r}.torch"] for r in range(world_size)]).gt(255).any()):
        raise _fail(what, "torch generator state must hold bytes (0..255)")


# --------------------------------------------------------------------------- against the live objects


def check_weights_fit(model: torch.nn.Module, sd: dict[str, torch.Tensor], what: str) -> None:
    """The weights have exactly the model's names and shapes (else UsageError, before loading)."""
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(sd)), sorted(set(sd) - set(own))
    bad_shape = [f"{k} {list(sd[k].shape)} (model {list(own[k].shape)})" for k in own
                 if k in sd and own[k].shape != sd[k].shape]
    if missing or unexpected or bad_shape:
        raise UsageError(f"{what}: weights do not fit --model (missing {missing[:3]}, unexpected {unexpected[:3]}, "
                         f"shape mismatch {bad_shape[:3]})")


def check_resume_fits(saved: dict[str, Any], model: torch.nn.Module, optimizer: Any, scheduler: Any,
                      where: Path) -> None:
    """Before anything is written: the checkpoint's weights, optimizer state and scheduler state fit the
    model, optimizer and scheduler this run built (names, counts, shapes, types). A sharded checkpoint
    (--sharding fsdp) holds per-rank shards, whose shapes DCP checks as it loads them: here only its
    parameter names and groups are checked."""
    from disttrain.checkpoint import SHARDS

    w = f"checkpoint {where / 'optimizer.json'}"
    live = optimizer.state_dict()
    meta = saved["optimizer.json"]
    if [len(g["params"]) for g in meta["param_groups"]] != [len(g["params"]) for g in live["param_groups"]]:
        raise _fail(w, "parameter groups do not match the model's parameters")
    if SHARDS in saved:
        names = {n for n, _ in model.named_parameters(remove_duplicate=False)}
        unknown = [p for g in meta["param_groups"] for p in g["params"] if p not in names]
        unknown += [p for p in meta["scalars"] if p not in names]
        if unknown:
            raise _fail(w, f"state for parameters {unknown[:3]} that the model does not have")
    else:
        _check_full_fits(saved, model, optimizer, where)
    _check_scheduler_fits(saved, scheduler, where)


def _check_full_fits(saved: dict[str, Any], model: torch.nn.Module, optimizer: Any, where: Path) -> None:
    check_weights_fit(model, saved["model.safetensors"], f"checkpoint {where}")
    w = f"checkpoint {where / 'optimizer.json'}"
    meta, tensors = saved["optimizer.json"], saved["optimizer.safetensors"]
    params = [p for g in optimizer.param_groups for p in g["params"]]
    for key, t in tensors.items():
        pid, _, name = key.partition(".")
        i = int(pid)
        if i >= len(params):
            raise _fail(w, f"state for parameter {i}, but the model has {len(params)}")
        if t.numel() > 1 and t.shape != params[i].shape:
            raise _fail(w, f"{key} has shape {list(t.shape)}, the parameter {list(params[i].shape)}")
    for pid in meta["scalars"]:
        if int(pid) >= len(params):
            raise _fail(w, f"state for parameter {pid}, but the model has {len(params)}")


def _check_scheduler_fits(saved: dict[str, Any], scheduler: Any, where: Path) -> None:
    w = f"checkpoint {where / 'scheduler.json'}"
    sch, own = saved["scheduler.json"], scheduler.state_dict()
    if set(sch) != set(own):
        raise _fail(w, f"keys {sorted(sch)} differ from the scheduler's {sorted(own)}")
    for k, v in own.items():
        s = sch[k]
        same = (s is None and v is None) or (isinstance(v, bool) and isinstance(s, bool)) or \
               (_is_num(v) and _is_num(s) and (not _is_int(v) or _is_int(s))) or \
               (isinstance(v, list) and isinstance(s, list) and len(v) == len(s) and all(x is None or _is_num(x) for x in s))
        if not same:
            raise _fail(w, f"{k} {s!r} does not fit the scheduler (expects {type(v).__name__})")
