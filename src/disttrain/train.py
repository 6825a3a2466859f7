"""python -m disttrain.train: the plain PyTorch loop, under Accelerate, on any number of processes.

Read `train()` first: it is the loop of the PyTorch tutorials (train mode, zero_grad, forward, loss,
backward, step, scheduler step; evaluation in eval mode under inference_mode). The few marked lines
around it make it exact on any world size (per-sample loss weighting, one all-reduce per optimizer step),
resumable (checkpoints, a stop flag agreed by all ranks) and cheap (no host sync inside a step).
`setup()` builds everything the loop needs; `main()` turns errors into one line and an exit code.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.distributed.elastic.multiprocessing.errors import record

from disttrain import checkpoint as ckpt
from disttrain import schema
from disttrain.config import Config, config_diff, default_output_dir, parse_config, to_yaml
from disttrain.data import Data, load_data
from disttrain.distributed import (UNUSED_HINT, StopSignal, Sync, broadcast_str, contention_watch,
                                   find_unused_parameters, is_launched, make_accelerator, resolve_precision, say,
                                   configure_cpu, shutdown, start_parent_watchdog, topology)
from disttrain.errors import (EXIT_FAILURE, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, TrainingError, UsageError,
                              cut, one_line)
from disttrain.ema import EMA, averaged
from disttrain.evaluate import evaluate
from disttrain.launch import report_refusal
from disttrain.metrics import MetricsLog, epoch_line, step_line
from disttrain.models import build_model, check_batch, is_conv_net, num_parameters
from disttrain.optim import build_loss, build_optimizer, build_scheduler, check_schedule, loss_name
from disttrain.parallel import make_parallel, resolve_sharding
from disttrain.recovery import Progress, SaveClock, restart_line, restart_record
from disttrain.state import (Position, checkpoint_files, load_model_weights, position_dict, restore, resume_config,
                             seed_rank_streams, shard_files)
from disttrain.summary import write_summary


STOP_EVERY = 4  # steps between stop-flag agreements in multi-process runs
REFUSAL_GRACE_S = 5.0  # other ranks wait this long before exiting 2, so rank 0 prints the refusal first


class Interrupted(Exception):
    """A stop signal was agreed on; a checkpoint has been written."""


@dataclass
class Run:
    """Everything the loop needs, built by setup()."""

    cfg: Config
    acc: Any
    model: Any
    optimizer: Any
    scheduler: Any
    loss_fn: Any
    data: Data
    rundir: ckpt.RunDir
    metrics: MetricsLog
    sync: Sync
    stop: StopSignal
    pos: Position
    total_steps: int
    model_meta: dict[str, Any]
    progress: Progress  # the last finished step, for the launcher's restarts (main process)
    save_clock: SaveClock  # --save-every-minutes
    par: Any = None  # parallel.DataParallel or FullyShardedDataParallel: wrapping, gradient sync, state
    attempt_start: float = field(default_factory=time.time)
    save_s: float = 0.0
    bar: Any = None  # the epoch's progress bar, closed before a message that ends the run
    ema: EMA | None = None  # --ema-decay

    @property
    def epochs(self) -> int:
        """Epochs this run will reach: --max-steps may end it inside an earlier one (console lines)."""
        return min(self.cfg.epochs, -(-self.total_steps // max(1, self.data.steps_per_epoch())))


class Meter:
    """Training-loss sums kept on the device, read only at log steps, saves and epoch ends."""

    def __init__(self, device: torch.device, wait_s: float, carried: dict[str, float] | None = None,
                 main: bool = True):
        zero = lambda: torch.zeros((), dtype=torch.float64, device=device)  # noqa: E731
        self.epoch_sum, self.interval_sum = zero(), zero()
        self.finite_adds = torch.zeros((), dtype=torch.int64, device=device)  # adds that left the sum finite
        self.n_adds, self.step0 = 0, 0  # host ints: adds so far, the step before the first add
        self.n_epoch = self.n_interval = self.steps_interval = 0  # host ints: batch sizes are known
        self.t_epoch: float | None = time.perf_counter()  # None once the epoch's time is folded in
        self.t_interval, self.wait_start = self.t_epoch, wait_s
        if carried:  # resumed mid-interval: the first step line covers the same steps as without the resume
            self.steps_interval = int(carried["steps"])
            self.t_interval -= carried["s"]
            if main:  # (sums are read over all ranks: the saved all-rank sums live on the main process)
                self.interval_sum += carried["loss"]
                self.n_interval = int(carried["count"])

    def train_s(self, save_s: float) -> float:
        """Seconds of this epoch's training so far (checkpoint writes excluded), 0 once folded in."""
        return 0.0 if self.t_epoch is None else time.perf_counter() - self.t_epoch - save_s

    def carried(self, acc: Any) -> dict[str, float]:
        """The open step-line interval, over all ranks, for a checkpoint (a collective)."""
        loss, n, _ = self.read(acc, "interval")
        return {"loss": loss, "count": n, "steps": self.steps_interval, "s": time.perf_counter() - self.t_interval}

    def add(self, window_sum: torch.Tensor, n: int, step: int) -> None:
        self.epoch_sum += window_sum
        self.interval_sum += window_sum
        self.n_epoch, self.n_interval, self.steps_interval = self.n_epoch + n, self.n_interval + n, self.steps_interval + 1
        # remember the first step whose loss was not finite, without asking the host: a non-finite value
        # stays non-finite in a sum, so counting the adds after which the sum was finite (2 small ops) is enough
        self.step0 = step - 1 if self.n_adds == 0 else self.step0
        self.n_adds += 1
        self.finite_adds += torch.isfinite(self.epoch_sum)

    @property
    def first_bad(self) -> torch.Tensor:
        """The first step (of this meter) whose loss was not finite, or -1; a device tensor."""
        return torch.where(self.finite_adds < self.n_adds, self.finite_adds + (self.step0 + 1), -1)

    def read(self, acc: Any, which: str) -> tuple[float, int, int]:
        """(loss sum, samples, first non-finite step or -1) over all ranks, for "epoch" or "interval"."""
        total, n = (self.epoch_sum, self.n_epoch) if which == "epoch" else (self.interval_sum, self.n_interval)
        dev = total.device
        sums = acc.reduce(torch.stack([total, torch.tensor(float(n), dtype=torch.float64, device=dev)]), "sum")
        bad = acc.reduce(self.first_bad.clone(), "max") if acc.num_processes > 1 else self.first_bad
        return float(sums[0]), int(sums[1]), int(bad)


