"""python -m disttrain.bench: how fast is disttrain's training step, against the loops it replaces?

One invocation, interleaved rounds (machines are noisy: every ratio is taken within one round, and the
report is the median of the per-round ratios). Same model, same batch size, same optimizer, same threads:

  a  tutorial   the hand-written tutorial loop: torchvision FashionMNIST with per-sample PIL transforms
                (ToTensor + Normalize) through a DataLoader (the tutorial's 2 workers)
  b  bare       a bare PyTorch loop over pre-normalised float tensors already in memory
  c  disttrain  disttrain's real code path, 1 process: `setup()` builds the Run from flags and `train()`
                runs it; throughput is read from its own metrics.jsonl step lines (start-up excluded)
  d  multi      disttrain launched for real (`accelerate launch`), 2 processes x 1 thread (gloo) against
                1 process x 2 threads, at the same global batch; steady state from metrics.jsonl step lines;
                start-up (command -> first training step) is measured on these launches

Models: `lenet` (the PyTorch TensorBoard tutorial's net, SGD lr 1e-3 momentum 0.9 as in the tutorial) and
the default `cnn` (Adam lr 1e-3, disttrain's default). Batch 64.

    python -m disttrain.bench --data-dir /tmp/fmdata [--rounds 3] [--steps 800] [--json bench.json]

`--workload lm` benchmarks the GPT language model instead (bench_lm.py: against a nanoGPT-style hand loop,
tokens/s; with --recipe, validation loss and wall time of recipes/char_gpt.yaml against the hand loop).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

WARM = 50  # steps before timing starts (also disttrain's default --log-every)
OPTIM = {"lenet": ["--optimizer", "sgd", "--lr", "0.001", "--momentum", "0.9"],
         "cnn": ["--optimizer", "adam", "--lr", "0.001"]}
REPO = Path(__file__).resolve().parents[2]


def _optimizer(name: str, model: torch.nn.Module) -> torch.optim.Optimizer:
    if name == "lenet":
        return torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    return torch.optim.Adam(model.parameters(), lr=1e-3)


def _model(name: str) -> torch.nn.Module:
    from disttrain.models import BUILTIN

    torch.manual_seed(0)
    return BUILTIN[name]([1, 28, 28], 10)


def _time_loop(step: Any, batches: Any, steps: int, batch: int) -> float:
    """samples/s of `step` over `steps` batches after WARM untimed ones."""
    it = iter(batches)
    for _ in range(WARM):
        step(*next(it))
    t = time.perf_counter()
    for _ in range(steps):
        step(*next(it))
    return steps * batch / (time.perf_counter() - t)


def _plain_step(model: torch.nn.Module, opt: torch.optim.Optimizer) -> Any:
    loss_fn = torch.nn.CrossEntropyLoss()

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()

    return step


def bench_tutorial(name: str, data_dir: str, steps: int, batch: int, workers: int) -> float:
    """(a) the tutorial: torchvision dataset, PIL -> ToTensor -> Normalize per sample, DataLoader."""
    import torchvision
    from torchvision import transforms

    tf = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.5,), (0.5,))])
    ds = torchvision.datasets.FashionMNIST(data_dir, train=True, download=False, transform=tf)
    loader = torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=True, num_workers=workers)
    model = _model(name)
    model.train()
    return _time_loop(_plain_step(model, _optimizer(name, model)), loader, steps, batch)


def bench_bare(name: str, x: torch.Tensor, y: torch.Tensor, steps: int, batch: int) -> float:
    """(b) bare loop: pre-normalised float tensors in memory, a shuffled index per epoch."""
    model = _model(name)
    model.train()
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))

    def batches() -> Any:
        for idx in perm.split(batch):
            yield x[idx], y[idx]

    return _time_loop(_plain_step(model, _optimizer(name, model)), batches(), steps, batch)


def _steady(metrics: Path) -> tuple[float, float]:
    """(samples/s over the step lines after the first, seconds covered by the first line)."""
    lines = [json.loads(s) for s in metrics.read_text().splitlines() if s.strip()]
    steps = [d for d in lines if d["kind"] == "step"]
    first = steps[0]
    first_s = first["step_time_s"] * first["step"]
    rest = steps[1:]
    n = sum(d["samples_per_sec"] * d["step_time_s"] * (d["step"] - p["step"]) for p, d in zip(steps, rest))
    t = sum(d["step_time_s"] * (d["step"] - p["step"]) for p, d in zip(steps, rest))
    return n / t, first_s


def _flags(name: str, data_dir: str, out: str, steps: int, batch: int) -> list[str]:
    return ["--model", name, *OPTIM[name], "--data-dir", data_dir, "--batch-size", str(batch),
            "--max-steps", str(WARM + steps), "--epochs", "1", "--log-every", str(WARM), "--output-dir", out,
            "--overwrite", "--no-progress", "--seed", "0"]


def bench_disttrain(name: str, data_dir: str, steps: int, batch: int, extra: list[str]) -> float:
    """(c) disttrain's own setup() + train(), in this process; its metrics.jsonl gives the throughput."""
    from disttrain.config import parse_config
    from disttrain.distributed import StopSignal
    from disttrain.train import setup, train

    _reset_accelerate()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = parse_config(_flags(name, data_dir, tmp, steps, batch) + extra)
        r = setup(cfg, StopSignal())
        r.data.test = r.data.val = None  # the epoch-end evaluation is not part of the step being timed
        try:
            train(r)
        finally:
            r.metrics.close()
            r.rundir.unlock()
        return _steady(Path(tmp) / "metrics.jsonl")[0]


