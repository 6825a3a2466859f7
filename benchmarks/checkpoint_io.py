"""Checkpoint save/load cost for resnet18 (a benchmark, not a test).

    python benchmarks/checkpoint_io.py [--rounds 5] [--json out.json]

Builds resnet18 for 10 classes on 32x32x3 inputs with Adam state (one real step), then times
disttrain's own atomic save (tensors to safetensors, fsync, SHA-256 manifest, rename) and verified load,
next to a plain `safetensors.torch.save_file` of the weights alone as the floor. Reports medians.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from disttrain import checkpoint as ckpt
from disttrain.data import DataSpec
from disttrain.models import build_model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--json")
    args = p.parse_args()
    torch.manual_seed(0)
    model = build_model("resnet18", {}, DataSpec("classification", [3, 32, 32], 10))
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    opt.step()
    tensors, meta = ckpt.optimizer_to_files(opt.state_dict())
    files = {"model.safetensors": model.state_dict(), "optimizer.safetensors": tensors, "optimizer.json": meta,
             "rng.safetensors": {f"rank0.{k}": v for k, v in ckpt.rng_state().items()},
             "state.json": {"position": {}}, "model.json": {}}
    save_s, load_s, plain_s = [], [], []
    with tempfile.TemporaryDirectory() as d:
        run = ckpt.RunDir(Path(d))
        for i in range(args.rounds):
            t = time.perf_counter()
            path = ckpt.save_checkpoint(run, i + 1, files, keep_last=2)
            save_s.append(time.perf_counter() - t)
            t = time.perf_counter()
            ckpt.load_checkpoint(path)
            load_s.append(time.perf_counter() - t)
            t = time.perf_counter()
            save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(Path(d) / "plain.safetensors"))
            plain_s.append(time.perf_counter() - t)
        size = sum(f.stat().st_size for f in path.iterdir())
        weights = (path / "model.safetensors").stat().st_size
    res = {"model": "resnet18 (11.2M params) + Adam", "checkpoint_mb": size / 2**20, "weights_mb": weights / 2**20,
           "save_s_median": statistics.median(save_s), "load_verified_s_median": statistics.median(load_s),
           "plain_save_weights_s_median": statistics.median(plain_s), "rounds": args.rounds}
    for k, v in res.items():
        print(f"{k:32s} {v:.3f}" if isinstance(v, float) else f"{k:32s} {v}")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
