"""python -m disttrain.launch [--max-restarts N] [accelerate launch options] -- [disttrain.train flags]

A thin wrapper around `accelerate launch ... -m disttrain.train`, for scripts and schedulers (slurm/train.sh).
Plain `accelerate launch` falls short in three ways that matter there:

1. Bad flags are found only after every process has started, and come back as exit 1 buried under
   Accelerate's traceback. Here they are checked first, in this process: `disttrain: error: <one line>`, exit 2,
   nothing started. The output directory is resolved once here and passed to every node, so all agree.
2. Signals: torchrun's agent dies of SIGUSR1 without passing it on, and dies of a second signal while it
   waits for its workers to stop. The child runs in its own session (a terminal's Ctrl-C reaches only us);
   the first SIGTERM, SIGINT or SIGUSR1 sent to this process becomes one SIGTERM to the training processes
   (they finish the step, checkpoint and exit 75). A second SIGINT is sent on as SIGINT (twice: the trainer
   aborts at once on its second SIGINT); a third kills the group. The agent is told to handle SIGUSR1 like
   SIGTERM (PET_SIGNALS_TO_HANDLE), for when a scheduler signals every process of the job step.
3. The exit code: Accelerate turns every failing worker into exit 1. Here the code comes from the run
   directory's status.json when this attempt wrote it (0 completed, 75 interrupted after a checkpoint,
   1 failed, 2 bad input), else from the child; our one-line reason is printed LAST so users find it.
4. Self-healing (`--max-restarts N`, before the `--`): when an attempt crashes (a worker killed or raising,
   a peer lost in a collective), the whole group is started again on the same run directory with `--resume
   auto`, up to N times; bad input, a requested stop and deterministic failures (non-finite loss) are not
   restarted. disttrain.recovery says why this is not torchrun's own `--max_restarts`.

Everything before `--` goes to `accelerate launch`, everything after it to disttrain.train; without `--`
any argument is refused (`--model mlp` could be either), and `--help` before `--` prints this usage.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from disttrain import hardware
from disttrain.config import default_output_dir, parse_config
from disttrain.errors import EXIT_FAILURE, EXIT_USAGE, UsageError, cut, one_line
from disttrain.recovery import (FAILURE_FILE_ENV, RESTART_ENV, Outcome, Progress, judge, read_failure, restart_env,
                                restart_flags)
from disttrain.safe_io import MAX_SMALL, read_json, read_text, write_atomic
from disttrain.signals import SignalTally

PROG = "disttrain-launch"
ERROR_FILE_ENV = "DISTTRAIN_ERROR_FILE"  # set for the trainer: where it leaves a refusal line for us
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


def split_argv(argv: list[str]) -> tuple[list[str], list[str]]:
    """(accelerate launch options, disttrain.train flags), split at the first `--`."""
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1:]
    return [], list(argv)


def _option(opts: list[str], name: str) -> str | None:
    """The value of an accelerate option given as `--name v` or `--name=v` (last one wins)."""
    value = None
    for i, a in enumerate(opts):
        if a == name and i + 1 < len(opts):
            value = opts[i + 1]
        elif a.startswith(name + "="):
            value = a.split("=", 1)[1]
    return value


def _children(pid: int) -> list[int]:
    """Direct children of `pid` (Linux /proc); [] where /proc cannot tell."""
    kids = []
    for d in Path("/proc").glob("[0-9]*"):
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        if int(stat[stat.rindex(")") + 2:].split()[1]) == pid:  # after "pid (comm) state": ppid
            kids.append(int(d.name))
    return kids


class Forwarder:
    """Signal handlers that pass stop requests on to the training processes.

    The first stop request becomes one SIGTERM to the workers (the agent's children), not to the agent nor
    to the workers' own children (DataLoader workers would die of it): the agent dies of a second signal
    while it waits for its workers, and under Slurm it may already have got one (a step signal reaches
    every process of the step). Later SIGTERM/SIGUSR1 are not passed on: a worker that has left its
    training loop (writing status.json) would die of them. Before the workers exist, the whole group gets
    SIGTERM: nothing to save yet."""

    def __init__(self) -> None:
        self.child: subprocess.Popen[bytes] | None = None  # set right after the start: a signal before it
        self.sigints, self.resend_at = 0, 0.0             # is only recorded, then sent on by start()
        self.received: str | None = None
        self.tally = SignalTally()  # entered by main() around the handlers

    def start(self, cmd: list[str], env: dict[str, str]) -> None:
        self.child = subprocess.Popen(cmd, start_new_session=True, env=env)  # own session: we choose its signals
        if self.received is not None:
            self._kill(signal.SIGTERM, workers_only=False)

    def _kill(self, sig: int, workers_only: bool = True) -> None:
        if self.child is None:
            return
        try:
            pids = _children(self.child.pid) if workers_only else []
            for pid in pids:
                os.kill(pid, sig)
            if not pids:
                os.killpg(self.child.pid, sig)
        except ProcessLookupError:
            pass

    def handler(self, signum: int, frame: Any) -> None:
        first = self.received is None
        self.received = self.received or signal.Signals(signum).name
        if signum == signal.SIGINT:
            self.sigints = self.tally.count(signum)  # exact: two Ctrl-C before this handler ran count as two
            if self.sigints == 2:  # the user insists: abort without a checkpoint (the trainer's 2nd SIGINT)
                self._kill(signal.SIGINT)
                self.resend_at = time.monotonic() + 0.3
                return
            if self.sigints > 2:
                self._kill(signal.SIGKILL, workers_only=False)
                return
        if first:
            self._kill(signal.SIGTERM)

    def wait(self) -> int:
        """Wait for the child; returns its exit code (128+N when killed by signal N)."""
        assert self.child is not None
        while True:
            try:
                rc = self.child.wait(timeout=0.1)
                return 128 - rc if rc < 0 else rc
            except subprocess.TimeoutExpired:
                if self.resend_at and time.monotonic() >= self.resend_at:
                    self.resend_at = 0.0
                    self._kill(signal.SIGINT)

def read_status(path: Path, since: float, wait_s: float = 0.0) -> dict[str, Any] | None:
    """status.json if written at or after `since` (this attempt), polling up to wait_s seconds for it."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            status = read_json(path, MAX_SMALL)
            if isinstance(status, dict) and float(status.get("time", 0)) >= since:
                return status
        except (OSError, ValueError, TypeError):
            pass
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.2)


