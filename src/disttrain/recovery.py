"""Self-healing runs: what a failure costs, and starting the whole group again after one.

`python -m disttrain.launch --max-restarts N ... -- FLAGS` runs the training as attempts. When an attempt
crashes (a worker killed, an uncaught exception, a peer that died or hung in a collective), every worker of
the group is already stopped by torchrun's agent; the launcher starts the group again on the same run
directory with `--resume auto`, so training continues from the newest good checkpoint, bitwise as if
nothing had happened. Not restarted: bad input (exit 2), a requested stop (exit 75), and failures that would
happen again (a non-finite loss, a full disk: `status.json` says `"restartable": false`).

Why not torchrun's own `--max_restarts`: its agent restarts the workers with the same arguments, whatever
the exit code (a bad flag or a NaN would be retried N times), and without `--resume auto` the restarted
trainer refuses a run directory that already holds a run; the agent cannot tell our exit codes apart. So the
launcher re-launches the group, and uses what torchrun does well: stopping every worker of the group at the
first failure, and naming the root cause (ChildFailedError), which `agent_main` passes back in a file.

This module holds both halves of the protocol:
- launcher side: `agent_main` (the launcher's child), `judge` (restart or not), `restart_flags`;
- trainer side: `restart_record` (the `kind: restart` line), `Progress` (the last finished step, so the
  resumed trainer knows how many steps were lost) and `SaveClock` (`--save-every-minutes`).
"""

from __future__ import annotations

import json
import mmap
import os
import signal
import struct
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from disttrain.errors import EXIT_FAILURE, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, one_line

FAILURE_FILE_ENV = "DISTTRAIN_FAILURE_FILE"  # launcher -> agent: where the agent leaves the root cause
RESTART_ENV = "DISTTRAIN_RESTART"  # launcher -> trainer: JSON {attempt, max, cause} of this restart
MAX_FILE_BYTES = 64 << 10


# =========================================================================== the agent (launcher's child)


def agent_main(argv: list[str]) -> None:
    """`python -m disttrain.recovery ACCELERATE_LAUNCH_ARGS`: `accelerate launch` in this process. When a
    worker fails, torchrun's agent has stopped the others and raises ChildFailedError; its first observed
    failure (rank, exit code or signal, the worker's exception from its error file) goes to the file named by
    $DISTTRAIN_FAILURE_FILE, and the failure table is printed without the launcher's own traceback."""
    from accelerate.commands.launch import launch_command, launch_command_parser
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    args = launch_command_parser().parse_args(argv)
    try:
        launch_command(args)
    except ChildFailedError as e:
        failures = [_failure(rank, f) for rank, f in e.failures.items()]
        _write_failure(min(failures, key=_root_order))
        print(str(e), file=sys.stderr)  # torchrun's table: every failed rank, and the root cause
        sys.exit(EXIT_FAILURE)
    except subprocess.CalledProcessError as e:  # one process: accelerate runs it as a plain subprocess
        _write_failure({"rank": 0, "local_rank": 0, "exitcode": e.returncode, "message": "",
                        "host": os.uname().nodename, "time": time.time()})
        sys.exit(EXIT_FAILURE)


def _failure(rank: int, f: Any) -> dict[str, Any]:
    """A torchrun ProcessFailure as JSON: the worker's own message only when it left an error file."""
    has_file = f.error_file and f.error_file != "<N/A>"
    message = f.message if has_file else ""
    if isinstance(message, dict):  # torchrun's record format: {"message": ..., "extraInfo": ...}
        message = message.get("message", "")
    stamp = f.timestamp
    if has_file:  # the error file's time to the nanosecond orders failures within one second
        try:
            stamp = os.stat(f.error_file).st_mtime
        except OSError:
            pass
    return {"rank": rank, "local_rank": f.local_rank, "exitcode": f.exitcode, "message": one_line(message)[:500],
            "host": os.uname().nodename, "time": stamp}


