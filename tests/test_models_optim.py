"""models.py and optim.py: each built-in model builds with the right shapes; optimizers and schedules."""

from __future__ import annotations

import math

import pytest
import torch

from disttrain.config import Config
from disttrain.data import DataSpec
from disttrain.errors import UsageError
from disttrain.models import build_model
from disttrain.optim import build_loss, build_optimizer, build_scheduler, lr_factor


@pytest.mark.parametrize("name", ["linear", "mlp", "cnn", "lenet", "resnet18"])
@pytest.mark.parametrize("shape", [[1, 28, 28], [3, 32, 32]])
def test_builtin_models_fit_the_data(name, shape):
    spec = DataSpec("classification", shape, 10)
    model = build_model(name, {}, spec)
    assert model(torch.zeros(2, *shape)).shape == (2, 10)


def _textbook_cnn(width: int, double: bool, hidden: int) -> torch.nn.Module:
    """The cnn in the usual order: conv-BN-ReLU ... then max-pool."""
    nn = torch.nn

    def cb(i, o):
        return [nn.Conv2d(i, o, 3, padding=1, bias=False), nn.BatchNorm2d(o), nn.ReLU(inplace=True)]

    a, b = width, 2 * width
    s1, s2 = cb(1, a) + (cb(a, a) if double else []), cb(a, b) + (cb(b, b) if double else [])
    head = [nn.Linear(b * 49, hidden), nn.ReLU(inplace=True), nn.Dropout(0.0)] if hidden else []
    return nn.Sequential(*s1, nn.MaxPool2d(2), *s2, nn.MaxPool2d(2), nn.Flatten(), nn.Dropout(0.0), *head,
                         nn.Linear(hidden or b * 49, 10))


@pytest.mark.parametrize("kw,bf16", [({"width": 8}, False), ({"width": 4, "double": True, "hidden": 16}, True)])
def test_cnn_pools_before_its_last_relu_and_is_bitwise_the_textbook_net(kw, bf16):
    """Moving each stage's last ReLU after the max-pool (4x fewer ReLU elements) changes nothing: same
    parameter names (old checkpoints load), same initial weights for a seed, same outputs and gradients,
    bitwise, over several Adam steps."""
    spec = DataSpec("classification", [1, 28, 28], 10)
    torch.manual_seed(0)
    ours = build_model("cnn", kw, spec).to(memory_format=torch.channels_last)
    torch.manual_seed(0)
    ref = _textbook_cnn(kw["width"], kw.get("double", False), kw.get("hidden", 0)).to(memory_format=torch.channels_last)
    assert list(ours.state_dict()) == list(ref.state_dict())  # same names: old checkpoints load
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), ref.state_dict().values()))  # same init
    opts = [torch.optim.Adam(m.parameters(), lr=1e-2) for m in (ours, ref)]
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        x = torch.randn(16, 1, 28, 28, generator=g).contiguous(memory_format=torch.channels_last)
        y = torch.randint(0, 10, (16,), generator=g)
        outs = []
        for m, opt in zip((ours, ref), opts):
            opt.zero_grad()
            with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
                out = m(x)
            torch.nn.functional.cross_entropy(out.float(), y).backward()
            opt.step()
            outs.append(out)
        assert torch.equal(outs[0], outs[1])
    for (k, a), b in zip(ours.state_dict().items(), ref.state_dict().values()):
        assert torch.equal(a, b), k
    assert isinstance(ours[2], torch.nn.MaxPool2d) or isinstance(ours[5], torch.nn.MaxPool2d)


def test_vector_models_and_image_only_models():
    spec = DataSpec("regression", [5], 1)
    assert build_model("mlp", {"hidden": 7}, spec)(torch.zeros(3, 5)).shape == (3, 1)
    with pytest.raises(UsageError, match="needs image inputs"):
        build_model("cnn", {}, spec)
    with pytest.raises(UsageError, match="raised TypeError"):
        build_model("mlp", {"nope": 1}, spec)


@pytest.mark.parametrize("opt,cls", [("sgd", torch.optim.SGD), ("adam", torch.optim.Adam), ("adamw", torch.optim.AdamW)])
def test_optimizers(opt, cls):
    cfg = Config(optimizer=opt, lr=0.1, momentum=0.9 if opt == "sgd" else 0.0, weight_decay=0.01)
    o = build_optimizer(cfg, torch.nn.Linear(2, 2))
    assert isinstance(o, cls) and o.param_groups[0]["lr"] == 0.1 and o.param_groups[0]["weight_decay"] == 0.01


def lrs(cfg: Config, total: int) -> list[float]:
    o = build_optimizer(cfg, torch.nn.Linear(1, 1))
    s = build_scheduler(cfg, o, total)
    out = []
    for _ in range(total):
        out.append(o.param_groups[0]["lr"])
        o.step()
        s.step()
    return out


def test_schedules():
    assert lrs(Config(lr=1.0), 5) == [1.0] * 5
    warm = lrs(Config(lr=1.0, scheduler="cosine", warmup_steps=4), 14)
    assert warm[:4] == [0.25, 0.5, 0.75, 1.0] and warm[4] == 1.0 and warm[-1] < 0.05
    assert all(a >= b for a, b in zip(warm[4:], warm[5:]))
    step = lrs(Config(lr=1.0, scheduler="step", scheduler_kwargs={"step_size": 2, "gamma": 0.5}), 6)
    assert step == [1.0, 1.0, 0.5, 0.5, 0.25, 0.25]
    one = lrs(Config(lr=1.0, scheduler="onecycle"), 100)
    assert math.isclose(one[0], 1 / 25) and max(one) == pytest.approx(1.0, abs=1e-3) and one[-1] < 1e-3


def test_warmup_longer_than_run_is_refused():
    with pytest.raises(UsageError, match="--warmup-steps 10 must be shorter than the run"):
        lrs(Config(warmup_steps=10), 5)


def test_lr_factor_is_pure():
    f = lr_factor(Config(scheduler="cosine", warmup_steps=3), 20)
    assert [f(i) for i in range(20)] == [f(i) for i in range(20)]


def test_losses_are_per_sample():
    ce = build_loss(Config(), "classification")
    out, y = torch.randn(4, 3), torch.tensor([0, 1, 2, 0])
    assert torch.allclose(ce(out, y).mean(), torch.nn.functional.cross_entropy(out, y))
    mse = build_loss(Config(loss="mse"), "regression")
    out, y = torch.randn(4, 2), torch.randn(4, 2)
    assert torch.allclose(mse(out, y).mean(), torch.nn.functional.mse_loss(out, y))
    with pytest.raises(UsageError, match="does not fit integer class targets"):
        build_loss(Config(loss="mse"), "classification")
