"""disttrain.hardware: usable CPUs (affinity, cgroup quota), OpenMP settings, contention, `auto` precision."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from disttrain import hardware as hw
from disttrain.config import Config


def _cgroup(tmp_path, proc_line: str, files: dict[str, str]):
    """A fake /proc/self/cgroup and /sys/fs/cgroup tree."""
    proc = tmp_path / "proc_cgroup"
    proc.write_text(proc_line + "\n")
    root = tmp_path / "cg"
    root.mkdir()
    for rel, text in files.items():
        f = root / rel
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(text)
    return proc, root


def test_cgroup_v2_quota(tmp_path):
    proc, root = _cgroup(tmp_path, "0::/job/step", {"job/step/cpu.max": "150000 100000\n", "cpu.max": "max 100000\n"})
    assert hw.cgroup_cpu_limit(proc, root) == 1.5


def test_cgroup_v2_without_quota(tmp_path):
    proc, root = _cgroup(tmp_path, "0::/job", {"job/cpu.max": "max 100000\n", "cpu.max": "max 100000\n"})
    assert hw.cgroup_cpu_limit(proc, root) is None


def test_cgroup_v2_tightest_ancestor_wins(tmp_path):
    proc, root = _cgroup(tmp_path, "0::/a/b", {"a/b/cpu.max": "400000 100000", "a/cpu.max": "100000 100000"})
    assert hw.cgroup_cpu_limit(proc, root) == 1.0


def test_cgroup_v2_container_namespace_reads_the_mount_root(tmp_path):
    """Inside a container /proc/self/cgroup names a path of the host's tree that is not under the mount."""
    proc, root = _cgroup(tmp_path, "0::/kubepods/pod1/abc", {"cpu.max": "300000 100000"})
    assert hw.cgroup_cpu_limit(proc, root) == 3.0


def test_cgroup_v1_quota_and_none(tmp_path):
    proc, root = _cgroup(tmp_path, "4:cpu,cpuacct:/slurm/job1\n3:memory:/x",
                         {"cpu,cpuacct/slurm/job1/cpu.cfs_quota_us": "250000\n",
                          "cpu,cpuacct/slurm/job1/cpu.cfs_period_us": "100000\n"})
    assert hw.cgroup_cpu_limit(proc, root) == 2.5
    (root / "cpu,cpuacct/slurm/job1/cpu.cfs_quota_us").write_text("-1\n")
    assert hw.cgroup_cpu_limit(proc, root) is None


def test_cgroup_unreadable_or_garbage_is_no_limit(tmp_path):
    assert hw.cgroup_cpu_limit(tmp_path / "missing", tmp_path) is None
    proc, root = _cgroup(tmp_path, "0::/../../etc", {"cpu.max": "lots 100000"})
    assert hw.cgroup_cpu_limit(proc, root) is None


@pytest.mark.parametrize("cpus,quota,local,env,want", [
    ({0, 1}, None, "1", {}, 2),                      # 2 cores, one process
    ({0, 1}, None, "2", {}, 1),                      # two local processes share them
    (set(range(64)), 4.0, "1", {}, 4),               # container quota of 4 CPUs on a 64-core host
    (set(range(64)), 1.5, "1", {}, 2),               # a fractional quota rounds up
    (set(range(64)), 0.5, "1", {}, 1),
    ({3}, None, "1", {}, 1),                         # taskset -c 3
    ({0, 1, 2}, None, "2", {}, 1),                   # 3 CPUs / 2 processes
    ({0, 1}, 8.0, "4", {}, 1),                       # never below 1
    ({0, 1}, None, "1", {"DISTTRAIN_THREADS": "3"}, 3),
    ({0, 1}, None, "1", {"DISTTRAIN_THREADS": "0"}, 2),  # 0 = the default
    ({0, 1}, None, "1", {"OMP_NUM_THREADS": "1"}, 2),     # torchrun's export is ignored
])
def test_default_threads(cpus, quota, local, env, want):
    assert hw.default_threads({"LOCAL_WORLD_SIZE": local, **env}, cpus, quota) == want


def test_bad_thread_count_is_a_usage_error(monkeypatch):
    from disttrain.distributed import configure_cpu
    from disttrain.errors import UsageError

    monkeypatch.setenv("DISTTRAIN_THREADS", "two")
    with pytest.raises(UsageError, match="DISTTRAIN_THREADS='two'"):
        configure_cpu()


def test_bad_malloc_switch_is_one_line_and_exit_2_before_anything_is_written(tmp_path):
    env = dict(os.environ, DISTTRAIN_MALLOC="off")
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "disttrain.train", "--dataset", "synthetic_classification", "--model",
                        "mlp", "--max-steps", "1", "--output-dir", str(out), "--no-progress"],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines()[-1] == "disttrain: error: DISTTRAIN_MALLOC='off': expected 0 (leave glibc's allocator alone) or 1"
    assert not out.exists()


