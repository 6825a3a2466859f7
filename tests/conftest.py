"""Shared fixtures: isolated environment, process-group teardown, subprocess launch helpers, small data."""

from __future__ import annotations

import gzip
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"
PY = sys.executable
BIN = Path(PY).parent
ACCELERATE = str(BIN / "accelerate")
TORCHRUN = str(BIN / "torchrun")


@pytest.fixture(autouse=True)
def _isolate(monkeypatch, tmp_path_factory):
    """Every test: its own HF home (no user default_config.yaml), no inherited launcher variables,
    no downloads, and no process group left behind."""
    home = tmp_path_factory.mktemp("hf_home")
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("DISTTRAIN_OFFLINE", "1")
    monkeypatch.setenv("DISTTRAIN_CONTENTION_NOTE", "0")  # stderr must not depend on the machine's load
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                "ACCELERATE_MIXED_PRECISION", "ACCELERATE_USE_CPU", "TORCHELASTIC_RUN_ID", "DISTTRAIN_FAULT",
                "OMP_NUM_THREADS", "ACCELERATE_USE_FSDP", "FSDP_RESHARD_AFTER_FORWARD"):
        monkeypatch.delenv(var, raising=False)
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
    reset_accelerate()


def reset_accelerate() -> None:
    """Tear down the process group and Accelerate's process-wide singletons, so a later in-process run
    starts clean."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()


def install_plugin(tmp_path: Path, monkeypatch, name: str, source: str):
    """Write plug-in module `name` into tmp_path/plugins, importable for this test; yields the folder."""
    d = tmp_path / "plugins"
    d.mkdir()
    (d / f"{name}.py").write_text(source)
    monkeypatch.syspath_prepend(str(d))
    yield d
    sys.modules.pop(name, None)


def env(**extra: str) -> dict[str, str]:
    """Environment for child processes: the current one, isolated like the fixture, plus `extra`."""
    e = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "DISTTRAIN_FAULT")}
    e.update({"DISTTRAIN_OFFLINE": "1", "PYTHONUNBUFFERED": "1", **extra})
    e["PYTHONPATH"] = os.pathsep.join([str(REPO / "tests"), e.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return e


def train_cmd(nproc: int = 1, launcher: str = "python") -> list[str]:
    """How users launch: python -m, accelerate launch with a launch/ config, or torchrun."""
    if launcher == "python":
        assert nproc == 1
        return [PY, "-m", "disttrain.train"]
    if launcher == "accelerate":
        cfgfile = LAUNCH / ("cpu-multi.yaml" if nproc > 1 else "cpu.yaml")
        return [ACCELERATE, "launch", "--config_file", str(cfgfile), "--num_processes", str(nproc),
                "--main_process_port", str(free_port()), "-m", "disttrain.train"]
    if launcher == "torchrun":
        return [TORCHRUN, "--nproc_per_node", str(nproc), "--master_port", str(free_port()), "-m", "disttrain.train"]
    raise ValueError(launcher)


def run(cmd: list[str], timeout: float = 300, **kw) -> subprocess.CompletedProcess:
    kw.setdefault("env", env())
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_idx(folder: Path, n_train: int = 256, n_test: int = 64, size: int = 28, seed: int = 0,
              gz: bool = False) -> None:
    """Tiny learnable Fashion-MNIST-format IDX files (class k draws a bright bar at row 2k)."""
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        y = torch.randint(0, 10, (n,), generator=g, dtype=torch.int64)
        x = torch.randint(0, 60, (n, size, size), generator=g, dtype=torch.int64)
        for i, k in enumerate(y.tolist()):
            x[i, 2 * k + 4: 2 * k + 6, 4:24] = 250
        images = struct.pack(">IIII", 2051, n, size, size) + x.to(torch.uint8).numpy().tobytes()
        labels = struct.pack(">II", 2049, n) + y.to(torch.uint8).numpy().tobytes()
        for name, blob in ((f"{prefix}-images-idx3-ubyte", images), (f"{prefix}-labels-idx1-ubyte", labels)):
            if gz:
                with gzip.open(folder / f"{name}.gz", "wb") as f:
                    f.write(blob)
            else:
                (folder / name).write_bytes(blob)


@pytest.fixture
def fmnist_dir(tmp_path) -> Path:
    """A data dir holding tiny IDX files where torchvision's FashionMNIST looks for them."""
    d = tmp_path / "data"
    write_idx(d / "FashionMNIST" / "raw")
    return d


def cuda_only(fn):
    return pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")(pytest.mark.gpu(fn))


# ---- run-directory readers shared by the checkpoint and resume tests
def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    """The exported final model of a run."""
    from safetensors.torch import load_file

    return load_file(str(run_dir / "model.safetensors"))


def bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def records(run_dir: Path) -> list[dict]:
    """metrics.jsonl as a list of records."""
    import json

    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
