"""Gradient averaging through shared memory, for CPU processes that share one machine.

Why: gloo's all-reduce goes through TCP loopback; on a 2-core box it costs ~2 ms per call even for a few
thousand floats, as much as a whole small-model step, so 2 processes x 1 thread trained at 0.6-0.7x the
speed of 1 process x 2 threads. Copying a bucket into a shared mapping and summing the peers' copies costs
microseconds (docs/performance.md has the numbers).

How: one mapped file per job holds, for each of two alternating rounds, one slot per rank. In round s a
rank writes its bucket divided by the world size (as DDP's own all-reduce divides) into its slot,
publishes s in its flag, waits until every peer's flag reaches s, and sums the slots in rank order: the
same order on every rank, so all ranks keep bitwise identical weights (with two ranks, a + b is also
bitwise what gloo returns). Two rounds of slots are enough: a rank writes round s + 2 only after every peer
published s + 1, which each peer does only after it has read round s. Buckets larger than a slot go in
chunks, one round each. x86 keeps stores in order (TSO), so a peer that sees the flag sees the data; on
other architectures, or across machines, DDP keeps gloo.
"""

from __future__ import annotations

import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from collections.abc import Callable
from typing import Any

import torch

from disttrain.errors import TrainingError

SHM_DIR = Path("/dev/shm")
MAX_SLOT_BYTES = 4 << 20  # per rank and round; larger buckets go through in chunks
FLAG_STRIDE = 16  # int64s between two ranks' flags: 128 bytes, no false sharing of cache lines
SPIN = 2000  # busy polls before yielding the core (a peer on its own core arrives within microseconds)


def usable(acc: Any, enabled: bool) -> bool:
    """Whether this job can average gradients through shared memory: several CPU processes, all on this
    x86 machine, a writable SHM_DIR, and not turned off with --no-shm-allreduce."""
    return (enabled and acc.num_processes > 1 and acc.device.type == "cpu"
            and int(os.environ.get("LOCAL_WORLD_SIZE", "0")) == acc.num_processes
            and platform.machine().lower() in ("x86_64", "amd64")  # store ordering, see above
            and SHM_DIR.is_dir() and os.access(SHM_DIR, os.W_OK))


def fsdp_hooks_available() -> bool:
    """Whether this torch's FSDP2 takes custom all-gather/reduce-scatter collectives (torch >= 2.8)."""
    try:
        from torch.distributed.fsdp import FSDPModule
        from torch.distributed.fsdp._fully_shard._fsdp_api import AllGather, ReduceScatter  # noqa: F401
    except ImportError:
        return False
    return all(hasattr(FSDPModule, f) for f in ("set_custom_all_gather", "set_custom_reduce_scatter",
                                                 "set_force_sum_reduction_for_comms"))