def train(r: Run) -> None:
    """The loop."""
    cfg, acc, model, optimizer, data, pos = r.cfg, r.acc, r.model, r.optimizer, r.data, r.pos
    steps_per_epoch = data.steps_per_epoch()
    # Accelerate's optimizer wrapper looks up optional packages on the file system at every step: step the
    # wrapped optimizer itself unless the wrapper has real work (an fp16 grad scaler, XLA)
    opt = optimizer.optimizer if (hasattr(optimizer, "optimizer") and getattr(acc, "scaler", None) is None
                                  and acc.distributed_type != "XLA") else optimizer
    while pos.epoch < cfg.epochs and pos.step < r.total_steps and not pos.early_stopped:
        meter, r.save_s = Meter(acc.device, data.wait_s, pos.interval, acc.is_main_process), 0.0
        pos.interval = None
        model.train()
        bar = r.bar = _progress_bar(r, steps_per_epoch)
        for window in data.train_windows(pos.epoch, start=pos.window):
            opt.zero_grad(set_to_none=True)
            window_loss: Any = None
            for i, (x, y) in enumerate(window):
                # --- reduce gradients once per optimizer step: no sync on earlier micro-batches (DDP or FSDP);
                #     window.mode: a rank with no sample left in the epoch's last step joins with weight 0
                with r.par.grad_sync(model, i == len(window) - 1), window.mode(model):
                    losses = r.loss_fn(model(x), y)  # per-sample losses, shape [batch]
                    # --- sum x processes / samples in the step (all ranks): after DDP's average over ranks
                    #     each sample weighs the same on any world size, micro-batching or partial last step
                    acc.backward(losses.sum() * window.weight)
                s = losses.detach().sum(dtype=torch.float64) * (not window.placeholder)
                window_loss = s if window_loss is None else window_loss + s
            # --on-nonfinite skip: no update, but the step slot (schedule, data position) is used up
            skipped = cfg.on_nonfinite == "skip" and _skip_nonfinite(r, window_loss)
            if not skipped:
                if cfg.max_grad_norm:
                    r.par.clip(model, cfg.max_grad_norm)  # the full model's norm, sharded or not
                pos.last_lr = opt.param_groups[0]["lr"]
                opt.step()
                if r.ema is not None:  # --ema-decay: fold the new weights into the average
                    r.ema.update()
            r.scheduler.step()
            pos.step, pos.window = pos.step + 1, pos.window + 1
            r.progress.mark(pos.step)
            meter.add(torch.zeros_like(window_loss) if skipped else window_loss,
                      0 if skipped else window.n_samples, pos.step)
            if bar is not None:
                bar.update(1)
            # --- bookkeeping at step boundaries: logs, agreed stop, periodic checkpoints
            if pos.step % cfg.log_every == 0:
                _log_step(r, meter, steps_per_epoch)
            # agreed stop and time-based checkpoint: every step on one process; across processes a
            # pipelined poll every STOP_EVERY steps (never waits on a gloo round trip), so all ranks stop or
            # save after the same step, at most 2 * STOP_EVERY - 1 steps after the signal or the deadline
            stop = save_due = False
            if r.sync.n == 1 or pos.step % STOP_EVERY == 0:
                stop, save_due = r.sync.poll(r.stop.received is not None, r.save_clock.due())
            if stop:
                _save(r, meter)
                raise Interrupted(r.stop.received or "a signal on another rank")
            last = pos.window == steps_per_epoch or pos.step >= r.total_steps
            if cfg.eval_every_steps and pos.step % cfg.eval_every_steps == 0 and not last:
                _eval_line(r, meter)
            if (save_due or cfg.save_every_steps and pos.step % cfg.save_every_steps == 0) and not last:
                _save(r, meter)
            if pos.step >= r.total_steps:
                break
        if bar is not None:
            bar.close()
        pos.epoch_train_s += meter.train_s(r.save_s)
        meter.t_epoch = None
        _end_epoch(r, meter)
    r.sync.drain()