def report_refusal(line: str) -> None:
    """Trainer side: leave our one-line usage error for the launcher that started us (if one did)."""
    path = os.environ.get(ERROR_FILE_ENV)
    if path:
        try:
            write_atomic(Path(path), line.encode())
        except (OSError, UsageError):
            pass


def _read_refusal(path: Path) -> str | None:
    try:
        return one_line(read_text(path, 64 << 10)) or None
    except (OSError, UsageError):
        return None


def check(flags: list[str]) -> int:
    """Validate disttrain.train flags and DISTTRAIN_* settings: 0, or 2 after printing the one-line error
    (slurm/train.sh)."""
    try:
        try:
            hardware.check_env(os.environ)  # DISTTRAIN_THREADS, DISTTRAIN_MALLOC: every worker would refuse them
        except ValueError as e:
            raise UsageError(str(e)) from None
        cfg = parse_config(flags, prog=PROG)
        if cfg.sharding == "fsdp":  # the combinations FSDP2 cannot train, before any worker starts
            from disttrain.parallel import resolve_sharding  # (imports torch: only when it matters)

            resolve_sharding(cfg)
    except UsageError as e:
        print(f"disttrain: error: {cut(e)}", file=sys.stderr)
        return EXIT_USAGE
    return 0


USAGE = f"""usage: python -m disttrain.launch [ACCELERATE LAUNCH OPTIONS] -- [TRAINING FLAGS]
       ({PROG} is the same command)

Runs `accelerate launch [ACCELERATE LAUNCH OPTIONS] -m disttrain.train [TRAINING FLAGS]` after checking the
training flags here (bad ones: one line, exit 2, nothing started). The `--` separates the two: before it,
accelerate's options (--config_file launch/cpu-multi.yaml, --num_processes 2, --machine_rank ...; see
`accelerate launch --help`); after it, disttrain's flags (see `python -m disttrain.train --help`).
Stop signals (SIGTERM, SIGINT, SIGUSR1) reach the training processes as one SIGTERM: they checkpoint and
exit 75. The exit code is the run's own (0 done, 2 bad input, 75 stopped after a checkpoint, 1 failed).
--max-restarts N (before the --): when a worker dies or a collective fails, start the whole group again
with --resume auto, up to N times (bad input, a requested stop and a non-finite loss are not restarted).

example: python -m disttrain.launch --config_file launch/cpu-multi.yaml --num_processes 2 -- --model mlp --epochs 2
"""


