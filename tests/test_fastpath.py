"""The in-memory fast path feeds the loop exactly what the DataLoader path would (issue 6, performance).

Same samples, same order, same normalised values for the same seed/epoch/rank/world size; a short real run
ends with the same weights either way; augmentation depends on (seed, epoch, sample) only.
Speed is measured by `python -m disttrain.bench`, not here.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.utils.data import Dataset

from disttrain.config import parse_config
from disttrain.data import ArrayDataset, Data
from disttrain.data.builtin import _load_image_dataset, _prepare_image_dataset


class Wrapped(Dataset):
    """The same samples, but not an ArrayDataset: forces the DataLoader path."""

    def __init__(self, ds: ArrayDataset):
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int):
        return self.ds[i]


def _cfg(data_dir: Path, *flags: str):
    return parse_config(["--data-dir", str(data_dir), "--num-workers", "0", *flags])


def _data(cfg, rank: int, world: int, wrap: bool = False, channels_last: bool = False) -> Data:
    _prepare_image_dataset("fashion_mnist", Path(cfg.data_dir))
    train, test, spec = _load_image_dataset("fashion_mnist", Path(cfg.data_dir))
    d = Data(cfg, Wrapped(train) if wrap else train, None, test, spec, rank, world, torch.device("cpu"))
    d.channels_last = channels_last
    return d


def _batches(d: Data, epoch: int, start: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [b for w in d.train_windows(epoch, start=start) for b in w]


@pytest.mark.parametrize("world,grad_accum,batch", [(1, 1, 32), (2, 1, 24), (3, 2, 16)])
def test_fast_path_yields_the_dataloader_batches(fmnist_dir, world, grad_accum, batch):
    cfg = _cfg(fmnist_dir, "--seed", "3", "--batch-size", str(batch), "--grad-accum", str(grad_accum))
    for rank in range(world):
        fast, slow = _data(cfg, rank, world), _data(cfg, rank, world, wrap=True)
        assert fast.in_memory and not slow.in_memory
        for epoch in (0, 1):
            a, b = _batches(fast, epoch), _batches(slow, epoch)
            assert len(a) == len(b) > 0
            idx = fast.epoch_batches(epoch)
            for (xa, ya), (xb, yb), i in zip(a, b, idx):
                assert torch.equal(ya, yb)
                assert torch.equal(ya, fast.train.y[i])  # the very samples the sampler chose, in its order
                assert xa.dtype == xb.dtype == torch.float32 and xa.shape == xb.shape
                torch.testing.assert_close(xa, xb, rtol=0, atol=1e-6)
                ref = (fast.train.x[i].float() / 255 - fast.spec.mean[0]) / fast.spec.std[0]
                torch.testing.assert_close(xa, ref, rtol=0, atol=1e-6)
        # a resume in the middle of an epoch continues with the same batches on both paths
        tail_a, tail_b = _batches(fast, 1, start=2), _batches(slow, 1, start=2)
        assert len(tail_a) == len(tail_b)
        assert all(torch.equal(p[1], q[1]) and torch.equal(p[0], q[0]) for p, q in zip(tail_a, tail_b))
    # every sample of the epoch is trained on by exactly one rank, once (no padding)
    seen = torch.cat([torch.cat([b for w, _ in _data(cfg, r, world).epoch_windows(0) for b in w]) for r in range(world)])
    assert sorted(seen.tolist()) == list(range(len(_data(cfg, 0, 1).train)))


def test_channels_last_changes_layout_not_values(fmnist_dir):
    cfg = _cfg(fmnist_dir, "--batch-size", "32")
    a = _batches(_data(cfg, 0, 1), 0)
    b = _batches(_data(cfg, 0, 1, wrap=True, channels_last=True), 0)
    for (xa, _), (xb, _) in zip(a, b):
        assert xb.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(xa, xb)


def _reset_accelerate() -> None:
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()


def _short_run(fmnist_dir: Path, out: Path, wrap: bool) -> dict[str, torch.Tensor]:
    from disttrain.distributed import StopSignal
    from disttrain.train import finish, release, setup, train

    _reset_accelerate()
    cfg = _cfg(fmnist_dir, "--model", "cnn", "--model-kwargs", '{"width": 8}', "--batch-size", "32", "--epochs",
               "2", "--max-steps", "12", "--output-dir", str(out), "--no-progress", "--log-every", "5",
               "--optimizer", "sgd", "--momentum", "0.9", "--lr", "0.05")
    r = setup(cfg, StopSignal())
    if wrap:  # same Data object, but its training set only reachable through __getitem__
        r.data.train, r.data.in_memory = Wrapped(r.data.train), False
    try:
        train(r)
        finish(r)
    finally:
        release(r)
    return {k: v.detach().clone() for k, v in r.acc.unwrap_model(r.model).state_dict().items()}


def test_short_run_same_weights_on_both_paths(fmnist_dir, tmp_path):
    fast = _short_run(fmnist_dir, tmp_path / "fast", wrap=False)
    slow = _short_run(fmnist_dir, tmp_path / "slow", wrap=True)
    assert fast.keys() == slow.keys()
    for k in fast:
        torch.testing.assert_close(fast[k], slow[k], rtol=0, atol=1e-6, msg=k)
    # and training did move the weights (the comparison is not vacuous)
    from disttrain.models import build_model

    torch.manual_seed(0)
    init = build_model("cnn", {"width": 8}, _load_image_dataset("fashion_mnist", fmnist_dir)[2]).state_dict()
    assert any(not torch.allclose(init[k].float(), fast[k].float()) for k in fast if k.endswith("weight"))


def _augmented_by_sample(cfg, world: int, epoch: int) -> dict[int, torch.Tensor]:
    out: dict[int, torch.Tensor] = {}
    for rank in range(world):
        d = _data(cfg, rank, world)
        for (x, _), idx in zip(_batches(d, epoch), d.epoch_batches(epoch)):
            for xi, i in zip(x, idx.tolist()):
                if i in out:  # the sampler pads with repeats: a repeated sample gets the same draw
                    assert torch.equal(out[i], xi)
                out[i] = xi
    return out


def test_augmentation_depends_on_seed_epoch_sample_only(fmnist_dir):
    cfg = _cfg(fmnist_dir, "--augment", "crop_flip", "--batch-size", "24", "--seed", "5")
    one = _augmented_by_sample(cfg, 1, epoch=1)
    again = _augmented_by_sample(cfg, 1, epoch=1)
    two = _augmented_by_sample(cfg, 2, epoch=1)
    three = _augmented_by_sample(_cfg(fmnist_dir, "--augment", "crop_flip", "--batch-size", "7", "--seed", "5"),
                                 3, epoch=1)
    assert one.keys() == two.keys() == three.keys() == set(range(len(one)))
    for i in one:
        assert torch.equal(one[i], again[i])
        assert torch.equal(one[i], two[i]), f"sample {i} augmented differently on 2 processes"
        assert torch.equal(one[i], three[i]), f"sample {i} augmented differently with another batch size"
    plain = _data(_cfg(fmnist_dir, "--batch-size", "24"), 0, 1)
    ref = {i: (plain.train.x[i].float() / 255 - plain.spec.mean[0]) / plain.spec.std[0] for i in one}
    assert sum(not torch.equal(one[i], ref[i]) for i in one) > len(one) // 2  # it does augment
    other_epoch = _augmented_by_sample(cfg, 1, epoch=2)
    assert any(not torch.equal(one[i], other_epoch[i]) for i in one)
    other_seed = _augmented_by_sample(_cfg(fmnist_dir, "--augment", "crop_flip", "--seed", "6"), 1, epoch=1)
    assert any(not torch.equal(one[i], other_seed[i]) for i in one)
