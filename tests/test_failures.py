"""Issue 7: failure behaviour. Non-finite losses, a rank that dies, signals, a killed launcher, a full
disk, and untrusted files. Multi-process cases are real `accelerate launch` jobs (marked slow)."""

from __future__ import annotations

import json
import os
import pickle
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, env, install_plugin, train_cmd, write_idx

from disttrain import checkpoint as ckpt
from disttrain import evaluate, train

PLUGIN = "dt_faulty_plugins"
PLUGIN_SRC = '''
import os, time, torch
from torch import nn


class Faulty(nn.Module):
    """A linear classifier for 28x28 images that misbehaves on purpose at chosen training steps
    (its training forwards are counted; check_batch and evaluation run without grad and do not count)."""

    def __init__(self, nan_steps=(), nan_from=0, rank=-1, raise_at=0, exit_at=0, sleep=0.0, trace=""):
        super().__init__()
        self.lin = nn.Linear(784, 10)
        self.calls = 0
        self.nan_steps, self.nan_from, self.rank = set(nan_steps), nan_from, rank
        self.raise_at, self.exit_at, self.sleep, self.trace = raise_at, exit_at, sleep, trace

    def forward(self, x):
        me = int(os.environ.get("RANK", "0"))
        mine = self.rank in (-1, me)
        bad = False
        if torch.is_grad_enabled() and self.training:
            self.calls += 1
            if self.trace:
                with open(self.trace, "a") as f:
                    f.write(f"{me} {self.calls}\\n")
            if self.sleep:
                time.sleep(self.sleep)
            if mine and self.calls == self.raise_at:
                raise RuntimeError(f"boom at step {self.calls} on rank {me}")
            if mine and self.calls == self.exit_at:
                os._exit(3)
            bad = mine and (self.calls in self.nan_steps or (self.nan_from and self.calls >= self.nan_from))
        out = self.lin(x.flatten(1))
        return out * float("nan") if bad else out


def faulty(**kw):
    return Faulty(**kw)
'''


@pytest.fixture
def plugin_dir(tmp_path, monkeypatch):
    yield from install_plugin(tmp_path, monkeypatch, PLUGIN, PLUGIN_SRC)


def base(data: Path, out: Path, **model_kwargs) -> list[str]:
    return ["--dataset", "fashion_mnist", "--data-dir", str(data), "--model", f"{PLUGIN}:faulty",
            "--model-kwargs", json.dumps(model_kwargs), "--batch-size", "16", "--epochs", "1",
            "--no-progress", "--log-every", "100", "--output-dir", str(out)]


def step_dirs(out: Path) -> list[str]:
    return sorted(p.name for p in (out / "checkpoints").glob("step_*")) if (out / "checkpoints").is_dir() else []


def assert_finite_checkpoints(out: Path) -> None:
    from safetensors.torch import load_file

    for d in (out / "checkpoints").glob("step_*"):
        assert ckpt.verify(d) is None
        for name in ("model.safetensors", "optimizer.safetensors"):
            for k, t in load_file(str(d / name)).items():
                assert torch.isfinite(t).all(), f"{d.name}/{name}:{k} is not finite"


def status(out: Path) -> dict:
    return json.loads((out / "status.json").read_text())


