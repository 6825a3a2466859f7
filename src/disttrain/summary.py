"""The run summary: `<output-dir>/summary.json` and a few console lines at the end of a run.

Everything about metrics comes from metrics.jsonl itself (the "final" block is its last epoch line), so the
summary always agrees with the log, also after resumes. The rest is bookkeeping from the loop's Position
(checkpoints written, resumes, the best checkpoint) and provenance: versions, git commit, hosts, command.
"""

from __future__ import annotations

import os
import platform
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from disttrain import checkpoint as ckpt
from disttrain.distributed import say
from disttrain.metrics import read_metrics

# metrics where larger is better; every other numeric epoch metric is "lower is better" (losses)
HIGHER_IS_BETTER = ("eval_accuracy", "val_accuracy")
BEST_KEYS = ("train_loss", "val_loss", "val_accuracy", "eval_loss", "eval_accuracy")


def _git(cwd: Path, *args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def git_info() -> dict[str, Any] | None:
    """Commit of the repository holding the current directory, else of the one holding disttrain's code."""
    for where in (Path.cwd(), Path(__file__).resolve().parent):
        commit = _git(where, "rev-parse", "HEAD")
        if commit:
            dirty = _git(where, "status", "--porcelain", "--untracked-files=no")
            return {"commit": commit, "dirty": bool(dirty), "repo": _git(where, "rev-parse", "--show-toplevel")}
    return None


def _version(module: str) -> str | None:
    try:
        return getattr(__import__(module), "__version__", None)
    except Exception:  # noqa: BLE001 - provenance is best effort
        return None


def gather_hosts(acc: Any) -> list[str]:
    """Host (Slurm node name when there is one) of every rank, in rank order (a collective on several)."""
    me = os.environ.get("SLURMD_NODENAME") or socket.gethostname()
    if acc.num_processes == 1:
        return [me]
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        return [me]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, me)
    return [str(h) for h in out]


def command_line() -> str:
    """The command as a user would type it (`python -m disttrain.train ...` rather than the module's path)."""
    argv = list(sys.argv)
    if argv and argv[0].endswith(os.path.join("disttrain", "train.py")):
        argv[:1] = ["python", "-m", "disttrain.train"]
    return shlex.join(argv)


def provenance(acc: Any, hosts: list[str]) -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {
        "disttrain": _version("disttrain"), "torch": torch.__version__, "accelerate": _version("accelerate"),
        "python": platform.python_version(), "git": git_info(), "world_size": acc.num_processes,
        "hosts": hosts, "main_host": hosts[0] if hosts else socket.gethostname(),
        "num_hosts": len(set(hosts)), "device": acc.device.type, "mixed_precision": str(acc.mixed_precision),
        "command": command_line(), "argv": list(sys.argv), "cwd": os.getcwd(),
    }
    if acc.device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(acc.device)
    return info


def best_metrics(epochs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Best value of each epoch metric over the run, with the epoch and step it came from."""
    best: dict[str, dict[str, Any]] = {}
    for key in BEST_KEYS:
        rows = [e for e in epochs if isinstance(e.get(key), (int, float))]
        if not rows:
            continue
        pick = max if key in HIGHER_IS_BETTER else min
        row = pick(rows, key=lambda e: e[key])
        best[key] = {"value": row[key], "epoch": row["epoch"], "step": row["step"]}
    return best


def run_throughput(epochs: list[dict[str, Any]]) -> float | None:
    """Training samples/s over the whole run: each epoch line's rate weighted by the steps it covers
    (total samples / total training time when the batch is constant)."""
    steps, time_units, prev = 0, 0.0, 0
    for e in epochs:
        n = e["step"] - prev
        prev = e["step"]
        if n > 0 and e.get("samples_per_sec"):
            steps += n
            time_units += n / e["samples_per_sec"]
    return steps / time_units if time_units > 0 else None


def build_summary(r: Any, hosts: list[str]) -> dict[str, Any]:
    """The summary.json object of a finished run (a `train.Run`)."""
    records = read_metrics(r.rundir.metrics)
    epochs = [x for x in records if x.get("kind") == "epoch"]
    final = {k: v for k, v in epochs[-1].items() if k != "kind"} if epochs else None
    rundir: ckpt.RunDir = r.rundir
    kept = [p.name for p in rundir.step_dirs()]
    elapsed = r.pos.elapsed_s + time.time() - r.attempt_start
    return {
        "run_dir": str(rundir.path),
        "dataset": r.cfg.dataset,
        "model": r.cfg.model,
        "task": r.data.spec.task,
        "steps": r.pos.step,
        "epochs": final["epoch"] if final else 0,
        "global_batch": r.cfg.batch_size * r.acc.num_processes * r.cfg.grad_accum,
        "final": final,
        "best": best_metrics(epochs),
        "best_checkpoint": dict(r.pos.best, path=str(rundir.best)) if r.pos.best and rundir.best.is_dir()
        else r.pos.best,
        "elapsed_s": final["elapsed_s"] if final else elapsed,  # as in the last epoch line
        "finished_elapsed_s": elapsed,  # up to this summary (final export included)
        "train_samples_per_sec": run_throughput(epochs),
        "checkpoints": {"written": r.pos.checkpoints, "kept": kept, "resumes": r.pos.resumes},
        "resumes": r.pos.resumes,
        "restarts": sum(1 for x in records if x.get("kind") == "restart"),  # by disttrain.launch --max-restarts
        "nonfinite_skips": r.pos.nonfinite_skips,
        "model_file": str(rundir.model) if rundir.model.exists() else None,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "provenance": provenance(r.acc, hosts),
    }


def format_summary(s: dict[str, Any]) -> str:
    lines = ["summary:"]
    f = s["final"]
    if f:
        parts = [f"{k} {f[k]:.4f}" for k in BEST_KEYS if k in f]
        lines.append(f"  final (epoch {f['epoch']}, step {f['step']}): " + ", ".join(parts))
    for k, b in s["best"].items():
        if k != "train_loss":
            lines.append(f"  best {k} {b['value']:.4f} at epoch {b['epoch']} (step {b['step']})")
    sps = s["train_samples_per_sec"]
    c = s["checkpoints"]
    restarts = f", {s['restarts']} restart(s) after a failure" if s.get("restarts") else ""
    lines.append(f"  time {s['elapsed_s']:.1f} s, {sps:.0f} training samples/s, {c['written']} checkpoint(s) "
                 f"written, {s['resumes']} resume(s){restarts}" if sps else
                 f"  time {s['elapsed_s']:.1f} s, {c['written']} checkpoint(s) written, {s['resumes']} resume(s)"
                 f"{restarts}")
    p = s["provenance"]
    git = p["git"]
    lines.append(f"  disttrain {p['disttrain']}, torch {p['torch']}, accelerate {p['accelerate']}, "
                 f"{p['world_size']} process(es) on {p['num_hosts']} host(s)"
                 + (f", git {git['commit'][:12]}{' (dirty)' if git['dirty'] else ''}" if git else ""))
    return "\n".join(lines)


def write_summary(r: Any) -> dict[str, Any] | None:
    """Call on every rank at the end of a run (gathers host names); the main process writes summary.json
    and prints the summary. Returns the summary on the main process, None elsewhere."""
    hosts = gather_hosts(r.acc)
    if not r.acc.is_main_process:
        return None
    s = build_summary(r, hosts)
    ckpt.write_json(r.rundir.summary, s)
    say(r.acc, format_summary(s) + f"\n  written to {r.rundir.summary}")
    return s
