"""Models: one module per family, `build_model` (built-ins and plug-ins) and the pre-flight batch check.

- vision.py: linear, mlp, cnn, lenet, resnet18
- gpt.py: gpt, a decoder-only transformer language model (nanoGPT)
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from disttrain.data import DataSpec, import_plugin
from disttrain.errors import UsageError, one_line
from disttrain.models.gpt import gpt
from disttrain.models.vision import cnn, lenet, linear, mlp, resnet18

BUILTIN = {"linear": linear, "mlp": mlp, "cnn": cnn, "lenet": lenet, "resnet18": resnet18, "gpt": gpt}

def build_model(name: str, kwargs: dict[str, Any], spec: DataSpec) -> nn.Module:
    """A built-in model sized from the data, or `module:function(**kwargs)`.

    Bounded before any memory is allocated (the same bounds for training and for every reader of a
    model.json: schema.py): the data's input shape and output count, and for built-ins the parameter count,
    counted on the meta device first. A plug-in is user code and sizes itself."""
    from disttrain import schema

    schema.check_shape(list(spec.input_shape), spec.num_outputs, f"--model {name}")
    if name in BUILTIN:
        fn, args = BUILTIN[name], {"input_shape": spec.input_shape, "num_outputs": spec.num_outputs}
        try:
            with torch.device("meta"):
                n = num_parameters(fn(**args, **kwargs))
        except Exception:  # noqa: BLE001 - reported below by the real build, with its message
            n = 0
        if n > schema.MAX_PARAMETERS:
            raise UsageError(f"--model {name} with --model-kwargs {one_line(kwargs)[:200]} would have {n:,} "
                             f"parameters, more than the {schema.MAX_PARAMETERS:,} disttrain allows")
    else:
        fn, args = import_plugin(name, "--model"), {}
    try:
        model = fn(**args, **kwargs)
    except UsageError:
        raise
    except Exception as e:  # noqa: BLE001 - factories are user code or get user kwargs
        raise UsageError(f"--model {name} with --model-kwargs {kwargs} raised "
                         f"{type(e).__name__}: {one_line(e)}") from None
    if not isinstance(model, nn.Module):
        raise UsageError(f"--model {name} must return a torch.nn.Module, got {type(model).__name__}")
    return model


def is_conv_net(model: nn.Module) -> bool:
    return any(isinstance(m, nn.Conv2d) for m in model.modules())


def num_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def check_batch(model: nn.Module, loss_fn: Any, x: torch.Tensor, y: torch.Tensor, spec: DataSpec,
                loss_name: str) -> list[str]:
    """The pre-flight batch: one real forward + loss before training, so a shape mismatch is reported in
    seconds. Runs in train mode with autograd recording (no backward), so it also finds the trainable
    parameters the loss never reaches; returns their names. Leaves no trace on the model: it runs on a copy
    (batch-norm statistics, `num_batches_tracked`, a model's own counters stay as they were); a model that
    cannot be copied runs itself and gets its buffers put back. The caller keeps the RNG (train.setup).
    UsageError naming the shapes when the model does not fit the data."""
    try:
        probe = copy.deepcopy(model)
    except Exception:  # noqa: BLE001 - e.g. a module holding a lock or a file: run on the model itself
        probe = None
    if probe is not None:
        return _check_batch(probe, loss_fn, x, y, spec, loss_name)
    saved = [(b, b.detach().clone()) for b in model.buffers()]
    try:
        return _check_batch(model, loss_fn, x, y, spec, loss_name)
    finally:
        with torch.no_grad():
            for b, v in saved:
                b.copy_(v)


def _check_batch(model: nn.Module, loss_fn: Any, x: torch.Tensor, y: torch.Tensor, spec: DataSpec,
                 loss_name: str) -> list[str]:
    try:
        with torch.enable_grad():
            out = model(x)
    except Exception as e:  # noqa: BLE001
        raise UsageError(f"--model does not accept the data: input batch of shape {list(x.shape)} "
                         f"raised {type(e).__name__}: {one_line(e)[:300]}") from None
    if not isinstance(out, torch.Tensor):
        raise UsageError(f"--model must return a tensor, got {type(out).__name__}")
    if loss_name == "cross_entropy":
        if y.is_floating_point() or y.ndim not in (1, 2) or out.ndim != y.ndim + 1 or out.shape[:-1] != y.shape:
            raise UsageError(f"--loss cross_entropy needs integer class targets of shape [batch] (or [batch, tokens]) "
                             f"and outputs [batch, classes] (or [batch, tokens, classes]); got targets "
                             f"{list(y.shape)} {y.dtype} and outputs {list(out.shape)}")
        if out.shape[-1] < spec.num_outputs:
            raise UsageError(f"model outputs {out.shape[-1]} classes but the targets have {spec.num_outputs}")
    elif out.shape != y.shape and not (out.numel() == y.numel() and out.shape[0] == y.shape[0]):
        raise UsageError(f"--loss {loss_name}: model output shape {list(out.shape)} does not fit target shape "
                         f"{list(y.shape)}")
    loss = loss_fn(out.float(), y)
    if loss.shape != (len(y),):
        raise UsageError(f"--loss {loss_name} gave per-sample shape {list(loss.shape)}, expected [{len(y)}]")
    reached = _parameters_reached(loss)
    return [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in reached]


def _parameters_reached(t: torch.Tensor) -> set[int]:
    """ids of the leaf tensors `t` depends on through autograd: the walk DDP's find_unused_parameters does
    after every forward (torch/nn/parallel/distributed.py), done once here."""
    seen, ids, stack = set(), set(), [t.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        var = getattr(fn, "variable", None)  # AccumulateGrad nodes hold the parameter
        if var is not None:
            ids.add(id(var))
        stack.extend(f for f, _ in fn.next_functions)
    return ids