def take_max_restarts(opts: list[str]) -> tuple[int, list[str]]:
    """(--max-restarts N, the accelerate options without it). UsageError for a bad N, and for torchrun's
    own --max_restarts, which would restart workers without --resume auto (see disttrain.recovery)."""
    n, rest, i = 0, [], 0
    while i < len(opts):
        a = opts[i]
        if a == "--max-restarts" or a.startswith("--max-restarts="):
            if "=" in a:
                value = a.split("=", 1)[1]
            elif i + 1 < len(opts):
                value, i = opts[i + 1], i + 1
            else:
                raise UsageError("--max-restarts needs a number of restarts")
            try:
                n = int(value, 10)
            except ValueError:
                raise UsageError(f"--max-restarts must be an integer, got {value!r}") from None
            if n < 0:
                raise UsageError(f"--max-restarts must be >= 0, got {n}")
        elif a == "--max_restarts" or a.startswith("--max_restarts="):
            raise UsageError(f"{a.split('=')[0]} (torchrun's) restarts workers without --resume auto; use "
                             "--max-restarts N, which restarts the whole group from the newest checkpoint")
        else:
            rest.append(a)
        i += 1
    return n, rest


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    before = args[:args.index("--")] if "--" in args else args
    if any(a in ("-h", "--help") for a in before):
        print(USAGE, end="")
        return 0
    if args and "--" not in args:
        print(f"{PROG}: error: put `--` between accelerate launch options and training flags (got "
              f"{' '.join(args[:4])}{' ...' if len(args) > 4 else ''}); e.g. python -m disttrain.launch "
              f"--num_processes 2 -- {' '.join(args[:4])}; see --help", file=sys.stderr)
        return EXIT_USAGE
    acc_opts, flags = split_argv(args)
    try:
        max_restarts, acc_opts = take_max_restarts(acc_opts)
    except UsageError as e:
        print(f"disttrain: error: {cut(e)}", file=sys.stderr)
        return EXIT_USAGE
    if check(flags):
        return EXIT_USAGE
    cfg = parse_config(flags, prog=PROG)
    if cfg.output_dir is None:  # one name for every node (each would otherwise stamp its own time)
        cfg.output_dir = default_output_dir(cfg)
        flags = [*flags, "--output-dir", cfg.output_dir]
    status_file = Path(cfg.output_dir) / "status.json"
    first_machine = (_option(acc_opts, "--machine_rank") or "0") == "0"
    old = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    env = dict(os.environ)
    env.setdefault("PET_SIGNALS_TO_HANDLE", "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1")  # torchrun --signals_to_handle
    env.pop(RESTART_ENV, None)
    tmp = tempfile.mkdtemp(prefix="disttrain-launch-")  # what the attempt leaves for us comes back here:
    failure_file, refusal_file = Path(tmp) / "failure.json", Path(tmp) / "error"  # a failed worker, bad input
    env[FAILURE_FILE_ENV], env[ERROR_FILE_ENV] = str(failure_file), str(refusal_file)
    fwd = Forwarder()
    with fwd.tally:
        for s in STOP_SIGNALS:
            signal.signal(s, fwd.handler)
        restarts, attempt_flags = 0, flags
        try:
            while True:
                failure_file.unlink(missing_ok=True)
                refusal_file.unlink(missing_ok=True)
                cmd = [sys.executable, "-m", "disttrain.recovery", *acc_opts, "-m", "disttrain.train", *attempt_flags]
                start = time.time() - 1.0  # status.json "time" is a wall clock written by another process
                fwd.start(cmd, env)
                rc = fwd.wait()
                refusal = _read_refusal(refusal_file)
                if refusal is not None:  # the trainer refused its input (exit 2): that line is the story, and last
                    print(refusal, file=sys.stderr)
                    return EXIT_USAGE
                # After a stop request, or on machines other than the first, the main rank (maybe on another
                # node) may write status.json a moment after our child ended: give it a few seconds.
                expect = rc != 0 and (fwd.received is not None or not first_machine)
                status = None if cfg.dry_run else read_status(status_file, start, 5.0 if expect else 0.0)
                out = judge(rc, status, read_failure(failure_file), fwd.received is not None)
                if not out.restart or restarts >= max_restarts or fwd.received is not None:
                    break
                restarts += 1
                rundir = run_dir(cfg.output_dir)
                reached = Progress.read(rundir.progress)
                at = f" (last finished step {reached[0]})" if reached else ""
                print(f"{PROG}: restart {restarts}/{max_restarts} after {out.cause}{at}; starting the group again "
                      "from the newest checkpoint", file=sys.stderr)
                env[RESTART_ENV] = restart_env(restarts, max_restarts, out.cause)
                attempt_flags = restart_flags(flags, cfg.resume, bool(rundir.step_dirs()))
        finally:
            for s, h in old.items():
                signal.signal(s, h)
            shutil.rmtree(tmp, ignore_errors=True)
    if out.restart:
        return give_up(run_dir(cfg.output_dir), out, restarts, max_restarts, write=first_machine and not cfg.dry_run)
    if status is not None and isinstance(status.get("exit_code"), int):
        code, state, reason = status["exit_code"], status.get("state", "?"), status.get("reason") or ""
        where = f" at step {status['step']}" if "step" in status else ""
        print(f"{PROG}: training {state}{where} (exit {code}){': ' + reason if reason else ''}", file=sys.stderr)
        return code
    what = f"stopped by {fwd.received}" if fwd.received else "exited"
    print(f"{PROG}: training {what} with code {out.code}"
          + ("" if out.code == 0 else f" before writing {status_file}; the first error above says why"),
          file=sys.stderr)
    return out.code