def _end_epoch(r: Run, meter: Meter) -> None:
    """Evaluate, write the epoch line, checkpoint (and best/)."""
    pos = r.pos
    s, n, bad = meter.read(r.acc, "epoch")
    _fail_if_bad(r, bad)
    pos.epoch_loss, pos.epoch_count = pos.epoch_loss + s, pos.epoch_count + n
    meter.epoch_sum.zero_()
    meter.n_epoch = 0
    rec: dict[str, Any] = {"kind": "epoch", "epoch": pos.epoch + 1, "step": pos.step,
                           "train_loss": pos.epoch_loss / max(1, pos.epoch_count)}
    for split in ("val", "eval"):
        if (r.data.val if split == "val" else r.data.test) is not None:
            rec.update(_evaluate(r, "val" if split == "val" else "test", split))
    rec["lr"] = pos.last_lr
    rec["samples_per_sec"] = pos.epoch_count / max(pos.epoch_train_s, 1e-9)
    if r.data.spec.vocab:
        rec["tokens_per_sec"] = rec["samples_per_sec"] * r.data.spec.input_shape[0]
    rec["elapsed_s"] = _elapsed(r)
    r.metrics.write(rec)
    say(r.acc, epoch_line(rec, r.epochs))
    if pos.window >= r.data.steps_per_epoch():  # a run cut short by --max-steps stays inside its epoch,
        pos.epoch, pos.window = pos.epoch + 1, 0  # so a resume with a longer run continues it
        pos.epoch_loss, pos.epoch_count, pos.epoch_train_s = 0.0, 0, 0.0
    key = "val_loss" if "val_loss" in rec else "eval_loss" if "eval_loss" in rec else "train_loss"
    improved = pos.best is None or rec[key] < pos.best["value"]
    if improved:
        pos.best = {"metric": key, "value": rec[key], "step": pos.step, "epoch": rec["epoch"]}
    _early_stop(r, improved)
    path = _save(r, meter)
    if improved and r.acc.is_main_process:
        ckpt.save_best(r.rundir, path, pos.best)


def _evaluate(r: Run, split: str, prefix: str) -> dict[str, Any]:
    """Metrics of the evaluated weights: the average under --ema-decay (swapped in before FSDP gathers
    them), whole on every rank (ranks may run different numbers of batches: no collective inside)."""
    with averaged(r.ema), r.par.unsharded(r.model):
        return evaluate(r.model, r.data, r.loss_fn, r.acc, split, prefix=prefix)


def _early_stop(r: Run, improved: bool) -> None:
    """--early-stop-patience N: after N epoch ends in a row without a better selection metric the loop ends
    (the run completes; best/ holds the best checkpoint). The count is in the checkpoint: a resume goes on
    counting, and a resume of a stopped run stops at once."""
    pos, patience = r.pos, r.cfg.early_stop_patience
    pos.epochs_since_best = 0 if improved else pos.epochs_since_best + 1
    if patience and pos.epochs_since_best >= patience:
        pos.early_stopped = True
        r.metrics.write({"kind": "early_stop", "step": pos.step, "epoch": pos.epoch, "best": pos.best})
        say(r.acc, f"early stop: no better {pos.best['metric']} for {patience} epoch(s); best "
                   f"{pos.best['value']:.4f} at epoch {pos.best['epoch']} (step {pos.best['step']}) is in "
                   f"{r.rundir.best}")


