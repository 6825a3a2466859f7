"""What a checkpoint holds, assembled outside the loop: the position, the model, optimizer, scheduler,
grad scaler and every rank's RNG streams.

Two functions are the whole contract with train.py:

- `checkpoint_files(r, ...)` builds the `{file name: content}` mapping that `checkpoint.save_checkpoint`
  writes (tensors -> .safetensors, anything else -> .json);
- `restore(saved, ...)` puts a loaded checkpoint back into the wrapped model (DDP or FSDP2) and the prepared
  optimizer: model and optimizer through the parallel strategy (parallel.py: full or sharded state, any world
  size), then scheduler, RNG, position and grad scaler.

A new kind of state (an EMA of the weights) adds its file in `checkpoint_files` and its restore in
`restore`; the loop does not change. Only checkpoint.py knows how files are laid out
on disk; this module only knows what they mean.
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from disttrain import checkpoint as ckpt
from disttrain.config import Config, load_yaml, resumed_config
from disttrain.distributed import say
from disttrain.errors import UsageError

if TYPE_CHECKING:  # train.py imports this module; the type only
    from disttrain.train import Run


@dataclass
class Position:
    """Where the loop is; saved in every checkpoint (state.json "position") and restored on resume."""

    epoch: int = 0  # 0-based epoch in progress
    window: int = 0  # optimizer steps done in this epoch
    step: int = 0  # optimizer steps done in the run
    epoch_loss: float = 0.0  # sum of per-sample training losses so far this epoch, all ranks
    epoch_count: int = 0
    epoch_train_s: float = 0.0
    elapsed_s: float = 0.0  # wall time of earlier attempts, up to their last checkpoint
    best: dict[str, Any] | None = None
    nonfinite_skips: int = 0
    resumes: int = 0
    checkpoints: int = 0
    last_lr: float = 0.0
    epochs_since_best: int = 0  # --early-stop-patience: epoch ends in a row without a better selection metric
    early_stopped: bool = False
    interval: dict[str, float] | None = None  # the open step-line interval (all-rank loss sum, samples,
    #                                            steps, seconds) when saved mid-epoch; used once on resume

    @classmethod
    def from_saved(cls, p: dict[str, Any]) -> Position:
        """From a checkpoint's state.json "position" (keys it does not know are ignored)."""
        return cls(**{k: p[k] for k in cls.__dataclass_fields__ if k in p})


def seed_rank_streams(seed: int, rank: int, step: int = 0) -> None:
    """Seed this process's training streams (torch CPU and CUDA, numpy, Python `random`: dropout and any
    draw a model makes) from (seed, rank, step) through numpy's SeedSequence, so ranks draw different
    masks, each a function of the seed and its rank. Called after the model is built (initial weights come
    from `--seed` alone, the same on every rank); `step` is nonzero only when a resume on another world size
    cannot carry the saved streams over."""
    import numpy as np

    s = int(np.random.SeedSequence([seed % 2**63, rank, step]).generate_state(1, np.uint64)[0]) >> 1
    torch.manual_seed(s)
    random.seed(s)
    np.random.seed(s % 2**32)


def global_batch(cfg: Config, world: int) -> int:
    """Samples per optimizer step over all ranks: batch-size x processes x grad-accum."""
    return cfg.batch_size * world * cfg.grad_accum


# --------------------------------------------------------------------------- which run a resume continues


def resume_config(cfg: Config) -> tuple[Config, str | None]:
    """--resume continues a run as it was. `auto` continues --output-dir's run; PATH continues the run
    directory that holds PATH unless --output-dir names another. Either way the run's saved config is reused
    and only the keys given explicitly change (train refuses the ones a resume may not change). Returns the
    config and the one line saying what changed (None when there is no saved run to continue)."""
    if cfg.resume == "none":
        return cfg, None
    checkpoint = None
    if cfg.resume == "auto":
        run = Path(cfg.output_dir or ".")
    else:
        run, checkpoint = ckpt.run_dir_of(cfg.resume)
        if cfg.output_dir is None and run is not None:  # (an explicit --output-dir wins)
            cfg.output_dir = str(run)
    saved_file = ckpt.RunDir(run).config if run is not None and ckpt.RunDir(run).is_run() else None
    if saved_file is not None and saved_file.is_file():  # (a folder that is not a run: train refuses it)
        try:
            saved = load_yaml(str(saved_file))
        except UsageError as e:
            raise UsageError(f"--resume: the run's saved config is unusable ({e})") from None
        where = str(saved_file)
    else:
        saved = ckpt.saved_run_config(checkpoint) if checkpoint is not None else None
        where = f"{checkpoint}/state.json"
    if saved is None:
        return cfg, None
    new, changed = resumed_config(saved, cfg, where)
    return new, (f"resume: continuing {new.output_dir} with its saved config ({where}); "
                 + (f"changed: {', '.join(changed)}" if changed else "no setting changed"))