def run_dir(path: str) -> Any:
    """The run directory's layout (checkpoint.RunDir), imported only after a failure: disttrain.checkpoint
    imports torch, which the launcher otherwise never loads (it starts in a tenth of a second)."""
    from disttrain.checkpoint import RunDir

    return RunDir(path)


def give_up(rundir: Any, out: Outcome, restarts: int, max_restarts: int, write: bool) -> int:
    """A crash with no restart left: status.json says why (first machine), one line, exit 1."""
    if max_restarts:
        reason = f"giving up after {restarts} restart(s) (--max-restarts {max_restarts}); last failure: {out.cause}"
    else:
        reason = f"{out.cause}; not restarted (--max-restarts 0)"
    reached = Progress.read(rundir.progress)
    if write and rundir.path.is_dir():
        try:
            from disttrain.checkpoint import write_json

            write_json(rundir.status, {"state": "failed", "exit_code": EXIT_FAILURE,
                                       "step": reached[0] if reached else None, "reason": reason,
                                       "restartable": True, "restarts": restarts, "time": time.time()})
        except OSError as e:
            print(f"disttrain: warning: cannot write {rundir.status}: {one_line(e)}", file=sys.stderr)
    where = f" at step {reached[0]}" if reached else ""
    print(f"{PROG}: training failed{where} (exit {EXIT_FAILURE}): {reason}", file=sys.stderr)
    return EXIT_FAILURE


def _entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    _entry()
