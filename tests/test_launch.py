"""python -m disttrain.launch: flags checked before anything starts, signals forwarded, meaningful exit codes."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import LAUNCH, PY, env, free_port, run
from disttrain import launch

SYNTH = ["--dataset", "synthetic_classification", "--model", "mlp", "--no-progress"]


def launch_cmd(out: Path, *flags: str) -> list[str]:
    return [PY, "-m", "disttrain.launch", "--config_file", str(LAUNCH / "cpu-multi.yaml"), "--num_processes", "2",
            "--main_process_port", str(free_port()), "--", *SYNTH, "--output-dir", str(out), *flags]


def last_line(text: str) -> str:
    return text.strip().splitlines()[-1]


def test_split_argv():
    assert launch.split_argv(["--num_processes", "2", "--", "--lr", "0.1"]) == (["--num_processes", "2"],
                                                                                ["--lr", "0.1"])
    assert launch.split_argv(["--lr", "0.1"]) == ([], ["--lr", "0.1"])
    assert launch._option(["--machine_rank", "1"], "--machine_rank") == "1"
    assert launch._option(["--machine_rank=3"], "--machine_rank") == "3"


def test_bad_flag_starts_nothing(monkeypatch, capsys, tmp_path):
    def no_popen(*a, **k):
        raise AssertionError("a child was started for bad input")

    monkeypatch.setattr(launch.subprocess, "Popen", no_popen)
    out = tmp_path / "run"
    code = launch.main(["--num_processes", "2", "--", *SYNTH, "--lr", "-1", "--output-dir", str(out)])
    err = capsys.readouterr().err
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and err.startswith("disttrain: error: --lr must be > 0")
    assert not out.exists()


@pytest.mark.parametrize("var, value", [("DISTTRAIN_MALLOC", "off"), ("DISTTRAIN_THREADS", "two")])
def test_bad_disttrain_env_starts_nothing(monkeypatch, capsys, tmp_path, var, value):
    """A DISTTRAIN_* setting every worker would refuse is refused once, here, before any worker starts."""
    def no_popen(*a, **k):
        raise AssertionError("a child was started for bad input")

    monkeypatch.setattr(launch.subprocess, "Popen", no_popen)
    monkeypatch.setenv(var, value)
    out = tmp_path / "run"
    code = launch.main(["--num_processes", "2", "--", *SYNTH, "--output-dir", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith(f"disttrain: error: {var}={value!r}: expected")
    assert not out.exists()


def test_bad_flag_subprocess_one_line(tmp_path):
    t = time.monotonic()
    p = run([PY, "-m", "disttrain.launch", "--num_processes", "2", "--", "--no-such-flag"], cwd=tmp_path)
    assert p.returncode == 2
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("disttrain: error: unrecognized arguments: --no-such-flag")
    assert not (tmp_path / "runs").exists() and "topology" not in p.stdout
    assert time.monotonic() - t < 60


def test_output_dir_resolved_once(monkeypatch, tmp_path):
    """Without --output-dir the launcher picks runs/<dataset>-<model>-<time> and passes it to every worker."""
    seen: dict[str, list[str]] = {}

    class FakeChild:
        pid = 0

        def __init__(self, cmd, **kw):
            seen["cmd"] = cmd

        def wait(self, timeout=None):
            return 0

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(launch.subprocess, "Popen", FakeChild)
    assert launch.main(["--num_processes", "2", "--", *SYNTH]) == 0
    cmd = seen["cmd"]
    assert cmd[1:4] == ["-m", "disttrain.recovery", "--num_processes"]  # accelerate launch, in the agent shim
    i = cmd.index("disttrain.train")
    assert cmd[i + 1:i + 1 + len(SYNTH)] == SYNTH
    out = cmd[cmd.index("--output-dir") + 1]
    assert out.startswith("runs/synthetic_classification-mlp-")


@pytest.mark.slow
def test_two_processes_exit_0(tmp_path):
    out = tmp_path / "run"
    p = run(launch_cmd(out, "--epochs", "1"), cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "topology: 2 process(es)" in p.stdout
    assert last_line(p.stderr).startswith("disttrain-launch: training completed at step 16 (exit 0)")
    assert (out / "model.safetensors").is_file()
    assert json.loads((out / "status.json").read_text())["state"] == "completed"


@pytest.mark.slow
def test_sigterm_checkpoints_exit_75_then_resume(tmp_path):
    out = tmp_path / "run"
    flags = ["--epochs", "1", "--batch-size", "8", "--dataset-kwargs", '{"n_train": 20000}', "--log-every", "20"]
    proc = subprocess.Popen(launch_cmd(out, *flags), cwd=tmp_path, env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        metrics = out / "metrics.jsonl"
        deadline = time.monotonic() + 120
        while not (metrics.exists() and '"kind": "step"' in metrics.read_text()):
            assert proc.poll() is None and time.monotonic() < deadline, "training never got going"
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 75, err[-3000:]
    assert "training interrupted at step" in last_line(err) and "(exit 75)" in last_line(err)
    status = json.loads((out / "status.json").read_text())
    assert status["state"] == "interrupted" and 0 < status["step"] < 1250
    assert list((out / "checkpoints").glob("step_*"))
    assert not (out / "model.safetensors").exists()

    p = run(launch_cmd(out, *flags, "--resume", "auto"), cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    kinds = [json.loads(ln)["kind"] for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert kinds.count("resume") == 1 and kinds[-1] == "epoch"
    assert (out / "model.safetensors").is_file()


def test_forwarder_passes_one_stop_then_escalates_sigint(monkeypatch):
    """First stop request: one SIGTERM to the workers; repeats are dropped; 2nd SIGINT -> SIGINT; 3rd -> kill."""
    sent: list[tuple[str, int, int]] = []
    monkeypatch.setattr(launch, "_children", lambda pid: [101, 102])
    monkeypatch.setattr(launch.os, "kill", lambda pid, sig: sent.append(("kill", pid, sig)))
    monkeypatch.setattr(launch.os, "killpg", lambda pgid, sig: sent.append(("killpg", pgid, sig)))
    fwd = launch.Forwarder()
    fwd.child = type("C", (), {"pid": 100})()
    fwd.handler(signal.SIGUSR1, None)
    assert sent == [("kill", 101, signal.SIGTERM), ("kill", 102, signal.SIGTERM)] and fwd.received == "SIGUSR1"
    sent.clear()
    fwd.handler(signal.SIGTERM, None)
    fwd.handler(signal.SIGINT, None)  # the first SIGINT after a stop request: nothing new to say
    assert sent == []
    fwd.handler(signal.SIGINT, None)
    assert sent == [("kill", 101, signal.SIGINT), ("kill", 102, signal.SIGINT)] and fwd.resend_at > 0
    sent.clear()
    fwd.handler(signal.SIGINT, None)
    assert sent == [("killpg", 100, signal.SIGKILL)]