def _eval_line(r: Run, meter: Meter) -> None:
    """--eval-every-steps: evaluate the validation set inside an epoch (a "kind": "eval" line); its time is
    left out of the throughput figures. Selection of the best checkpoint stays at epoch ends."""
    if r.data.val is None:
        return
    t = time.perf_counter()
    rec: dict[str, Any] = {"kind": "eval", "epoch": r.pos.epoch + 1, "step": r.pos.step}
    rec.update(_evaluate(r, "val", "val"))
    rec["elapsed_s"] = _elapsed(r)
    r.metrics.write(rec)
    say(r.acc, f"step {r.pos.step}: " + ", ".join(f"{k} {v:.4f}" for k, v in rec.items() if k.startswith("val_")))
    dt = time.perf_counter() - t
    r.save_s += dt
    meter.t_interval += dt


def _log_step(r: Run, meter: Meter, steps_per_epoch: int) -> None:
    s, n, bad = meter.read(r.acc, "interval")
    _fail_if_bad(r, bad)
    now = time.perf_counter()
    dt = max(now - meter.t_interval, 1e-9)
    wait = min(1.0, (r.data.wait_s - meter.wait_start) / dt)
    rec = {"kind": "step", "epoch": r.pos.epoch + 1, "step": r.pos.step, "train_loss": s / max(1, n),
           "lr": r.pos.last_lr, "samples_per_sec": n / dt, "step_time_s": dt / max(1, meter.steps_interval),
           "data_wait_fraction": wait}
    if r.data.spec.vocab:  # text: windows of block_size tokens
        rec["tokens_per_sec"] = rec["samples_per_sec"] * r.data.spec.input_shape[0]
    meter.interval_sum.zero_()
    meter.n_interval = meter.steps_interval = 0
    meter.t_interval, meter.wait_start = now, r.data.wait_s
    r.metrics.write(rec)
    if not _bar_active(r):
        say(r.acc, step_line(rec["epoch"], r.epochs, r.pos.window, steps_per_epoch, rec["train_loss"],
                              rec["lr"], rec["samples_per_sec"], wait, rec.get("tokens_per_sec")))


def _skip_nonfinite(r: Run, window_loss: torch.Tensor) -> bool:
    """--on-nonfinite skip: drop this step's update if any rank's loss is not finite (a host sync per step)."""
    if not r.sync.any(not bool(torch.isfinite(window_loss))):
        return False
    r.optimizer.zero_grad(set_to_none=True)
    r.pos.nonfinite_skips += 1
    say(r.acc, f"disttrain: warning: non-finite loss at step {r.pos.step + 1}, update skipped "
                f"({r.pos.nonfinite_skips}/{r.cfg.max_nonfinite_skips})")
    if r.pos.nonfinite_skips >= r.cfg.max_nonfinite_skips:
        raise TrainingError(f"non-finite loss: {r.pos.nonfinite_skips} steps skipped, giving up at step "
                            f"{r.pos.step + 1}; the last good checkpoint is kept")
    return True


def _fail_if_bad(r: Run, first_bad: int) -> None:
    if first_bad >= 0:
        raise TrainingError(f"non-finite loss at step {first_bad} (epoch {r.pos.epoch + 1}); stopping. The last "
                            "good checkpoint is kept; lower --lr, set --max-grad-norm, or --on-nonfinite skip")


def _save(r: Run, meter: Meter) -> ckpt.Path:
    """A checkpoint of the current position (a collective: every rank calls it)."""
    t = time.perf_counter()
    s, n, bad = meter.read(r.acc, "epoch")  # never save after a non-finite loss
    _fail_if_bad(r, bad)
    interval = meter.carried(r.acc) if r.pos.window > 0 else None  # (an epoch's end starts a new interval)
    if not r.par.params_finite(r.model):
        raise TrainingError(f"non-finite weights at step {r.pos.step}; not saving. The last good checkpoint is kept")
    rng = ckpt.gather_rng(r.acc)
    path = r.rundir.step_dir(r.pos.step)
    failed: TrainingError | None = None
    main = r.acc.is_main_process
    files = shard_files(r)  # FSDP: every rank writes its shards; else nothing on non-main ranks
    if main:
        r.pos.checkpoints += 1
        position = position_dict(r.pos, elapsed_s=_elapsed(r), metrics_lines=r.metrics.lines(),
                                 epoch_loss=r.pos.epoch_loss + s, epoch_count=r.pos.epoch_count + n,
                                 epoch_train_s=r.pos.epoch_train_s + meter.train_s(r.save_s), interval=interval)
        files = checkpoint_files(r, rng, position, files)
    if files:
        try:
            path = ckpt.save_checkpoint(r.rundir, r.pos.step, files, r.cfg.keep_last, main=main, agree=r.sync.any)
        except TrainingError as e:  # disk full / unwritable: every rank stops together, exit 1
            failed = e
    if r.sync.any(failed is not None):
        raise failed or TrainingError(f"the main process could not write checkpoint {path}; stopping")
    r.acc.wait_for_everyone()
    r.save_clock.reset()
    r.save_s += time.perf_counter() - t
    return path


