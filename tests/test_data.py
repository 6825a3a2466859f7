"""data.py: built-in and plug-in datasets, offline sources, the per-rank order."""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch
from conftest import write_idx

from disttrain.data import builtin as data_mod
from disttrain.config import Config
from disttrain.data import ArrayDataset, Data, DataSpec, load_data
from disttrain.errors import UsageError


class FakeAcc:
    """The few Accelerator members data.py uses, for one process."""

    process_index, num_processes, is_local_main_process = 0, 1, True
    device = torch.device("cpu")

    @contextmanager
    def local_main_process_first(self):
        yield


def test_fashion_mnist_from_idx_files(fmnist_dir):
    d = load_data(Config(data_dir=str(fmnist_dir)), FakeAcc())
    assert d.spec.input_shape == [1, 28, 28] and d.spec.num_outputs == 10 and d.spec.task == "classification"
    assert len(d.train) == 256 and len(d.test) == 64 and d.train.x.dtype == torch.uint8
    assert (fmnist_dir / "disttrain-cache" / "fashion_mnist-train.safetensors").is_file()
    # the cache matches torchvision's own reading of the IDX files
    import torchvision

    tv = torchvision.datasets.FashionMNIST(str(fmnist_dir), train=True)
    assert torch.equal(d.train.x[:, 0], tv.data) and torch.equal(d.train.y, tv.targets)
    x, _ = next(d.eval_batches("test"))
    ref = torchvision.transforms.Normalize((0.2860,), (0.3530,))(torchvision.transforms.ToTensor()(tv.data[0].numpy()))
    assert x.shape == (64, 1, 28, 28) and x.dtype == torch.float32
    x0 = next(iter(next(d.train_windows(0))))[0]
    assert x0.dtype == torch.float32
    assert torch.allclose(d.prepare(d.train.x[:1])[0], ref, atol=1e-6)


def test_local_source_is_used_before_download(tmp_path, monkeypatch):
    src = tmp_path / "usr-share"
    write_idx(src, gz=True)  # like Debian's dataset-fashion-mnist: .gz IDX files
    monkeypatch.setitem(data_mod.LOCAL_SOURCES, "fashion_mnist", [src])
    d = load_data(Config(data_dir=str(tmp_path / "empty")), FakeAcc())
    assert len(d.train) == 256
    assert (tmp_path / "empty" / "FashionMNIST" / "raw" / "train-images-idx3-ubyte").is_file()


def test_missing_dataset_says_where_it_looked(tmp_path):
    with pytest.raises(UsageError) as e:
        load_data(Config(dataset="mnist", data_dir=str(tmp_path)), FakeAcc())
    msg = str(e.value)
    assert str(tmp_path / "MNIST") in msg and "/usr/share/datasets/mnist" in msg and "to get it" in msg


@pytest.mark.parametrize("name,task,shape", [("synthetic_regression", "regression", [1]),
                                             ("synthetic_classification", "classification", [16])])
def test_synthetic(name, task, shape):
    d = load_data(Config(dataset=name), FakeAcc())
    assert d.spec.task == task and d.spec.input_shape == shape and d.in_memory
    again = load_data(Config(dataset=name), FakeAcc())
    assert torch.equal(d.train.x, again.train.x)  # generated from the seed
    other = load_data(Config(dataset=name, seed=1), FakeAcc())
    assert not torch.equal(d.train.x, other.train.x)


def test_plugin_dataset():
    d = load_data(Config(dataset="plugins_for_tests:indexed_data", dataset_kwargs={"n_train": 30}), FakeAcc())
    assert len(d.train) == 30 and d.spec.num_outputs == 3 and d.spec.input_shape == [9]


def test_val_split_is_deterministic_and_disjoint():
    cfg = Config(dataset="plugins_for_tests:indexed_data", val_fraction=0.2)
    a, b = load_data(cfg, FakeAcc()), load_data(cfg, FakeAcc())
    assert torch.equal(a.val.x, b.val.x) and len(a.val) == 40 and len(a.train) == 160
    seen = set(a.train.x[:, 0].tolist()) | set(a.val.x[:, 0].tolist())
    assert len(seen) == 200 and not set(a.train.x[:, 0].tolist()) & set(a.val.x[:, 0].tolist())


def data(n: int, world: int, rank: int, batch: int, seed: int = 0, accum: int = 1) -> Data:
    ds = ArrayDataset(torch.arange(n), torch.zeros(n, dtype=torch.long))
    spec = DataSpec("classification", [1], 2)
    return Data(Config(batch_size=batch, seed=seed, grad_accum=accum), ds, None, None, spec, rank, world,
                torch.device("cpu"))


def order(n: int, world: int, batch: int, epoch: int, seed: int = 0, accum: int = 1) -> list[list[list[int]]]:
    """Per rank, per optimizer step, the sample indices of the step (all its micro-batches)."""
    return [[[i for b in w for i in b.tolist()] for w, _ in data(n, world, r, batch, seed, accum).epoch_windows(epoch)]
            for r in range(world)]


@pytest.mark.parametrize("n", [96, 97, 101, 5])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_every_sample_exactly_once_per_epoch_no_padding(world, n):
    per_rank = order(n, world, 8, epoch=3)
    seen = [i for rank in per_rank for w in rank for i in w]
    assert sorted(seen) == list(range(n))  # no padding, no dropping
    assert len({len(rank) for rank in per_rank}) == 1  # every rank has the same number of steps


@pytest.mark.parametrize("n", [96, 101, 97, 33])
def test_global_batch_is_world_size_independent(n):
    one, two, acc = order(n, 1, 32, epoch=1)[0], order(n, 2, 16, epoch=1), order(n, 1, 16, epoch=1, accum=2)[0]
    assert len(one) == len(two[0]) == len(acc)
    for k, step in enumerate(one):
        assert sorted(step) == sorted(two[0][k] + two[1][k]) == sorted(acc[k])
    assert order(96, 1, 32, epoch=2) != order(96, 1, 32, epoch=1)  # reshuffled each epoch
    assert order(96, 1, 32, epoch=1, seed=5) != order(96, 1, 32, epoch=1)


def test_a_rank_without_samples_gets_a_weight_zero_placeholder():
    # 97 samples, 2 ranks x 16: the last step holds 1 sample, on rank 0; rank 1 joins with a placeholder
    w0, w1 = (list(data(97, 2, r, 16).train_windows(0)) for r in (0, 1))
    assert len(w0) == len(w1) == 4
    assert (w0[-1].n_samples, w0[-1].weight, w0[-1].placeholder) == (1, 2.0, False)  # 2 processes / 1 sample
    assert (w1[-1].n_samples, w1[-1].weight, w1[-1].placeholder, len(w1[-1])) == (0, 0.0, True, 1)
    assert w0[0].weight == 2 / 32 and sum(w.n_samples for w in w0 + w1) == 97
    batches = [[x for x, _ in w] for w in data(97, 2, 1, 16).train_windows(0)]
    assert [[len(x) for x in b] for b in batches] == [[16], [16], [16], [1]]  # last: one real sample, weight 0


def test_augment_is_refused_where_it_cannot_apply():
    with pytest.raises(UsageError, match="--augment flip applies to in-memory image datasets"):
        load_data(Config(dataset="synthetic_classification", augment="flip"), FakeAcc())