def test_configure_openmp_keeps_a_users_choice():
    env: dict[str, str] = {}
    assert hw.configure_openmp(env) and env["OMP_WAIT_POLICY"] == "PASSIVE"
    for var in hw.OMP_WAIT_VARS:
        env = {var: "x"}
        assert not hw.configure_openmp(env) and env == {var: "x"}


def test_openmp_is_passive_before_torch_loads_it():
    """`import disttrain` must set the wait policy before torch (and so libgomp) is imported."""
    env = {k: v for k, v in os.environ.items() if k not in hw.OMP_WAIT_VARS}
    code = "import sys, disttrain, os; assert 'torch' not in sys.modules; print(os.environ['OMP_WAIT_POLICY'])"
    p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and p.stdout.strip() == "PASSIVE", p.stderr


def test_cpu_times_sums_the_allowed_cpus(tmp_path):
    hz = os.sysconf("SC_CLK_TCK")
    stat = tmp_path / "stat"
    stat.write_text(f"cpu  9 9 9 9 9 9 9 9\ncpu0 {hz} 0 {hz} 500 7 0 0 0 0 0\ncpu1 {3 * hz} 0 0 1 1 0 0 0 0 0\n"
                    f"cpu2 {100 * hz} 0 0 0 0 0 0 0\nintr 1 2\n")
    assert hw.cpu_times({0, 1}, stat) == pytest.approx(5.0)  # idle and iowait excluded, cpu2 not ours
    assert hw.cpu_times({7}, stat) is None


def test_contention_verdict():
    # 2 CPUs, 1 process x 2 threads; another program busy on one core for the whole window
    others = hw.others_load(busy_s=20.0, own_s=10.0, local_processes=1, wall_s=10.0)
    assert others == pytest.approx(1.0)
    assert hw.is_heavy(others, threads=2, local_processes=1, cpus=2)
    assert not hw.is_heavy(others, threads=1, local_processes=1, cpus=2)  # 1 thread still has a core
    quiet = hw.others_load(busy_s=19.0, own_s=18.5, local_processes=1, wall_s=10.0)
    assert not hw.is_heavy(quiet, threads=2, local_processes=1, cpus=2)
    # two local ranks: their CPU time is ours, not contention
    assert hw.others_load(busy_s=20.0, own_s=10.0, local_processes=2, wall_s=10.0) == 0.0
    msg = hw.contention_message(1.0, 2, 2)
    assert "\n" not in msg and "DISTTRAIN_THREADS=1" in msg


@pytest.mark.parametrize("device,cuda_bf16,flags,want", [
    ("cpu", False, {"avx2", "avx512f", "amx_bf16", "amx_tile"}, "bf16"),
    ("cpu", False, {"avx512f", "avx512_bf16"}, "bf16"),
    ("cpu", False, {"avx2", "avx512f", "avx512_vnni"}, "no"),   # AVX512 without BF16: emulated, fp32
    ("cpu", False, set(), "no"),
    ("cuda", True, set(), "bf16"),
    ("cuda", False, {"amx_bf16"}, "fp16"),                       # the GPU decides, not the host CPU
    ("mps", False, set(), "no"),
])
def test_auto_precision(device, cuda_bf16, flags, want):
    mp, why = hw.auto_precision(device, cuda_bf16, flags)
    assert mp == want and why.startswith("auto: ")


def test_cpu_flags_from_cpuinfo(tmp_path):
    f = tmp_path / "cpuinfo"
    f.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512_bf16\n\nprocessor\t: 1\nflags\t\t: fpu avx2 avx512_bf16\n")
    assert hw.cpu_flags(f) == {"fpu", "avx2", "avx512_bf16"}


def test_auto_precision_resolves_and_is_reported(monkeypatch, tmp_path, capsys):
    """`--mixed-precision auto` on this CPU: the choice reaches Accelerate, config.yaml and the topology line."""
    import yaml

    from disttrain.distributed import resolve_precision
    from disttrain.train import main

    for flags, want in (({"avx512_bf16"}, "bf16"), ({"avx2"}, "no")):
        monkeypatch.setattr(hw, "cpu_flags", lambda flags=flags: flags)
        if not __import__("torch").cuda.is_available():
            assert resolve_precision(Config(mixed_precision="auto"))[0] == want
    out = tmp_path / "r"
    assert main(["--dataset", "synthetic_classification", "--model", "mlp", "--max-steps", "2", "--epochs", "1",
                 "--mixed-precision", "auto", "--output-dir", str(out), "--no-progress"]) == 0
    line = next(s for s in capsys.readouterr().out.splitlines() if s.startswith("topology:"))
    saved = yaml.safe_load((out / "config.yaml").read_text())["mixed_precision"]
    assert saved == want and f"mixed precision {want} (auto: " in line


