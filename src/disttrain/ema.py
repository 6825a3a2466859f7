"""--ema-decay: an exponential moving average of the weights (Polyak averaging), the weights that are
evaluated, selected on (best/), exported and loaded by evaluate/generate/predict.

After every optimizer step: ema = decay * ema + (1 - decay) * weights, for every floating-point entry of
the model's state dict (parameters and float buffers such as batch-norm statistics, as timm's ModelEmaV2
does); integer buffers (`num_batches_tracked`) are copied. One `torch._foreach_lerp_` per step, on the
device, no host sync. Every rank keeps the same average (DDP keeps the weights equal), so it needs no
communication. Under FSDP2 the average is sharded like the weights (each rank averages its own shards:
still no communication; parallel.py saves and gathers it). It is saved in every checkpoint
(ema.safetensors, or ema.* shards) and restored bitwise on resume.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
from torch import nn


class EMA:
    """The moving average of `model`'s state dict (`model`: the plain module, not a DDP wrapper; under FSDP2
    the sharded module: its parameters are DTensors and so is their average, `shadow`)."""

    def __init__(self, model: nn.Module, decay: float):
        if not 0 < decay < 1:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = decay
        live = model.state_dict()  # detached tensors sharing storage with the parameters and buffers
        self.names = list(live)
        self._live = [live[n] for n in self.names]
        self.shadow = [t.detach().clone() for t in self._live]
        # the arithmetic runs on the local tensors (a DTensor's shard; plain tensors are their own)
        shadow, live = [_local(t) for t in self.shadow], [_local(t) for t in self._live]
        fl = {i for i, t in enumerate(live) if t.is_floating_point()}
        self._float = ([shadow[i] for i in sorted(fl)], [live[i] for i in sorted(fl)])
        self._other = [(shadow[i], live[i]) for i in range(len(self.names)) if i not in fl]
        self._pairs = list(zip(live, shadow))

    @torch.no_grad()
    def update(self) -> None:
        """Fold the current weights in (after an optimizer step)."""
        shadow, live = self._float
        if shadow:
            torch._foreach_lerp_(shadow, live, 1.0 - self.decay)
        for s, t in self._other:
            s.copy_(t)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The averaged weights, keyed like the model's state dict (the exported model)."""
        return dict(zip(self.names, self.shadow))

    @torch.no_grad()
    def load_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        missing = set(self.names) ^ set(sd)
        if missing:
            raise KeyError(f"EMA state does not fit the model (keys differ: {sorted(missing)[:3]})")
        for n, s in zip(self.names, self.shadow):
            _local(s).copy_(_local(sd[n]))

    @contextmanager
    def applied(self) -> Iterator[None]:
        """The model holds the averaged weights inside the block, its own weights again after it."""
        backup = [t.clone() for t, _ in self._pairs]
        try:
            with torch.no_grad():
                for t, s in self._pairs:
                    t.copy_(s)
            yield
        finally:
            with torch.no_grad():
                for (t, _), b in zip(self._pairs, backup):
                    t.copy_(b)


def _local(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard (a view of its storage), or the tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t


def averaged(ema: EMA | None) -> Any:
    """`ema.applied()`, or nothing without an EMA: what evaluation runs under."""
    return ema.applied() if ema is not None else nullcontext()