def _reset_accelerate() -> None:
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()


def launch(name: str, data_dir: str, steps: int, nproc: int, batch: int, extra: list[str]) -> dict[str, float]:
    """(d) a real launch; steady-state samples/s (all ranks) and start-up (command -> first training step)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    accel = str(Path(sys.executable).parent / "accelerate")
    cfgfile = REPO / "launch" / ("cpu-multi.yaml" if nproc > 1 else "cpu.yaml")
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "DISTTRAIN_THREADS")}
    env["PYTHONUNBUFFERED"] = "1"
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        cmd = [accel, "launch", "--config_file", str(cfgfile), "--num_processes", str(nproc),
               "--main_process_port", str(port), "-m", "disttrain.train",
               *_flags(name, data_dir, str(out), steps, batch), *extra]
        t0 = time.time()
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        seen = None
        metrics = out / "metrics.jsonl"
        while p.poll() is None:
            if seen is None and metrics.is_file() and '"step"' in metrics.read_text():
                seen = time.time()
            time.sleep(0.02)
        log = p.stdout.read() if p.stdout else ""
        if p.returncode != 0:
            raise RuntimeError(f"launch failed ({p.returncode}): {' '.join(cmd)}\n{log[-2000:]}")
        sps, first_s = _steady(metrics)
        startup = (seen or time.time()) - t0 - first_s
        return {"samples_per_sec": sps, "startup_s": startup, "wall_s": time.time() - t0}


def _fashion_tensors(data_dir: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The training set as pre-normalised float tensors (and make sure torchvision's raw files exist)."""
    from disttrain.data.builtin import IMAGE_DATASETS, _load_image_dataset, _prepare_image_dataset

    _prepare_image_dataset("fashion_mnist", Path(data_dir))
    train, _, spec = _load_image_dataset("fashion_mnist", Path(data_dir))
    mean, std = IMAGE_DATASETS["fashion_mnist"][2:4]
    return (train.x.float() / 255 - mean[0]) / std[0], train.y


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m disttrain.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=800,
                   help="timed steps per candidate after 50 warm-up steps, within one epoch (<= 888 at batch 64)")
    p.add_argument("--models", default="lenet,cnn")
    p.add_argument("--multi-models", default="lenet,cnn", help="models for (d); empty to skip the launches")
    p.add_argument("--batch-size", type=int, default=64, help="per step; (d) keeps this global batch")
    p.add_argument("--threads", type=int, default=0, help="intra-op threads (default: usable cores)")
    p.add_argument("--tutorial-workers", type=int, default=2, help="DataLoader workers of (a) (tutorial: 2)")
    p.add_argument("--data-dir", default="./data")
    p.add_argument("--extra", default="", help="extra disttrain flags for (c) and (d), e.g. '--no-channels-last'")
    p.add_argument("--json", default=None)
    p.add_argument("--workload", choices=("vision", "lm"), default="vision",
                   help="vision (Fashion-MNIST, above) or lm (GPT on --corpus, bench_lm.py)")
    p.add_argument("--corpus", default="data/shakespeare", help="lm: text file or folder")
    p.add_argument("--block-size", type=int, default=64, help="lm: tokens per window")
    p.add_argument("--recipe", default=None, help="lm: compare this recipe (val loss, wall time) with the hand loop")
    a = p.parse_args(argv)
    if a.workload == "lm":
        return _main_lm(a)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = a.threads or cores
    os.environ["DISTTRAIN_THREADS"] = str(threads)  # setup() of (c) uses the same thread count
    torch.set_num_threads(threads)
    models = [m for m in a.models.split(",") if m]
    multi = [m for m in a.multi_models.split(",") if m]
    extra = a.extra.split()
    x, y = _fashion_tensors(a.data_dir)
    B = a.batch_size
    rows: dict[str, dict[str, list[float]]] = {m: {} for m in set(models) | set(multi)}

    def rec(m: str, k: str, v: float) -> None:
        rows[m].setdefault(k, []).append(v)
        print(f"  {m:6s} {k:14s} {v:10.1f}", flush=True)

    for r in range(a.rounds):
        print(f"round {r + 1}/{a.rounds}", flush=True)
        for m in models:
            order = [("a", lambda: bench_tutorial(m, a.data_dir, a.steps, B, a.tutorial_workers)),
                     ("b", lambda: bench_bare(m, x, y, a.steps, B)),
                     ("c", lambda: bench_disttrain(m, a.data_dir, a.steps, B, extra))]
            if r % 2:
                order.reverse()  # alternate the order: drifts in machine load cancel across rounds
            got = {}
            for k, fn in order:
                torch.set_num_threads(threads)
                got[k] = fn()
                rec(m, k, got[k])
            rec(m, "c/a", got["c"] / got["a"])
            rec(m, "c/b", got["c"] / got["b"])
        for m in multi:
            runs = [(2, 1), (1, 2)] if r % 2 == 0 else [(1, 2), (2, 1)]
            got = {}
            for nproc, _ in runs:
                got[nproc] = launch(m, a.data_dir, a.steps, nproc, B // nproc, ["--batch-size", str(B // nproc)] + extra)
                rec(m, f"d{nproc}p", got[nproc]["samples_per_sec"])
                rec(m, f"startup{nproc}p_s", got[nproc]["startup_s"])
            rec(m, "d", got[2]["samples_per_sec"] / got[1]["samples_per_sec"])

    summary = {m: {k: median(v) for k, v in d.items()} for m, d in rows.items()}
    names = {"a": "a tutorial loop", "b": "b bare tensors", "c": "c disttrain 1 proc", "d2p": "d 2 proc x 1 thr",
             "d1p": "d 1 proc x 2 thr", "c/a": "c/a (target >= 2.2)", "c/b": "c/b (target >= 0.95)",
             "d": "d = 2x1 / 1x2 (target >= 0.9)", "startup1p_s": "start-up 1 proc (s)",
             "startup2p_s": "start-up 2 proc (s)"}
    print(f"\nmedians over {a.rounds} round(s), batch {B}, {threads} thread(s), {a.steps} timed steps "
          f"(samples/s; ratios are medians of per-round ratios)")
    print(f"| {'':32s} | " + " | ".join(f"{m:>9s}" for m in rows) + " |")
    print(f"|{'-' * 34}|" + "|".join("-" * 11 for _ in rows) + "|")
    for k, label in names.items():
        if any(k in summary[m] for m in rows):
            print(f"| {label:32s} | " + " | ".join(f"{summary[m].get(k, float('nan')):9.2f}" for m in rows) + " |")
    if a.json:
        Path(a.json).write_text(json.dumps({"rounds": a.rounds, "steps": a.steps, "batch_size": B,
                                            "threads": threads, "extra": extra, "median": summary,
                                            "per_round": rows}, indent=1))
    return 0


def _main_lm(a: argparse.Namespace) -> int:
    from disttrain import bench_lm

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = a.threads or cores
    os.environ["DISTTRAIN_THREADS"] = str(threads)
    torch.set_num_threads(threads)
    rows: dict[str, dict[str, list[float]]] = {}

    def rec(m: str, k: str, v: float) -> None:
        rows.setdefault(m, {}).setdefault(k, []).append(v)
        print(f"  {m:6s} {k:20s} {v:10.3f}", flush=True)

    if a.recipe:
        bench_lm.recipe(a.corpus, a.recipe, a.rounds, threads, rec)
    else:
        bench_lm.throughput(a.corpus, a.data_dir, a.rounds, a.steps, a.batch_size, a.block_size, threads,
                            bool(a.multi_models), rec)
    summary = {m: {k: median(v) for k, v in d.items()} for m, d in rows.items()}
    print(f"\nmedians over {a.rounds} round(s), {threads} thread(s)"
          + ("" if a.recipe else f", batch {a.batch_size} x block {a.block_size}, {a.steps} timed steps "
             "(tokens/s; c/b = disttrain / hand loop, target >= 1.0; d = 2 proc x 1 thr / 1 proc x 2 thr, "
             "target >= 0.9; ratios are medians of per-round ratios)"))
    for m, d in summary.items():
        for k, v in d.items():
            print(f"  {m:6s} {k:20s} {v:10.3f}")
    if a.json:
        Path(a.json).write_text(json.dumps({"workload": "lm", "rounds": a.rounds, "steps": a.steps,
                                            "batch_size": a.batch_size, "threads": threads, "median": summary,
                                            "per_round": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
