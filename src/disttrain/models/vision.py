"""Vision nets and small baselines, sized from the data (input shape, number of outputs)."""

from __future__ import annotations

import math

from torch import nn

from disttrain.errors import UsageError

def linear(input_shape: list[int], num_outputs: int) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), num_outputs))


def mlp(input_shape: list[int], num_outputs: int, hidden: int = 256, depth: int = 2,
        dropout: float = 0.0) -> nn.Module:
    layers: list[nn.Module] = [nn.Flatten()]
    width = math.prod(input_shape)
    for _ in range(depth):
        layers += [nn.Linear(width, hidden), nn.ReLU(), nn.Dropout(dropout)]
        width = hidden
    return nn.Sequential(*layers, nn.Linear(width, num_outputs))


def _conv_bn(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


def _stage(cin: int, cout: int, double: bool) -> list[nn.Module]:
    """conv-BN-ReLU (twice if `double`), then a 2x2 max-pool, with the last ReLU moved after the pool: max and
    ReLU commute (both only pick values), so it is the same function with bitwise the same gradients, and
    the ReLU runs on a quarter of the elements (cnn step 1.14x faster in fp32, the recipe's 1.23x in bf16).
    Parameter names are those of the textbook order (the ReLU and pool have none)."""
    layers = _conv_bn(cin, cout) + (_conv_bn(cout, cout) if double else [])
    return layers[:-1] + [nn.MaxPool2d(2), layers[-1]]


def cnn(input_shape: list[int], num_outputs: int, width: int = 32, dropout: float = 0.0,
        double: bool = False, hidden: int = 0) -> nn.Module:
    """Two conv+BN+pool stages and a linear head: a small net that does well on 28x28 images.

    `double` puts two convs in each stage (slower, a little more accurate); `hidden` > 0 adds a hidden
    fully-connected layer to the head (cheap capacity).
    """
    _require_image(input_shape, "cnn")
    c, h, w = input_shape
    a, b = width, 2 * width
    s1, s2 = _stage(c, a, double), _stage(a, b, double)  # (in this order: the initial weights draw from the RNG)
    flat = b * (h // 4) * (w // 4)
    head: list[nn.Module] = [nn.Linear(flat, hidden), nn.ReLU(inplace=True), nn.Dropout(dropout)] if hidden else []
    return nn.Sequential(*s1, *s2, nn.Flatten(), nn.Dropout(dropout), *head, nn.Linear(hidden or flat, num_outputs))


def lenet(input_shape: list[int], num_outputs: int) -> nn.Module:
    """The small conv net of the PyTorch TensorBoard tutorial (conv 6, 16, then 120-84-out)."""
    _require_image(input_shape, "lenet")
    c, h, w = input_shape
    hh, ww = ((h - 4) // 2 - 4) // 2, ((w - 4) // 2 - 4) // 2
    flat = 16 * hh * ww
    return nn.Sequential(nn.Conv2d(c, 6, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(6, 16, 5), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Flatten(), nn.Linear(flat, 120), nn.ReLU(), nn.Linear(120, 84),
                         nn.ReLU(), nn.Linear(84, num_outputs))


def resnet18(input_shape: list[int], num_outputs: int) -> nn.Module:
    """torchvision's ResNet-18; for small images a 3x3 stem without max-pool (the CIFAR variant)."""
    import torchvision

    _require_image(input_shape, "resnet18")
    c, h, _ = input_shape
    m = torchvision.models.resnet18(weights=None, num_classes=num_outputs)
    if h <= 64:
        m.conv1 = nn.Conv2d(c, 64, 3, 1, 1, bias=False)
        m.maxpool = nn.Identity()
    elif c != 3:
        m.conv1 = nn.Conv2d(c, 64, 7, 2, 3, bias=False)
    return m


BUILTIN = {"linear": linear, "mlp": mlp, "cnn": cnn, "lenet": lenet, "resnet18": resnet18}



def _require_image(shape: list[int], name: str) -> None:
    if len(shape) != 3:
        raise UsageError(f"--model {name} needs image inputs (channels, height, width), got input shape {shape}")

