"""On one NVIDIA GPU (`pytest -m gpu`, run by benchmarks/gpu_check.sh): training on cuda, fp16 with the grad
scaler, bf16, `auto`, channels_last, compile, kill -9 + bitwise resume with deterministic algorithms, and the
data kept on the device. Skipped without CUDA; the GPU path is verified by review until a GPU runs it
(docs/performance.md). The no-CUDA path of gpu_check.sh is tested here too (it runs everywhere)."""

from __future__ import annotations

import json
import math
import signal
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import PY, REPO, cuda_only, env, run
from safetensors.torch import load_file

from disttrain.config import parse_config
from disttrain.distributed import StopSignal

SMALL = ["--model-kwargs", '{"width": 8}', "--batch-size", "32", "--epochs", "1", "--no-progress", "--overwrite"]

DETERMINISTIC_PLUGIN = '''
import torch
from disttrain.models import BUILTIN

def det_cnn(input_shape, num_outputs):
    torch.use_deterministic_algorithms(True)  # with CUBLAS_WORKSPACE_CONFIG (set by the test)
    torch.backends.cudnn.benchmark = False
    return BUILTIN["cnn"](input_shape, num_outputs, width=8)
'''


def _setup(tmp_path: Path, fmnist_dir: Path, *extra: str):
    from disttrain.train import setup

    cfg = parse_config(["--data-dir", str(fmnist_dir), "--output-dir", str(tmp_path / "r"), *SMALL, *extra])
    return setup(cfg, StopSignal())


def _train(r) -> list[dict]:
    from disttrain.train import finish, release, train

    try:
        train(r)
        finish(r)
    finally:
        release(r)
    return [json.loads(s) for s in (r.rundir.path / "metrics.jsonl").read_text().splitlines()]


@cuda_only
@pytest.mark.parametrize("precision", ["no", "bf16", "fp16", "auto"])
def test_trains_on_cuda(tmp_path, fmnist_dir, capsys, precision):
    if precision == "bf16" and not torch.cuda.is_bf16_supported(including_emulation=False):
        pytest.skip("this GPU has no native bf16")
    r = _setup(tmp_path, fmnist_dir, "--mixed-precision", precision)
    assert r.acc.device.type == "cuda"
    want = {"auto": "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16"}.get(precision,
                                                                                                      precision)
    assert r.acc.mixed_precision == want and r.cfg.mixed_precision == want
    assert (getattr(r.acc, "scaler", None) is not None) == (want == "fp16")  # fp16 steps through the scaler
    seen = []
    last = [m for m in r.acc.unwrap_model(r.model).modules() if isinstance(m, torch.nn.Linear)][-1]
    last.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    recs = _train(r)
    half = {"bf16": torch.bfloat16, "fp16": torch.float16, "no": torch.float32}[want]
    assert seen and seen[0] == half  # autocast really ran the last linear layer in that precision
    assert math.isfinite([d for d in recs if d["kind"] == "epoch"][-1]["eval_loss"])
    w = load_file(str(tmp_path / "r" / "model.safetensors"))
    assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in w.values())  # fp32 master weights
    if want == "fp16":
        step = sorted((tmp_path / "r" / "checkpoints").glob("step_*"))[-1]
        assert (step / "scaler.json").is_file()
    assert "device cuda" in capsys.readouterr().out