def test_contention_watch_says_it_once(monkeypatch, capfd):
    """A fake /proc/stat where another program keeps one of 2 CPUs busy: one line, once, then the watch ends."""
    clock = {"busy": 0.0}

    def busy(cpus, stat=None):  # every window: our own CPU time plus one CPU-second per wall second
        clock["busy"] += 1.0
        return clock["busy"] + hw.own_cpu_s()

    monkeypatch.setattr(hw, "cpu_times", busy)
    monkeypatch.setattr(hw, "monotonic", lambda: clock["busy"])  # 1 s of wall time per window
    monkeypatch.setattr(hw, "affinity", lambda: {0, 1})
    monkeypatch.setattr(hw, "cgroup_cpu_limit", lambda: None)
    monkeypatch.delenv("DISTTRAIN_CONTENTION_NOTE", raising=False)
    with hw.ContentionWatch(threads=2, local_processes=1, interval_s=0.001, checks=50) as w:
        w._thread.join(timeout=30)
    assert w.said is not None
    err = capfd.readouterr().err.strip().splitlines()
    assert err == [w.said] and "DISTTRAIN_THREADS=1" in err[0]
    # one thread in all, or switched off: no watcher
    assert not hw.ContentionWatch(threads=1, local_processes=1).enabled
    monkeypatch.setenv("DISTTRAIN_CONTENTION_NOTE", "0")
    assert not hw.ContentionWatch(threads=2, local_processes=1).enabled


class _FakeLibc:
    def __init__(self):
        self.calls: list[tuple[int, int]] = []

    def mallopt(self, param: int, value: int) -> int:
        self.calls.append((param, value))
        return 1


@pytest.mark.parametrize("env, tuned", [
    ({}, True),
    ({"DISTTRAIN_MALLOC": "0"}, False),
    ({"MALLOC_TRIM_THRESHOLD_": "1000000"}, False),
    ({"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=1000000"}, False),
    ({"GLIBC_TUNABLES": "glibc.cpu.hwcaps=-AVX2"}, True),
    ({"LD_PRELOAD": "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"}, False),
])
def test_tune_malloc_sets_glibcs_ceiling_unless_the_user_chose(env, tuned):
    libc = _FakeLibc()
    assert hw.tune_malloc(env, libc) is tuned
    want = [(hw.M_MMAP_THRESHOLD, 32 << 20), (hw.M_TRIM_THRESHOLD, 64 << 20)] if tuned else []
    assert libc.calls == want


FAULTS = """
import os, resource, sys, torch
from disttrain import hardware
if sys.argv[1] == "tuned":
    assert hardware.tune_malloc({})
def step():  # a forward keeps its activations; the backward frees them last-in first-out, allocating gradients
    acts = [torch.ones(n) for n in (100_000, 400_000, 300_000, 100_000, 400_000, 300_000)]
    grads = []
    while acts:
        a = acts.pop()
        grads.append(torch.ones(a.numel() // 2 + 50_000))
        del a
    del grads
for _ in range(5):
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(30):
    step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(hw._glibc() is None, reason="glibc's allocator only")
def test_tuned_malloc_stops_page_faults_at_every_step():
    """A step's pattern of allocations (real processes, page faults counted by the kernel): glibc's default
    returns freed memory to the kernel and faults it in again every step; tuned, the pages are reused."""
    env = {k: v for k, v in os.environ.items() if k not in hw.MALLOC_ENV and k != "GLIBC_TUNABLES"}
    faults = {mode: int(subprocess.run([sys.executable, "-c", FAULTS, mode], env=env, check=True, text=True,
                                       capture_output=True).stdout) for mode in ("plain", "tuned")}
    pages = 30 * 4 * (1_600_000 + 1_100_000) // 4096  # touched in the 30 counted steps (~80k)
    assert faults["plain"] > pages // 10, faults  # the default allocator re-faults a share of every step
    assert faults["tuned"] < pages // 100, faults


def test_training_tunes_the_allocator(monkeypatch, tmp_path):
    from disttrain.train import main

    seen = []
    monkeypatch.setattr(hw, "tune_malloc", lambda env, libc=None: seen.append(dict(env)) or True)
    assert main(["--dataset", "synthetic_classification", "--model", "mlp", "--max-steps", "1", "--epochs", "1",
                 "--output-dir", str(tmp_path / "r"), "--no-progress"]) == 0
    assert len(seen) == 1
