"""Issue 18: self-healing runs. `disttrain.launch --max-restarts N` starts the whole group again from the
newest checkpoint after a crash, and only then; `--save-every-minutes` bounds what a crash costs.

The decision rules and the trainer's side are tested in-process; the end-to-end cases are real 2-process
jobs (marked slow) whose workers are SIGKILLed when a checkpoint has appeared (never on a timer)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from conftest import LAUNCH, PY, env, free_port, install_plugin
from safetensors.torch import load_file
from test_failures import PLUGIN, PLUGIN_SRC, base, step_dirs

from disttrain import launch, recovery, train
from disttrain.errors import TrainingError
from disttrain.metrics import MetricsLog, read_metrics
from disttrain.recovery import Outcome, Progress, SaveClock, judge, restart_flags, restart_record

# =========================================================================== the launcher's decision


def status(code: int, restartable: bool = False, reason: str = "why") -> dict:
    return {"state": "x", "exit_code": code, "restartable": restartable, "reason": reason, "time": 1.0}


KILLED = {"rank": 1, "exitcode": -9, "message": "", "host": "h"}
RAISED = {"rank": 1, "exitcode": 1, "message": "RuntimeError: boom", "host": "h"}
REFUSED = {"rank": 0, "exitcode": 2, "message": "", "host": "h"}


@pytest.mark.parametrize("rc, st, failure, stopped, expect", [
    # crashes: no status.json from this attempt -> restart, the agent names the cause
    (1, None, KILLED, False, Outcome(1, True, "rank 1 (host h) killed by SIGKILL")),
    (1, None, RAISED, False, Outcome(1, True, "rank 1: RuntimeError: boom")),
    (137, None, None, False, Outcome(137, True, "the launcher's child exited with code 137")),
    # a peer lost in a collective: the trainer says restartable; the root cause wins over its reason
    (1, status(1, True, "rank 1 died during the gradient all-reduce"), KILLED, False,
     Outcome(1, True, "rank 1 (host h) killed by SIGKILL")),
    (1, status(1, True, "rank 1 died"), None, False, Outcome(1, True, "rank 1 died")),
    # deterministic failures, bad input, requested stops, success: never restarted
    (1, status(1, False, "non-finite loss at step 6"), RAISED, False, Outcome(1, False, "non-finite loss at step 6")),
    (1, status(2), REFUSED, False, Outcome(2, False, "why")),
    (1, None, REFUSED, False, Outcome(2, False, "rank 0 exited with code 2")),
    (2, None, None, False, Outcome(2, False, "")),
    (75, status(75), None, True, Outcome(75, False, "why")),
    (1, status(1, True), KILLED, True, Outcome(1, False, "why")),
    (143, None, KILLED, True, Outcome(143, False, "rank 1 (host h) killed by SIGKILL")),
    (0, status(0, reason=""), None, False, Outcome(0, False, "")),
], ids=["killed", "raised", "no-record", "peer-lost+root", "peer-lost", "nonfinite", "bad-input-status",
        "bad-input-worker", "bad-input-rc", "stop-75", "stopped-crash", "stopped-no-status", "completed"])
def test_judge(rc, st, failure, stopped, expect):
    assert judge(rc, st, failure, stopped) == expect


def test_root_cause_prefers_the_killed_or_raising_rank():
    """Within one second, the rank killed by a signal (not the agent's SIGTERM) or the one that raised is
    the cause; peers that lost it (exit 1 without an error file) or were stopped by the agent are not."""
    lost = {"rank": 0, "exitcode": 1, "message": "", "time": 100.2}
    stopped = {"rank": 0, "exitcode": -15, "message": "", "time": 100.1}
    killed = dict(KILLED, time=100.9)
    raised = dict(RAISED, time=100.5)
    assert min([lost, killed], key=recovery._root_order) is killed
    assert min([stopped, killed], key=recovery._root_order) is killed
    assert min([lost, raised], key=recovery._root_order) is raised
    assert min([dict(killed, time=99.0), lost], key=recovery._root_order)["exitcode"] == -9
    assert min([dict(lost, time=99.0), killed], key=recovery._root_order)["exitcode"] == 1  # a second earlier


def test_restart_flags():
    flags = ["--epochs", "2", "--overwrite", "--init-from", "w.safetensors"]
    again = restart_flags(flags, "none", has_checkpoint=True)
    cfg = train.parse_config(["--epochs", "2", "--resume", "auto", "--no-overwrite", "--init-from", "none",
                              "--output-dir", "run"])
    assert again[:len(flags)] == flags and again[len(flags):] == ["--resume", "auto", "--no-overwrite",
                                                                  "--init-from", "none"]
    assert (cfg.resume, cfg.overwrite, cfg.init_from) == ("auto", False, None)
    # nothing saved yet: a fresh run starts over, a resumed one resumes from where it did
    assert restart_flags(["--epochs", "2"], "none", has_checkpoint=False) == ["--epochs", "2", "--overwrite"]
    assert restart_flags(["--resume", "/x"], "/x", has_checkpoint=False) == ["--resume", "/x"]


@pytest.mark.parametrize("opts, message", [
    (["--max-restarts", "-1"], "--max-restarts must be >= 0, got -1"),
    (["--max-restarts=two"], "--max-restarts must be an integer, got 'two'"),
    (["--max-restarts"], "--max-restarts needs a number of restarts"),
    (["--max_restarts", "3"], "--max_restarts (torchrun's) restarts workers without --resume auto"),
])
def test_bad_max_restarts_starts_nothing(monkeypatch, capsys, tmp_path, opts, message):
    monkeypatch.setattr(launch.subprocess, "Popen", lambda *a, **k: pytest.fail("a child was started"))
    out = tmp_path / "run"
    assert launch.main(["--num_processes", "2", *opts, "--", "--output-dir", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"disttrain: error: {message}"), err
    assert not out.exists()


def test_take_max_restarts_keeps_accelerate_options():
    assert launch.take_max_restarts(["--num_processes", "2", "--max-restarts", "3", "--machine_rank", "0"]) == \
        (3, ["--num_processes", "2", "--machine_rank", "0"])
    assert launch.take_max_restarts(["--max-restarts=0"]) == (0, [])
    assert launch.take_max_restarts([]) == (0, [])


class FakeChild:
    """subprocess.Popen stand-in for launch.main: each attempt 'crashes' the way the test says."""

    def __init__(self, script, seen):
        self.script, self.seen = script, seen

    def __call__(self, cmd, env, **kw):
        self.seen.append((cmd, dict(env)))
        rc, failure = self.script[len(self.seen) - 1]
        if failure is not None:
            Path(env[recovery.FAILURE_FILE_ENV]).write_text(json.dumps(failure))
        child = type("Child", (), {"pid": 0, "wait": lambda self, timeout=None: rc})()
        return child


def test_launcher_restarts_then_gives_up_with_status(monkeypatch, capsys, tmp_path):
    """Every attempt crashes: N restarts with --resume auto and $DISTTRAIN_RESTART, then exit 1, one last
    line and status.json naming the cause."""
    out = tmp_path / "run"
    (out / "checkpoints" / "step_00000004").mkdir(parents=True)
    Progress(out / ".progress", True).mark(7)
    seen: list = []
    monkeypatch.setattr(launch.subprocess, "Popen", FakeChild([(1, KILLED), (1, RAISED), (1, RAISED)], seen))
    code = launch.main(["--max-restarts", "2", "--num_processes", "2", "--", "--output-dir", str(out),
                        "--epochs", "3"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(seen) == 3
    assert err == ["disttrain-launch: restart 1/2 after rank 1 (host h) killed by SIGKILL (last finished step 7); "
                   "starting the group again from the newest checkpoint",
                   "disttrain-launch: restart 2/2 after rank 1: RuntimeError: boom (last finished step 7); starting "
                   "the group again from the newest checkpoint",
                   "disttrain-launch: training failed at step 7 (exit 1): giving up after 2 restart(s) "
                   "(--max-restarts 2); last failure: rank 1: RuntimeError: boom"]
    first, second = seen[0], seen[1]
    assert recovery.RESTART_ENV not in first[1] and "--resume" not in first[0]
    assert second[0][-5:] == ["--resume", "auto", "--no-overwrite", "--init-from", "none"]
    assert json.loads(second[1][recovery.RESTART_ENV]) == {"attempt": 1, "max": 2,
                                                           "cause": "rank 1 (host h) killed by SIGKILL"}
    st = json.loads((out / "status.json").read_text())
    assert st["state"] == "failed" and st["exit_code"] == 1 and st["restarts"] == 2 and st["step"] == 7
    assert st["reason"].endswith("last failure: rank 1: RuntimeError: boom")


def test_launcher_does_not_restart_bad_input_or_success(monkeypatch, capsys, tmp_path):
    for script, code in (([(1, REFUSED)], 2), ([(0, None)], 0)):
        seen: list = []
        monkeypatch.setattr(launch.subprocess, "Popen", FakeChild(script, seen))
        assert launch.main(["--max-restarts", "3", "--", "--output-dir", str(tmp_path / "run")]) == code
        assert len(seen) == 1
        assert "disttrain-launch: restart" not in capsys.readouterr().err


# =========================================================================== the trainer's side


def test_nonfinite_status_is_not_restartable(tmp_path, fmnist_dir, plugin_dir, capsys):
    """The status.json a non-finite loss writes makes the launcher stop (it would fail the same way)."""
    out = tmp_path / "run"
    assert train.main(base(fmnist_dir, out, nan_steps=[6]) + ["--save-every-steps", "2"]) == 1
    st = json.loads((out / "status.json").read_text())
    assert st["restartable"] is False
    assert judge(1, st, RAISED, False) == Outcome(1, False, st["reason"])
    assert TrainingError("peer", restartable=True).restartable and not TrainingError("x").restartable


@pytest.fixture
def plugin_dir(tmp_path, monkeypatch):
    yield from install_plugin(tmp_path, monkeypatch, PLUGIN, PLUGIN_SRC)


def test_progress_marks_survive_the_writer(tmp_path):
    p = tmp_path / ".progress"
    assert Progress.read(p) is None
    w = Progress(p, True)
    w.mark(41)
    w.mark(42)
    step, when = Progress.read(p)  # another reader, while the writer still has it mapped
    assert step == 42 and abs(when - time.time()) < 60
    w.close()
    assert Progress.read(p)[0] == 42
    Progress(tmp_path / "off", False).mark(1)
    assert not (tmp_path / "off").exists()
    os.symlink(p, tmp_path / "link")
    assert Progress.read(tmp_path / "link") is None  # links are not followed


def test_restart_record():
    environ = {recovery.RESTART_ENV: recovery.restart_env(2, 3, "rank 1 (host h) killed by SIGKILL")}
    rec = restart_record(40, (52, time.time() - 3.0), environ)
    assert rec["kind"] == "restart" and rec["attempt"] == 2 and rec["max_restarts"] == 3
    assert (rec["step"], rec["reached"], rec["steps_lost"]) == (40, 52, 12) and 2.5 < rec["recovery_s"] < 60
    assert recovery.restart_line(rec).startswith("disttrain: restart 2/3 after rank 1 (host h) killed by SIGKILL: "
                                                 "resumed at step 40, 12 step(s) lost, ")
    unknown = restart_record(0, None, environ)
    assert unknown["steps_lost"] is None and "steps lost unknown" in recovery.restart_line(unknown)
    assert restart_record(40, (52, 0.0), {}) is None  # not started by the launcher after a failure


def test_metrics_keep_restart_lines_of_attempts_that_never_saved(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [{"kind": "step", "step": 1}, {"kind": "restart", "attempt": 1}, {"kind": "step", "step": 2}]
    path.write_text("".join(json.dumps(x) + "\n" for x in lines) + '{"kind": "st')  # cut short by a kill
    log = MetricsLog(path, True)
    log.open(keep_lines=1)
    log.write({"kind": "restart", "attempt": 2})
    log.close()
    assert [x.get("attempt") for x in read_metrics(path)] == [None, 1, 2]


def test_save_clock_asks_once_per_period():
    now = [0.0]
    c = SaveClock(1.0, True, clock=lambda: now[0])
    assert not c.due()
    now[0] = 59.9
    assert not c.due()
    now[0] = 60.0
    assert c.due() and not c.due()  # asked once: the pipelined answer must not trigger a second save
    c.reset()
    now[0] = 119.0
    assert not c.due()
    now[0] = 120.0
    assert c.due()
    assert not SaveClock(1.0, False, clock=lambda: 1e9).due()  # not the main process: never asks
    assert not SaveClock(0.0, True, clock=lambda: 1e9).due()  # off


def test_save_every_minutes_with_a_fake_clock(tmp_path, fmnist_dir, monkeypatch):
    """Each step 'takes' 20 s of a fake clock: with --save-every-minutes 1 a checkpoint follows every 3 steps
    after the previous checkpoint, epoch ends included (16 steps per epoch)."""
    out = tmp_path / "run"
    clock = lambda: 20.0 * ((Progress.read(out / ".progress") or (0, 0))[0])  # noqa: E731
    monkeypatch.setattr(train, "SaveClock", lambda minutes, enabled: SaveClock(minutes, enabled, clock=clock))
    args = ["--dataset", "fashion_mnist", "--data-dir", str(fmnist_dir), "--model", "linear", "--batch-size", "16",
            "--epochs", "2", "--no-progress", "--keep-last", "100", "--save-every-minutes", "1",
            "--output-dir", str(out)]
    assert train.main(args) == 0
    assert [int(d[5:]) for d in step_dirs(out)] == [3, 6, 9, 12, 15, 16, 19, 22, 25, 28, 31, 32]
    assert json.loads((out / "summary.json").read_text())["restarts"] == 0


# =========================================================================== real processes


SLOW = dict(sleep=0.1)  # a step takes >= 0.1 s whatever the machine: a kill lands long before the end
RUN = ["--epochs", "4", "--log-every", "1", "--save-every-minutes", "0.003"]  # a checkpoint every ~0.2 s


def launch_cmd(data: Path, out: Path, max_restarts: int, *flags: str, **model_kwargs) -> list[str]:
    return [PY, "-m", "disttrain.launch", "--max-restarts", str(max_restarts), "--config_file",
            str(LAUNCH / "cpu-multi.yaml"), "--num_processes", "2", "--main_process_port", str(free_port()), "--",
            *base(data, out, **model_kwargs), *flags]


def plugin_env(plugins: Path) -> dict[str, str]:
    """Child environment that imports the test plug-ins, and disttrain from where this test imports it."""
    return env(PYTHONPATH=os.pathsep.join([str(plugins), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))


def worker_pid(out: Path, rank: int) -> int | None:
    """The training process of `rank` in the job writing to `out` (its command line names the directory)."""
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            cmd = (p / "cmdline").read_bytes().split(b"\0")
            environ = (p / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"disttrain.train" in cmd and str(out).encode() in cmd and f"LOCAL_RANK={rank}".encode() in environ:
            return int(p.name)
    return None


def wait_for(what, proc: subprocess.Popen, timeout: float = 240):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = what()
        if got:
            return got
        if proc.poll() is not None:
            raise AssertionError(f"the job ended first: {proc.communicate()[1][-3000:]}")
        time.sleep(0.02)
    raise AssertionError("timed out")


def restarts_in(out: Path) -> list[dict]:
    return [x for x in read_metrics(out / "metrics.jsonl") if x["kind"] == "restart"] if \
        (out / "metrics.jsonl").exists() else []


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted 2-process run of the configuration the kill test uses."""
    root = tmp_path_factory.mktemp("reference")
    from conftest import write_idx

    write_idx(root / "data" / "FashionMNIST" / "raw")
    (root / "plugins").mkdir()
    (root / "plugins" / f"{PLUGIN}.py").write_text(PLUGIN_SRC)
    out = root / "run"
    p = subprocess.run(launch_cmd(root / "data", out, 0, *RUN, **SLOW), capture_output=True, text=True,
                       env=plugin_env(root / "plugins"), timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    return root / "data", root / "plugins", out


@pytest.mark.slow
def test_killed_workers_recover_bitwise(tmp_path, reference):
    """SIGKILL rank 1 after the first time-based checkpoint, then rank 0 after a checkpoint of the restarted
    attempt: the job finishes by itself, bitwise equal to the uninterrupted run, every epoch logged once."""
    data, plugins, ref = reference
    out = tmp_path / "run"
    proc = subprocess.Popen(launch_cmd(data, out, 3, *RUN, **SLOW), env=plugin_env(plugins),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        for rank in (1, 0):
            done = len(restarts_in(out))
            after = restarts_in(out)[-1]["step"] if done else 0
            wait_for(lambda: any(int(d[5:]) > after for d in step_dirs(out)), proc)  # a checkpoint of this attempt
            os.kill(wait_for(lambda: worker_pid(out, rank), proc), signal.SIGKILL)
            wait_for(lambda: len(restarts_in(out)) > done, proc)
        _, err = proc.communicate(timeout=600)
    finally:
        _stop(proc)
    assert proc.returncode == 0, err[-3000:]
    said = [ln for ln in err.splitlines() if ln.startswith("disttrain-launch: restart")]
    assert len(said) == 2 and "restart 1/3 after rank 1" in said[0] and "restart 2/3 after rank 0" in said[1], said
    a, b = load_file(str(ref / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "not bitwise equal after restarts"
    records = read_metrics(out / "metrics.jsonl")
    assert [x["epoch"] for x in records if x["kind"] == "epoch"] == [1, 2, 3, 4]
    r1, r2 = restarts_in(out)
    assert (r1["attempt"], r2["attempt"]) == (1, 2)
    assert r1["cause"].startswith("rank 1 ") and r1["cause"].endswith("killed by SIGKILL")
    assert r2["cause"].startswith("rank 0 ") and r2["cause"].endswith("killed by SIGKILL")
    for r in (r1, r2):
        assert r["step"] > 0 and r["reached"] >= r["step"] and r["steps_lost"] == r["reached"] - r["step"]
        assert r["recovery_s"] > 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["restarts"] == 2 and summary["resumes"] == 2
    assert json.loads((out / "status.json").read_text())["state"] == "completed"
    print(f"restarts: {[(r['steps_lost'], r['recovery_s']) for r in (r1, r2)]} (steps lost, s to resume)")


@pytest.mark.slow
def test_always_failing_worker_gives_up(tmp_path, fmnist_dir, plugin_dir):
    """A plug-in that raises 5 steps after every start: one restart, then exit 1 and one line naming it."""
    out = tmp_path / "run"
    p = subprocess.run(launch_cmd(fmnist_dir, out, 1, "--save-every-steps", "2", "--epochs", "3", raise_at=5, rank=1),
                       capture_output=True, text=True, env=plugin_env(plugin_dir), timeout=600)
    assert p.returncode == 1, p.stderr[-3000:]
    lines = p.stderr.strip().splitlines()
    said = [ln for ln in lines if ln.startswith("disttrain-launch: restart")]
    (restart,) = restarts_in(out)
    assert said == [f"disttrain-launch: restart 1/1 after rank 1: RuntimeError: boom at step 5 on rank 1 (last "
                    f"finished step {restart['reached']}); starting the group again from the newest checkpoint"]
    assert restart["cause"] == "rank 1: RuntimeError: boom at step 5 on rank 1"
    assert 0 < restart["step"] <= restart["reached"] and restart["step"] % 2 == 0  # --save-every-steps 2
    st = json.loads((out / "status.json").read_text())
    assert st["state"] == "failed" and st["exit_code"] == 1 and st["restarts"] == 1
    assert st["step"] > restart["reached"]  # the restarted attempt got further, then failed the same way
    assert lines[-1] == (f"disttrain-launch: training failed at step {st['step']} (exit 1): giving up after 1 "
                         "restart(s) (--max-restarts 1); last failure: rank 1: RuntimeError: boom at step 5 on rank 1")
    assert st["reason"] == lines[-1].split("(exit 1): ", 1)[1]
    assert not (out / "model.safetensors").exists()


@pytest.mark.slow
def test_bad_input_in_a_worker_is_not_restarted(tmp_path, fmnist_dir, plugin_dir):
    """Bad input found only by the workers (a plug-in that does not exist): exit 2 once, no restart."""
    out = tmp_path / "run"
    cmd = launch_cmd(fmnist_dir, out, 3)
    cmd[cmd.index(f"{PLUGIN}:faulty")] = f"{PLUGIN}:no_such_model"
    p = subprocess.run(cmd, capture_output=True, text=True, env=plugin_env(plugin_dir), timeout=600)
    assert p.returncode == 2, p.stderr[-3000:]
    assert "disttrain-launch: restart" not in p.stderr
    assert "disttrain: error: --model dt_faulty_plugins:no_such_model" in p.stderr
    assert not out.exists()
