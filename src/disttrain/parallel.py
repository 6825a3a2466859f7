"""How the model is spread over the processes: the one module that knows DDP from FSDP2.

- `DataParallel` (`--sharding none`, the default): every rank holds the whole model; Accelerate wraps it
  in DDP and gradients are all-reduced once per optimizer step (through shared memory on one machine's CPU
  processes, distributed.share_gradients).
- `FullyShardedDataParallel` (`--sharding fsdp`): PyTorch's FSDP2 (`torch.distributed.fsdp.fully_shard`),
  applied per block (every child of an `nn.ModuleList`, e.g. a GPT's transformer blocks; a torchvision
  ResNet's four stages) and then to the whole model, so each rank keeps 1/N of every parameter, gradient
  and optimizer-state tensor (dim-0 shards) and all-gathers one block at a time for compute
  (torchtitan's `apply_fsdp` recipe). Gradients are reduce-scattered, averaged over ranks like DDP.

`train()` sees only the common surface: `wrap`, `grad_sync` (no reduction on earlier micro-batches of
an accumulation window), `clip` (over the full norm), `params_finite`, `unsharded` (evaluation),
`checkpoint_state` / `load_state` (what a checkpoint holds; checkpoint.py decides how it is laid out)
and `full_state_dict` (the final export, gathered one tensor at a time).

Accelerate trap: an FSDP launch config (`distributed_type: FSDP`, which exports ACCELERATE_USE_FSDP=true)
with `Accelerator(cpu=True)` silently becomes MULTI_CPU + DDP. `resolve_sharding` reads that variable
itself, so such a launch shards with FSDP2 here (or refuses, with `--sharding none`): never silent DDP.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
from torch import nn

from disttrain import checkpoint as ckpt
from disttrain import shm_allreduce
from disttrain.config import Config
from disttrain.distributed import broadcast_str, gradient_path, plain_module, share_gradients
from disttrain.ema import EMA
from disttrain.errors import TrainingError, UsageError
from disttrain.state import load_model_weights

_TRUE = ("1", "true", "yes")


def fsdp_requested_by_launcher() -> bool:
    """Accelerate exports ACCELERATE_USE_FSDP=true for a launch config with `distributed_type: FSDP`."""
    return os.environ.get("ACCELERATE_USE_FSDP", "").strip().lower() in _TRUE


def resolve_sharding(cfg: Config) -> str:
    """'fsdp' or 'none': the flag; with `auto` (the default) the launch config's choice (Accelerate's FSDP
    keys), else none.

    Raises UsageError for combinations that cannot work, before anything is written."""
    launcher = fsdp_requested_by_launcher()
    if cfg.sharding == "none" and launcher:
        given = "sharding" in getattr(cfg, "explicit", {"sharding"})  # else a resumed run's saved setting
        raise UsageError(f"{'--sharding none' if given else 'the resumed run was trained with sharding none'}, "
                         "but the launch config asks for FSDP (distributed_type: FSDP, ACCELERATE_USE_FSDP=true); "
                         "pass --sharding fsdp or use a launch config without FSDP")
    kind = cfg.sharding if cfg.sharding != "auto" else "fsdp" if launcher else "none"
    if kind == "fsdp":
        if cfg.mixed_precision == "fp16":
            raise UsageError("--sharding fsdp with --mixed-precision fp16 is not supported (FSDP2 would need a "
                             "sharded gradient scaler); use --mixed-precision bf16")
        if cfg.sync_batchnorm:
            raise UsageError("--sharding fsdp with --sync-batchnorm is not supported; batch-norm statistics stay "
                             "per process")
    return kind


def reshard_after_forward(cfg: Config) -> bool:
    """--fsdp-reshard-after-forward, else the launch config's fsdp_reshard_after_forward, else True
    (FSDP2's default: free the gathered parameters after forward, gather again in backward: ZeRO-3)."""
    if cfg.fsdp_reshard_after_forward is not None:
        return cfg.fsdp_reshard_after_forward
    v = os.environ.get("FSDP_RESHARD_AFTER_FORWARD", "").strip().lower()
    if v in ("false", "0", "no", "no_shard", "shard_grad_op"):
        return False
    return True


def make_parallel(cfg: Config, acc: Any, kind: str, model: nn.Module) -> DataParallel | FullyShardedDataParallel:
    """The strategy for this run (`model`: the plain module it will wrap). FSDP on one process has nothing to
    shard: plain training (same results). UsageError for a model FSDP2 cannot shard, before anything is
    written: a 0-dim parameter (fully_shard shards along dim 0)."""
    if kind == "fsdp" and acc.num_processes > 1:
        scalars = [n for n, p in model.named_parameters() if p.ndim == 0]
        if scalars:
            raise UsageError(f"--sharding fsdp: parameter {scalars[0]!r} is a scalar (0-dim); FSDP2 shards along "
                             "dimension 0: make it shape [1] in the model, or use --sharding none")
        return FullyShardedDataParallel(cfg, acc)
    return DataParallel(cfg, acc, asked_fsdp=kind == "fsdp")


def state_bytes_per_param(cfg: Config) -> int:
    """fp32 parameter + optimizer state per parameter: Adam/AdamW keep 2 moments, SGD with momentum 1."""
    slots = 2 if cfg.optimizer in ("adam", "adamw") else 1 if cfg.momentum else 0
    return 4 * (1 + slots)


def optimizer_fqns(net: nn.Module, optimizer: Any) -> list[str]:
    """The parameter names in the order of the optimizer's state_dict ids: torch numbers parameters group by
    group (optim.param_groups puts matrices first, then biases and norms), not in model.parameters() order."""
    names = {id(p): n for n, p in net.named_parameters()}
    return [names[id(p)] for g in optimizer.param_groups for p in g["params"]]


class DataParallel:
    """Replicas: Accelerate's DDP (or nothing, on one process); checkpoints hold the full state."""

    sharded = False
    channels_last = True  # conv weights may be channels_last (non-contiguous)

    def __init__(self, cfg: Config, acc: Any, asked_fsdp: bool = False):
        self.cfg, self.acc, self.asked_fsdp = cfg, acc, asked_fsdp

    def describe(self, model: nn.Module) -> str:
        mb = sum(p.numel() for p in model.parameters()) * state_bytes_per_param(self.cfg) / 1e6
        what = "fsdp2 asked, 1 process: nothing to shard" if self.asked_fsdp else "none"
        return f"sharding {what} (~{mb:.3g} MB of parameters+optimizer state per rank)"

    def wrap(self, model: nn.Module) -> nn.Module:
        if self.cfg.compile:
            model = torch.compile(model)
        model = self.acc.prepare(model)  # NOT the loaders (re-sharding) nor the scheduler
        share_gradients(self.cfg, self.acc, model)  # one machine, CPU: all-reduce through shared memory
        return model

    def prepare_optimizer(self, optimizer: torch.optim.Optimizer) -> Any:
        return self.acc.prepare(optimizer)

    def unwrap(self, model: nn.Module) -> nn.Module:
        return plain_module(self.acc, model)

    def grad_sync(self, model: nn.Module, sync: bool) -> Any:
        """Context for one micro-batch's forward+backward: all-reduce its gradients only if `sync`."""
        return nullcontext() if sync else self.acc.no_sync(model)

    def clip(self, model: nn.Module, max_norm: float) -> torch.Tensor:
        return self.acc.clip_grad_norm_(model.parameters(), max_norm)

    def params_finite(self, model: nn.Module) -> bool:
        return all(bool(torch.isfinite(p).all()) for p in model.parameters())

    def unsharded(self, model: nn.Module) -> Any:
        return nullcontext()

    def checkpoint_state(self, model: nn.Module, optimizer: Any, ema: EMA | None = None) -> dict[str, Any]:
        """The files the main process writes for model, optimizer (full state; ids are positions) and the
        --ema-decay average (ema.safetensors)."""
        opt_tensors, opt_meta = ckpt.optimizer_to_files(optimizer.state_dict())
        files = {"model.safetensors": self.unwrap(model).state_dict(), "optimizer.safetensors": opt_tensors,
                 "optimizer.json": opt_meta}
        if ema is not None:
            files["ema.safetensors"] = ema.state_dict()
        return files

    def load_state(self, model: nn.Module, optimizer: Any, saved: dict[str, Any], what: str,
                   ema: EMA | None = None) -> None:
        """Restore model, optimizer and EMA from a checkpoint of either layout (any world size)."""
        net = self.unwrap(model)
        _require_ema(saved, ema)
        if ckpt.is_sharded(saved):  # written by FSDP on any number of ranks: read it whole
            flat = ckpt.read_shards_full(saved)
            load_model_weights(net, _prefixed(flat, "model.", saved), what)
            tensors, meta = _optimizer_fqn_to_ids(flat, saved["optimizer.json"], optimizer_fqns(net, optimizer))
            average = _prefixed(flat, "ema.", saved) if ema is not None else {}
        else:
            load_model_weights(net, saved["model.safetensors"], what)
            tensors, meta = saved["optimizer.safetensors"], saved["optimizer.json"]
            average = saved.get("ema.safetensors", {})
        optimizer.load_state_dict(ckpt.optimizer_from_files(optimizer.state_dict(), tensors, meta))
        if ema is not None:
            ema.load_state_dict(average)

    def full_state_dict(self, model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
        yield from self.unwrap(model).state_dict().items()

    def gathered(self, sd: dict[str, torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
        """A state dict laid out like the model's (the EMA's), whole: here it already is."""
        yield from sd.items()


class FullyShardedDataParallel:
    """FSDP2 over all processes: dim-0 shards of every parameter, gradient and optimizer state."""

    sharded = True
    channels_last = False  # fully_shard takes contiguous parameters only (channels_last conv weights are not)

    def __init__(self, cfg: Config, acc: Any):
        from torch.distributed.device_mesh import init_device_mesh

        self.cfg, self.acc = cfg, acc
        self.mesh = init_device_mesh(acc.device.type, (acc.num_processes,))
        self.reshard = reshard_after_forward(cfg)
        self.module: nn.Module | None = None  # the root FSDP module (under torch.compile's wrapper, if any)

    def describe(self, model: nn.Module) -> str:
        n = self.acc.num_processes
        mb = sum(p.numel() for p in model.parameters()) * state_bytes_per_param(self.cfg) / n / 1e6
        return f"sharding fsdp2 ({n} ranks, ~{mb:.3g} MB of parameters+optimizer state per rank)"

    def wrap(self, model: nn.Module) -> nn.Module:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        # bf16 compute with fp32 master weights (the sharded parameters) and an fp32 gradient reduction;
        # the model's output cast back to fp32 so the loss is computed as in full precision
        bf16 = self.cfg.mixed_precision == "bf16"
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else \
            MixedPrecisionPolicy()
        root_mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32,
                                       output_dtype=torch.float32) if bf16 else MixedPrecisionPolicy()
        for block in fsdp_blocks(model):
            fully_shard(block, mesh=self.mesh, mp_policy=mp, reshard_after_forward=self.reshard)
        # the root keeps what is left (embeddings, head, norms); after forward it is needed by backward first
        fully_shard(model, mesh=self.mesh, mp_policy=root_mp, reshard_after_forward=False)
        self.module = model
        share_shards(self.cfg, self.acc, model)
        return torch.compile(model) if self.cfg.compile else model

    def prepare_optimizer(self, optimizer: torch.optim.Optimizer) -> Any:
        return optimizer  # not Accelerate's wrapper: no scaler (fp16 refused), nothing to add

    def unwrap(self, model: nn.Module) -> nn.Module:
        assert self.module is not None
        return self.module

    @contextmanager
    def grad_sync(self, model: nn.Module, sync: bool) -> Iterator[None]:
        """No reduce-scatter on earlier micro-batches: gradients accumulate unsharded until the last one."""
        fsdp = self.unwrap(model)
        fsdp.set_requires_gradient_sync(sync)  # type: ignore[operator]
        try:
            yield
        finally:
            fsdp.set_requires_gradient_sync(True)  # type: ignore[operator]

    def clip(self, model: nn.Module, max_norm: float) -> torch.Tensor:
        # DTensor gradients: the norm is reduced over all shards (the full model's norm, as under DDP)
        return torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)

    def params_finite(self, model: nn.Module) -> bool:
        ok = torch.tensor([int(all(bool(torch.isfinite(_local(p)).all()) for p in model.parameters()))],
                          dtype=torch.int32, device=self.acc.device)
        torch.distributed.all_reduce(ok, op=torch.distributed.ReduceOp.MIN)
        return bool(ok.item())

    @contextmanager
    def unsharded(self, model: nn.Module) -> Iterator[None]:
        """Whole parameters on every rank while evaluating: ranks may run different numbers of batches, so
        no collective may happen inside (peak: the full parameters, as under DDP)."""
        fsdp = [m for m in self.unwrap(model).modules() if hasattr(m, "unshard")]
        for m in fsdp:
            m.set_reshard_after_forward(False, recurse=False)  # type: ignore[operator]
            m.unshard()  # type: ignore[operator]
        try:
            yield
        finally:
            for m in fsdp:
                m.reshard()  # type: ignore[operator]
            for m in fsdp:
                m.set_reshard_after_forward(self.reshard if m is not self.module else False,  # type: ignore[operator]
                                            recurse=False)

    def checkpoint_state(self, model: nn.Module, optimizer: Any, ema: EMA | None = None) -> dict[str, Any]:
        """Every rank's shards (model.<fqn>, optim.<fqn>.<state>, ema.<fqn>) + the optimizer's non-tensors
        (JSON)."""
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

        net = self.unwrap(model)
        aliases = tied_aliases(net)  # safetensors stores a tied parameter once
        shards: dict[str, torch.Tensor] = {f"model.{k}": v for k, v in get_model_state_dict(net).items()
                                           if k not in aliases}
        osd = get_optimizer_state_dict(net, optimizer)
        scalars: dict[str, dict[str, Any]] = {}
        for fqn, st in osd["state"].items():
            for k, v in st.items():
                if isinstance(v, torch.Tensor):
                    shards[f"optim.{fqn}.{k}"] = v
                else:
                    scalars.setdefault(fqn, {})[k] = v
        if ema is not None:  # the average's shards, laid out like the weights'
            shards |= {f"ema.{k}": v for k, v in ema.state_dict().items() if k not in aliases}
        meta = {"param_groups": osd["param_groups"], "scalars": scalars, "keyed_by": "fqn"}
        return {ckpt.SHARDS: shards, "optimizer.json": meta,
                ckpt.SHARDING_JSON: {"tied": aliases, "ema": ema is not None}}

    def load_state(self, model: nn.Module, optimizer: Any, saved: dict[str, Any], what: str,
                   ema: EMA | None = None) -> None:
        """Sharded checkpoints load shard by shard (DCP reshards to this world size); full ones are
        distributed from every rank's full copy."""
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                             set_optimizer_state_dict)

        net = self.unwrap(model)
        names = optimizer_fqns(net, optimizer)
        _require_ema(saved, ema)
        if ckpt.is_sharded(saved):
            template = self.checkpoint_state(model, optimizer, ema)[ckpt.SHARDS]  # DTensors of this layout
            ckpt.load_shards(saved, template)  # in place (the EMA's own tensors included)
            sd = _prefixed(template, "model.", saved)
            _check_keys(net, sd, what)
            set_model_state_dict(net, sd)
            osd = _optimizer_fqn_state(template, saved["optimizer.json"], names)
            set_optimizer_state_dict(net, optimizer, osd)
            if ema is not None:
                ema.load_state_dict(_prefixed(template, "ema.", saved))  # the tied names' copies too
            return
        if ema is not None:  # a full average: every rank keeps the slices of its shards
            from torch.distributed.tensor import distribute_tensor

            ema.load_state_dict({k: distribute_tensor(saved["ema.safetensors"][k], t.device_mesh, t.placements,
                                                      src_data_rank=None) if hasattr(t, "device_mesh") else
                                 saved["ema.safetensors"][k] for k, t in ema.state_dict().items()})
        full = saved["model.safetensors"]
        _check_keys(net, full, what)
        opts = StateDictOptions(full_state_dict=True)
        set_model_state_dict(net, full, options=opts)
        tensors = {}
        for key, t in saved["optimizer.safetensors"].items():  # "<position>.<state>" -> "optim.<fqn>.<state>"
            pid, _, k = key.partition(".")
            tensors[f"optim.{names[int(pid)]}.{k}"] = t
        meta = dict(saved["optimizer.json"])
        meta["scalars"] = {names[int(pid)]: v for pid, v in meta["scalars"].items()}
        meta["param_groups"] = [dict(g, params=[names[i] for i in g["params"]]) for g in meta["param_groups"]]
        set_optimizer_state_dict(net, optimizer, _optimizer_fqn_state(tensors, meta, names), options=opts)

    def full_state_dict(self, model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, full tensor) on every rank, gathered one tensor at a time (a collective per DTensor):
        the peak on a rank is its shards plus the largest single tensor. Tied names (one parameter under
        two names) yield the same gathered tensor, so the export stores it once."""
        sd = self.unwrap(model).state_dict(keep_vars=True)  # the parameters themselves: tied ones are one object
        uses = Counter(id(v) for v in sd.values())
        tied: dict[int, torch.Tensor] = {}
        for k, v in sd.items():
            if id(v) not in tied:
                with torch.no_grad():
                    t = (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().cpu()
                if uses[id(v)] == 1:
                    yield k, t
                    continue
                tied[id(v)] = t
            yield k, tied[id(v)]

    def gathered(self, sd: dict[str, torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
        """A state dict laid out like the model's (the EMA's), gathered one tensor at a time on every rank."""
        for k, v in sd.items():
            yield k, (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().cpu()


def share_shards(cfg: Config, acc: Any, model: nn.Module) -> None:
    """On one machine's CPU processes, FSDP2's all-gathers and reduce-scatters go through shared memory
    (shm_allreduce.py) instead of gloo's TCP loopback, as DDP's all-reduce does (collective)."""
    if gradient_path(cfg, acc) != "shared memory reduce-scatter":
        return
    shm = shm_allreduce.ShmAllReduce.attach(acc, model, cfg.dist_timeout, broadcast_str)
    if shm is None:  # no room in /dev/shm: gloo (rank 0 said so)
        return
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.fsdp._fully_shard._fsdp_api import AllGather, ReduceScatter

    class Gather(AllGather):
        def allocate(self, size: Any, *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
            return torch.empty(*size, dtype=dtype, device=device)

        def __call__(self, output_tensor: torch.Tensor, input_tensor: torch.Tensor, group: Any,
                     async_op: bool = False) -> None:
            shm.all_gather_(output_tensor, input_tensor)

    class Scatter(ReduceScatter):
        allocate = Gather.allocate

        def __call__(self, output_tensor: torch.Tensor, input_tensor: torch.Tensor, group: Any, op: Any,
                     async_op: bool = False) -> None:
            if op != torch.distributed.ReduceOp.SUM:  # set_force_sum_reduction_for_comms below
                raise TrainingError(f"shared-memory reduce-scatter: unexpected reduction {op}")
            shm.reduce_scatter_(output_tensor, input_tensor)

    gather, scatter = Gather(), Scatter()
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.set_force_sum_reduction_for_comms(True)  # FSDP2 divides by the world size after the sum
            m.set_custom_all_gather(gather)
            m.set_custom_reduce_scatter(scatter)


def _prefixed(flat: dict[str, torch.Tensor], prefix: str, saved: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The `prefix`ed tensors of a sharded checkpoint (model., ema.), without the prefix, tied names added back."""
    return ckpt.with_tied({k[len(prefix):]: v for k, v in flat.items() if k.startswith(prefix)}, saved)


