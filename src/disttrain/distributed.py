"""Processes, devices and signals: everything about running as one of many.

Accelerate traps handled here (see README): a CPU job must build `Accelerator(cpu=True)` or torchrun's
processes each train their own copy; if the environment says N processes were started but Accelerate
sees one, we stop instead of training copies; fp16 on CPU would silently run fp32, so it is refused.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from datetime import timedelta
from typing import Any

import torch

from disttrain import hardware, shm_allreduce
from disttrain.config import Config
from disttrain.errors import UsageError
from disttrain.signals import SignalTally


def resolve_precision(cfg: Config) -> tuple[str, str]:
    """(mixed precision, where it came from): the flag wins, then the launch config (Accelerate exports it),
    else full precision. `auto` picks by the device (hardware.auto_precision)."""
    mp = cfg.mixed_precision or os.environ.get("ACCELERATE_MIXED_PRECISION", "no") or "no"
    given = "mixed_precision" in getattr(cfg, "explicit", {"mixed_precision"})  # else a resumed run's saved value
    why = ("--mixed-precision" if given else "the resumed run's setting") if cfg.mixed_precision else \
        "the launch config" if os.environ.get("ACCELERATE_MIXED_PRECISION") else "default"
    if mp not in ("no", "bf16", "fp16", "auto"):
        raise UsageError(f"mixed precision {mp!r} from the launch config is not supported; use no, bf16, fp16 or auto")
    if mp == "auto":
        if torch.cuda.is_available():
            return hardware.auto_precision("cuda", torch.cuda.is_bf16_supported(including_emulation=False))
        return hardware.auto_precision("cpu", flags=hardware.cpu_flags())
    if mp == "fp16" and not torch.cuda.is_available():
        raise UsageError("--mixed-precision fp16 needs a GPU (on CPU it would silently run fp32); use auto, bf16 or no")
    return mp, why


def configure_cpu() -> int:
    """This process's CPU setup; returns its intra-op threads: usable CPUs (affinity mask, cgroup quota) /
    processes on this node unless DISTTRAIN_THREADS says otherwise (hardware.default_threads), and glibc's
    allocator keeping freed memory for the next step (hardware.tune_malloc). A bad DISTTRAIN_* value:
    UsageError."""
    try:
        n = hardware.default_threads(os.environ, hardware.affinity(), hardware.cgroup_cpu_limit())
        hardware.tune_malloc(os.environ)
    except ValueError as e:
        raise UsageError(str(e)) from None
    torch.set_num_threads(n)
    return n


def contention_watch(acc: Any) -> hardware.ContentionWatch:
    """While training: one line from the main process if other programs take the CPUs our threads need."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    return hardware.ContentionWatch(torch.get_num_threads(), local,
                                    enabled=acc.is_main_process and acc.device.type == "cpu")


def make_accelerator(cfg: Config, mixed_precision: str, project_dir: str | None = None) -> Any:
    """An Accelerator that is really distributed whenever several processes were launched."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs

    # DISTTRAIN_FORCE_CPU=0 lets Accelerate pick the device itself (the trap the guard below catches; tests)
    cpu = not torch.cuda.is_available() and os.environ.get("DISTTRAIN_FORCE_CPU", "1") != "0"
    log_with = None  # --log-with: train._tracker attaches the tracker once the run directory is known
    acc = Accelerator(cpu=cpu, mixed_precision=mixed_precision, log_with=log_with, project_dir=project_dir,
                      kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=cfg.dist_timeout)),
                                       # gradients live in the all-reduce buckets (no copy in and out);
                                       # not a broadcast of the BN statistics before every forward (a gloo
                                       # round trip per step); evaluate() syncs them once, see sync_buffers
                                       DistributedDataParallelKwargs(broadcast_buffers=False,
                                                                     gradient_as_bucket_view=True)])
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != acc.num_processes:
        raise UsageError(f"the launcher started {launched} processes (WORLD_SIZE={launched}) but Accelerate sees "
                         f"{acc.num_processes} ({acc.distributed_type}); refusing to train independent copies")
    return acc


def broadcast_str(acc: Any, s: str) -> str:
    """Rank 0's string (at most 1024 bytes) on every rank."""
    if acc.num_processes == 1:
        return s
    buf = torch.zeros(1024, dtype=torch.uint8, device=acc.device)
    raw = s.encode()[:1024]
    buf[: len(raw)] = torch.tensor(list(raw), dtype=torch.uint8)
    torch.distributed.broadcast(buf, src=0)
    return bytes(buf.cpu().tolist()).rstrip(b"\0").decode()


