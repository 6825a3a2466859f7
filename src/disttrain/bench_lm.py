"""The language-model workload of `python -m disttrain.bench --workload lm`: disttrain against a
nanoGPT-style hand loop, side by side in one invocation.

The hand loop is nanoGPT's train.py reduced to what a CPU run does: random windows drawn with
`torch.randint` from the token tensor (`get_batch`), the same `GPT` module, AdamW over the same
decay/no-decay groups (fused), nanoGPT's warmup + cosine to min_lr, gradient clipping, no host sync per
step (the loss is read only at the end). Two comparisons:

  throughput  tokens/s of disttrain's real path (setup() + train(), 1 process, read from its metrics.jsonl
              step lines) over the hand loop's, same model, batch, block size and threads, in interleaved
              rounds (median of per-round ratios); and real launches of 2 processes x 1 thread against
              1 process x 2 threads at the same global batch
  recipe      `--recipe recipes/char_gpt.yaml`: the recipe launched for real (`accelerate launch`) against the
              hand loop with the recipe's hyperparameters for the same number of optimizer steps, run at the
              same time as a process of its own (hand_process); validation loss (the same full validation
              split, per token) and wall time of each process, start-up and data preparation included

    python -m disttrain.bench --workload lm --corpus data/shakespeare [--rounds 3] [--steps 300]
    python -m disttrain.bench --workload lm --corpus data/shakespeare --recipe recipes/char_gpt.yaml
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch.nn import functional as F

from disttrain.models.gpt import GPT
from disttrain.optim import param_groups

REPO = Path(__file__).resolve().parents[2]
WARM = 20  # untimed steps before the throughput measurement


def corpus_ids(corpus: str, val_fraction: float) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(train ids, val ids, vocab size) of a text corpus: the same split and vocabulary as text:PATH."""
    from disttrain.data.text import corpus_files, encode_corpus, read_corpus

    train, val, vocab = encode_corpus(read_corpus(corpus_files(Path(corpus))), val_fraction)
    return torch.from_numpy(train.astype("int64")), torch.from_numpy(val.astype("int64")), len(vocab)


def hand_loop(train_ids: torch.Tensor, val_ids: torch.Tensor | None, vocab: int, steps: int, *, block: int = 64,
              batch: int = 12, n_layer: int = 4, n_head: int = 4, n_embd: int = 128, dropout: float = 0.0,
              lr: float = 1e-3, min_lr: float = 1e-4, warmup: int = 100, weight_decay: float = 0.1,
              clip: float = 1.0, seed: int = 0, warm: int = 0, eval_every: int = 0,
              device: str = "cpu") -> dict[str, Any]:
    """nanoGPT-style training on `device`; {tokens_per_sec (after `warm` steps), train_s, val_loss (full
    split), wall_s, curve: [(step, seconds, val_loss)] every `eval_every` steps (as nanoGPT's eval_interval)
    and at the end}."""
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    model = GPT(vocab, block, n_layer, n_head, n_embd, dropout).to(device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    opt = torch.optim.AdamW(param_groups(list(model.parameters()), weight_decay), lr=lr, fused=True)

    def get_lr(it: int) -> float:  # nanoGPT: linear warmup, cosine decay to min_lr
        if it < warmup:
            return lr * (it + 1) / (warmup + 1)
        ratio = (it - warmup) / max(1, steps - warmup)
        return min_lr + 0.5 * (1.0 + math.cos(math.pi * min(1.0, ratio))) * (lr - min_lr)

    model.train()
    t_start, curve = time.perf_counter(), []
    for it in range(steps):
        if it == warm:
            sync()
            t_start = time.perf_counter()
        for g in opt.param_groups:
            g["lr"] = get_lr(it)
        ix = torch.randint(len(train_ids) - block, (batch,))
        x = torch.stack([train_ids[i:i + block] for i in ix]).to(device, non_blocking=True)  # as nanoGPT's get_batch
        y = torch.stack([train_ids[i + 1:i + 1 + block] for i in ix]).to(device, non_blocking=True)
        logits = model(x)
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        if eval_every and val_ids is not None and (it + 1) % eval_every == 0 and it + 1 < steps:
            v = val_loss(model, val_ids, block)  # the time after evaluating, as disttrain's elapsed_s
            curve.append((it + 1, time.perf_counter() - t0, v))
    sync()
    train_s = time.perf_counter() - t_start
    out: dict[str, Any] = {"tokens_per_sec": (steps - warm) * batch * block / train_s, "train_s": train_s}
    if val_ids is not None:
        out["val_loss"] = val_loss(model, val_ids, block)
        out["curve"] = curve + [(steps, time.perf_counter() - t0, out["val_loss"])]
    out["wall_s"] = time.perf_counter() - t0
    return out


@torch.inference_mode()
def val_loss(model: torch.nn.Module, ids: torch.Tensor, block: int, batch: int = 256) -> float:
    """Mean per-token loss over the non-overlapping windows of `ids` (as disttrain's evaluation)."""
    model.eval()
    ids = ids.to(next(model.parameters()).device)
    x, y = ids[:-1].unfold(0, block, block), ids[1:].unfold(0, block, block)
    total = 0.0
    for i in range(0, len(x), batch):
        logits = model(x[i:i + batch])
        total += float(F.cross_entropy(logits.flatten(0, 1), y[i:i + batch].flatten(), reduction="sum"))
    model.train()
    return total / y.numel()


def hand_process(corpus: str, val_fraction: float, steps: int, hp: dict[str, Any], threads: int,
                 out: Path) -> dict[str, Any]:
    """The hand loop as its own process, as a user runs it (`python train.py`): wall_s from the start of the
    process to its end (interpreter and torch start-up, reading and encoding the corpus included), like the
    recipe's launch beside it."""
    env = dict(os.environ, DISTTRAIN_THREADS=str(threads))
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "disttrain.bench_lm", corpus, str(val_fraction), str(steps),
                    json.dumps(hp), str(out)], check=True, env=env)
    res = json.loads(out.read_text())
    return res | {"wall_s": time.perf_counter() - t0}


