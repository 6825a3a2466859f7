"""What this machine lets a process use: its CPUs, how OpenMP waits, contention, and the fast precision.

- Threads: the CPUs a process may really use are its affinity mask capped by the cgroup CPU quota
  (containers, Slurm and Kubernetes limits), divided among the local processes.
- OpenMP: PyTorch's CPU kernels run in OpenMP parallel regions. GNU OpenMP (the pip wheels') lets a thread
  that finished its share spin for ~300k iterations before it sleeps; when another program holds a core,
  spinning threads and the program take turns in whole scheduler slices and every region waits for a
  descheduled thread (measured: a 300-step MLP run took 18.4 s with 2 threads against 1.2 s with 1).
  `OMP_WAIT_POLICY=PASSIVE` makes waiting threads sleep at once, so they wake ahead of the competitor
  (CFS favours a task that slept). It is read when libgomp is loaded, i.e. at `import torch`, so
  `disttrain/__init__` sets it; `torch.backends.xeon.run_cpu` does the same for Intel OpenMP with
  KMP_BLOCKTIME=1. A user's own OMP_WAIT_POLICY / GOMP_SPINCOUNT / KMP_BLOCKTIME wins.
- Contention: a background thread compares the CPU time of the whole allowed CPU set with this process's
  own (/proc/stat); when other programs hold enough of it that the threads cannot each have a core, it
  says so once.
- Memory allocator: glibc returns the top of its heap to the kernel whenever more than M_TRIM_THRESHOLD is
  free there (128 KiB by default, raised only by freeing a large mmap'ed block), so a training step's
  transient tensors are page-faulted in again at every step. `tune_malloc` sets the thresholds glibc's own
  dynamic rule tops out at: each malloc arena keeps up to 64 MiB of freed memory for the next step.
- Mixed precision `auto`: bf16 where the device computes it natively, else fp16 + a grad scaler on GPUs,
  else fp32.
"""

from __future__ import annotations

import math
import os
import sys
import threading
from time import monotonic, process_time
from collections.abc import Mapping, MutableMapping
from pathlib import Path
from typing import Any

CGROUP_ROOT = Path("/sys/fs/cgroup")
_MAX_READ = 64 * 1024  # every file read here is a small kernel file; read at most this much
# the OpenMP settings a user may have chosen; if any is set, we set nothing
OMP_WAIT_VARS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")


def _read(path: Path, limit: int = _MAX_READ) -> str | None:
    """A small text file's content (at most `limit` bytes), or None if it cannot be read."""
    try:
        with open(path, "rb") as f:
            return f.read(limit).decode("utf-8", "replace")
    except OSError:
        return None


# =========================================================================== CPUs and threads


def cgroup_cpu_limit(proc_cgroup: Path = Path("/proc/self/cgroup"), root: Path = CGROUP_ROOT) -> float | None:
    """The CPU quota of this process's cgroup in CPUs (quota / period; may be fractional), or None if unlimited.

    cgroup v2: `cpu.max` ("max 100000" or "<quota> <period>", microseconds); cgroup v1: `cpu.cfs_quota_us`
    (-1 = none) / `cpu.cfs_period_us`. The tightest limit of the cgroup and its ancestors counts (the
    kernel enforces all of them). Inside a container the cgroup path may not exist under the mount (its
    namespace root is the mount itself), so the mount's root is read too.
    """
    text = _read(proc_cgroup) or ""
    limits: list[float] = []
    for line in text.splitlines()[:64]:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, rel = parts
        if controllers == "":  # v2 unified hierarchy: "0::/path"
            for d in _ancestors(root, rel):
                q = _v2_quota(d / "cpu.max")
                if q is not None:
                    limits.append(q)
        elif "cpu" in controllers.split(","):  # v1: "4:cpu,cpuacct:/path"
            for mount in (root / controllers, root / "cpu,cpuacct", root / "cpu"):
                if mount.is_dir():
                    for d in _ancestors(mount, rel):
                        q = _v1_quota(d)
                        if q is not None:
                            limits.append(q)
                    break
    return min(limits) if limits else None