def _elapsed(r: Run) -> float:
    return r.pos.elapsed_s + time.time() - r.attempt_start


def _progress_bar(r: Run, steps_per_epoch: int) -> Any:
    if not _bar_active(r):
        return None
    from tqdm import tqdm

    return tqdm(total=steps_per_epoch, initial=r.pos.window, desc=f"epoch {r.pos.epoch + 1}/{r.epochs}",
                unit="step", leave=False, dynamic_ncols=True)


def _bar_active(r: Run) -> bool:
    return r.cfg.progress and r.acc.is_main_process and sys.stderr.isatty()


# =========================================================================== set-up


def _resume_source(cfg: Config, rundir: ckpt.RunDir) -> ckpt.Path | None:
    """Which checkpoint to resume from, or None for a fresh start; refuses what would lose work."""
    _check_output_dir(cfg, rundir)
    if cfg.resume == "none":
        if rundir.has_history() and not cfg.overwrite:
            raise UsageError(f"--output-dir {rundir.path} already holds a run; use --resume auto to continue it "
                             "or --overwrite to replace it")
        return None
    if cfg.resume == "auto":
        good, bad = ckpt.find_latest(rundir)
        if good is None and bad:  # one line: the error names every bad checkpoint itself
            raise UsageError(f"--resume auto: every checkpoint in {rundir.checkpoints} is bad: {'; '.join(bad)}")
        for why in bad:
            print(f"disttrain: warning: skipping bad checkpoint: {why}", file=sys.stderr)
        return good
    return ckpt.resolve_checkpoint(cfg.resume)


def _check_output_dir(cfg: Config, rundir: ckpt.RunDir) -> None:
    """The output directory is new, empty, or a disttrain run (never a folder of the user's own files:
    config.yaml, status.json... would be replaced); --overwrite finds only what disttrain wrote; a
    checkpoint of another run is never resumed into a directory that holds a run (docs/security.md)."""
    entries = rundir.entries()
    if entries and not rundir.is_run():
        raise UsageError(f"--output-dir {rundir.path}: not empty and not a disttrain run (holds "
                         f"{', '.join(entries[:4])}{', ...' if len(entries) > 4 else ''}); choose a new or empty directory")
    if cfg.overwrite:
        foreign = rundir.foreign_entries()
        if foreign:
            raise UsageError(f"--overwrite: {rundir.path} holds files disttrain did not write ({', '.join(foreign[:4])}"
                             f"{', ...' if len(foreign) > 4 else ''}); move them away or choose another --output-dir")
    if cfg.resume not in ("auto", "none") and rundir.has_history():
        src = ckpt.Path(cfg.resume).resolve()
        home = next((p.parent for p in (src, *src.parents) if p.name == "checkpoints"), None)
        if home is None or home.resolve() != rundir.path.resolve():
            raise UsageError(f"--resume {cfg.resume}: the checkpoint belongs to another run, and --output-dir "
                             f"{rundir.path} already holds a run; resume into that checkpoint's own run directory "
                             "or a new one")


def _claim(acc: Any, rundir: ckpt.RunDir) -> None:
    """Lock first, then decide: the main process refuses links in the run directory and takes its lock
    (waiting for a killed run's orphaned workers to finish saving); every rank learns if that failed."""
    err: UsageError | None = None
    if acc.is_main_process:
        try:
            rundir.check_layout()
            rundir.lock()
        except UsageError as e:
            err = e
    if Sync(acc).any(err is not None):
        raise err or UsageError(f"--output-dir {rundir.path}: the main process could not lock it")


def _check_resume(cfg: Config, saved: dict[str, Any], world: int) -> None:
    diff = config_diff(saved["config"], cfg)
    if diff:
        detail = ", ".join(f"{k}: {saved['config'][k]!r} -> {getattr(cfg, k)!r}" for k in diff)
        raise UsageError(f"--resume: the checkpoint was made with different settings ({detail}); only run length, "
                         "logging and checkpoint cadence may change")
    gb = cfg.batch_size * world * cfg.grad_accum
    if gb != saved["global_batch"] and not cfg.allow_batch_change:
        raise UsageError(f"--resume: global batch {gb} (batch {cfg.batch_size} x {world} processes x grad-accum "
                         f"{cfg.grad_accum}) differs from the checkpoint's {saved['global_batch']}; pass "
                         "--allow-batch-change to accept a different data order")


