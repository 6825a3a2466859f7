"""Plug-ins used by the tests (imported as `plugins_for_tests:<function>`)."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import TensorDataset


class TutorialLinear(nn.Module):
    """The PyTorch linear-regression tutorial's model."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(42)
        self.weight = nn.Parameter(torch.randn(1, dtype=torch.float))
        self.bias = nn.Parameter(torch.randn(1, dtype=torch.float))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * x + self.bias


def tutorial_linear() -> nn.Module:
    return TutorialLinear()


def tutorial_data(data_dir: str) -> tuple[TensorDataset, TensorDataset]:
    x = torch.arange(0, 1, 0.02).unsqueeze(1)
    y = 0.7 * x + 0.3
    return TensorDataset(x[:40], y[:40]), TensorDataset(x[40:], y[40:])


def indexed_data(data_dir: str, n_train: int = 200, n_eval: int = 51, features: int = 8, classes: int = 3,
                 seed: int = 0) -> tuple[TensorDataset, TensorDataset]:
    """Learnable blobs whose first feature is the sample's index (so a model can record what it saw)."""
    g = torch.Generator().manual_seed(seed)
    n = n_train + n_eval
    centres = 2 * torch.randn(classes, features, generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    x = centres[y] + torch.randn(n, features, generator=g)
    x = torch.cat([torch.arange(n, dtype=torch.float).unsqueeze(1), x], 1)
    return TensorDataset(x[:n_train], y[:n_train]), TensorDataset(x[n_train:], y[n_train:])


class Recording(nn.Module):
    """An MLP over features 1..; in training mode it appends the indices (feature 0) of each batch to
    $DISTTRAIN_TEST_RECORD/rank<RANK>.txt, one line per forward call."""

    def __init__(self, features: int = 8, classes: int = 3, hidden: int = 16) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(features, hidden), nn.Tanh(), nn.Linear(hidden, classes))
        self.record = os.environ.get("DISTTRAIN_TEST_RECORD")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.record and torch.is_grad_enabled():
            line = ",".join(str(int(i)) for i in x[:, 0].tolist())
            with open(Path(self.record) / f"rank{os.environ.get('RANK', '0')}.txt", "a") as f:
                f.write(line + "\n")
        return self.net(x[:, 1:])


def recording(**kw) -> nn.Module:
    return Recording(**kw)


def dropout_mlp(features: int = 8, classes: int = 3) -> nn.Module:
    return nn.Sequential(nn.Linear(features + 1, 32), nn.ReLU(), nn.Dropout(0.3), nn.Linear(32, classes))
