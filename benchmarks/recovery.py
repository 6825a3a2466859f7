"""What a crash costs under `disttrain.launch --max-restarts` (a benchmark, not a test).

    python benchmarks/recovery.py save [--data-dir DIR]     # checkpoint cost of the default job
    python benchmarks/recovery.py restart [--rank 1]        # SIGKILL a worker of a 2-process job, time the restart

`save`: trains the default job (Fashion-MNIST, the default CNN and flags) for 300 steps with a checkpoint
every 25 steps, and reports the median step, the median checkpoint, the per-step bookkeeping of the restart
machinery (progress marker, time-cadence check) and what `--save-every-minutes 1` and `5` cost as a fraction
of training time (checkpoint seconds / period: the ratio does not depend on the machine's speed).

`restart`: a 2-process CPU job (synthetic data, MLP, a checkpoint every 10 steps) under `disttrain.launch
--max-restarts 1`; when step 12 has finished, SIGKILL one worker and report the phases: kill -> the launcher's
restart line (torchrun's agent noticed and stopped the group), -> the new group's topology line (imports,
rendezvous, data), -> its "resumed" line (checkpoint loaded), -> its first finished step; the steps lost;
and, for scale, how long the first (fresh) start took to its topology line.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import timeit
from pathlib import Path


def save_cost(data_dir: str) -> None:
    from disttrain import recovery, train

    saves: list[float] = []
    real = train._save

    def timed(r, meter):  # noqa: ANN001, ANN202
        t = time.perf_counter()
        path = real(r, meter)
        saves.append(time.perf_counter() - t)
        return path

    train._save = timed
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        code = train.main(["--data-dir", data_dir, "--max-steps", "300", "--save-every-steps", "25",
                           "--log-every", "25", "--no-progress", "--output-dir", str(out)])
        steps = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines() if '"kind": "step"' in ln]
        p = recovery.Progress(Path(tmp) / "progress", True)
        clock = recovery.SaveClock(5, True)
        mark = min(timeit.repeat(lambda: p.mark(7), number=10000, repeat=5)) / 10000
        due = min(timeit.repeat(clock.due, number=10000, repeat=5)) / 10000
        p.close()
    step = sorted(x["step_time_s"] for x in steps)[len(steps) // 2]
    save = sorted(saves)[len(saves) // 2]
    print(f"exit {code}; median step {step * 1e3:.2f} ms; median checkpoint {save * 1e3:.1f} ms ({len(saves)} saves)")
    print(f"per step: progress marker {mark * 1e6:.2f} us + time-cadence check {due * 1e6:.2f} us "
          f"= {100 * (mark + due) / step:.4f}% of a step")
    for minutes in (1, 5):
        print(f"--save-every-minutes {minutes}: one checkpoint per {minutes * 60 / step:.0f} steps, "
              f"{100 * save / (minutes * 60):.3f}% of training time")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(out: Path, rank: int) -> int | None:
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd, environ = (d / "cmdline").read_bytes().split(b"\0"), (d / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"disttrain.train" in cmd and str(out).encode() in cmd and f"LOCAL_RANK={rank}".encode() in environ:
            return int(d.name)
    return None


def restart_cost(rank: int) -> None:
    from disttrain.recovery import Progress

    repo = Path(__file__).resolve().parents[1]
    tmp = Path(tempfile.mkdtemp(prefix="disttrain-bench-"))
    out = tmp / "run"
    cmd = [sys.executable, "-m", "disttrain.launch", "--max-restarts", "1", "--config_file",
           str(repo / "launch" / "cpu-multi.yaml"), "--num_processes", "2", "--main_process_port", str(_free_port()),
           "--", "--dataset", "synthetic_classification", "--dataset-kwargs", '{"n_train": 20000}', "--model", "mlp",
           "--batch-size", "16", "--epochs", "1", "--max-steps", "400", "--save-every-steps", "10", "--log-every",
           "1000", "--no-progress", "--output-dir", str(out)]
    events: list[tuple[float, str]] = []
    t_start = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))

    def read(stream) -> None:  # noqa: ANN001
        for line in stream:
            events.append((time.time(), line.rstrip()))

    for s in (proc.stdout, proc.stderr):
        threading.Thread(target=read, args=(s,), daemon=True).start()

    def first(text: str, after: float = 0.0) -> float:
        return next((t for t, ln in events if text in ln and t >= after), float("nan"))

    try:
        while (Progress.read(out / ".progress") or (0, 0.0))[0] < 12:
            if proc.poll() is not None:
                raise SystemExit(f"the job ended first: {events[-5:]}")
            time.sleep(0.005)
        pid, before = _worker(out, rank), Progress.read(out / ".progress")
        t_kill = time.time()
        os.kill(pid, signal.SIGKILL)
        first_step = None
        while proc.poll() is None and first_step is None:
            now, resumed = Progress.read(out / ".progress"), first("resumed from", t_kill)
            if now is not None and now[1] > resumed:  # (nan compares False: not resumed yet)
                first_step = now[1]
            time.sleep(0.005)
        proc.wait(timeout=600)
        restart = next(json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines() if '"restart"' in ln)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"killed rank {rank} after step {before[0]}; resumed at step {restart['step']}, "
          f"{restart['steps_lost']} step(s) lost; exit {proc.returncode}")
    for what, text in (("the launcher's restart line (group stopped)", "disttrain-launch: restart"),
                       ("the new group's topology line", "topology:"), ("its resumed line", "resumed from")):
        print(f"  kill -> {what:45s} {first(text, t_kill) - t_kill:6.2f} s")
    print(f"  kill -> {'its first finished step':45s} {(first_step or float('nan')) - t_kill:6.2f} s "
          f"(restart line: recovery_s {restart['recovery_s']})")
    print(f"  for scale: the fresh start's launch -> topology line {first('topology:') - t_start:6.2f} s")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=("save", "restart"))
    p.add_argument("--data-dir", default="/usr/share/datasets")
    p.add_argument("--rank", type=int, default=1, help="the worker to kill (restart)")
    args = p.parse_args()
    save_cost(args.data_dir) if args.what == "save" else restart_cost(args.rank)


if __name__ == "__main__":
    main()