def _ancestors(mount: Path, rel: str) -> list[Path]:
    """mount/rel and its parents up to the mount (only those that exist; no '..' or links out)."""
    parts = [p for p in rel.strip().split("/") if p and p not in (".", "..")][:32]
    dirs = [mount / Path(*parts[:i]) if i else mount for i in range(len(parts), -1, -1)]
    return [d for d in dirs if d.is_dir()]


def _v2_quota(path: Path) -> float | None:
    fields = (_read(path, 256) or "").split()
    if len(fields) != 2 or fields[0] == "max":
        return None
    try:
        quota, period = int(fields[0]), int(fields[1])
    except ValueError:
        return None
    return quota / period if quota > 0 and period > 0 else None


def _v1_quota(d: Path) -> float | None:
    try:
        quota = int((_read(d / "cpu.cfs_quota_us", 64) or "").strip())
        period = int((_read(d / "cpu.cfs_period_us", 64) or "").strip())
    except ValueError:
        return None
    return quota / period if quota > 0 and period > 0 else None


def affinity() -> set[int]:
    """The CPUs the scheduler may run this process on."""
    if hasattr(os, "sched_getaffinity"):
        return set(os.sched_getaffinity(0))
    return set(range(os.cpu_count() or 1))


def usable_cpus(cpus: set[int] | None = None, quota: float | None = None) -> int:
    """CPUs this process may really use: the affinity mask, capped by the cgroup quota rounded up (>= 1).

    Rounded up: a quota of 1.5 CPUs runs 2 threads at 75% rather than 1 thread leaving half a CPU unused.
    """
    n = len(cpus) if cpus is not None else len(affinity())
    if quota is not None:
        n = min(n, math.ceil(quota - 1e-9))
    return max(1, n)