@cuda_only
def test_data_and_channels_last_on_the_device(tmp_path, fmnist_dir):
    r = _setup(tmp_path, fmnist_dir)
    x, y = next(iter(next(r.data.train_windows(0))))
    assert x.device.type == "cuda" and y.device.type == "cuda"  # batches are gathered on the GPU, no copies
    assert r.data.train.x.device.type == "cuda"  # the whole (uint8) set lives there
    assert x.is_contiguous(memory_format=torch.channels_last)
    conv = next(m for m in r.acc.unwrap_model(r.model).modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    _train(r)


@cuda_only
def test_compile_on_cuda(tmp_path, fmnist_dir):
    r = _setup(tmp_path, fmnist_dir, "--compile", "--epochs", "3", "--max-steps", "20")
    recs = _train(r)
    assert recs[-1]["kind"] == "epoch" and recs[-1]["step"] == 20


@cuda_only
def test_kill_9_and_resume_is_bitwise_on_cuda(tmp_path, fmnist_dir):
    """Deterministic algorithms (cuBLAS workspace config, no cuDNN autotuning): a run killed with SIGKILL
    right after a checkpoint and resumed ends bitwise equal to an uninterrupted one."""
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "det_models.py").write_text(DETERMINISTIC_PLUGIN)
    e = env(CUBLAS_WORKSPACE_CONFIG=":4096:8")
    e["PYTHONPATH"] = f"{plugins}:{e['PYTHONPATH']}"

    def cmd(out: Path, *extra: str) -> list[str]:
        return [PY, "-m", "disttrain.train", "--data-dir", str(fmnist_dir), "--model", "det_models:det_cnn",
                "--batch-size", "16", "--epochs", "2", "--save-every-steps", "5", "--no-progress",
                "--output-dir", str(out), *extra]

    ref, out = tmp_path / "ref", tmp_path / "killed"
    assert run(cmd(ref), env=e).returncode == 0
    killed = run(cmd(out), env={**e, "DISTTRAIN_FAULT": "after-rename:10"})
    assert killed.returncode == -signal.SIGKILL
    p = run(cmd(out, "--resume", "auto"), env=e)
    assert p.returncode == 0, p.stderr[-2000:]
    a, b = load_file(str(ref / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


# --------------------------------------------------------------------------- gpu_check.sh without CUDA


@pytest.mark.skipif(torch.cuda.is_available(), reason="the no-CUDA path")
def test_gpu_check_without_cuda_says_so_and_exits_0(tmp_path):
    p = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), str(tmp_path / "out")],
                       capture_output=True, text=True, timeout=120, env={**env(), "PYTHON": PY})
    assert p.returncode == 0, p.stderr
    lines = p.stdout.strip().splitlines()
    assert len(lines) == 1 and "no CUDA" in lines[0] and "skipped" in lines[0], p.stdout
    assert not (tmp_path / "out").exists()  # nothing written


def test_gpu_summary_reads_the_tests_and_the_benchmark(tmp_path, monkeypatch, capsys):
    """The summary gpu_check.sh writes, from a JUnit file and a bench JSON (the device faked)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_summary", REPO / "benchmarks" / "gpu_summary.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    monkeypatch.setattr(mod, "device_info", lambda: {"name": "Fake GPU", "capability": "8.0", "memory_gib": 80.0,
                                                     "bf16_native": True, "torch": "x", "cuda": "y", "count": 1})
    (tmp_path / "gpu_tests.xml").write_text(
        '<testsuites><testsuite><testcase classname="tests.test_gpu" name="test_a"/>'
        '<testcase classname="tests.test_gpu" name="test_b"><failure message="boom"/></testcase>'
        '<testcase classname="tests.test_gpu" name="test_c"><skipped/></testcase></testsuite></testsuites>')
    bench = {"device": "cuda", "rounds": 2, "steps": 400, "batch_size": 64,
             "median": {"lenet": {"a": 5000.0, "b": 40000.0, "c": 38000.0, "c/a": 7.6, "c/b": 0.95}}}
    (tmp_path / "bench.json").write_text(json.dumps(bench))
    assert mod.main([str(tmp_path), "1", "0", "300"]) == 1  # a failed test fails the check
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["tests"]["failed"] == ["tests.test_gpu::test_b"] and report["tests"]["passed"] == 1
    assert report["bench"]["median"]["lenet"]["c/a"] == 7.6
    summary = (tmp_path / "summary.md").read_text()
    assert "FAILED tests.test_gpu::test_b" in summary and "| c/a | 7.60 |" in summary
    assert report["gpt_tokens_per_sec"] is None and "GPT tokens/s: no result" in summary
    lm = {"workload": "lm", "steps": 200, "batch_size": 64, "median": {"gpt": {"b": 9e5, "c": 1.0e6, "c/b": 1.11}}}
    (tmp_path / "bench_lm.json").write_text(json.dumps(lm))
    mod.main([str(tmp_path), "1", "0", "300"])
    assert json.loads((tmp_path / "gpu_check.json").read_text())["gpt_tokens_per_sec"]["c/b"] == 1.11
    assert "hand loop 900000, disttrain 1000000, disttrain / hand loop 1.11" in (tmp_path / "summary.md").read_text()
    (tmp_path / "gpu_tests.xml").write_text('<testsuites><testsuite><testcase classname="t" name="a"/>'
                                            '</testsuite></testsuites>')
    assert mod.main([str(tmp_path), "0", "0", "300"]) == 0
    assert capsys.readouterr().out.count("# GPU check: OK") == 1