def sync_buffers(acc: Any, net: torch.nn.Module) -> None:
    """Give every rank rank 0's buffers (BN running statistics): the ones a checkpoint saves. Training does
    not read them (BN uses batch statistics), so this is needed only before evaluating."""
    if acc.num_processes > 1 and torch.distributed.is_initialized():
        for b in net.buffers():
            torch.distributed.broadcast(b, src=0)


def gradient_path(cfg: Config, acc: Any) -> str:
    """How gradients are averaged across processes (the topology line says it)."""
    if acc.num_processes == 1:
        return "none"
    shm = shm_allreduce.usable(acc, cfg.shm_allreduce)
    if cfg.sharding == "fsdp":  # FSDP2 reduce-scatters (shm_allreduce's where FSDP2 takes it, or the group's)
        shm = shm and shm_allreduce.fsdp_hooks_available()
        return f"{'shared memory' if shm else torch.distributed.get_backend()} reduce-scatter"
    if shm:
        return "shared memory"
    return torch.distributed.get_backend() if torch.distributed.is_initialized() else "?"


def share_gradients(cfg: Config, acc: Any, model: Any) -> None:
    """On one machine's CPU processes, make DDP average gradients through shared memory (collective)."""
    if isinstance(model, torch.nn.parallel.DistributedDataParallel) and gradient_path(cfg, acc) == "shared memory":
        shm = shm_allreduce.ShmAllReduce.attach(acc, model.module, cfg.dist_timeout, broadcast_str)
        if shm is not None:  # (None: no room in /dev/shm; DDP keeps gloo, rank 0 said so)
            # a lambda: DDP checks a hook's annotations at run time, and ours are strings (postponed evaluation)
            model.register_comm_hook(None, lambda state, bucket: shm.hook(state, bucket))


def find_unused_parameters(acc: Any, unused: list[str], force: bool = False) -> bool:
    """Parameters the pre-flight loss never reached (a head `forward` skips, one used on some steps): DDP
    must then look for them after every forward (find_unused_parameters), else all ranks die at the next
    step waiting for their gradients. Globally unused parameters keep `grad=None`, as on one process.
    `force` (--find-unused-parameters): also when the pre-flight batch used them all. Returns whether on."""
    on = bool(unused or force) and acc.num_processes > 1 and acc.ddp_handler is not None
    if on:
        acc.ddp_handler.find_unused_parameters = True
    return on


UNUSED_HINT = "Expected to have finished reduction in the prior iteration"  # DDP's error for it


def plain_module(acc: Any, model: Any) -> torch.nn.Module:
    """The user's own module under every wrapper (DDP, torch.compile's `_orig_mod`, Accelerate's fp32
    wrapper kept): its state_dict keys are the ones a plain `load_state_dict` expects, so every saved
    weight file loads into the unwrapped model, compiled or not."""
    m = acc.unwrap_model(model, keep_torch_compile=False)
    while isinstance(getattr(m, "_orig_mod", None), torch.nn.Module):  # compiled before DDP wrapped it
        m = m._orig_mod
    return m


def say(acc: Any, *args: Any) -> None:
    """print() on the global main process only (Accelerate's print is once per node)."""
    if acc.is_main_process:
        print(*args, flush=True)