def _root_order(f: dict[str, Any]) -> tuple[Any, ...]:
    """Which failure caused the others: the earliest one (torchrun's rule), and among those seen in the same
    second, a worker killed by a signal other than the agent's own SIGTERM, then one that raised (its
    error file), before peers that merely lost it (they exit 1 with no error file)."""
    killed = f["exitcode"] < 0 and f["exitcode"] != -signal.SIGTERM
    return int(f["time"]), not killed, not f["message"], f["time"], f["rank"]


def _write_failure(record: dict[str, Any]) -> None:
    path = os.environ.get(FAILURE_FILE_ENV)
    if path:
        try:
            tmp = f"{path}.tmp"
            Path(tmp).write_text(json.dumps(record))
            os.replace(tmp, path)
        except OSError:
            pass  # the launcher then says what it saw itself


def read_failure(path: Path) -> dict[str, Any] | None:
    """The agent's record of the first failure of an attempt, or None."""
    try:
        if path.stat().st_size > MAX_FILE_BYTES:
            return None
        record = json.loads(path.read_text())
        return record if isinstance(record, dict) and isinstance(record.get("exitcode"), int) else None
    except (OSError, ValueError):
        return None


def describe(failure: dict[str, Any]) -> str:
    """One phrase for a failure record: `rank 1 (host h) killed by SIGKILL`, `rank 0: RuntimeError: ...`."""
    who = f"rank {failure.get('rank', '?')}"
    code = failure["exitcode"]
    if failure.get("message"):
        return f"{who}: {failure['message']}"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"{who} (host {failure.get('host', '?')}) killed by {name}"
    return f"{who} exited with code {code}"


# =========================================================================== the launcher's decision


@dataclass
class Outcome:
    """What an attempt's end means: the exit code to report, whether to start again, and why."""

    code: int
    restart: bool
    cause: str


def judge(rc: int, status: dict[str, Any] | None, failure: dict[str, Any] | None, stopped: bool) -> Outcome:
    """Restart or not, from the child's exit code, this attempt's status.json (None if it wrote none), the
    agent's failure record and whether the launcher was asked to stop.

    Restarted: a crash (no status.json: a worker killed or an uncaught exception) and a failure the trainer
    calls restartable (a peer lost in a collective). Not restarted: success, bad input (exit 2, also when a
    worker refused it before writing anything), a requested stop (75), a failure the trainer calls
    deterministic (non-finite loss, full disk), and anything after the launcher was asked to stop."""
    cause = describe(failure) if failure is not None else ""
    if status is not None and isinstance(status.get("exit_code"), int):
        code = status["exit_code"]
        reason = status.get("reason") or ""
        restart = code == EXIT_FAILURE and bool(status.get("restartable")) and not stopped
        return Outcome(code, restart, (cause or reason) if restart else reason)
    if failure is not None and failure["exitcode"] == EXIT_USAGE:
        return Outcome(EXIT_USAGE, False, cause)
    if rc in (EXIT_OK, EXIT_USAGE, EXIT_INTERRUPTED) or stopped:
        return Outcome(rc, False, cause)
    return Outcome(rc, True, cause or f"the launcher's child exited with code {rc}")


def restart_flags(flags: list[str], resume: str, has_checkpoint: bool) -> list[str]:
    """The trainer flags of a restart. With a checkpoint in the run directory: continue from the newest good
    one (`--resume auto`; an `--overwrite` or `--init-from` of the first attempt must not apply again).
    Without one, nothing was saved: a fresh run starts over (`--overwrite` of its own partial outputs), a
    run that resumed from somewhere resumes from there again."""
    if has_checkpoint:
        return [*flags, "--resume", "auto", "--no-overwrite", "--init-from", "none"]
    return [*flags, "--overwrite"] if resume == "none" else list(flags)


def restart_env(attempt: int, max_restarts: int, cause: str) -> str:
    """The value of $DISTTRAIN_RESTART for restart number `attempt` (1-based)."""
    return json.dumps({"attempt": attempt, "max": max_restarts, "cause": cause})


# =========================================================================== trainer side


