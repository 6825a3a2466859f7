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
    """An MLP over features 1..; it appends the indices (feature 0) of each batch it is trained on to
    $DISTTRAIN_TEST_RECORD/rank<RANK>.txt, one line per backward pass through it (so the pre-flight forward,
    which never runs backward, is not recorded)."""

    def __init__(self, features: int = 8, classes: int = 3, hidden: int = 16) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(features, hidden), nn.Tanh(), nn.Linear(hidden, classes))
        self.record = os.environ.get("DISTTRAIN_TEST_RECORD")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net(x[:, 1:])
        if self.training and self.record and out.requires_grad:
            line = ",".join(str(int(i)) for i in x[:, 0].tolist())
            out.register_hook(lambda g: self._write(line))
        return out

    def _write(self, line: str) -> None:
        with open(Path(self.record) / f"rank{os.environ.get('RANK', '0')}.txt", "a") as f:
            f.write(line + "\n")


def recording(**kw) -> nn.Module:
    return Recording(**kw)


def dropout_mlp(features: int = 8, classes: int = 3) -> nn.Module:
    return nn.Sequential(nn.Linear(features + 1, 32), nn.ReLU(), nn.Dropout(0.3), nn.Linear(32, classes))


# --------------------------------------------------------------------------- models people bring (issue 13)


def token_data(data_dir: str, n_train: int = 96, n_eval: int = 32, vocab: int = 16, length: int = 6,
               seed: int = 0) -> tuple[TensorDataset, TensorDataset]:
    """Token sequences [N, length] (int64); the target is the first token (learnable by a bag of embeddings)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, vocab, (n_train + n_eval, length), generator=g)
    return TensorDataset(x[:n_train], x[:n_train, 0].clone()), TensorDataset(x[n_train:], x[n_train:, 0].clone())


class TiedLM(nn.Module):
    """A language-model-shaped net whose output projection's weight IS its embedding's weight (GPT-2 style)."""

    def __init__(self, vocab: int = 16, dim: int = 12) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(torch.randn(6, dim) * 0.1)
        self.drop = nn.Dropout(0.2)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.emb.weight  # tied

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.emb(x) + self.pos[: x.shape[1]]
        h = h * torch.linspace(1.0, 0.2, x.shape[1])[:, None]  # position-dependent weights: token 0 counts most
        return self.head(self.drop(h.sum(1)))


def tied_lm(**kw) -> nn.Module:
    return TiedLM(**kw)


class SharedBlockNet(nn.Module):
    """An image classifier that applies one block twice under two names (weight sharing across layers)."""

    def __init__(self, input_shape: list[int] = (1, 28, 28), classes: int = 10) -> None:
        super().__init__()
        c, h, w = input_shape
        self.inp = nn.Linear(c * h * w, 16)
        self.block1 = nn.Linear(16, 16)
        self.block2 = self.block1  # shared
        self.out = nn.Linear(16, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.inp(x.flatten(1)))
        return self.out(torch.tanh(self.block2(torch.tanh(self.block1(h)))))


def shared_block_net(**kw) -> nn.Module:
    return SharedBlockNet(**kw)


class UnusedHead(nn.Module):
    """An MLP with a second head that `forward` never calls, a frozen input layer, and (sometimes=True) an
    extra layer used only on every third training forward (the same steps on every rank and world size;
    `phase` 1: including the first, the pre-flight)."""

    def __init__(self, features: int = 8, classes: int = 3, sometimes: bool = False, phase: int = 0,
                 with_unused_head: bool = True) -> None:
        super().__init__()
        self.frozen = nn.Linear(features, features)
        self.frozen.requires_grad_(False)
        self.body = nn.Linear(features, 16)
        self.head = nn.Linear(16, classes)
        self.unused_head = nn.Linear(16, classes) if with_unused_head else None  # never called
        self.phase = phase  # 1: the pre-flight forward (the first) uses `sometimes`
        self.sometimes = nn.Linear(16, 16) if sometimes else None
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.body(self.frozen(x[:, 1:])))
        if self.training and torch.is_grad_enabled():
            self.calls += 1
        if self.sometimes is not None and self.calls % 3 == self.phase:
            h = torch.tanh(self.sometimes(h))
        return self.head(h)


def unused_head(**kw) -> nn.Module:
    return UnusedHead(**kw)


class NoisyIndexed(torch.utils.data.Dataset):
    """indexed_data read through `__getitem__` with random augmentation: feature 1 gets noise drawn from
    torch, numpy and Python's `random` (the draws DataLoader workers make); not a TensorDataset, so it goes
    through the DataLoader path."""

    def __init__(self, base: TensorDataset) -> None:
        self.x, self.y = base.tensors

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        import random

        import numpy as np

        x = self.x[i].clone()
        x[1] += float(torch.rand(())) + float(np.random.rand()) + random.random()
        return x, self.y[i]


def noisy_data(data_dir: str, **kw) -> tuple[NoisyIndexed, NoisyIndexed]:
    train, test = indexed_data(data_dir, **kw)
    return NoisyIndexed(train), NoisyIndexed(test)


class DictItems(torch.utils.data.Dataset):
    """indexed_data with mapping items, under the given keys."""

    def __init__(self, base: TensorDataset, keys: tuple[str, str]) -> None:
        self.base, self.keys = base, keys

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        x, y = self.base[i]
        return {self.keys[0]: x, self.keys[1]: y, "id": i}


def dict_data(data_dir: str, input_key: str = "x", target_key: str = "label", **kw) -> tuple[DictItems, DictItems]:
    train, test = indexed_data(data_dir, **kw)
    return DictItems(train, (input_key, target_key)), DictItems(test, (input_key, target_key))


class ValuesRecording(Recording):
    """Recording that writes (index, feature 1) of every trained sample and, per forward, one draw of the
    process's torch RNG (what dropout would use): `index:value` items, then `|draw`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net(x[:, 1:])
        if self.training and self.record and out.requires_grad:
            draw = float(torch.rand(()))
            line = ",".join(f"{int(i)}:{v!r}" for i, v in zip(x[:, 0].tolist(), x[:, 1].tolist())) + f"|{draw!r}"
            out.register_hook(lambda g: self._write(line))
        return out


def values_recording(**kw) -> nn.Module:
    return ValuesRecording(**kw)


class BatchNormFirst(nn.Module):
    """Batch norm on the raw features (its running statistics depend on the batches only), then an MLP."""

    def __init__(self, features: int = 8, classes: int = 3) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(features)
        self.net = nn.Sequential(nn.Linear(features, 16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.bn(x[:, 1:]))


def batchnorm_first(**kw) -> nn.Module:
    return BatchNormFirst(**kw)


class ViewFlattenConv(nn.Module):
    """A conv net as people write it: flattens with x.view(x.size(0), -1), which channels_last breaks."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, stride=2)
        self.fc = nn.Linear(4 * 13 * 13, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv(x))
        return self.fc(h.view(h.size(0), -1))


def view_flatten_conv() -> nn.Module:
    return ViewFlattenConv()