# --------------------------------------------------------------------------- save


def shard_files(r: Run) -> dict[str, Any]:
    """What every rank writes itself: its shards of model, optimizer and EMA under FSDP (r.par), else nothing."""
    return r.par.checkpoint_state(r.model, r.optimizer, r.ema) if r.par.sharded else {}


def checkpoint_files(r: Run, rng: dict[str, torch.Tensor], position: dict[str, Any],
                     shards: dict[str, Any]) -> dict[str, Any]:
    """The files of one checkpoint (main process). `rng` is every rank's RNG state (checkpoint.gather_rng, a
    collective done by all ranks before), `position` the Position as a dict with the loop's not-yet-folded
    sums added, `shards` this rank's shard_files(). Returns {file name: tensors dict or JSON-able object}."""
    files: dict[str, Any] = {
        **(shards or r.par.checkpoint_state(r.model, r.optimizer, r.ema)),  # model, optimizer, EMA: full or sharded
        "scheduler.json": r.scheduler.state_dict(),
        "rng.safetensors": rng,
        "model.json": r.model_meta,
        "state.json": {"position": position, "world_size": r.acc.num_processes,
                       "global_batch": global_batch(r.cfg, r.acc.num_processes),
                       "config": r.cfg.to_dict(), "torch": torch.__version__},
    }
    if getattr(r.acc, "scaler", None) is not None:
        files["scaler.json"] = r.acc.scaler.state_dict()
    return files


def position_dict(pos: Position, **override: Any) -> dict[str, Any]:
    """The Position as saved, with `override` applied (e.g. the loop's running sums folded in)."""
    return dataclasses.asdict(pos) | override


# --------------------------------------------------------------------------- restore


def restore(saved: dict[str, Any], cfg: Config, acc: Any, par: Any, model: torch.nn.Module, optimizer: Any,
            scheduler: Any, source: Any, ema: Any = None) -> Position:
    """Model and optimizer (through `par`, either layout, any world size), EMA weights, scheduler, grad
    scaler, this rank's RNG streams and the position, into the wrapped model and prepared optimizer."""
    state = saved["state.json"]
    pos = Position.from_saved(state["position"])
    pos.resumes += 1
    par.load_state(model, optimizer, saved, f"checkpoint {source}", ema)  # --ema-decay: the average too
    if "scaler.json" in saved and getattr(acc, "scaler", None) is not None:
        acc.scaler.load_state_dict(saved["scaler.json"])
    scheduler.load_state_dict(saved["scheduler.json"])
    gb = global_batch(cfg, acc.num_processes)
    if state["global_batch"] != gb:  # --allow-batch-change: continue from the sample count
        pos.window = pos.window * state["global_batch"] // gb
    rng = saved["rng.safetensors"]
    if state["world_size"] == acc.num_processes:
        ckpt.set_rng_state({k: rng[f"rank{acc.process_index}.{k}"] for k in ckpt.RNG_PARTS})
    else:  # other world size: per-rank streams cannot carry over; derive fresh ones
        say(acc, f"disttrain: note: world size {state['world_size']} -> {acc.num_processes}; "
                  "per-rank RNG streams (dropout) restart from the seed")
        seed_rank_streams(cfg.seed, acc.process_index, pos.step)
    return pos


def load_model_weights(model: torch.nn.Module, sd: dict[str, torch.Tensor], what: str) -> None:
    """Load `sd` into `model` exactly (UsageError naming `what` when the keys or shapes do not fit)."""
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(sd)), sorted(set(sd) - set(own))
    bad_shape = [k for k in own if k in sd and own[k].shape != sd[k].shape]
    if missing or unexpected or bad_shape:
        raise UsageError(f"{what}: weights do not fit --model (missing {missing[:3]}, unexpected {unexpected[:3]}, "
                         f"shape mismatch {bad_shape[:3]})")
    model.load_state_dict(sd)