def topology(acc: Any, cfg: Config, steps_per_epoch: int, threads: int, unused: list[str] | None = None,
             precision_why: str = "") -> str:
    machines = int(os.environ.get("ACCELERATE_NUM_MACHINES", os.environ.get("NNODES", "0")) or 0) or \
        max(1, acc.num_processes // int(os.environ.get("LOCAL_WORLD_SIZE", acc.num_processes)))
    backend = torch.distributed.get_backend() if torch.distributed.is_initialized() else "none"
    gb = cfg.batch_size * acc.num_processes * cfg.grad_accum
    return (f"topology: {acc.num_processes} process(es) on {machines} machine(s), device {acc.device.type}, "
            f"backend {backend}, {threads} thread(s)/process, batch {cfg.batch_size}/process x "
            f"{acc.num_processes} x grad-accum {cfg.grad_accum} = global batch {gb}, gradients averaged by "
            f"{gradient_path(cfg, acc)}, mixed precision "
            f"{acc.mixed_precision}{f' ({precision_why})' if precision_why else ''}, {steps_per_epoch} steps/epoch"
            + (f", {len(unused)} parameter(s) unused by the loss ({', '.join(unused[:3])}"
               f"{', ...' if len(unused) > 3 else ''}): "
               + ("DDP finds unused parameters every step" if acc.num_processes > 1 and cfg.sharding != "fsdp"
                  else "they get no gradient")
               if unused else "")
            + (", DDP finds unused parameters every step (--find-unused-parameters)"
               if cfg.find_unused_parameters and not unused and acc.num_processes > 1 and cfg.sharding != "fsdp"
               else ""))


class Sync:
    """Host-side agreement between ranks (stop requests), without touching the GPU stream: on NCCL runs
    these go over a separate gloo group so they never force a device synchronisation."""

    def __init__(self, acc: Any):
        self.n = acc.num_processes
        self.group = None
        self._pending: tuple[Any, torch.Tensor] | None = None  # poll() in flight
        if self.n > 1 and acc.device.type != "cpu":
            self.group = torch.distributed.new_group(backend="gloo")

    def any(self, flag: bool) -> bool:
        """True on every rank if `flag` is true on any rank (blocking)."""
        if self.n == 1:
            return flag
        t = torch.tensor([int(flag)], dtype=torch.int32)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX, group=self.group)
        return bool(t.item())

    def poll(self, stop: bool, save: bool = False) -> tuple[bool, bool]:
        """Like any() for two flags (stop, save a checkpoint), pipelined: start this poll's all-reduce and
        return the previous poll's answer, which has long arrived, so no rank waits for the slowest one here.
        Every rank polls at the same steps and so acts on the same answer at the same step, one poll
        interval later than a blocking any()."""
        if self.n == 1:
            return stop, save
        t = torch.tensor([int(stop), int(save)], dtype=torch.int32)
        work = torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX, group=self.group, async_op=True)
        prev, self._pending = self._pending, (work, t)
        if prev is None:
            return False, False
        prev[0].wait()
        got_stop, got_save = (bool(v) for v in prev[1].tolist())
        if got_stop:
            self.drain()
        return got_stop, got_save

    def drain(self) -> None:
        """Wait for a poll still in flight (before anything that ends the process group)."""
        if self._pending is not None:
            self._pending[0].wait()
            self._pending = None


class StopSignal:
    """SIGTERM, SIGINT or SIGUSR1 during training: finish the step, checkpoint, exit 75.

    A second SIGINT (a user's second Ctrl-C) exits at once. Repeated SIGTERMs do not count: the elastic
    agent of torchrun/accelerate re-sends SIGTERM to its workers and SIGKILLs them ~30 s later, so the
    checkpoint has to be written inside that window, not abandoned. Outside the loop the default handlers
    stay, so a signal during start-up (maybe inside a blocking collective) ends the process at once.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)

    def __init__(self) -> None:
        self.received: str | None = None
        self._sigints = 0
        self._old: dict[int, Any] = {}
        self._tally = SignalTally()  # two Ctrl-C before the handler ran still count as two

    def __enter__(self) -> StopSignal:
        if threading.current_thread() is threading.main_thread():
            self._tally.__enter__()
            for s in self.SIGNALS:
                self._old[s] = signal.signal(s, self._handler)
        return self

    def __exit__(self, *exc: Any) -> None:
        for s, old in self._old.items():
            signal.signal(s, old)
        self._old.clear()
        self._tally.__exit__(*exc)

    def _handler(self, signum: int, frame: Any) -> None:
        if signum == signal.SIGINT:
            self._sigints = self._tally.count(signum)
            if self._sigints >= 2:
                newline = "\n" if sys.stderr.isatty() else ""  # never on the progress bar's line
                sys.stderr.write(f"{newline}disttrain: second Ctrl-C, exiting without a checkpoint\n")
                sys.stderr.flush()
                os._exit(130)
        self.received = self.received or signal.Signals(signum).name


def start_parent_watchdog(interval: float = 1.0) -> None:
    """Under a launcher, exit at once if the launcher dies (kill -9 leaves workers as orphans that would
    go on writing into the run directory). Not for a plain `python -m`, where nohup'ing is legitimate."""
    if "TORCHELASTIC_RUN_ID" not in os.environ and "LOCAL_RANK" not in os.environ:
        return
    parent = os.getppid()
    if parent == 1:  # the launcher died before we got here (we were re-parented to init)
        sys.stderr.write(f"disttrain: launcher died before worker {os.getpid()} started; exiting\n")
        sys.stderr.flush()
        os._exit(1)

    def watch() -> None:
        while True:
            time.sleep(interval)
            if os.getppid() != parent:
                try:
                    sys.stderr.write(f"disttrain: launcher (pid {parent}) died; worker {os.getpid()} exits\n")
                    sys.stderr.flush()
                finally:
                    os._exit(1)

    threading.Thread(target=watch, name="disttrain-parent-watchdog", daemon=True).start()


def shutdown() -> None:
    """Tear down the process group (a finished gloo run can otherwise abort at interpreter exit)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        try:
            torch.distributed.destroy_process_group()
        except Exception:  # noqa: BLE001 - best effort on the way out
            pass


def is_launched() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1
