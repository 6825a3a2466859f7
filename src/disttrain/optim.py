"""Loss, optimizer and LR schedule.

The schedule is a pure function of the optimizer step (LambdaLR over our own step count; never
`accelerator.prepare()`d, which would step it once per process), so the LR is the same on any world
size, with or without accumulation, and its state is a few JSON numbers.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from disttrain.config import Config
from disttrain.errors import UsageError

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def loss_name(cfg: Config, task: str) -> str:
    name = cfg.loss or ("cross_entropy" if task == "classification" else "mse")
    if task == "classification" and name != "cross_entropy":
        raise UsageError(f"--loss {name} does not fit integer class targets; use --loss cross_entropy "
                         "(or return float targets from the dataset)")
    if task == "regression" and name == "cross_entropy":
        raise UsageError("--loss cross_entropy needs integer class targets, but the dataset's targets are "
                         "floating point; use mse, l1 or bce_with_logits")
    return name


def build_loss(cfg: Config, task: str) -> LossFn:
    """Per-sample losses, shape [batch]: the loop sums them and divides by the samples in the window,
    so every sample weighs the same whatever the micro-batch, world size or last partial batch."""
    name = loss_name(cfg, task)
    smoothing = cfg.label_smoothing

    def per_sample(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if name == "cross_entropy" and out.ndim == 3:  # sequences [B, T, C], targets [B, T]: per-token
            # losses, averaged per sample; every window has T tokens, so the loop's per-sample weighting is
            # exactly the per-token mean on any world size and accumulation
            tok = nn.functional.cross_entropy(out.flatten(0, 1), y.flatten(), reduction="none",
                                              label_smoothing=smoothing)
            return tok.view(y.shape).mean(1)
        if name == "cross_entropy":
            return nn.functional.cross_entropy(out, y, reduction="none", label_smoothing=smoothing)
        y = y.reshape(out.shape).to(out.dtype)
        fn = {"mse": nn.functional.mse_loss, "l1": nn.functional.l1_loss,
              "bce_with_logits": nn.functional.binary_cross_entropy_with_logits}[name]
        return fn(out, y, reduction="none").reshape(len(out), -1).mean(1)

    return per_sample


def param_groups(params: list[nn.Parameter], weight_decay: float) -> list[dict]:
    """Weight decay on matrices only: parameters with 2 or more dimensions (linear and conv weights, and
    embeddings) decay; biases and norm weights/offsets (1-D) do not. As nanoGPT's configure_optimizers
    (and GPT-2/timm) do: decaying a norm's scale or a bias only shrinks it towards a value it has no reason
    to prefer. Embeddings decay: in the GPT the token embedding is also the output projection (tied), a
    matrix of a matmul like any other. One group when there is no decay (the optimizer state is the same)."""
    if not weight_decay:
        return [{"params": params}]
    decay, no_decay = [p for p in params if p.ndim >= 2], [p for p in params if p.ndim < 2]
    return [g for g in ({"params": decay, "weight_decay": weight_decay},
                        {"params": no_decay, "weight_decay": 0.0}) if g["params"]]


def build_optimizer(cfg: Config, model: nn.Module) -> torch.optim.Optimizer:
    """SGD, Adam or AdamW over `param_groups` (weight decay on matrices only)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise UsageError(f"--model {cfg.model} has no trainable parameters")
    groups = param_groups(params, cfg.weight_decay)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                               nesterov=cfg.nesterov)
    if cfg.momentum:
        raise UsageError(f"--momentum {cfg.momentum} applies to --optimizer sgd only, got {cfg.optimizer}")
    cls = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[cfg.optimizer]
    # the fused kernel (one pass over each parameter) is ~5-10% of a cnn step faster on CPU than foreach
    # (docs/performance.md); it takes float parameters on CPU or CUDA only
    fused = all(p.dtype.is_floating_point and p.device.type in ("cpu", "cuda") for p in params)
    return cls(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused)


def lr_factor(cfg: Config, total_steps: int) -> Callable[[int], float]:
    """LR multiplier for the optimizer step with index `step` (0-based)."""
    warm, kw = cfg.warmup_steps, cfg.scheduler_kwargs
    decay_steps = max(1, total_steps - warm)

    def factor(step: int) -> float:
        if cfg.scheduler == "onecycle":
            start = int(kw.get("pct_start", 0.3) * total_steps) if not warm else warm
            lo, end = 1 / kw.get("div_factor", 25.0), 1 / (kw.get("div_factor", 25.0) * kw.get("final_div_factor", 1e4))
            if step < start:
                return lo + (1 - lo) * (1 - math.cos(math.pi * step / max(1, start))) / 2
            t = min(1.0, (step - start) / max(1, total_steps - 1 - start))
            return end + (1 - end) * (1 + math.cos(math.pi * t)) / 2
        if step < warm:
            return (step + 1) / warm
        t = min(1.0, (step - warm) / decay_steps)
        if cfg.scheduler == "cosine":
            floor = kw.get("min_lr_ratio", 0.0)
            return floor + (1 - floor) * (1 + math.cos(math.pi * t)) / 2
        if cfg.scheduler == "step":
            size = int(kw.get("step_size", max(1, decay_steps // 3)))
            return kw.get("gamma", 0.1) ** ((step - warm) // size)
        return 1.0

    return factor


def check_schedule(cfg: Config, total_steps: int) -> None:
    """UsageError if the schedule cannot fit the run (before anything is built or written)."""
    if cfg.warmup_steps >= total_steps:
        raise UsageError(f"--warmup-steps {cfg.warmup_steps} must be shorter than the run ({total_steps} "
                         "optimizer steps)")


def build_scheduler(cfg: Config, optimizer: torch.optim.Optimizer, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    check_schedule(cfg, total_steps)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(cfg, total_steps))