def default_threads(env: Mapping[str, str], cpus: set[int] | None = None, quota: float | None = None) -> int:
    """Intra-op threads per process: DISTTRAIN_THREADS if set (not 0), else usable CPUs // local processes (>= 1).

    Local processes: LOCAL_WORLD_SIZE (torchrun/accelerate export it). torchrun's OMP_NUM_THREADS=1, which
    it exports for every multi-process job, is ignored: on CPU it would leave cores idle.
    Raises ValueError naming DISTTRAIN_THREADS if it is not a positive integer.
    """
    given = env.get("DISTTRAIN_THREADS", "").strip()
    if given and given != "0":  # 0: the default
        if not given.isdigit() or int(given) < 1:
            raise ValueError(f"DISTTRAIN_THREADS={given!r}: expected a positive integer")
        return int(given)
    local = env.get("LOCAL_WORLD_SIZE", "1").strip()
    local_n = int(local) if local.isdigit() and int(local) > 0 else 1
    return max(1, usable_cpus(cpus, quota) // local_n)


def configure_openmp(env: MutableMapping[str, str]) -> bool:
    """Make OpenMP's idle threads sleep instead of spinning, unless the user chose a wait policy.

    Must run before `import torch` loads the OpenMP runtime (it reads these once); also inherited by
    launched workers. Returns True if it set anything.
    """
    if any(v in env for v in OMP_WAIT_VARS):
        return False
    env["OMP_WAIT_POLICY"] = "PASSIVE"  # GNU libgomp and Intel/LLVM OpenMP both read it
    env["KMP_BLOCKTIME"] = "0"  # Intel/LLVM OpenMP (ms to spin before sleeping; run_cpu uses 1)
    return True


# =========================================================================== contention


def cpu_times(cpus: set[int], stat: Path = Path("/proc/stat")) -> float | None:
    """Busy seconds (not idle/iowait) summed over `cpus` since boot, from /proc/stat; None if unreadable."""
    text = _read(stat, 1 << 20)
    if text is None:
        return None
    hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    busy = 0
    seen = 0
    for line in text.splitlines():
        if not line.startswith("cpu") or line.startswith("cpu "):
            continue
        name, *vals = line.split()
        try:
            cpu = int(name[3:])
            ticks = [int(v) for v in vals[:8]]
        except ValueError:
            continue
        if cpu in cpus and len(ticks) >= 5:
            busy += sum(ticks) - ticks[3] - ticks[4]  # user nice system idle iowait irq softirq steal
            seen += 1
    return busy / hz if seen else None


def own_cpu_s() -> float:
    """CPU seconds used by this process (all threads) and its live children (DataLoader workers)."""
    total = process_time()
    hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    task = Path("/proc/self/task")
    try:
        tids = [t.name for t in task.iterdir()][:4096]
    except OSError:
        return total
    kids = {pid for t in tids for pid in (_read(task / t / "children", 4096) or "").split()}
    for pid in list(kids)[:256]:
        stat = _read(Path("/proc") / pid / "stat", 4096) or ""
        fields = stat.rpartition(")")[2].split()  # after the command name, which may hold spaces
        if len(fields) > 12 and fields[11].isdigit() and fields[12].isdigit():
            total += (int(fields[11]) + int(fields[12])) / hz  # utime, stime
    return total


def others_load(busy_s: float, own_s: float, local_processes: int, wall_s: float) -> float:
    """CPUs' worth of work that other programs ran on our CPUs over a window (>= 0).

    busy_s: busy CPU seconds of the allowed CPUs; own_s: this process's CPU seconds (all threads); the
    other local ranks are assumed to use as much as this one (they run the same loop).
    """
    return max(0.0, busy_s - own_s * local_processes) / max(wall_s, 1e-9)


def is_heavy(others: float, threads: int, local_processes: int, cpus: int) -> bool:
    """More runnable threads than free CPUs: ours do not each get a core (0.5 CPU of slack for noise)."""
    return threads * local_processes + others > cpus + 0.5


def contention_message(others: float, cpus: int, threads: int) -> str:
    return (f"disttrain: note: other programs are using about {others:.1f} of the {cpus} CPU(s) this run may use, "
            f"so its {threads} thread(s)/process share cores with them; if steps are slow, set "
            f"DISTTRAIN_THREADS={max(1, threads - math.ceil(others - 0.25))} (and keep it for resumes) or "
            "run when the machine is free")


class ContentionWatch:
    """A daemon thread that, every `interval_s` while the run trains, measures other programs' load on our
    CPUs and says it once (one line on stderr) if heavy. Stops after the note, after `checks` windows
    (the first minutes: when users look), or when the context exits. Does nothing where /proc/stat is
    missing, when the process has one CPU thread in all, or with DISTTRAIN_CONTENTION_NOTE=0.
    """

    def __init__(self, threads: int, local_processes: int, interval_s: float = 10.0, checks: int = 12,
                 enabled: bool = True):
        self.threads, self.local, self.interval_s, self.checks = threads, local_processes, interval_s, checks
        self.cpus = affinity()
        self.n_cpus = usable_cpus(self.cpus, cgroup_cpu_limit())
        self.enabled = enabled and os.environ.get("DISTTRAIN_CONTENTION_NOTE", "1") != "0" and \
            threads * local_processes > 1 and cpu_times(self.cpus) is not None
        self.said: str | None = None
        self._done = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> ContentionWatch:
        if self.enabled:
            self._thread = threading.Thread(target=self._watch, name="disttrain-contention", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _watch(self) -> None:
        busy0, own0, t0 = cpu_times(self.cpus), own_cpu_s(), monotonic()
        for _ in range(self.checks):
            if self._done.wait(self.interval_s):
                return
            busy1, own1, t1 = cpu_times(self.cpus), own_cpu_s(), monotonic()
            if busy0 is None or busy1 is None:
                return
            others = others_load(busy1 - busy0, own1 - own0, self.local, t1 - t0)
            if is_heavy(others, self.threads, self.local, self.n_cpus):
                self.said = contention_message(others, self.n_cpus, self.threads)
                sys.stderr.write(self.said + "\n")
                sys.stderr.flush()
                return
            busy0, own0, t0 = busy1, own1, t1


# =========================================================================== memory allocator

# glibc's ceiling for its dynamic mmap threshold on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX in malloc/malloc.c) and
# the trim threshold glibc pairs with it (twice the mmap threshold, as malloc.c's free() sets it)
MMAP_THRESHOLD = 32 << 20
TRIM_THRESHOLD = 64 << 20
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt() parameter numbers (malloc.h)
MALLOC_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")  # a user's choice wins
OTHER_ALLOCATORS = ("jemalloc", "tcmalloc", "mimalloc")  # preloaded: mallopt would tune an unused allocator


def tune_malloc(env: Mapping[str, str], libc: Any = None) -> bool:
    """Keep freed memory for the next training step instead of returning it to the kernel (glibc only).

    Sets mallopt(M_MMAP_THRESHOLD, 32 MiB) and mallopt(M_TRIM_THRESHOLD, 64 MiB): the values glibc's own rule
    reaches after the process frees one 32 MiB block (a loop that happens to free a large temporary at start-up
    runs in this state by accident). Measured here (docs/performance.md, "The allocator"): the char GPT recipe's
    step took 5% longer and 2.2x the minor page faults without it. Peak memory is unchanged; up to 64 MiB of
    freed heap per malloc arena may stay mapped. Nothing is done (False) with DISTTRAIN_MALLOC=0, when the user set
    MALLOC_*_ or glibc.malloc tunables, when LD_PRELOAD brings another allocator, or off glibc.
    `libc`: an object with mallopt(param, value) -> int (tests); default the process's C library.
    Raises ValueError naming DISTTRAIN_MALLOC if it is not 0 or 1.
    """
    if not malloc_wanted(env):
        return False
    libc = _glibc() if libc is None else libc
    if libc is None:
        return False
    return bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))


