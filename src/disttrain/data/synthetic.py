"""Synthetic datasets generated from the seed (tests, tutorials)."""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import TensorDataset


def synthetic_regression(n_train: int = 1024, n_eval: int = 256, features: int = 1, weight: float = 0.7,
                         bias: float = 0.3, noise: float = 0.01, seed: int = 0, **_: Any):
    """y = weight * x + bias (+ noise), like the PyTorch linear-regression tutorial."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n_train + n_eval, features, generator=g)
    y = weight * x.sum(1, keepdim=True) + bias + noise * torch.randn(n_train + n_eval, 1, generator=g)
    return TensorDataset(x[:n_train], y[:n_train]), TensorDataset(x[n_train:], y[n_train:])


def synthetic_classification(n_train: int = 2048, n_eval: int = 512, features: int = 16,
                             num_classes: int = 4, noise: float = 1.0, seed: int = 0, **_: Any):
    """Gaussian blobs around random class centres: learnable, generated from the seed."""
    g = torch.Generator().manual_seed(seed)
    centres = 2.0 * torch.randn(num_classes, features, generator=g)
    y = torch.randint(0, num_classes, (n_train + n_eval,), generator=g)
    x = centres[y] + noise * torch.randn(n_train + n_eval, features, generator=g)
    return TensorDataset(x[:n_train], y[:n_train]), TensorDataset(x[n_train:], y[n_train:])