# =========================================================================== non-finite loss


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, fmnist_dir, plugin_dir, capsys):
    out = tmp_path / "run"
    code = train.main(base(fmnist_dir, out, nan_steps=[10]) + ["--save-every-steps", "4"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1
    assert len(err) == 1 and err[0].startswith("disttrain: error: non-finite loss at step 10"), err
    assert step_dirs(out) == ["step_00000004", "step_00000008"]  # nothing saved after step 10
    assert_finite_checkpoints(out)
    assert not (out / "model.safetensors").exists()
    st = status(out)
    assert st["state"] == "failed" and st["exit_code"] == 1 and "step 10" in st["reason"]
    assert not list((out / "checkpoints").glob(".tmp-*"))


def test_nonfinite_skip_counts_and_continues(tmp_path, fmnist_dir, plugin_dir, capsys):
    out = tmp_path / "run"
    code = train.main(base(fmnist_dir, out, nan_steps=[3, 5]) + ["--on-nonfinite", "skip",
                                                                  "--max-nonfinite-skips", "3"])
    cap = capsys.readouterr()
    err = cap.out + cap.err
    assert code == 0, err
    warnings = [ln for ln in err.splitlines() if "non-finite loss" in ln]
    assert warnings == ["disttrain: warning: non-finite loss at step 3, update skipped (1/3)",
                        "disttrain: warning: non-finite loss at step 5, update skipped (2/3)"]
    assert_finite_checkpoints(out)
    from safetensors.torch import load_file

    assert all(torch.isfinite(t).all() for t in load_file(str(out / "model.safetensors")).values())
    state = json.loads((out / "checkpoints" / step_dirs(out)[-1] / "state.json").read_text())
    assert state["position"]["nonfinite_skips"] == 2
    assert state["position"]["step"] == 16  # skipped steps still use up their slot (schedule, data order)
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    epoch = [x for x in lines if x["kind"] == "epoch"][0]
    assert torch.isfinite(torch.tensor(epoch["train_loss"]))
    assert status(out)["state"] == "completed"


def test_nonfinite_skip_gives_up_after_n(tmp_path, fmnist_dir, plugin_dir, capsys):
    out = tmp_path / "run"
    code = train.main(base(fmnist_dir, out, nan_from=3) + ["--on-nonfinite", "skip", "--max-nonfinite-skips", "3",
                                                            "--save-every-steps", "2"])
    err = capsys.readouterr().err.splitlines()
    assert code == 1
    assert err[-1] == ("disttrain: error: non-finite loss: 3 steps skipped, giving up at step 5; "
                       "the last good checkpoint is kept")
    assert step_dirs(out) == ["step_00000002", "step_00000004"]  # step 4 was skipped: weights unchanged, fine
    assert_finite_checkpoints(out)
    assert status(out)["state"] == "failed"


def _launch(args: list[str], nproc: int = 2, **kw) -> subprocess.Popen:
    return subprocess.Popen(train_cmd(nproc, "accelerate") + args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True, **kw)


def _leftovers(marker: str) -> list[int]:
    """Live processes whose command line mentions `marker` (a unique output dir): a /proc scan."""
    pids = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit() or int(p.name) == os.getpid():
            continue
        try:
            cmd = (p / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = next((ln for ln in (p / "status").read_text().splitlines() if ln.startswith("State:")), "")
        except OSError:
            continue
        if marker in cmd and "Z" not in state.split()[1:2]:
            pids.append(int(p.name))
    return pids


def _wait_gone(marker: str, timeout: float = 10) -> list[int]:
    deadline = time.time() + timeout
    while time.time() < deadline and _leftovers(marker):
        time.sleep(0.2)
    return _leftovers(marker)


def _cleanup(proc: subprocess.Popen) -> None:
    """Kill what this test started (its own process group) if anything is left."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


@pytest.mark.slow
def test_nonfinite_on_one_rank_stops_both(tmp_path, fmnist_dir, plugin_dir):
    out = tmp_path / "run_nan2"
    p = _launch(base(fmnist_dir, out, nan_steps=[6], rank=1) + ["--save-every-steps", "2"],
                env=env(PYTHONPATH=str(plugin_dir)))
    try:
        log, _ = p.communicate(timeout=120)
    finally:
        _cleanup(p)
    assert p.returncode != 0
    for rank in (0, 1):
        assert f"disttrain: error [rank {rank}]: non-finite loss at step 6" in log, log
    assert step_dirs(out) == ["step_00000002", "step_00000004"]
    assert_finite_checkpoints(out)
    assert status(out)["state"] == "failed"
    assert _wait_gone(str(out)) == []


# =========================================================================== a rank that dies


@pytest.mark.slow
@pytest.mark.parametrize("how", ["exception", "os_exit"])
def test_dead_rank_ends_the_job(tmp_path, fmnist_dir, plugin_dir, how):
    out, trace = tmp_path / f"run_dead_{how}", tmp_path / "trace"
    kw = {"raise_at": 5} if how == "exception" else {"exit_at": 5}
    p = _launch(base(fmnist_dir, out, rank=1, trace=str(trace), **kw) + ["--dist-timeout", "60"],
                env=env(PYTHONPATH=str(plugin_dir)))
    try:
        _wait_trace(trace, 5, p, timeout=120)  # start-up on a busy machine is not what is measured
        t0 = time.time()
        log, _ = p.communicate(timeout=90)
    finally:
        _cleanup(p)
    took = time.time() - t0
    assert p.returncode != 0
    assert took < 60, f"job took {took:.0f}s to notice a dead rank"
    if how == "exception":
        assert "boom at step 5 on rank 1" in log, log
    assert re.search(r"rank\s*:?\s*1|local_rank: 1|\[rank 1\]", log), log
    assert _wait_gone(str(out)) == [], "processes left behind"


# =========================================================================== signals


SIG_ARGS = dict(sleep=0.05)


def _py_run(args: list[str], plugin_dir: Path, **kw) -> subprocess.Popen:
    return subprocess.Popen(train_cmd() + args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env(PYTHONPATH=str(plugin_dir)), start_new_session=True, **kw)


def _wait_trace(trace: Path, step: int, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if trace.exists() and any(int(ln.split()[1]) >= step for ln in trace.read_text().splitlines() if ln):
            return
        if proc.poll() is not None:
            raise AssertionError(f"process ended early: {proc.communicate()}")
        time.sleep(0.02)
    raise AssertionError("training never reached the step")


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    """An uninterrupted run of the signal tests' configuration (its own process)."""
    root = tmp_path_factory.mktemp("reference")
    data = root / "data"
    write_idx(data / "FashionMNIST" / "raw")
    (root / "plugins").mkdir()
    (root / "plugins" / f"{PLUGIN}.py").write_text(PLUGIN_SRC)
    out = root / "run"
    r = subprocess.run(train_cmd() + base(data, out, **SIG_ARGS) + ["--epochs", "2"], capture_output=True,
                       text=True, env=env(PYTHONPATH=str(root / "plugins")), timeout=120)
    assert r.returncode == 0, r.stderr
    return data, root / "plugins", out


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_checkpoints_and_resume_is_bitwise_equal(tmp_path, reference_run, sig):
    data, plugins, ref = reference_run
    out = tmp_path / "run"
    args = base(data, out, **SIG_ARGS) + ["--epochs", "2"]
    p = _py_run(args, plugins)
    try:
        # (a trace file would change model_kwargs and so the config a resume checks: watch metrics instead)
        deadline = time.time() + 60
        while time.time() < deadline and not (out / "metrics.jsonl").exists():
            time.sleep(0.02)
        time.sleep(0.3)  # a few steps in
        p.send_signal(sig)
        _, err = p.communicate(timeout=60)
    finally:
        _cleanup(p)
    assert p.returncode == 75, err
    msg = [ln for ln in err.splitlines() if ln.startswith("disttrain:")]
    assert msg and f"stopped by {sig.name}" in msg[-1] and "--resume auto" in msg[-1], err
    st = status(out)
    assert st["state"] == "interrupted" and st["exit_code"] == 75
    stopped_at = st["step"]
    assert 0 < stopped_at < 32, "signal arrived too late to interrupt"
    assert step_dirs(out)[-1] == f"step_{stopped_at:08d}"
    assert not (out / "model.safetensors").exists()

    r = subprocess.run(train_cmd() + args + ["--resume", "auto"], capture_output=True, text=True,
                       env=env(PYTHONPATH=str(plugins)), timeout=120)
    assert r.returncode == 0, r.stderr
    assert "resumed from" in r.stdout + r.stderr
    from safetensors.torch import load_file

    a, b = load_file(str(ref / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after interrupt + resume"
    assert status(out)["state"] == "completed"


def test_second_sigint_exits_at_once(tmp_path, fmnist_dir, plugin_dir):
    out, trace = tmp_path / "run", tmp_path / "trace"
    p = _py_run(base(fmnist_dir, out, sleep=1.0, trace=str(trace)), plugin_dir)
    try:
        _wait_trace(trace, 2, p)
        before = step_dirs(out)
        p.send_signal(signal.SIGINT)
        time.sleep(0.3)
        p.send_signal(signal.SIGINT)
        t0 = time.time()
        _, err = p.communicate(timeout=30)
        took = time.time() - t0
    finally:
        _cleanup(p)
    assert p.returncode == 130, err
    assert took < 1.0
    assert "second Ctrl-C" in err
    assert step_dirs(out) == before == []
    assert not list((out / "checkpoints").glob("*")) if (out / "checkpoints").exists() else True
    assert not (out / "status.json").exists() or status(out)["state"] != "interrupted"


@pytest.mark.slow
def test_sigterm_to_accelerate_launch_reaches_workers(tmp_path, fmnist_dir, plugin_dir):
    out, trace = tmp_path / "run_term2", tmp_path / "trace"
    p = _launch(base(fmnist_dir, out, sleep=0.2, trace=str(trace)), env=env(PYTHONPATH=str(plugin_dir)))
    try:
        _wait_trace(trace, 3, p)
        p.send_signal(signal.SIGTERM)
        t0 = time.time()
        log, _ = p.communicate(timeout=60)
        took = time.time() - t0
    finally:
        _cleanup(p)
    assert took < 25, f"workers took {took:.0f}s (the agent SIGKILLs after ~30 s)"
    assert "stopped by SIGTERM" in log, log
    st = status(out)
    assert st["state"] == "interrupted", log
    assert step_dirs(out)[-1] == f"step_{st['step']:08d}"
    assert ckpt.verify(out / "checkpoints" / step_dirs(out)[-1]) is None
    assert _wait_gone(str(out)) == []


@pytest.mark.slow
def test_kill_9_of_launcher_stops_workers(tmp_path, fmnist_dir, plugin_dir):
    out, trace = tmp_path / "run_kill9", tmp_path / "trace"
    p = _launch(base(fmnist_dir, out, sleep=0.2, trace=str(trace)) + ["--log-every", "1", "--epochs", "5",
                                                                       "--save-every-steps", "2"],
                env=env(PYTHONPATH=str(plugin_dir)))
    try:
        _wait_trace(trace, 3, p)
        assert _leftovers(str(out))
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
        gone = _wait_gone(str(out), timeout=5)
        assert gone == [], f"workers {gone} still running 5 s after the launcher died"
        snap = {str(f.relative_to(tmp_path)): (f.stat().st_size, f.stat().st_mtime_ns)
                for f in tmp_path.rglob("*") if f.is_file()}
        time.sleep(3)
        again = {str(f.relative_to(tmp_path)): (f.stat().st_size, f.stat().st_mtime_ns)
                 for f in tmp_path.rglob("*") if f.is_file()}
        assert again == snap, "files changed after the launcher died"
    finally:
        _cleanup(p)
        for pid in _leftovers(str(out)):  # only processes of this test (their command line names its dir)
            os.kill(pid, signal.SIGKILL)


# =========================================================================== disk full


@pytest.fixture
def tiny_tmpfs(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"mount -t tmpfs failed (no CAP_SYS_ADMIN?): {r.stderr.strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_disk_full_during_save(tmp_path, fmnist_dir, plugin_dir, tiny_tmpfs, capsys):
    """Rule: the error is reported (path and errno), the temporary directory is removed, the previous
    checkpoint stays intact, and the run stops with exit 1 (resume with --resume auto once there is room)."""
    out = tiny_tmpfs / "run"
    code = train.main(base(fmnist_dir, out) + ["--save-every-steps", "2", "--keep-last", "5"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1
    assert len(err) == 1, err
    assert re.match(r"disttrain: error: cannot write checkpoint .*step_\d{8}: \[Errno 28\] ENOSPC", err[0]), err
    assert str(out) in err[0] and "previous checkpoint is kept" in err[0]
    done = step_dirs(out)
    assert done, "the tmpfs should hold at least one checkpoint"
    for d in done:
        assert ckpt.verify(out / "checkpoints" / d) is None  # never a half checkpoint with a final name
    assert not list((out / "checkpoints").glob(".tmp-*")), "temporary directory left on the full disk"
    assert not list((out / "checkpoints").glob(".old-*"))
    assert status(out)["state"] == "failed"
    # the run resumes from the last good checkpoint once there is room
    st = json.loads((out / "checkpoints" / done[-1] / "state.json").read_text())
    assert st["position"]["step"] == int(done[-1][5:])


def test_unwritable_checkpoint_dir(tmp_path, fmnist_dir, plugin_dir, capsys):
    """The checkpoints directory replaced by a file mid-run (read-only-like): same rule, exit 1."""
    out = tmp_path / "run"
    real_save = ckpt._save_checkpoint
    calls = []

    def sabotage(run, step, files, keep_last):
        calls.append(step)
        if len(calls) == 2:
            raise PermissionError(13, "Permission denied", str(run.checkpoints / f".tmp-step_{step:08d}"))
        return real_save(run, step, files, keep_last)

    import pytest as _pytest

    mp = _pytest.MonkeyPatch()
    mp.setattr(ckpt, "_save_checkpoint", sabotage)
    try:
        code = train.main(base(fmnist_dir, out) + ["--save-every-steps", "2"])
    finally:
        mp.undo()
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1
    assert err == [f"disttrain: error: cannot write checkpoint {out}/checkpoints/step_00000004: [Errno 13] EACCES: "
                   f"Permission denied ({out}/checkpoints/.tmp-step_00000004); the previous checkpoint is kept and "
                   "the partial one removed"]
    assert step_dirs(out) == ["step_00000002"]
    assert ckpt.verify(out / "checkpoints" / "step_00000002") is None


# =========================================================================== untrusted files


class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",))


@pytest.fixture
def small_run(tmp_path, fmnist_dir):
    out = tmp_path / "run"
    code = train.main(["--dataset", "fashion_mnist", "--data-dir", str(fmnist_dir), "--model", "linear",
                       "--epochs", "1", "--batch-size", "64", "--no-progress", "--output-dir", str(out)])
    assert code == 0
    return out


def _resume(ckpt_dir: Path, tmp_path: Path, fmnist_dir: Path, capsys) -> tuple[int, list[str]]:
    capsys.readouterr()
    code = train.main(["--dataset", "fashion_mnist", "--data-dir", str(fmnist_dir), "--model", "linear",
                       "--epochs", "2", "--batch-size", "64", "--no-progress", "--output-dir", str(tmp_path / "new"),
                       "--resume", str(ckpt_dir)])
    return code, capsys.readouterr().err.strip().splitlines()


def test_payload_really_would_run(tmp_path):
    marker = tmp_path / "marker"
    pickle.loads(pickle.dumps(_Payload(marker)))  # the crafted file is live ammunition
    assert marker.exists()


@pytest.mark.parametrize("victim", ["optimizer.json", "state.json", "model.safetensors", "rng.safetensors"])
@pytest.mark.parametrize("rewrite_manifest", [False, True], ids=["manifest-kept", "manifest-rewritten"])
def test_crafted_pickle_is_rejected(tmp_path, fmnist_dir, small_run, capsys, victim, rewrite_manifest):
    marker = tmp_path / "marker"
    d = sorted((small_run / "checkpoints").glob("step_*"))[-1]
    (d / victim).write_bytes(pickle.dumps(_Payload(marker)))
    if rewrite_manifest:  # the attacker also rewrote the manifest: checksums pass, formats do not
        mf = json.loads((d / "manifest.json").read_text())
        mf["files"][victim] = {"bytes": (d / victim).stat().st_size, "sha256": ckpt._sha256(d / victim)}
        (d / "manifest.json").write_text(json.dumps(mf))
    code, err = _resume(d, tmp_path, fmnist_dir, capsys)
    assert code == 2
    assert len(err) == 1 and err[0].startswith("disttrain: error: checkpoint "), err
    assert victim in err[0]
    assert ("unreadable" if rewrite_manifest else "truncated or changed") in err[0]
    assert not marker.exists(), "code in a checkpoint was executed"
    assert not (tmp_path / "new").exists()
    # evaluate reads the same files the same way
    capsys.readouterr()
    assert evaluate.main(["--checkpoint", str(d), "--data-dir", str(fmnist_dir)]) == 2
    assert not marker.exists()


@pytest.mark.parametrize("name", ["../../evil", "/etc/passwd", "..", "sub/dir.json"])
def test_manifest_path_outside_checkpoint_is_refused(tmp_path, fmnist_dir, small_run, capsys, name):
    d = sorted((small_run / "checkpoints").glob("step_*"))[-1]
    (tmp_path / "evil").write_text("{}")
    mf = json.loads((d / "manifest.json").read_text())
    mf["files"][name] = {"bytes": 2, "sha256": ckpt._sha256(tmp_path / "evil")}
    (d / "manifest.json").write_text(json.dumps(mf))
    code, err = _resume(d, tmp_path, fmnist_dir, capsys)
    assert code == 2
    assert len(err) == 1 and "refuses file name" in err[0] and repr(name) in err[0], err


def test_no_pickle_in_source():
    """A cheap static check: nothing in src/ can unpickle."""
    bad = []
    for f in (REPO / "src").rglob("*.py"):
        text = f.read_text()
        if re.search(r"^\s*(import|from)\s+(c?pickle|dill|joblib|shelve)\b", text, re.M):
            bad.append(f"{f.name}: imports a pickle module")
        for m in re.finditer(r"torch\.load\(([^)]*)\)", text):
            if "weights_only=True" not in m.group(1):
                bad.append(f"{f.name}: {m.group(0)}")
        if re.search(r"\bnp\.load\([^)]*allow_pickle=True", text):
            bad.append(f"{f.name}: np.load(allow_pickle=True)")
    assert bad == []


# =========================================================================== evaluate and plug-ins


MARKER_PLUGIN = '''
import os
from pathlib import Path
Path(os.environ["DT_IMPORT_MARKER"]).write_text("imported")
from torch import nn

def net(input_shape, num_outputs):
    return nn.Sequential(nn.Flatten(), nn.Linear(784, num_outputs))

def build(**kw):
    return net([1, 28, 28], 10)
'''


def test_evaluate_imports_saved_plugin_only_when_trusted(tmp_path, fmnist_dir, monkeypatch, capsys):
    (tmp_path / "pl").mkdir()
    (tmp_path / "pl" / "dt_marker_plugin.py").write_text(MARKER_PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path / "pl"))
    marker = tmp_path / "imported"
    monkeypatch.setenv("DT_IMPORT_MARKER", str(marker))
    out = tmp_path / "run"
    try:
        assert train.main(["--dataset", "fashion_mnist", "--data-dir", str(fmnist_dir), "--model",
                           "dt_marker_plugin:build", "--epochs", "1", "--batch-size", "64", "--no-progress",
                           "--output-dir", str(out)]) == 0
        for args, code, imported in (([], 2, False), (["--trust-plugins"], 0, True),
                                     (["--model", "dt_marker_plugin:build"], 0, True)):
            marker.unlink(missing_ok=True)
            sys.modules.pop("dt_marker_plugin", None)
            capsys.readouterr()
            assert evaluate.main(["--checkpoint", str(out)] + args) == code, capsys.readouterr().err
            assert marker.exists() == imported, args
            if code == 2:
                err = capsys.readouterr().err.strip().splitlines()
                assert len(err) == 1 and "--trust-plugins" in err[0] and "dt_marker_plugin:build" in err[0], err
    finally:
        sys.modules.pop("dt_marker_plugin", None)
