"""Real multi-process runs on CPU (gloo), launched the way users launch them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import PY, cuda_only, env, run, train_cmd
from safetensors.torch import load_file

from disttrain.distributed import make_accelerator
from disttrain.config import Config

pytestmark = pytest.mark.slow

DATA = ["--dataset", "plugins_for_tests:indexed_data", "--model", "plugins_for_tests:recording", "--no-progress"]


def launch(cmd_prefix, args, out, **extra_env):
    p = run(cmd_prefix + DATA + args + ["--output-dir", str(out)], env=env(**extra_env))
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    return p


def epochs(out):
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"epoch"' in x and
            json.loads(x)["kind"] == "epoch"]


def recorded(folder, rank):
    return [[int(i) for i in ln.split(",")] for ln in (folder / f"rank{rank}.txt").read_text().splitlines()]


@pytest.mark.parametrize("launcher", ["accelerate", "torchrun"])
def test_each_sample_once_per_epoch_and_global_batches_match(tmp_path, launcher):
    rec2, rec1 = tmp_path / "rec2", tmp_path / "rec1"
    rec2.mkdir(), rec1.mkdir()
    args = ["--epochs", "2", "--batch-size", "16", "--dataset-kwargs", '{"n_train": 200}']
    p = launch(train_cmd(2, launcher), args, tmp_path / "two", DISTTRAIN_TEST_RECORD=str(rec2))
    assert "topology: 2 process(es)" in p.stdout and "backend gloo" in p.stdout
    assert "gradients averaged by shared memory" in p.stdout  # one machine: not gloo's TCP round trips
    assert p.stdout.count("topology:") == 1  # printed by the main process only
    r0, r1 = recorded(rec2, 0), recorded(rec2, 1)
    per_epoch = 7  # ceil(100 / 16) micro-batches per rank
    assert len(r0) == len(r1) == 2 * per_epoch
    for e in range(2):
        seen = [i for b in r0[e * per_epoch:(e + 1) * per_epoch] + r1[e * per_epoch:(e + 1) * per_epoch] for i in b]
        assert sorted(seen) == list(range(200))  # every sample exactly once per epoch
    args1 = ["--epochs", "2", "--batch-size", "32", "--dataset-kwargs", '{"n_train": 200}']
    launch([PY, "-m", "disttrain.train"], args1, tmp_path / "one", DISTTRAIN_TEST_RECORD=str(rec1))
    one = recorded(rec1, 0)
    assert [sorted(b) for b in one] == [sorted(a + b) for a, b in zip(r0, r1)]  # global batch k == batch k
    assert r0[:per_epoch] != r0[per_epoch:]  # reshuffled each epoch


def test_three_way_equivalence_lr_and_exact_eval(tmp_path):
    """1 x 32 == 2 x 16 == 1 x 16 x grad-accum 2 (no batch norm, momentum, shuffling, a partial last window)."""
    common = ["--epochs", "3", "--optimizer", "sgd", "--lr", "0.05", "--momentum", "0.9", "--scheduler", "cosine",
              "--warmup-steps", "5", "--dataset-kwargs", '{"n_train": 1000, "n_eval": 51}']
    a, b, c, g = tmp_path / "a", tmp_path / "b", tmp_path / "c", tmp_path / "g"
    shm_before = set(Path("/dev/shm").glob("disttrain-grads-*"))
    launch([PY, "-m", "disttrain.train"], common + ["--batch-size", "32"], a)
    launch(train_cmd(2, "accelerate"), common + ["--batch-size", "16"], b)
    launch([PY, "-m", "disttrain.train"], common + ["--batch-size", "16", "--grad-accum", "2"], c)
    launch(train_cmd(2, "accelerate"), common + ["--batch-size", "16", "--no-shm-allreduce"], g)
    wa, wb, wc, wg = (load_file(str(d / "model.safetensors")) for d in (a, b, c, g))
    assert all(torch.equal(wb[k], wg[k]) for k in wb)  # shared-memory averaging is bitwise gloo's, 2 ranks
    assert set(Path("/dev/shm").glob("disttrain-grads-*")) == shm_before  # the mapping is unlinked at start
    diff_ab = max((wa[k] - wb[k]).abs().max().item() for k in wa)
    diff_ac = max((wa[k] - wc[k]).abs().max().item() for k in wa)
    print(f"max abs diff: 1x32 vs 2x16 {diff_ab:.3g}, 1x32 vs 1x16x2 {diff_ac:.3g}")
    assert diff_ab < 1e-5 and diff_ac < 1e-5
    assert max(abs(v).max().item() for v in wa.values()) > 0.1  # weights really moved
    ea, eb, ec = epochs(a), epochs(b), epochs(c)
    assert [r["lr"] for r in ea] == [r["lr"] for r in eb] == [r["lr"] for r in ec]  # LR depends on steps only
    assert [r["step"] for r in ea] == [r["step"] for r in eb] == [r["step"] for r in ec] == [32, 64, 96]
    for x, y in ((ea, eb), (ea, ec)):  # train_loss is the mean over all ranks' samples
        assert [r["train_loss"] for r in x] == pytest.approx([r["train_loss"] for r in y], rel=1e-5)
    # exact evaluation on an uneven eval set (51 samples, 2 ranks): same as one process on the same weights
    res = tmp_path / "e.json"
    p = run([PY, "-m", "disttrain.evaluate", "--checkpoint", str(b), "--trust-plugins", "--json", str(res)])
    assert p.returncode == 0, p.stderr
    ev = json.loads(res.read_text())
    assert ev["samples"] == 51 and ev["eval_loss"] == pytest.approx(eb[-1]["eval_loss"], rel=1e-6)
    assert ev["eval_accuracy"] == eb[-1]["eval_accuracy"]


def test_copies_trap_is_refused(tmp_path):
    """Two processes whose Accelerator is not told cpu=True would each train their own copy."""
    p = run(train_cmd(2, "torchrun") + DATA + ["--epochs", "1", "--output-dir", str(tmp_path / "x")],
            env=env(DISTTRAIN_FORCE_CPU="0"))
    assert p.returncode != 0
    assert "refusing to train independent copies" in p.stderr
    assert not (tmp_path / "x").exists()


def test_ten_consecutive_two_process_runs_exit_cleanly(tmp_path):
    codes = []
    for i in range(10):
        p = run(train_cmd(2, "torchrun") + ["--dataset", "synthetic_regression", "--model", "linear", "--max-steps",
                                            "2", "--epochs", "1", "--output-dir", str(tmp_path / f"r{i}")])
        codes.append((p.returncode, p.stderr[-300:] if p.returncode else ""))
    assert [c for c, _ in codes] == [0] * 10, codes


def _sync_bn_run(tmp_path, fmnist_dir):
    return run(train_cmd(2, "accelerate") + ["--data-dir", str(fmnist_dir), "--model-kwargs", '{"width": 4}',
                                             "--sync-batchnorm", "--max-steps", "3", "--output-dir", str(tmp_path / "r")])


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU behaviour")
def test_sync_batchnorm_is_refused_on_cpu(tmp_path, fmnist_dir):
    p = _sync_bn_run(tmp_path, fmnist_dir)
    assert p.returncode != 0 and "--sync-batchnorm needs GPUs" in p.stderr
    assert not (tmp_path / "r").exists()


@cuda_only
def test_sync_batchnorm_runs_on_gpus(tmp_path, fmnist_dir):
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    p = _sync_bn_run(tmp_path, fmnist_dir)
    assert p.returncode == 0, p.stderr[-2000:]


def test_bf16_really_autocasts_on_cpu():
    acc = make_accelerator(Config(), "bf16")
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    seen = []
    model[0].register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    model = acc.prepare(model)
    model(torch.randn(3, 4))
    assert seen == [torch.bfloat16]
    assert all(p.dtype == torch.float32 for p in acc.unwrap_model(model).parameters())  # weights stay fp32


def test_precision_from_launch_config_unless_the_flag_overrides(monkeypatch):
    from disttrain.distributed import resolve_precision
    from disttrain.errors import UsageError

    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")  # what `accelerate launch` exports from its config
    assert resolve_precision(Config()) == ("bf16", "the launch config")
    assert resolve_precision(Config(mixed_precision="no")) == ("no", "--mixed-precision")
    if not torch.cuda.is_available():
        monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")
        with pytest.raises(UsageError, match="fp16 needs a GPU"):
            resolve_precision(Config())


@cuda_only
def test_fp16_uses_a_grad_scaler_on_gpu(tmp_path):
    from disttrain.train import main

    out = tmp_path / "r"
    assert main(["--dataset", "synthetic_classification", "--model", "mlp", "--epochs", "1", "--mixed-precision",
                 "fp16", "--output-dir", str(out)]) == 0
    step = sorted((out / "checkpoints").glob("step_*"))[-1]
    assert (step / "scaler.json").is_file()
    assert all(v.dtype == torch.float32 for v in load_file(str(out / "model.safetensors")).values())


def test_batchnorm_eval_on_two_processes_is_the_checkpoints_eval(tmp_path, fmnist_dir):
    """Each rank's BN running statistics see only its own batches; evaluation first gives every rank rank 0's
    (those a checkpoint saves), so the epoch-end eval equals evaluating the saved model."""
    out, res = tmp_path / "r", tmp_path / "e.json"
    p = run(train_cmd(2, "accelerate") + ["--data-dir", str(fmnist_dir), "--model-kwargs", '{"width": 4}',
                                          "--epochs", "1", "--batch-size", "16", "--no-progress", "--overwrite",
                                          "--output-dir", str(out)])
    assert p.returncode == 0, p.stderr[-2000:]
    p = run([PY, "-m", "disttrain.evaluate", "--checkpoint", str(out), "--data-dir", str(fmnist_dir),
             "--json", str(res)])
    assert p.returncode == 0, p.stderr[-2000:]
    ev, last = json.loads(res.read_text()), epochs(out)[-1]
    assert ev["eval_loss"] == pytest.approx(last["eval_loss"], rel=1e-6)
    assert ev["eval_accuracy"] == last["eval_accuracy"]