def setup(cfg: Config, stop: StopSignal, started: float | None = None) -> Run | None:
    """Build the run; validate everything before the output directory is touched. None on --dry-run.
    `started`: when this attempt began (time.time(); elapsed_s counts start-up)."""
    started = time.time() if started is None else started
    cfg, resume_note = resume_config(cfg)  # --resume: the saved run's config, explicit flags changed
    cfg.mixed_precision, precision_why = resolve_precision(cfg)  # `auto` becomes what was chosen
    cfg.sharding = resolve_sharding(cfg)  # never silent DDP when the launch config asked for FSDP
    threads = configure_cpu()  # threads, allocator
    start_parent_watchdog()
    acc = make_accelerator(cfg, cfg.mixed_precision)
    if cfg.output_dir is None:  # one timestamp for all ranks
        cfg.output_dir = broadcast_str(acc, default_output_dir(cfg))
    rundir = ckpt.RunDir(cfg.output_dir)
    if resume_note:
        say(acc, resume_note)
    _claim(acc, rundir)  # (a killed run's orphaned workers may still be saving: never read under them)
    try:
        run = _setup_run(cfg, stop, acc, rundir, threads, started, precision_why)
    except BaseException:
        rundir.abandon()  # refused before anything was written: leave no lock file nor directory behind
        raise
    if run is None:
        rundir.abandon()
    return run