def _hand_main(corpus: str, val_fraction: str, steps: str, hp: str, out: str) -> None:
    torch.set_num_threads(int(os.environ.get("DISTTRAIN_THREADS", "1")))
    train_ids, val_ids, vocab = corpus_ids(corpus, float(val_fraction))
    res = hand_loop(train_ids, val_ids, vocab, int(steps), **json.loads(hp))
    Path(out).write_text(json.dumps(res))


def _flags(corpus: str, data_dir: str, out: str, steps: int, batch: int, block: int) -> list[str]:
    return ["--dataset", f"text:{corpus}", "--data-dir", data_dir, "--model", "gpt", "--block-size", str(block),
            "--batch-size", str(batch), "--optimizer", "adamw", "--lr", "1e-3", "--weight-decay", "0.1",
            "--scheduler", "cosine", "--warmup-steps", "10", "--max-grad-norm", "1.0", "--max-steps",
            str(WARM + steps), "--epochs", "1", "--log-every", str(WARM), "--output-dir", out, "--overwrite",
            "--no-progress", "--seed", "0", "--mixed-precision", "no"]


def bench_disttrain(corpus: str, data_dir: str, steps: int, batch: int, block: int) -> float:
    """disttrain's setup() + train() in this process; tokens/s from its metrics.jsonl step lines."""
    from disttrain.bench import run_disttrain

    return run_disttrain(lambda tmp: _flags(corpus, data_dir, tmp, steps, batch, block)) * block


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args: list[str], nproc: int, threads: int = 0) -> tuple[float, str]:
    """`accelerate launch` of disttrain.train with `args` (`threads` per process, or disttrain's choice);
    (wall seconds, output)."""
    return finish_launch(start_launch(args, nproc, threads))


def start_launch(args: list[str], nproc: int, threads: int = 0) -> tuple[subprocess.Popen, float, list[str]]:
    accel = str(Path(sys.executable).parent / "accelerate")
    cfgfile = REPO / "launch" / ("cpu-multi.yaml" if nproc > 1 else "cpu.yaml")
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "DISTTRAIN_THREADS")}
    if threads:
        env["DISTTRAIN_THREADS"] = str(threads)
    cmd = [accel, "launch", "--config_file", str(cfgfile), "--num_processes", str(nproc), "--main_process_port",
           str(_port()), "-m", "disttrain.train", *args]
    t0 = time.perf_counter()
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env), t0, cmd


def finish_launch(started: tuple[subprocess.Popen, float, list[str]]) -> tuple[float, str]:
    p, t0, cmd = started
    out, _ = p.communicate()
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise RuntimeError(f"launch failed ({p.returncode}): {' '.join(cmd)}\n{out[-2000:]}")
    return wall, out


def bench_launch(corpus: str, data_dir: str, steps: int, nproc: int, batch: int, block: int) -> float:
    """Steady tokens/s (all ranks) of a real launch at per-process batch `batch`."""
    from disttrain.bench import _steady

    with tempfile.TemporaryDirectory() as tmp:
        launch(_flags(corpus, data_dir, tmp, steps, batch, block), nproc)
        return _steady(Path(tmp) / "metrics.jsonl")[0] * block


