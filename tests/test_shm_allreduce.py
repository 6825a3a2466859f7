"""The shared-memory gradient all-reduce, with real processes on one shared mapping."""

from __future__ import annotations

import multiprocessing as mp
import os
import time
from pathlib import Path

import pytest
import torch

from disttrain.errors import TrainingError
from disttrain.shm_allreduce import FLAG_STRIDE, ShmAllReduce

WORLD = 3
SLOT = 128  # bytes: 32 floats, so a 100-float bucket goes through in 4 chunks


def _mapping(tmp_path: Path, world: int) -> str:
    path = tmp_path / "grads"
    path.write_bytes(bytes(2 * world * SLOT + world * FLAG_STRIDE * 8))
    return str(path)


def _bucket(rank: int, rnd: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(100, generator=torch.Generator().manual_seed(100 * rnd + rank), dtype=torch.float64).to(dtype)


def _worker(path: str, rank: int, world: int, rounds: int, out: str, pids: list[int]) -> None:
    torch.set_num_threads(1)
    shm = ShmAllReduce(path, rank, world, SLOT, timeout_s=30)
    shm.pids = pids
    results = {}
    for rnd in range(rounds):
        dtype = torch.float64 if rnd == rounds - 1 else torch.float32  # slots take any dtype
        results[f"r{rnd}"] = shm.mean_(_bucket(rank, rnd, dtype))
    from safetensors.torch import save_file

    save_file(results, out)


def _spawn(target, *args) -> mp.Process:
    p = mp.get_context("spawn").Process(target=target, args=args)
    p.start()
    return p


def test_mean_is_the_rank_order_average_and_identical_on_every_rank(tmp_path):
    from safetensors.torch import load_file

    path = _mapping(tmp_path, WORLD)
    rounds = 5
    outs = [str(tmp_path / f"r{r}.safetensors") for r in range(WORLD)]
    pids = [os.getpid()] * WORLD  # every rank's liveness check sees a live process
    procs = [_spawn(_worker, path, r, WORLD, rounds, outs[r], pids) for r in range(WORLD)]
    try:
        for p in procs:  # (a generous bound, not a speed expectation: spawning imports torch in each child)
            p.join(600)
            assert p.exitcode == 0
    finally:  # a failed rank leaves the others spinning on its flag: never leave them behind
        for p in procs:
            p.kill()
            p.join()
    got = [load_file(o) for o in outs]
    for rnd in range(rounds):
        dtype = torch.float64 if rnd == rounds - 1 else torch.float32
        parts = [_bucket(r, rnd, dtype) / WORLD for r in range(WORLD)]
        want = parts[0] + parts[1] + parts[2]  # rank order, as the hook sums
        for g in got:
            assert g[f"r{rnd}"].dtype == dtype
            assert torch.equal(g[f"r{rnd}"], want)  # bitwise, on every rank
        assert not torch.allclose(want, _bucket(0, rnd, dtype))  # the peers' values really arrived


def _fsdp_worker(path: str, rank: int, world: int, out: str, pids: list[int]) -> None:
    torch.set_num_threads(1)
    shm = ShmAllReduce(path, rank, world, SLOT, timeout_s=30)
    shm.pids = pids
    results = {}
    for rnd, n in enumerate((7, 45, 11)):  # shards of 7..45 elements: several chunks per call with 128-byte slots
        gathered = torch.full((world * n,), float("nan"))
        shm.all_gather_(gathered, _bucket(rank, rnd)[:n])
        results[f"gather{rnd}"] = gathered
        scattered = torch.full((n,), float("nan"), dtype=torch.float64)
        full = torch.cat([_bucket(rank, 10 + rnd + r, torch.float64)[:n] for r in range(world)])
        shm.reduce_scatter_(scattered, full)
        results[f"scatter{rnd}"] = scattered
        results[f"mean{rnd}"] = shm.mean_(_bucket(rank, 20 + rnd))  # interleaved with the all-reduce's rounds
    from safetensors.torch import save_file

    save_file(results, out)


def test_all_gather_and_reduce_scatter_for_fsdp_in_rank_order(tmp_path):
    """FSDP2's two collectives (parallel.share_shards) through the same mapping: all-gather concatenates every
    rank's shard in rank order; reduce-scatter gives rank r the rank-order sum of every rank's segment r."""
    from safetensors.torch import load_file

    path = _mapping(tmp_path, WORLD)
    outs = [str(tmp_path / f"r{r}.safetensors") for r in range(WORLD)]
    procs = [_spawn(_fsdp_worker, path, r, WORLD, outs[r], [os.getpid()] * WORLD) for r in range(WORLD)]
    try:
        for p in procs:
            p.join(600)
            assert p.exitcode == 0
    finally:
        for p in procs:
            p.kill()
            p.join()
    got = [load_file(o) for o in outs]
    for rnd, n in enumerate((7, 45, 11)):
        want = torch.cat([_bucket(r, rnd)[:n] for r in range(WORLD)])
        for rank, g in enumerate(got):
            assert torch.equal(g[f"gather{rnd}"], want)
            seg = [_bucket(src, 10 + rnd + rank, torch.float64)[:n] for src in range(WORLD)]
            assert torch.equal(g[f"scatter{rnd}"], seg[0] + seg[1] + seg[2])
            parts = [_bucket(r, 20 + rnd) / WORLD for r in range(WORLD)]
            assert torch.equal(g[f"mean{rnd}"], parts[0] + parts[1] + parts[2])


def _exit_at_once() -> None:
    os._exit(0)


def test_a_dead_peer_is_an_error_not_a_hang(tmp_path):
    path = _mapping(tmp_path, 2)
    peer = _spawn(_exit_at_once)
    shm = ShmAllReduce(path, 0, 2, SLOT, timeout_s=60)
    shm.pids = [os.getpid(), peer.pid]
    peer.join(600)  # reaped: its pid is gone (waits for the spawn, however slow the machine)
    assert peer.exitcode == 0
    t = time.monotonic()
    with pytest.raises(TrainingError, match=f"rank 1 \\(pid {peer.pid}\\) died"):
        shm.mean_(torch.ones(10))
    assert time.monotonic() - t < 5


def test_a_peer_that_never_arrives_times_out(tmp_path):
    shm = ShmAllReduce(_mapping(tmp_path, 2), 0, 2, SLOT, timeout_s=0.5)
    shm.pids = [os.getpid(), os.getpid()]  # alive, but it never publishes a round
    t = time.monotonic()
    with pytest.raises(TrainingError, match="rank 1 did not reach the gradient all-reduce within"):
        shm.mean_(torch.ones(10))
    assert 0.5 <= time.monotonic() - t < 5


def test_no_room_in_shm_means_gloo_not_a_crash(tmp_path, monkeypatch, capsys):
    """A full tmpfs would SIGBUS the job at its first write into the mapping: the space is reserved up front,
    and when that fails the file is removed and the job keeps gloo."""
    import errno

    from disttrain import shm_allreduce

    monkeypatch.setattr(shm_allreduce, "SHM_DIR", tmp_path)
    assert Path(shm_allreduce._create(4096)).stat().st_size == 4096

    def full(fd, offset, size):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    assert shm_allreduce._create(4096) == ""
    assert len(list(tmp_path.iterdir())) == 1  # only the first file; the failed one is gone
    assert "gradients go through gloo" in capsys.readouterr().err
