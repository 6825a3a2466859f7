"""FSDP2 vs DDP on N CPU processes, side by side in one run: memory per rank, step time, checkpoints.

    python benchmarks/fsdp.py [--nproc 2] [--rounds 3] [--steps 20] [--width 384] [--depth 4] [--batch 32]
                              [--no-reshard] [--json out.json]

It starts itself under torchrun (gloo). Every round trains the same model (a stack of `depth` residual MLP
blocks in an nn.ModuleList, width x 4*width, ~`12 * depth * width**2` parameters, AdamW) once with disttrain's
DDP strategy, once with its FSDP2 strategy (parallel.py: the code path `train()` uses; on one machine's CPU
processes its collectives go through shared memory) and once with FSDP2 over gloo (`--no-shm-allreduce`: TCP
loopback), reversing the order every round, and reports per-round ratios and their median (the machine is shared and noisy: ratios,
not seconds, are the result). Measured per rank:

  state_mb     bytes of parameters + gradients + optimizer state this rank holds after a step (local shards
               under FSDP; gathered units are transient and not counted; DDP's gradients are its buckets)
  step_s       median wall time of one optimizer step (forward, backward, gradient sync, AdamW step)
  save_s/load_s/ckpt_mb   a checkpoint through checkpoint.save_checkpoint / load_checkpoint + load_state
               (full on the main process under DDP; every rank's shards under FSDP)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]


class Block(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.up, self.down = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(torch.relu(self.up(x)))


class Stack(nn.Module):
    def __init__(self, width: int, depth: int, classes: int = 10):
        super().__init__()
        self.blocks = nn.ModuleList(Block(width) for _ in range(depth))
        self.head = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for b in self.blocks:
            x = b(x)
        return self.head(x)


def _local_bytes(t: torch.Tensor | None) -> int:
    if t is None:
        return 0
    t = t.to_local() if hasattr(t, "to_local") else t
    return t.numel() * t.element_size()


def state_bytes(model: nn.Module, opt: torch.optim.Optimizer) -> int:
    n = sum(_local_bytes(p) + _local_bytes(p.grad) for p in model.parameters())
    for st in opt.state.values():
        n += sum(_local_bytes(v) for v in st.values() if isinstance(v, torch.Tensor))
    return n


def one(kind: str, args: argparse.Namespace, acc: Any, work: Path) -> dict[str, float]:
    from disttrain import checkpoint as ckpt
    from disttrain.config import parse_config
    from disttrain.optim import build_optimizer
    from disttrain.parallel import make_parallel

    shm = [] if kind != "fsdp-gloo" else ["--no-shm-allreduce"]  # FSDP2's collectives through gloo (TCP)
    kind = kind.removesuffix("-gloo")
    cfg = parse_config([*shm, "--optimizer", "adamw", "--lr", "1e-4", "--max-grad-norm", "1.0", "--sharding", kind,
                        "--dataset", "synthetic_classification", "--model", "mlp",
                        "--fsdp-reshard-after-forward" if args.reshard else "--no-fsdp-reshard-after-forward"])
    torch.manual_seed(0)
    model = Stack(args.width, args.depth)
    par = make_parallel(cfg, acc, kind, model)
    model = par.wrap(model)
    opt = par.prepare_optimizer(build_optimizer(cfg, model))
    raw = getattr(opt, "optimizer", opt)
    g = torch.Generator().manual_seed(acc.process_index)
    x = torch.randn(args.batch, args.width, generator=g)
    y = torch.randint(0, 10, (args.batch,), generator=g)
    times, mem = [], 0
    for i in range(args.steps + 2):
        t = time.perf_counter()
        raw.zero_grad(set_to_none=True)
        with par.grad_sync(model, True):
            nn.functional.cross_entropy(model(x), y).backward()
        par.clip(model, 1.0)
        raw.step()
        if i >= 2:  # first steps: lazy initialisation, optimizer state allocation
            times.append(time.perf_counter() - t)
        if i == 2:
            mem = state_bytes(model, raw)
    out = {"state_mb": mem / 1e6, "step_s": statistics.median(times)}
    # checkpoint: save, size, load (the same calls train() and setup() make)
    run = ckpt.RunDir(work / f"{kind}")
    main = acc.is_main_process
    from disttrain.distributed import Sync

    sync = Sync(acc)
    torch.distributed.barrier()
    t = time.perf_counter()
    files = par.checkpoint_state(model, opt) if main or par.sharded else {}
    if main:
        position = {"epoch": 0, "window": 1, "step": 1, "metrics_lines": 0}  # what load_checkpoint's schema asks
        files |= {"state.json": {"position": position, "config": {}, "world_size": acc.num_processes,
                                 "global_batch": args.batch * acc.num_processes}, "model.json": {
            "model": "mlp", "model_kwargs": {}, "dataset": "synthetic_classification", "loss": "cross_entropy",
            "channels_last": False, "spec": {"task": "classification", "input_shape": [args.width], "num_outputs": 10}}}
    if files:
        path = ckpt.save_checkpoint(run, 1, files, keep_last=1, main=main, agree=sync.any)
    torch.distributed.barrier()
    out["save_s"] = time.perf_counter() - t
    path = run.step_dir(1)
    out["ckpt_mb"] = sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 1e6
    t = time.perf_counter()
    saved = ckpt.load_checkpoint(path)
    par.load_state(model, opt, saved, "benchmark")
    torch.distributed.barrier()
    out["load_s"] = time.perf_counter() - t
    del model, opt, raw
    return out


def worker(args: argparse.Namespace) -> None:
    from disttrain.config import parse_config
    from disttrain.distributed import configure_cpu, make_accelerator

    configure_cpu()  # threads and allocator, as train() does
    acc = make_accelerator(parse_config(["--dataset", "synthetic_classification"]), "no")
    work = Path(args.workdir)
    rounds = []
    for r in range(args.rounds):
        order = KINDS if r % 2 == 0 else KINDS[::-1]
        res = {kind: one(kind, args, acc, work / f"r{r}-{kind}") for kind in order}
        # every rank's figures: memory is per rank (max over ranks), times are the slowest rank's
        flat = torch.tensor([res[k][m] for k in KINDS for m in METRICS], dtype=torch.float64)
        torch.distributed.all_reduce(flat, op=torch.distributed.ReduceOp.MAX)
        vals = flat.tolist()
        rounds.append({k: dict(zip(METRICS, vals[i * len(METRICS):(i + 1) * len(METRICS)]))
                       for i, k in enumerate(KINDS)})
    if acc.is_main_process:
        Path(args.result).write_text(json.dumps(rounds))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


KINDS = ("none", "fsdp", "fsdp-gloo")  # DDP (shared-memory all-reduce), FSDP2 (shared memory), FSDP2 (gloo)
METRICS = ("state_mb", "step_s", "save_s", "load_s", "ckpt_mb")


def report(rounds: list[dict[str, dict[str, float]]], args: argparse.Namespace) -> dict[str, Any]:
    params = sum(p.numel() for p in Stack(args.width, args.depth).parameters())
    med = lambda f: statistics.median(f(r) for r in rounds)  # noqa: E731
    out = {"params": params, "nproc": args.nproc, "rounds": rounds,
           "ddp": {m: med(lambda r, m=m: r["none"][m]) for m in METRICS},
           "fsdp": {m: med(lambda r, m=m: r["fsdp"][m]) for m in METRICS},
           "fsdp_gloo": {m: med(lambda r, m=m: r["fsdp-gloo"][m]) for m in METRICS},
           "ratio_fsdp_over_ddp": {m: med(lambda r, m=m: r["fsdp"][m] / r["none"][m]) for m in METRICS},
           "ratio_fsdp_gloo_over_ddp": {m: med(lambda r, m=m: r["fsdp-gloo"][m] / r["none"][m]) for m in METRICS}}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--width", type=int, default=384)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--batch", type=int, default=32, help="per rank")
    p.add_argument("--reshard", action=argparse.BooleanOptionalAction, default=True,
                   help="FSDP: --fsdp-reshard-after-forward (default) or not")
    p.add_argument("--json")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--workdir", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return
    tmp = Path(tempfile.mkdtemp(prefix="disttrain-fsdp-bench-"))
    try:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")]))
        import socket

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        cmd = [str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node", str(args.nproc),
               "--master_port", str(port), __file__, "--worker", "--workdir", str(tmp), "--result", str(tmp / "r.json"),
               *sum(([f"--{k}", str(getattr(args, k))] for k in ("rounds", "steps", "width", "depth", "batch")), []),
               "--reshard" if args.reshard else "--no-reshard"]
        subprocess.run(cmd, check=True, env=env)
        out = report(json.loads((tmp / "r.json").read_text()), args)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"model: {out['params'] / 1e6:.2f} M parameters, AdamW, batch {args.batch}/rank, {args.nproc} processes, "
          f"reshard after forward {args.reshard}, median of {args.rounds} rounds")
    print(f"{'':10}{'DDP':>10}{'FSDP2':>10}{'FSDP/DDP':>10}{'FSDP2 gloo':>12}{'gloo/DDP':>10}")
    for m in METRICS:
        print(f"{m:10}{out['ddp'][m]:10.3f}{out['fsdp'][m]:10.3f}{out['ratio_fsdp_over_ddp'][m]:10.2f}"
              f"{out['fsdp_gloo'][m]:12.3f}{out['ratio_fsdp_gloo_over_ddp'][m]:10.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