def throughput(corpus: str, data_dir: str, rounds: int, steps: int, batch: int, block: int, threads: int,
               multi: bool, rec: Any) -> None:
    """Interleaved rounds: b = hand loop, c = disttrain 1 process (same threads), d = 2x1 / 1x2 launches."""
    train_ids, _, vocab = corpus_ids(corpus, 0.1)
    device = "cuda" if torch.cuda.is_available() else "cpu"  # where disttrain trains too
    for r in range(rounds):
        print(f"round {r + 1}/{rounds}", flush=True)
        order = [("b", lambda: hand_loop(train_ids, None, vocab, WARM + steps, block=block, batch=batch,
                                         warmup=10, warm=WARM, device=device)["tokens_per_sec"]),
                 ("c", lambda: bench_disttrain(corpus, data_dir, steps, batch, block))]
        if r % 2:
            order.reverse()
        got = {}
        for k, fn in order:
            torch.set_num_threads(threads)
            got[k] = fn()
            rec("gpt", k, got[k])
        rec("gpt", "c/b", got["c"] / got["b"])
        if multi:
            runs = [2, 1] if r % 2 == 0 else [1, 2]
            for nproc in runs:
                got[f"d{nproc}p"] = bench_launch(corpus, data_dir, steps, nproc, batch // nproc, block)
                rec("gpt", f"d{nproc}p", got[f"d{nproc}p"])
            rec("gpt", "d", got["d2p"] / got["d1p"])


def recipe(corpus: str, recipe_path: str, rounds: int, threads: int, rec: Any) -> None:
    """The recipe launched for real and the hand loop with its hyperparameters (same steps), run side by side
    at the same time (each `threads` threads), so both see the same machine load; wall times and the
    validation loss of each (the same full validation split, per character)."""
    import yaml

    cfg = yaml.safe_load(Path(recipe_path).read_text())
    kw = cfg.get("model_kwargs", {})
    steps = int(cfg["max_steps"])
    hp = dict(block=int(cfg["block_size"]), batch=int(cfg["batch_size"]), n_layer=kw.get("n_layer", 4),
              n_head=kw.get("n_head", 4), n_embd=kw.get("n_embd", 128), dropout=kw.get("dropout", 0.0),
              lr=float(cfg["lr"]), min_lr=float(cfg["lr"]) * cfg.get("scheduler_kwargs", {}).get("min_lr_ratio", 0.0),
              warmup=int(cfg.get("warmup_steps", 0)), weight_decay=float(cfg.get("weight_decay", 0.0)),
              clip=float(cfg.get("max_grad_norm") or 0.0), seed=int(cfg.get("seed", 0)),
              eval_every=int(cfg.get("eval_every_steps", 0)))
    for r in range(rounds):
        print(f"round {r + 1}/{rounds}", flush=True)
        with tempfile.TemporaryDirectory() as tmp:
            run_dir = Path(tmp) / "run"
            started = start_launch(["--config", recipe_path, "--dataset", f"text:{corpus}", "--data-dir",
                                    str(Path(tmp) / "data"), "--no-progress", "--output-dir", str(run_dir)], 1, threads)
            res = hand_process(corpus, float(cfg["val_fraction"]), steps, hp, threads, Path(tmp) / "hand.json")
            wall, _ = finish_launch(started)
            lines = [json.loads(s) for s in (run_dir / "metrics.jsonl").read_text().splitlines()]
            last = [d for d in lines if d["kind"] == "epoch"][-1]
            if r == 0:
                keep = Path(recipe_path).with_suffix("").name
                (Path(tempfile.gettempdir()) / f"{keep}-bench-metrics.jsonl").write_text(
                    (run_dir / "metrics.jsonl").read_text())
                (Path(tempfile.gettempdir()) / f"{keep}-bench-hand-curve.json").write_text(json.dumps(res["curve"]))
                model = Path(tempfile.gettempdir()) / f"{keep}-bench-model"  # for samples: generate --checkpoint
                model.mkdir(exist_ok=True)
                for name in ("model.safetensors", "model.json"):
                    (model / name).write_bytes((run_dir / name).read_bytes())
        rec("recipe", "hand_val_loss", res["val_loss"])
        rec("recipe", "hand_wall_s", res["wall_s"])
        rec("recipe", "disttrain_val_loss", last["val_loss"])
        rec("recipe", "disttrain_wall_s", wall)
        rec("recipe", "wall_ratio", wall / res["wall_s"])
        rec("recipe", "val_loss_diff", last["val_loss"] - res["val_loss"])


if __name__ == "__main__":  # hand_process's child
    _hand_main(*sys.argv[1:])