def _require_ema(saved: dict[str, Any], ema: EMA | None) -> None:
    has = saved.get(ckpt.SHARDING_JSON, {}).get("ema", False) if ckpt.is_sharded(saved) else "ema.safetensors" in saved
    if ema is not None and not has:
        raise UsageError("--resume: the checkpoint has no EMA weights (ema.safetensors) but --ema-decay is set")


def fsdp_blocks(model: nn.Module) -> list[nn.Module]:
    """The units FSDP2 gathers one at a time: every child of an nn.ModuleList (transformer blocks), a
    torchvision ResNet's stages (layer1..layer4); none otherwise (the whole model is one unit)."""
    blocks = [child for m in model.modules() if isinstance(m, nn.ModuleList) for child in m.children()]
    blocks += [getattr(model, f"layer{i}") for i in range(1, 5)
               if isinstance(getattr(model, f"layer{i}", None), nn.Sequential) and hasattr(model, "fc")]
    return [b for b in blocks if any(True for _ in b.parameters())]


def tied_aliases(net: nn.Module) -> dict[str, str]:
    """{name: the first name of the same parameter} for parameters registered under several names."""
    first: dict[int, str] = {}
    out = {}
    for name, p in net.named_parameters(remove_duplicate=False):
        if id(p) in first:
            out[name] = first[id(p)]
        else:
            first[id(p)] = name
    return out


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def _check_keys(net: nn.Module, sd: dict[str, torch.Tensor], what: str) -> None:
    own = net.state_dict()
    missing, unexpected = sorted(set(own) - set(sd)), sorted(set(sd) - set(own))
    bad_shape = [k for k in own if k in sd and tuple(own[k].shape) != tuple(sd[k].shape)]
    if missing or unexpected or bad_shape:
        raise UsageError(f"{what}: weights do not fit --model (missing {missing[:3]}, unexpected {unexpected[:3]}, "
                         f"shape mismatch {bad_shape[:3]})")


