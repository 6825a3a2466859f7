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

Optional sections (each its own peers, side by side, in the same run):

  --contention  a busy process pinned to one of our CPUs; `python -m disttrain.train` with the default
                threads against DISTTRAIN_THREADS=1 and =all CPUs, and against libgomp's spinning wait
                (GOMP_SPINCOUNT=300000, what every run did before OMP_WAIT_POLICY=PASSIVE); then default
                against spinning on the quiet machine. Ratios: default / best of 1 and all threads
                (target >= 0.8), spinning / best, quiet default / quiet spinning (target >= 1, noise aside).
  --time-to-accuracy
                the recipe (recipes/fashion_mnist.yaml through setup() + train(), test accuracy at every
                epoch end) against a hand-written, hand-tuned in-memory loop of the same network, optimizer,
                schedule, augmentation, precision and batch; seconds until test accuracy >= 93.5%, and their
                ratio (target <= 0.8). Expensive: two full recipe trainings per round.

    python -m disttrain.bench --data-dir /tmp/fmdata [--rounds 3] [--steps 800] [--json bench.json]
    python -m disttrain.bench --models '' --multi-models '' --contention --time-to-accuracy

`--workload lm` benchmarks the GPT language model instead (bench_lm.py: against a nanoGPT-style hand loop,
tokens/s; with --recipe, validation loss and wall time of recipes/char_gpt.yaml against the hand loop).
"""

from __future__ import annotations

import argparse
import importlib
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

from disttrain import hardware

WARM = 50  # steps before timing starts (also disttrain's default --log-every)
OPTIM = {"lenet": ["--optimizer", "sgd", "--lr", "0.001", "--momentum", "0.9"],
         "cnn": ["--optimizer", "adam", "--lr", "0.001"], "mlp": ["--optimizer", "adam", "--lr", "0.001"]}
REPO = Path(__file__).resolve().parents[2]


def _optimizer(name: str, model: torch.nn.Module) -> torch.optim.Optimizer:
    if name == "lenet":
        return torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    return torch.optim.Adam(model.parameters(), lr=1e-3)


def _device() -> torch.device:
    """Where every candidate runs: the GPU if there is one (disttrain itself picks it), else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _model(name: str) -> torch.nn.Module:
    from disttrain.models import BUILTIN

    torch.manual_seed(0)
    return BUILTIN[name]([1, 28, 28], 10).to(_device())


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()  # GPU work is asynchronous: time what has finished


def _time_loop(step: Any, batches: Any, steps: int, batch: int) -> float:
    """samples/s of `step` over `steps` batches after WARM untimed ones."""
    it = iter(batches)
    for _ in range(WARM):
        step(*next(it))
    _sync()
    t = time.perf_counter()
    for _ in range(steps):
        step(*next(it))
    _sync()
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
    step, dev = _plain_step(model, _optimizer(name, model)), _device()
    return _time_loop(lambda x, y: step(x.to(dev), y.to(dev)), loader, steps, batch)  # the tutorial's .to(device)


def bench_bare(name: str, x: torch.Tensor, y: torch.Tensor, steps: int, batch: int) -> float:
    """(b) bare loop: pre-normalised float tensors in memory, a shuffled index per epoch."""
    model = _model(name)
    model.train()
    x, y = x.to(_device()), y.to(_device())
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0)).to(_device())

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
    return run_disttrain(lambda tmp: _flags(name, data_dir, tmp, steps, batch) + extra)


def run_disttrain(flags: Any) -> float:
    """disttrain's own setup() + train() in this process, for `flags(tmp_dir)`: steady samples/s from its
    metrics.jsonl (the benchmark's c column; bench_lm's disttrain side)."""
    from disttrain.config import parse_config
    from disttrain.distributed import StopSignal
    from disttrain.train import release, setup, train

    _reset_accelerate()
    with tempfile.TemporaryDirectory() as tmp:
        r = setup(parse_config(flags(tmp)), StopSignal())
        r.data.test = r.data.val = None  # the epoch-end evaluation is not part of the step being timed
        try:
            train(r)
        finally:
            release(r)
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


# =========================================================================== contention (shared machines)


def _busy_process(cpu: int) -> subprocess.Popen:
    """A process spinning on one CPU (the competing work of a shared machine)."""
    return subprocess.Popen([sys.executable, "-c", "while True: pass"],
                            preexec_fn=lambda: os.sched_setaffinity(0, {cpu}))