def restart_record(resumed_step: int, previous: tuple[int, float] | None,
                   environ: dict[str, str] | None = None) -> dict[str, Any] | None:
    """The `kind: restart` metrics line of a trainer started by the launcher after a failure, else None.
    `previous` is the failed attempt's Progress (last finished step, its wall time) read before this attempt
    overwrote it: steps_lost = the steps done after the checkpoint resumed from, and recovery_s = seconds from
    that last step to now (about the time from the failure to training again)."""
    raw = (os.environ if environ is None else environ).get(RESTART_ENV)
    if not raw:
        return None
    try:
        info = json.loads(raw)
        attempt, most, cause = int(info["attempt"]), int(info["max"]), str(info["cause"])
    except (ValueError, KeyError, TypeError):
        return None
    rec: dict[str, Any] = {"kind": "restart", "attempt": attempt, "max_restarts": most, "cause": one_line(cause),
                           "step": resumed_step, "reached": None, "steps_lost": None, "recovery_s": None}
    if previous is not None:
        reached, when = previous
        rec.update(reached=reached, steps_lost=max(0, reached - resumed_step),
                   recovery_s=round(max(0.0, time.time() - when), 3))
    return rec


def restart_line(rec: dict[str, Any]) -> str:
    """The console line of a restart (main process)."""
    lost = f"{rec['steps_lost']} step(s) lost" if rec["steps_lost"] is not None else "steps lost unknown"
    down = f", {rec['recovery_s']:.1f} s since the last step" if rec["recovery_s"] is not None else ""
    return (f"disttrain: restart {rec['attempt']}/{rec['max_restarts']} after {rec['cause']}: resumed at step "
            f"{rec['step']}, {lost}{down}")


class Progress:
    """The main process's last finished step and its wall time, 16 bytes in a shared mapping of
    `<run>/.progress`: written every step for ~0.3 us (no system call), and still there after a kill -9
    (the page belongs to the kernel's cache, not to the process). Read by the launcher and by the next
    attempt to count the steps a failure cost."""

    FORMAT = "<qd"

    def __init__(self, path: Path, enabled: bool):
        self._map: mmap.mmap | None = None
        if not enabled:
            return
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
            try:
                os.ftruncate(fd, struct.calcsize(self.FORMAT))
                self._map = mmap.mmap(fd, struct.calcsize(self.FORMAT))
            finally:
                os.close(fd)
        except (OSError, ValueError):  # a file system without shared mappings: restarts then say "unknown"
            self._map = None

    def mark(self, step: int) -> None:
        if self._map is not None:
            struct.pack_into(self.FORMAT, self._map, 0, step, time.time())

    def close(self) -> None:
        if self._map is not None:
            self._map.close()
            self._map = None

    @classmethod
    def read(cls, path: Path) -> tuple[int, float] | None:
        """(step, wall time) last marked in `path`, or None."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
            try:
                raw = os.read(fd, struct.calcsize(cls.FORMAT))
            finally:
                os.close(fd)
            step, when = struct.unpack(cls.FORMAT, raw)
        except (OSError, struct.error):
            return None
        return (step, when) if step >= 0 and when > 0 else None


class SaveClock:
    """`--save-every-minutes M`: whether a time-based checkpoint is due. Only the main process's clock counts
    (the others answer False), and the answer reaches every rank through the stop poll (distributed.Sync), so
    all ranks save after the same step. A due checkpoint is asked for once until the next save resets the
    clock (the pipelined poll answers one interval late; asking again would save twice)."""

    def __init__(self, minutes: float, enabled: bool, clock: Callable[[], float] = time.monotonic):
        self.period, self.clock = 60.0 * minutes if enabled else 0.0, clock
        self.last, self.asked = clock(), False

    def due(self) -> bool:
        if self.period <= 0 or self.asked or self.clock() - self.last < self.period:
            return False
        self.asked = True
        return True

    def reset(self) -> None:
        """A checkpoint was written (any cadence): the next one is due M minutes from now."""
        self.last, self.asked = self.clock(), False


if __name__ == "__main__":
    agent_main(sys.argv[1:])