def malloc_wanted(env: Mapping[str, str]) -> bool:
    """Whether tune_malloc may change the allocator (see there). Raises ValueError naming DISTTRAIN_MALLOC if it
    is not 0 or 1 (empty or unset: 1)."""
    switch = env.get("DISTTRAIN_MALLOC", "1").strip()
    if switch not in ("0", "1", ""):
        raise ValueError(f"DISTTRAIN_MALLOC={env['DISTTRAIN_MALLOC']!r}: expected 0 (leave glibc's allocator alone) "
                         "or 1")
    preload = env.get("LD_PRELOAD", "")
    return not (switch == "0" or any(k in env for k in MALLOC_ENV) or "glibc.malloc." in env.get("GLIBC_TUNABLES", "")
                or any(name in preload for name in OTHER_ALLOCATORS))


def check_env(env: Mapping[str, str]) -> None:
    """Validate the DISTTRAIN_* settings read here (DISTTRAIN_THREADS, DISTTRAIN_MALLOC) without applying them,
    e.g. in a launcher before any worker starts. Raises ValueError naming the bad one."""
    default_threads(env, cpus={0})
    malloc_wanted(env)


def _glibc() -> Any:
    """The process's C library if it is glibc (it has gnu_get_libc_version), else None."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018 - glibc only (musl's mallopt does nothing)
    except (OSError, AttributeError):
        return None
    return libc


# =========================================================================== mixed precision


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str]:
    """The CPU's feature flags (Linux /proc/cpuinfo), else what PyTorch's CPU probes report."""
    text = _read(cpuinfo, 1 << 20)
    if text:
        for line in text.splitlines():
            if line.startswith("flags"):
                return set(line.partition(":")[2].split())
    import torch

    probes = {"amx_bf16": "_is_amx_tile_supported", "avx512_bf16": "_is_avx512_bf16_supported"}
    return {flag for flag, fn in probes.items() if getattr(torch.cpu, fn, lambda: False)()}


def auto_precision(device_type: str, cuda_bf16: bool = False, flags: set[str] | None = None) -> tuple[str, str]:
    """(mixed precision, why) for `--mixed-precision auto`.

    GPU with native bf16 (NVIDIA compute capability >= 8.0, `torch.cuda.is_bf16_supported(including_emulation
    =False)`): bf16, no scaler needed (fp32's exponent range). Older GPUs: fp16 with Accelerate's grad
    scaler. CPU: bf16 on AMX (`amx_bf16`) or AVX512-BF16 (`avx512_bf16`), where oneDNN runs bf16 convs and
    matmuls natively; without them bf16 is emulated through fp32 and fp32 is chosen.
    """
    if device_type == "cuda":
        if cuda_bf16:
            return "bf16", "auto: the GPU computes bf16 natively"
        return "fp16", "auto: the GPU has no native bf16, fp16 with a grad scaler"
    if device_type == "cpu":
        found = sorted((flags or set()) & {"amx_bf16", "avx512_bf16"})
        if found:
            return "bf16", f"auto: the CPU has {'/'.join(f.upper() for f in found)}"
        return "no", "auto: the CPU has neither AMX nor AVX512-BF16"
    return "no", f"auto: no fast half precision known for device {device_type}"