def _setup_run(cfg: Config, stop: StopSignal, acc: Any, rundir: ckpt.RunDir, threads: int,
               started: float, precision_why: str) -> Run | None:
    """setup() with the run directory locked."""
    source = _resume_source(cfg, rundir)
    saved = ckpt.load_checkpoint(source) if source is not None else None
    if saved is not None:
        _check_resume(cfg, saved["state.json"], acc.num_processes)
    torch.manual_seed(cfg.seed)  # same initial weights on every rank (DDP also broadcasts them)
    data = load_data(cfg, acc)
    model = build_model(cfg.model, cfg.model_kwargs, data.spec)
    name = loss_name(cfg, data.spec.task)
    loss_fn = build_loss(cfg, data.spec.task)
    par = make_parallel(cfg, acc, cfg.sharding, model)  # DDP or FSDP2 (parallel.py); refuses what cannot shard
    channels_last = cfg.channels_last and is_conv_net(model) and len(data.spec.input_shape) == 3
    if channels_last and not par.channels_last:
        channels_last = False
        say(acc, "disttrain: note: channels_last memory format is off under --sharding fsdp (FSDP2 shards "
                 "contiguous parameters only)")
    model.to(acc.device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        data.channels_last = True
    if cfg.sync_batchnorm and acc.num_processes > 1 and acc.device.type == "cpu":
        raise UsageError("--sync-batchnorm needs GPUs: PyTorch's SyncBatchNorm does not run on CPU (gloo); "
                         "batch-norm statistics stay per process")
    unused, channels_last = _preflight(acc, model, loss_fn, data, name, channels_last)
    find_unused_parameters(acc, unused, cfg.find_unused_parameters)
    seed_rank_streams(cfg.seed, acc.process_index)  # training draws (dropout) differ per rank from here on
    if cfg.init_from:
        load_model_weights(model, ckpt.load_weights(cfg.init_from)[0], f"--init-from {cfg.init_from}")
    total = data.steps_per_epoch() * cfg.epochs if cfg.max_steps is None else \
        min(cfg.max_steps, data.steps_per_epoch() * cfg.epochs)
    check_schedule(cfg, total)
    # refuses bad optimizer settings now and checks a resumed state against them; the optimizer that trains
    # is built after wrapping, on the wrapped (maybe sharded) parameters
    optimizer = build_optimizer(cfg, model)
    if saved is not None:  # everything in the checkpoint fits what this run built, before anything is written
        schema.check_resume_fits(saved, model, optimizer, build_scheduler(cfg, optimizer, total), source)
    del optimizer
    say(acc, f"{topology(acc, cfg, data.steps_per_epoch(), threads, unused, precision_why)}, {par.describe(model)}")
    meta = {"model": cfg.model, "model_kwargs": cfg.model_kwargs, "dataset": cfg.dataset,
            "loss": name, "spec": dataclasses.asdict(data.spec), "channels_last": channels_last}
    if cfg.dry_run:
        say(acc, f"dry run: {cfg.model} with {num_parameters(model):,} parameters, {len(data.train)} training "
                  f"samples, {total} optimizer steps ({data.steps_per_epoch()}/epoch, {cfg.epochs} epochs), "
                  f"loss {name}, output dir {rundir.path}, "
                  + (f"would resume from {source} at step {saved['state.json']['position']['step']}"
                     if saved is not None else "would start fresh") + " (nothing written)")
        return None
    previous = Progress.read(rundir.progress) if acc.is_main_process else None  # a failed attempt's last step
    # ---- from here on we write into the run directory
    if acc.is_main_process:
        rundir.claim()
        ckpt.clean_partial(rundir)
        if cfg.overwrite:
            rundir.clear()
        ckpt.write_atomic(rundir.config, to_yaml(cfg).encode())
    if cfg.sync_batchnorm and acc.num_processes > 1:  # (checked before anything was written, above)
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = par.wrap(model)  # DDP (Accelerate) or FSDP2, torch.compile'd if asked (parallel.py)
    optimizer = build_optimizer(cfg, model)  # on the wrapped (maybe sharded) parameters
    scheduler = build_scheduler(cfg, optimizer, total)
    optimizer = par.prepare_optimizer(optimizer)
    pos = Position()
    ema = EMA(par.unwrap(model), cfg.ema_decay) if cfg.ema_decay else None
    if saved is not None:
        pos = restore(saved, cfg, acc, par, model, optimizer, scheduler, source, ema)
    tracker = _tracker(cfg, acc, rundir, pos.step if saved is not None else 0)
    metrics = MetricsLog(rundir.metrics, acc.is_main_process, tracker)
    metrics.open(keep_lines=saved["state.json"]["position"]["metrics_lines"] if saved else 0,
                 source=_earlier_metrics(rundir, source))
    if saved is not None:
        metrics.write({"kind": "resume", "step": pos.step, "checkpoint": str(source)})
        say(acc, f"resumed from {source} at step {pos.step} (epoch {pos.epoch + 1}, {pos.window} steps into it)")
    # started again by `disttrain.launch --max-restarts` after a crash: say what it cost
    restart = restart_record(pos.step, previous) if acc.is_main_process else None
    if restart is not None:
        metrics.write(restart)
        say(acc, restart_line(restart))
    return Run(cfg, acc, model, optimizer, scheduler, loss_fn, data, rundir, metrics, Sync(acc), stop, pos,
               total, meta, Progress(rundir.progress, acc.is_main_process),
               SaveClock(cfg.save_every_minutes, acc.is_main_process), par=par, attempt_start=started, ema=ema)


def _earlier_metrics(rundir: ckpt.RunDir, source: ckpt.Path | None) -> ckpt.Path | None:
    """--resume PATH into another --output-dir: the metrics.jsonl of PATH's run, whose lines up to the
    checkpoint start this one (so it reads as one run); None when resuming in place."""
    if source is None or rundir.metrics.exists():
        return None
    run, _ = ckpt.run_dir_of(source)
    return ckpt.RunDir(run).metrics if run is not None and run.resolve() != rundir.path.resolve() else None


def _preflight(acc: Any, model: Any, loss_fn: Any, data: Data, loss: str,
               channels_last: bool) -> tuple[list[str], bool]:
    """One batch through the model before anything is written (models.check_batch): (unused parameters,
    channels_last still on). channels_last is our default, never the user's: a model it breaks (a `view` of
    a conv output) runs in the standard format instead, and a note says so."""
    x, y = next(iter(next(data.train_windows(0))))
    try:
        return check_batch(model, loss_fn, x, y, data.spec, loss), channels_last
    except UsageError as e:
        if not channels_last:
            raise
        model.to(memory_format=torch.contiguous_format)
        data.channels_last = False
        unused = check_batch(model, loss_fn, x.contiguous(), y, data.spec, loss)  # still failing: the model's error
        say(acc, f"disttrain: note: channels_last memory format turned off: the model fails with it "
                  f"({one_line(e)[:160]}); training in the standard format")
        return unused, False


def _tracker(cfg: Config, acc: Any, rundir: ckpt.RunDir, resume_step: int = 0) -> Any:
    if cfg.log_with != "tensorboard" or not acc.is_main_process:
        return None
    from accelerate.tracking import TensorBoardTracker

    # purge_step: on resume, TensorBoard hides events logged after the checkpoint (metrics.jsonl drops them too)
    acc.log_with = [TensorBoardTracker("", str(rundir.tensorboard), purge_step=resume_step + 1 if resume_step else None)]
    acc.init_trackers("", config={k: v for k, v in cfg.to_dict().items() if isinstance(v, (int, float, str, bool))})
    return acc


def finish(r: Run) -> None:
    """Export the final model and the summary (main process)."""
    # with --ema-decay the averaged weights (those evaluated) are the model
    tensors = r.par.full_state_dict(r.model) if r.ema is None else r.par.gathered(r.ema.state_dict())
    full = {}
    for name, tensor in tensors:  # FSDP: gathered one tensor at a time, on every rank
        if r.acc.is_main_process:
            full[name] = tensor
    if r.acc.is_main_process:
        ckpt.export_model(r.rundir, full, r.model_meta)
        say(r.acc, f"done: {r.pos.step} steps, model in {r.rundir.model}")
    write_summary(r)  # every rank (host names are gathered); the main process writes summary.json
    r.acc.wait_for_everyone()


def _close_bar(r: Run | None) -> None:
    """Clear the progress bar's line, so that the message that follows starts on a line of its own."""
    if r is not None and r.bar is not None:
        r.bar.close()
        r.bar = None


def _write_status(r: Run | None, state: str, code: int, reason: str, restartable: bool = False) -> None:
    """status.json (main process). `restartable`: whether `disttrain.launch --max-restarts` may start again."""
    if r is not None and r.acc.is_main_process and r.rundir.path.is_dir():
        try:
            ckpt.write_json(r.rundir.status, {"state": state, "exit_code": code, "step": r.pos.step,
                                              "reason": reason, "restartable": restartable, "time": time.time()})
        except OSError as e:  # e.g. the disk that stopped the run is still full: the exit code still tells
            print(f"disttrain: warning: cannot write {r.rundir.status}: {one_line(e)}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """Train; return the exit code (0 ok, 2 bad input, 75 stopped by a signal after a checkpoint, 1 failure)."""
    r: Run | None = None
    rank = int(os.environ.get("RANK", "0"))
    stop = StopSignal()
    try:
        started = time.time()
        cfg = parse_config(argv)
        r = setup(cfg, stop, started)
        if r is None:
            return EXIT_OK
        # stop: also around the export (a late signal must not kill the run before status.json)
        with stop, contention_watch(r.acc):
            train(r)
            finish(r)
            _write_status(r, "completed", EXIT_OK, "")
        return EXIT_OK
    except UsageError as e:
        if rank == 0 or not is_launched():
            print(f"disttrain: error: {cut(e)}", file=sys.stderr)
            report_refusal(f"disttrain: error: {cut(e)}")  # disttrain.launch prints it last, exit 2
        else:  # the same refusal reaches rank 0 too: leave first and torchrun's agent would kill rank 0
            time.sleep(REFUSAL_GRACE_S)  # before it printed the line (plain `accelerate launch`)
        return EXIT_USAGE
    except Interrupted as e:
        _close_bar(r)
        msg = f"stopped by {e} at step {r.pos.step if r else '?'}; checkpoint written, resume with --resume auto"
        _write_status(r, "interrupted", EXIT_INTERRUPTED, msg)
        if r is None or r.acc.is_main_process:
            print(f"disttrain: {msg}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except TrainingError as e:
        _close_bar(r)
        _write_status(r, "failed", EXIT_FAILURE, cut(e), e.restartable)
        print(f"disttrain: error{f' [rank {rank}]' if is_launched() else ''}: {cut(e)}", file=sys.stderr)
        return EXIT_FAILURE
    except RuntimeError as e:
        if UNUSED_HINT not in str(e):
            raise
        msg = (f"a parameter got no gradient at step {r.pos.step + 1 if r else '?'} although the pre-flight batch "
               "used it (a model that skips parameters on some steps); rerun with --find-unused-parameters")
        _close_bar(r)
        _write_status(r, "failed", EXIT_FAILURE, msg)
        print(f"disttrain: error{f' [rank {rank}]' if is_launched() else ''}: {msg}", file=sys.stderr)
        return EXIT_FAILURE
    except OSError as e:  # e.g. disk full while writing metrics: one line, exit 1
        _close_bar(r)
        _write_status(r, "failed", EXIT_FAILURE, cut(e))
        print(f"disttrain: error{f' [rank {rank}]' if is_launched() else ''}: I/O error: {cut(e)}",
              file=sys.stderr)
        return EXIT_FAILURE
    finally:
        if r is not None:
            release(r)


def release(r: Run) -> None:
    """Close what setup() opened (metrics, progress marker, trackers) and drop the run directory's lock;
    main() and in-process callers (benchmarks, tests) end every run with it."""
    r.metrics.close()
    r.progress.close()
    if r.cfg.log_with and r.acc.is_main_process:
        for t in r.acc.trackers:  # not end_training(): that also tears down the process group
            t.finish()
    r.rundir.unlock()


@record  # torchrun's agent: an uncaught exception goes to its error file, so the launcher can name the cause
def _entry() -> None:
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    if is_launched():  # gloo can abort a finished run at interpreter exit; leave without running atexit hooks
        shutdown()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    _entry()