def train_process(name: str, data_dir: str, steps: int, batch: int, env_over: dict[str, str], cap_s: float,
                  extra: list[str]) -> float:
    """samples/s of `python -m disttrain.train` (one process) in steady state, with these environment
    settings (a fresh process: OpenMP reads its wait policy at start). A run slower than `cap_s` is stopped
    and measured on the step lines it wrote (a lower bound if fewer than two)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "DISTTRAIN_THREADS",
                        "OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")}
    env.update(env_over)
    env["DISTTRAIN_CONTENTION_NOTE"] = "0"
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        cmd = [sys.executable, "-m", "disttrain.train", *_flags(name, data_dir, str(out), steps, batch), *extra]
        t0 = time.time()
        p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
        try:
            p.wait(timeout=cap_s)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
        metrics = out / "metrics.jsonl"
        lines = [json.loads(s) for s in metrics.read_text().splitlines() if s.strip()] if metrics.is_file() else []
        steps_seen = [d for d in lines if d["kind"] == "step"]
        if len(steps_seen) >= 2:
            return _steady(metrics)[0]
        if p.returncode not in (0, -9):
            raise RuntimeError(f"{' '.join(cmd)} failed ({p.returncode}): {(p.stderr.read() if p.stderr else '')[-2000:]}")
        done = steps_seen[-1]["step"] if steps_seen else 0
        return done * batch / (time.time() - t0)  # lower bound: start-up included


def bench_contention(name: str, data_dir: str, steps: int, batch: int, cap_s: float, extra: list[str],
                     round_no: int) -> dict[str, float]:
    """One round: with a busy process pinned to our last CPU, default / 1 thread / all threads / spinning;
    then, without it, default / spinning. Order alternates with the round."""
    cpus = sorted(hardware.affinity())
    n = hardware.usable_cpus(set(cpus), hardware.cgroup_cpu_limit())
    spin = {"GOMP_SPINCOUNT": "300000"}  # libgomp's default when OMP_WAIT_POLICY is unset
    busy_runs = [("busy default", {}), ("busy 1 thread", {"DISTTRAIN_THREADS": "1"}),
                 (f"busy {n} threads", {"DISTTRAIN_THREADS": str(n)}), ("busy spinning", spin)]
    quiet_runs = [("quiet default", {}), ("quiet spinning", spin)]
    if round_no % 2:
        busy_runs.reverse()
        quiet_runs.reverse()
    got: dict[str, float] = {}
    hog = _busy_process(cpus[-1])
    try:
        for label, env in busy_runs:
            got[label] = train_process(name, data_dir, steps, batch, env, cap_s, extra)
    finally:
        hog.kill()
        hog.wait()
    for label, env in quiet_runs:
        got[label] = train_process(name, data_dir, steps, batch, env, cap_s, extra)
    best = max(got["busy 1 thread"], got[f"busy {n} threads"])
    got["busy default/best"] = got["busy default"] / best
    got["busy spinning/best"] = got["busy spinning"] / best
    got["quiet default/spinning"] = got["quiet default"] / got["quiet spinning"]
    return got


# =========================================================================== time to accuracy


RECIPE = REPO / "recipes" / "fashion_mnist.yaml"


def tta_recipe(data_dir: str, target: float) -> dict[str, Any]:
    """The recipe through disttrain's setup() + train() in this process: seconds from the call until the
    epoch-end test accuracy first reaches `target` (setup, evaluation and checkpoints included)."""
    from disttrain.config import parse_config
    from disttrain.distributed import StopSignal
    from disttrain.train import release, setup, train

    _reset_accelerate()
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.time()
        cfg = parse_config(["--config", str(RECIPE), "--data-dir", data_dir, "--output-dir", tmp, "--overwrite",
                            "--no-progress", "--seed", "0"])
        r = setup(cfg, StopSignal())
        try:
            train(r)
        finally:
            release(r)
        lines = [json.loads(s) for s in (Path(tmp) / "metrics.jsonl").read_text().splitlines() if s.strip()]
        curve = [(r.attempt_start - t0 + d["elapsed_s"], d["eval_accuracy"]) for d in lines if d["kind"] == "epoch"]
        return _tta(curve, target) | {"precision": cfg.mixed_precision}


def tta_hand(data_dir: str, target: float) -> dict[str, Any]:
    """The same network, optimizer, schedule, augmentation, precision and batch as the recipe, written by
    hand the way a careful user would: the whole set in memory, pre-normalised, channels_last, fused AdamW,
    PyTorch's OneCycleLR (no momentum cycling, as the recipe), per-sample flips, bf16 autocast if `auto`
    picks it, evaluation under inference_mode; test accuracy at every epoch end."""
    import yaml

    from disttrain.data.builtin import IMAGE_DATASETS, _load_image_dataset, _prepare_image_dataset
    from disttrain.models import BUILTIN

    rc = yaml.safe_load(RECIPE.read_text())
    t0 = time.time()
    _prepare_image_dataset("fashion_mnist", Path(data_dir))
    train_set, test_set, _ = _load_image_dataset("fashion_mnist", Path(data_dir))
    mean, std = IMAGE_DATASETS["fashion_mnist"][2][0], IMAGE_DATASETS["fashion_mnist"][3][0]
    norm = lambda u8: ((u8.float() / 255 - mean) / std).contiguous(memory_format=torch.channels_last)  # noqa: E731
    x, y, xt, yt = norm(train_set.x), train_set.y, norm(test_set.x), test_set.y
    mp = rc["mixed_precision"]
    if mp == "auto":
        mp = hardware.auto_precision("cpu", flags=hardware.cpu_flags())[0]
    torch.manual_seed(0)
    model = BUILTIN["cnn"]([1, 28, 28], 10, **rc["model_kwargs"]).to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=rc["lr"], weight_decay=rc["weight_decay"], fused=True)
    B, epochs = rc["batch_size"], rc["epochs"]
    steps = (len(x) + B - 1) // B
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=rc["lr"], total_steps=epochs * steps,
                                                cycle_momentum=False)
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=rc["label_smoothing"])
    cast = lambda: torch.autocast("cpu", torch.bfloat16, enabled=mp == "bf16")  # noqa: E731
    curve = []
    for _ in range(epochs):
        model.train()
        for idx in torch.randperm(len(x)).split(B):
            xb, yb = x[idx], y[idx]
            xb = torch.where(torch.rand(len(idx))[:, None, None, None] < 0.5, xb.flip(-1), xb)
            opt.zero_grad(set_to_none=True)
            with cast():
                loss = loss_fn(model(xb), yb)
            loss.backward()
            opt.step()
            sched.step()
        model.eval()
        with torch.inference_mode(), cast():
            correct = sum(int((model(xt[i:i + 1024]).argmax(1) == yt[i:i + 1024]).sum())
                          for i in range(0, len(xt), 1024))
        curve.append((time.time() - t0, correct / len(xt)))
    return _tta(curve, target) | {"precision": mp}


def _tta(curve: list[tuple[float, float]], target: float) -> dict[str, Any]:
    hit = next((t for t, a in curve if a >= target), None)
    return {"seconds_to_target": hit, "final_accuracy": curve[-1][1] if curve else None,
            "total_s": curve[-1][0] if curve else None, "curve": curve}


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
    p.add_argument("--contention", action="store_true", help="the shared-machine section (see above)")
    p.add_argument("--contention-model", default="mlp")
    p.add_argument("--contention-steps", type=int, default=300, help="timed steps per contention candidate")
    p.add_argument("--contention-cap", type=float, default=120.0,
                   help="seconds a contention candidate may run before it is stopped and measured as is")
    p.add_argument("--time-to-accuracy", action="store_true", help="the recipe against a hand loop (see above)")
    p.add_argument("--tta-rounds", type=int, default=1, help="rounds of the time-to-accuracy section")
    p.add_argument("--tta-target", type=float, default=0.935, help="test accuracy to reach")
    p.add_argument("--json", default=None)
    p.add_argument("--workload", choices=("vision", "lm"), default="vision",
                   help="vision (Fashion-MNIST, above) or lm (GPT on --corpus, bench_lm.py)")
    p.add_argument("--corpus", default="data/shakespeare", help="lm: text file or folder")
    p.add_argument("--block-size", type=int, default=64, help="lm: tokens per window")
    p.add_argument("--recipe", default=None, help="lm: compare this recipe (val loss, wall time) with the hand loop")
    a = p.parse_args(argv)
    # the in-process candidates share one allocator: set it up as train() does before any of them runs, so
    # the order of the candidates does not decide which one pays glibc's default page faults
    try:
        hardware.tune_malloc(os.environ)
    except ValueError as e:
        print(f"disttrain: error: {e}", file=sys.stderr)
        return 2
    if a.workload == "lm":
        return _main_lm(a)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = a.threads or cores
    os.environ["DISTTRAIN_THREADS"] = str(threads)  # setup() of (c) uses the same thread count
    torch.set_num_threads(threads)
    models = [m for m in a.models.split(",") if m]
    multi = [m for m in a.multi_models.split(",") if m]
    device = _device()
    if device.type == "cuda" and multi:
        print("d (CPU processes, gloo) skipped: the benchmark runs on the GPU", flush=True)
        multi = []
    if device.type == "cuda" and a.contention:
        print("--contention and --time-to-accuracy skipped: they measure the CPU path", flush=True)
        a.contention = a.time_to_accuracy = False
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
        if a.contention:
            cm = a.contention_model
            rows.setdefault(cm, {})
            for k, v in bench_contention(cm, a.data_dir, a.contention_steps, B, a.contention_cap, extra, r).items():
                rec(cm, k, v)

    tta: list[dict[str, Any]] = []
    if a.time_to_accuracy:
        for mod in ("accelerate", "torchvision"):  # imports are start-up, not training: before either clock
            importlib.import_module(mod)
    for r in range(a.tta_rounds if a.time_to_accuracy else 0):
        print(f"time to accuracy, round {r + 1}/{a.tta_rounds}", flush=True)
        order = [("recipe", tta_recipe), ("hand", tta_hand)]
        got = {k: fn(a.data_dir, a.tta_target) for k, fn in (order if r % 2 == 0 else order[::-1])}
        for k in ("recipe", "hand"):
            print(f"  {k:6s} {got[k]['seconds_to_target'] or float('nan'):8.1f} s to {a.tta_target:.1%}, final "
                  f"{got[k]['final_accuracy']:.2%} after {got[k]['total_s']:.1f} s ({got[k]['precision']})", flush=True)
        t_r, t_h = got["recipe"]["seconds_to_target"], got["hand"]["seconds_to_target"]
        got["ratio"] = t_r / t_h if t_r and t_h else None
        tta.append(got)

    summary = {m: {k: median(v) for k, v in d.items()} for m, d in rows.items()}
    all_cpus = hardware.usable_cpus(hardware.affinity(), hardware.cgroup_cpu_limit())
    names = {"a": "a tutorial loop", "b": "b bare tensors", "c": "c disttrain 1 proc", "d2p": "d 2 proc x 1 thr",
             "d1p": "d 1 proc x 2 thr", "c/a": "c/a (target >= 2.2)", "c/b": "c/b (target >= 0.95)",
             "d": "d = 2x1 / 1x2 (target >= 0.9)", "startup1p_s": "start-up 1 proc (s)",
             "startup2p_s": "start-up 2 proc (s)",
             "busy default": "busy: default threads", "busy 1 thread": "busy: 1 thread",
             f"busy {all_cpus} threads": f"busy: {all_cpus} threads", "busy spinning": "busy: spinning wait (before)",
             "busy default/best": "busy default/best (>= 0.8)", "busy spinning/best": "busy spinning/best (before)",
             "quiet default": "quiet: default", "quiet spinning": "quiet: spinning wait (before)",
             "quiet default/spinning": "quiet default/spinning"}
    print(f"\nmedians over {a.rounds} round(s), device {device}, batch {B}, {threads} thread(s), {a.steps} timed steps "
          f"(samples/s; ratios are medians of per-round ratios)"
          + (f"; contention: {a.contention_model}, {a.contention_steps} timed steps" if a.contention else ""))
    print(f"| {'':32s} | " + " | ".join(f"{m:>9s}" for m in rows) + " |")
    print(f"|{'-' * 34}|" + "|".join("-" * 11 for _ in rows) + "|")
    for k, label in names.items():
        if any(k in summary[m] for m in rows):
            print(f"| {label:32s} | " + " | ".join(f"{summary[m].get(k, float('nan')):9.2f}" for m in rows) + " |")
    if tta:
        ratios = [t["ratio"] for t in tta if t["ratio"] is not None]
        print(f"time to {a.tta_target:.1%} test accuracy: recipe / hand loop = "
              f"{median(ratios):.2f} (target <= 0.8; per round {', '.join(f'{x:.2f}' for x in ratios) or 'none'})")
    if a.json:
        Path(a.json).write_text(json.dumps({"device": str(device), "rounds": a.rounds, "steps": a.steps,
                                            "batch_size": B, "threads": threads, "extra": extra, "median": summary,
                                            "per_round": rows, "time_to_accuracy": tta}, indent=1))
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