def _optimizer_fqn_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any], names: list[str]) -> dict[str, Any]:
    """An FQN-keyed optimizer state_dict (torch.distributed.checkpoint.state_dict's form) from flat
    "optim.<fqn>.<state>" tensors and the JSON non-tensors."""
    state: dict[str, dict[str, Any]] = {}
    for key, t in tensors.items():
        if key.startswith("optim."):
            fqn, _, k = key[len("optim."):].rpartition(".")
            state.setdefault(fqn, {})[k] = t
    for fqn, vals in meta["scalars"].items():
        state.setdefault(fqn, {}).update(vals)
    groups = [dict(g, params=list(g["params"])) for g in meta["param_groups"]]
    for g in groups:
        for k, v in g.items():
            if isinstance(v, list) and k == "betas":
                g[k] = tuple(v)
    unknown = sorted(set(state) - set(names))
    if unknown:
        raise UsageError(f"checkpoint optimizer state for unknown parameters {unknown[:3]}")
    return {"state": state, "param_groups": groups}


def _optimizer_fqn_to_ids(flat: dict[str, torch.Tensor], meta: dict[str, Any],
                          names: list[str]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """FQN-keyed (sharded checkpoint) -> position-keyed (optimizer_to_files' form, this model's order)."""
    index = {n: i for i, n in enumerate(names)}
    tensors = {}
    for key, t in flat.items():
        if key.startswith("optim."):
            fqn, _, k = key[len("optim."):].rpartition(".")
            if fqn not in index:
                raise UsageError(f"checkpoint optimizer state for unknown parameter {fqn!r}")
            tensors[f"{index[fqn]}.{k}"] = t
    scalars = {str(index[fqn]): v for fqn, v in meta["scalars"].items() if fqn in index}
    groups = [dict(g, params=[index[n] for n in g["params"]]) for g in meta["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars}