class ShmAllReduce:
    """A DDP communication hook that averages gradient buckets through a shared mapping (one machine)."""

    def __init__(self, path: str, rank: int, world: int, slot_bytes: int, timeout_s: float):
        self.rank, self.world, self.slot_bytes, self.timeout_s = rank, world, slot_bytes, timeout_s
        raw = torch.from_file(path, shared=True, size=2 * world * slot_bytes + world * FLAG_STRIDE * 8,
                              dtype=torch.uint8)
        self.slots = raw[: 2 * world * slot_bytes].view(2, world, slot_bytes)
        self.flags = raw[2 * world * slot_bytes:].view(torch.int64).numpy()  # numpy: ~0.1 us per read
        self.round = 0
        self.pids: list[int] = []

    @classmethod
    def attach(cls, acc: Any, model: torch.nn.Module, timeout_s: float, broadcast_str: Any) -> ShmAllReduce | None:
        """Create (rank 0) and map (all ranks) the shared file; unlink it once mapped, so nothing outlives
        the job, even after kill -9. None (keep gloo) if rank 0 cannot reserve the space. Collective."""
        grad_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
        world = acc.num_processes
        # at least 128 bytes per rank: a reduce-scatter round holds one piece for every rank
        slot = min(MAX_SLOT_BYTES, max(-(-grad_bytes // 128) * 128, 128 * world))
        path = ""
        if acc.is_main_process:
            path = _create(2 * world * slot + world * FLAG_STRIDE * 8)
        path = broadcast_str(acc, path)
        if not path:
            return None
        self = cls(path, acc.process_index, world, slot, timeout_s)
        self.flags[self.rank * FLAG_STRIDE + 1] = os.getpid()
        acc.wait_for_everyone()
        self.pids = [int(self.flags[r * FLAG_STRIDE + 1]) for r in range(world)]
        acc.wait_for_everyone()
        if acc.is_main_process:
            os.unlink(path)
        return self

    def hook(self, state: Any, bucket: Any) -> torch.futures.Future:
        """DDP comm hook signature: average `bucket.buffer()` in place, return it as a completed future."""
        fut: torch.futures.Future = torch.futures.Future()
        fut.set_result(self.mean_(bucket.buffer()))
        return fut

    def mean_(self, buf: torch.Tensor) -> torch.Tensor:
        """Average a contiguous tensor over the ranks, in place."""
        flat = buf.view(-1)
        chunk = self.slot_bytes // buf.element_size()
        for start in range(0, flat.numel(), chunk):
            self._round(flat[start: start + chunk])
        return buf

    def _round(self, part: torch.Tensor) -> None:
        slots = self._exchange(part.numel(), part.dtype,
                               lambda mine: torch.div(part, self.world, out=mine))  # divide and publish in one pass
        torch.add(slots[0], slots[1], out=part)  # rank order on every rank: identical sums everywhere
        for r in range(2, self.world):
            part.add_(slots[r])

    def all_gather_(self, out: torch.Tensor, inp: torch.Tensor) -> None:
        """FSDP2's all-gather: `out` (1-D, world * n) = every rank's `inp` (1-D, n) in rank order."""
        n = inp.numel()
        dst = out.view(self.world, n)
        chunk = self.slot_bytes // inp.element_size()
        for start in range(0, n, chunk):
            part = inp[start: start + chunk]
            slots = self._exchange(part.numel(), part.dtype, lambda mine: mine.copy_(part))
            dst[:, start: start + part.numel()].copy_(slots)

    def reduce_scatter_(self, out: torch.Tensor, inp: torch.Tensor) -> None:
        """FSDP2's reduce-scatter (sum): `out` (1-D, n) = the sum over ranks of their `inp` (1-D, world * n)
        segment `rank`, added in rank order (deterministic: resumes stay bitwise)."""
        n, w = out.numel(), self.world
        src = inp.view(w, n)
        chunk = self.slot_bytes // inp.element_size() // w
        for start in range(0, n, chunk):
            k = min(chunk, n - start)
            slots = self._exchange(w * k, inp.dtype, lambda mine: mine.view(w, k).copy_(src[:, start: start + k]))
            mine = [slots[r].view(w, k)[self.rank] for r in range(w)]
            torch.add(mine[0], mine[1], out=out[start: start + k])
            for t in mine[2:]:
                out[start: start + k].add_(t)

    def _exchange(self, k: int, dtype: torch.dtype, fill: Callable[[torch.Tensor], Any]) -> torch.Tensor:
        """One round: `fill` this rank's slot (k elements of dtype), publish it, wait for every peer's;
        returns all slots, [world, k] (readable until the round after next)."""
        self.round += 1
        slots = self.slots[self.round & 1].view(dtype)[:, :k]
        fill(slots[self.rank])
        self.flags[self.rank * FLAG_STRIDE] = self.round  # after the copy: x86 publishes stores in order
        for r in range(self.world):
            if r != self.rank:
                self._wait(r)
        return slots

    def _wait(self, peer: int) -> None:
        flags, i, s = self.flags, peer * FLAG_STRIDE, self.round
        for _ in range(SPIN):
            if flags[i] >= s:
                return
        t0 = check = time.monotonic()
        while flags[i] < s:
            now = time.monotonic()
            if now - t0 < 0.01:
                os.sched_yield()  # more processes than cores: let the peer run
            else:
                time.sleep(0.0001)  # a long wait (a peer saving a checkpoint): do not burn the core
            if now > check:
                check = now + 0.1
                if not _alive(self.pids[peer]):
                    raise TrainingError(f"rank {peer} (pid {self.pids[peer]}) died during the gradient all-reduce",
                                        restartable=True)
                if now - t0 > self.timeout_s:
                    raise TrainingError(f"rank {peer} did not reach the gradient all-reduce within "
                                        f"{self.timeout_s:.0f} s (--dist-timeout)", restartable=True)


def _create(size: int) -> str:
    """A new file of `size` bytes in SHM_DIR with its space reserved (a full tmpfs would otherwise kill the
    job with SIGBUS at the first write into the mapping), or "" if that fails."""
    try:
        fd, path = tempfile.mkstemp(prefix="disttrain-grads-", dir=SHM_DIR)
    except OSError as e:
        print(f"disttrain: warning: {SHM_DIR}: {e}; gradients go through gloo", file=sys.stderr)
        return ""
    try:
        os.posix_fallocate(fd, 0, size)
        return path
    except OSError as e:
        os.unlink(path)
        print(f"disttrain: warning: cannot reserve {size} bytes in {SHM_DIR} ({e}); gradients go through gloo",
              file=sys.stderr)
        return ""
    finally:
        os.close(fd)


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")  # a zombie waits to be reaped: it is gone
