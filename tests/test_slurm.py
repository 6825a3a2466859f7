"""slurm/train.sh on a REAL local Slurm (2 nodes on this host, started by tests/slurm/start_local_slurm.sh).

Needs root on Debian (the fixture apt-installs slurmctld, slurmd, slurm-client and munge if missing). Jobs run
the venv's python: its bin dir goes first on PATH, and sbatch exports the environment to the job.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import BIN, LAUNCH, PY, REPO, env, free_port

SLURM_SCRIPTS = REPO / "tests" / "slurm"
TRAIN_SH = REPO / "slurm" / "train.sh"
NOT_ROOT = hasattr(os, "geteuid") and os.geteuid() != 0
NO_APT = not Path("/etc/debian_version").exists() or (shutil.which("apt-get") is None
                                                      and shutil.which("slurmctld") is None)
slurm_test = [pytest.mark.slurm, pytest.mark.slow,
              pytest.mark.skipif(NOT_ROOT, reason="starting slurmctld/slurmd needs root"),
              pytest.mark.skipif(NO_APT, reason="the local Slurm recipe needs Debian/Ubuntu with apt-get")]

# 256 optimizer steps of a tiny mlp on 2 processes: long enough for a signal to land mid-run
FLAGS = ["--dataset", "synthetic_classification", "--model", "mlp", "--dataset-kwargs", '{"n_train": 4096}',
         "--batch-size", "8", "--epochs", "1", "--log-every", "5", "--seed", "3", "--no-progress"]
STEPS = 4096 // (8 * 2)


def marks(fn):
    for m in slurm_test:
        fn = m(fn)
    return fn


def job_env() -> dict[str, str]:
    # one intra-op thread per process everywhere, so the Slurm and the local reference runs compute alike
    return env(PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", DISTTRAIN_THREADS="1")


def _cluster_up() -> bool:
    if shutil.which("scontrol") is None:
        return False
    p = subprocess.run(["scontrol", "ping"], capture_output=True, text=True)
    return "UP" in p.stdout


@pytest.fixture(scope="module")
def cluster():
    """Start the local 2-node cluster (idempotent); stop it at the end only if this fixture started it."""
    was_up = _cluster_up()
    p = subprocess.run(["bash", str(SLURM_SCRIPTS / "start_local_slurm.sh")], capture_output=True, text=True,
                       timeout=900, env={**os.environ, "SLURM_LOCAL_NODES": "2"})
    if p.returncode != 0:
        pytest.fail(f"local Slurm did not start:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    yield
    if not was_up:
        subprocess.run(["bash", str(SLURM_SCRIPTS / "stop_local_slurm.sh")], capture_output=True, timeout=300)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The same training as a local 2-process run (started at once; runs while the first job is queued)."""
    d = tmp_path_factory.mktemp("reference")
    cmd = [PY, "-m", "disttrain.launch", "--config_file", str(LAUNCH / "cpu-multi.yaml"), "--num_processes", "2",
           "--main_process_port", str(free_port()), "--", *FLAGS, "--output-dir", str(d / "run")]
    proc = subprocess.Popen(cmd, cwd=d, env=job_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def result() -> dict[str, torch.Tensor]:
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, out[-3000:]
        return load_file(d / "run" / "model.safetensors")

    yield result
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def sbatch(tmp: Path, *args: str, wait: bool = True, timeout: float = 300) -> tuple[int, str]:
    """Submit train.sh from the repo root, the job working in tmp; returns (exit code or 0, job id)."""
    cmd = ["sbatch", "--chdir", str(tmp), "--output", str(tmp / "%x-%j.out"), *(["--wait"] if wait else []),
           "--parsable", *args]
    p = subprocess.run(cmd, cwd=REPO, env=job_env(), capture_output=True, text=True, timeout=timeout)
    m = re.search(r"^(\d+)", p.stdout, re.M)
    assert m, f"sbatch said: {p.stdout} {p.stderr}"
    return p.returncode, m.group(1)


def log_of(tmp: Path, jid: str) -> str:
    return (tmp / f"disttrain-{jid}.out").read_text()


def same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def wait_gone(jid: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while subprocess.run(["squeue", "-h", "-j", jid], capture_output=True, text=True).stdout.strip():
        if time.monotonic() > deadline:
            subprocess.run(["scancel", jid])
            pytest.fail(f"job {jid} still in the queue after {timeout} s")
        time.sleep(0.5)


def test_scripts_are_shellcheck_clean():
    for script in (REPO / "slurm").glob("*.sh"):
        assert subprocess.run(["bash", "-n", str(script)]).returncode == 0, script
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck not installed (apt-get install shellcheck)")
    scripts = [*map(str, (REPO / "slurm").glob("*.sh")), *map(str, SLURM_SCRIPTS.glob("*.sh"))]
    p = subprocess.run(["shellcheck", *scripts], capture_output=True, text=True)
    assert p.returncode == 0, p.stdout


@marks
def test_two_nodes_train_like_two_local_processes(cluster, reference, tmp_path):
    code, jid = sbatch(tmp_path, "-N", "2", str(TRAIN_SH), *FLAGS)
    log = log_of(tmp_path, jid)
    assert code == 0, log[-4000:]
    # one srun task per node (srun --label: "0:" is machine rank 0 on n1, "1:" machine rank 1 on n2)
    assert "0: topology: 2 process(es) on 2 machine(s)" in log  # printed once, by the main process
    assert "1: topology" not in log
    run = tmp_path / "runs" / f"disttrain-{jid}"  # the default run directory
    assert json.loads((run / "status.json").read_text())["state"] == "completed"
    prov = json.loads((run / "summary.json").read_text())["provenance"]
    assert prov["world_size"] == 2 and prov["hosts"] == ["n1", "n2"]  # machine rank 1 on the second node
    epochs = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "epoch"]
    assert [r["step"] for r in epochs] == [STEPS]
    # the same weights, bit for bit, as 2 local processes: every sample seen once, in the same shards
    assert same_weights(load_file(run / "model.safetensors"), reference())


@marks
def test_time_limit_warning_checkpoints_requeues_and_resumes(cluster, reference, tmp_path):
    code, jid = sbatch(tmp_path, "-N", "2", str(TRAIN_SH), *FLAGS, wait=False)
    assert code == 0
    run = tmp_path / "runs" / f"disttrain-{jid}"
    metrics = run / "metrics.jsonl"
    deadline = time.monotonic() + 180
    while not (metrics.exists() and '"kind": "step"' in metrics.read_text()):
        assert time.monotonic() < deadline, "training never got going"
        time.sleep(0.1)
    # what --signal=B:USR1@<sec> does before the time limit: USR1 to the batch shell only
    subprocess.run(["scancel", "--signal=USR1", "--batch", jid], check=True)
    wait_gone(jid, 240)
    log = log_of(tmp_path, jid)
    timeline = [ln for ln in log.splitlines() if ln.startswith("train.sh")]
    print("\n".join(timeline))
    assert "got SIGUSR1" in log and f"requeueing job {jid} (restart 1" in log, log[-4000:]
    assert f"job {jid} attempt 2 (SLURM_RESTART_COUNT=1)" in log
    assert sum(ln.endswith("] training completed") for ln in timeline) == 1 and "attempt 3" not in log
    records = [json.loads(ln) for ln in metrics.read_text().splitlines()]
    resumes = [r for r in records if r["kind"] == "resume"]
    assert len(resumes) == 1 and 0 < resumes[0]["step"] < STEPS
    assert json.loads((run / "status.json").read_text())["state"] == "completed"
    assert same_weights(load_file(run / "model.safetensors"), reference())


@marks
def test_bad_flag_fails_once_without_requeue(cluster, tmp_path):
    code, jid = sbatch(tmp_path, "-N", "2", str(TRAIN_SH), *FLAGS, "--lr", "-1")
    log = log_of(tmp_path, jid)
    assert code == 2, log[-3000:]
    assert "disttrain: error: --lr must be > 0" in log
    assert log.count(" attempt ") == 1 and "SLURM_RESTART_COUNT=0" in log
    assert "requeueing" not in log and "bad input (exit 2): not requeued" in log
    assert not subprocess.run(["squeue", "-h", "-j", jid], capture_output=True, text=True).stdout.strip()


@marks
def test_scancel_checkpoints_without_requeue(cluster, tmp_path):
    """SIGTERM (scancel, preemption): the training checkpoints and exits 75; the job does not requeue itself."""
    code, jid = sbatch(tmp_path, "-N", "2", str(TRAIN_SH), *FLAGS, wait=False)
    run = tmp_path / "runs" / f"disttrain-{jid}"
    deadline = time.monotonic() + 180
    while not ((run / "metrics.jsonl").exists() and '"kind": "step"' in (run / "metrics.jsonl").read_text()):
        assert time.monotonic() < deadline, "training never got going"
        time.sleep(0.1)
    subprocess.run(["scancel", jid], check=True)
    wait_gone(jid, 120)
    log = log_of(tmp_path, jid)
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "interrupted" and status["exit_code"] == 75, log[-4000:]
    assert (run / "checkpoints" / f"step_{status['step']:08d}").is_dir()
    assert "requeueing" not in log and "attempt 2" not in log and not (run / "model.safetensors").exists()
    job = subprocess.run(["scontrol", "show", "job", jid], capture_output=True, text=True).stdout
    assert "JobState=CANCELLED" in job and "Restarts=0" in job
