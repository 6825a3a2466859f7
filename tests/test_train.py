"""train.py end to end on one process: run directory, metrics, evaluate, the tutorial loop."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from conftest import PY, run
from safetensors.torch import load_file

from disttrain.evaluate import main as evaluate_main
from disttrain.train import main

SYN = ["--dataset", "synthetic_classification", "--model", "mlp", "--no-progress"]


def metrics(run_dir):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_short_run_converges_and_writes_the_run_dir(tmp_path):
    out = tmp_path / "run"
    assert main(SYN + ["--epochs", "3", "--output-dir", str(out), "--log-every", "10"]) == 0
    names = {p.name for p in out.iterdir()}
    assert {"config.yaml", "metrics.jsonl", "model.safetensors", "model.json", "checkpoints"} <= names
    m = metrics(out)
    epochs = [r for r in m if r["kind"] == "epoch"]
    assert [r["epoch"] for r in epochs] == [1, 2, 3] and [r["step"] for r in epochs] == [32, 64, 96]
    assert epochs[-1]["eval_accuracy"] > 0.9 and epochs[-1]["train_loss"] < epochs[0]["train_loss"]
    for r in epochs:
        assert {"train_loss", "eval_loss", "eval_accuracy", "lr", "samples_per_sec", "elapsed_s"} <= set(r)
    steps = [r for r in m if r["kind"] == "step"]
    assert [r["step"] for r in steps] == list(range(10, 97, 10))
    assert {"train_loss", "lr", "samples_per_sec", "epoch"} <= set(steps[0])
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["dataset"] == "synthetic_classification" and saved["lr"] == 1e-3 and saved["mixed_precision"] == "no"
    sd = load_file(str(out / "model.safetensors"))
    assert set(sd) == set(build_reference_keys())


def build_reference_keys():
    from disttrain.data import DataSpec
    from disttrain.models import build_model

    return build_model("mlp", {}, DataSpec("classification", [16], 4)).state_dict().keys()


def test_evaluate_reproduces_final_metrics(tmp_path, fmnist_dir, capsys):
    out = tmp_path / "run"
    args = ["--data-dir", str(fmnist_dir), "--epochs", "2", "--batch-size", "32", "--output-dir", str(out),
            "--no-progress", "--model-kwargs", '{"width": 4}']
    assert main(args) == 0
    last = [r for r in metrics(out) if r["kind"] == "epoch"][-1]
    for target in (out, out / "model.safetensors"):
        assert evaluate_main(["--checkpoint", str(target), "--json", str(tmp_path / "e.json")]) == 0
        res = json.loads((tmp_path / "e.json").read_text())
        assert res["eval_loss"] == pytest.approx(last["eval_loss"], rel=1e-6)
        assert res["eval_accuracy"] == last["eval_accuracy"]
        assert len(res["confusion_matrix"]) == 10 and sum(map(sum, res["confusion_matrix"])) == 64
    ckpt = sorted((out / "checkpoints").glob("step_*"))[-1]
    assert evaluate_main(["--checkpoint", str(ckpt)]) == 0
    assert "confusion matrix" in capsys.readouterr().out


def test_tutorial_linear_regression_matches_the_hand_loop(tmp_path):
    """The PyTorch linear-regression tutorial: full-batch SGD lr 0.01, L1 loss."""
    out = tmp_path / "run"
    epochs = 30
    assert main(["--dataset", "plugins_for_tests:tutorial_data", "--model", "plugins_for_tests:tutorial_linear",
                 "--optimizer", "sgd", "--lr", "0.01", "--loss", "l1", "--batch-size", "40", "--epochs", str(epochs),
                 "--output-dir", str(out), "--no-progress", "--seed", "42"]) == 0
    from plugins_for_tests import tutorial_data, tutorial_linear

    train, test = tutorial_data("")
    (x, y), (xt, yt) = train.tensors, test.tensors
    model = tutorial_linear()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    loss_fn = torch.nn.L1Loss()
    hand = []
    for _ in range(epochs):
        model.train()
        loss = loss_fn(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        model.eval()
        with torch.inference_mode():
            hand.append((loss.item(), loss_fn(model(xt), yt).item()))
    ours = [(r["train_loss"], r["eval_loss"]) for r in metrics(out) if r["kind"] == "epoch"]
    assert [a for pair in ours for a in pair] == pytest.approx([a for pair in hand for a in pair], rel=1e-5, abs=1e-7)
    w = load_file(str(out / "model.safetensors"))
    assert torch.allclose(w["weight"], model.weight.detach()) and torch.allclose(w["bias"], model.bias.detach())


def test_max_steps_ends_with_an_epoch_line(tmp_path):
    out = tmp_path / "run"
    assert main(SYN + ["--epochs", "5", "--max-steps", "40", "--output-dir", str(out)]) == 0
    ep = [r for r in metrics(out) if r["kind"] == "epoch"]
    assert [r["step"] for r in ep] == [32, 40] and "eval_loss" in ep[-1]


def test_refuses_to_overwrite_and_overwrite_replaces(tmp_path):
    out = tmp_path / "run"
    assert main(SYN + ["--epochs", "1", "--output-dir", str(out)]) == 0
    assert main(SYN + ["--epochs", "1", "--output-dir", str(out)]) == 2
    assert main(SYN + ["--epochs", "1", "--output-dir", str(out), "--overwrite", "--lr", "0.01"]) == 0
    assert yaml.safe_load((out / "config.yaml").read_text())["lr"] == 0.01
    assert len([r for r in metrics(out) if r["kind"] == "epoch"]) == 1


def test_val_fraction_adds_val_metrics_and_best_uses_it(tmp_path):
    out = tmp_path / "run"
    assert main(SYN + ["--epochs", "2", "--val-fraction", "0.25", "--output-dir", str(out)]) == 0
    ep = [r for r in metrics(out) if r["kind"] == "epoch"]
    assert "val_loss" in ep[0] and "val_accuracy" in ep[0] and "eval_loss" in ep[0]
    best = json.loads((out / "checkpoints" / "best" / "best.json").read_text())
    assert best["metric"] == "val_loss" and best["value"] == min(r["val_loss"] for r in ep)


def test_subprocess_python_m_and_yaml_config(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("dataset: synthetic_regression\nmodel: linear\nlr: 1e-2\nepochs: 2\noptimizer: sgd\n")
    out = tmp_path / "run"
    p = run([PY, "-m", "disttrain.train", "--config", str(cfg), "--output-dir", str(out)], cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert "topology: 1 process(es)" in p.stdout and "Epoch [2/2]" in p.stdout
    assert yaml.safe_load((out / "config.yaml").read_text())["lr"] == 0.01
    bad = run([PY, "-m", "disttrain.train", "--lr", "-1", "--output-dir", str(tmp_path / "bad")], cwd=tmp_path)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == ["disttrain: error: --lr must be > 0, got -1.0"]
    assert not (tmp_path / "bad").exists()


def test_init_from_starts_from_weights(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(SYN + ["--epochs", "2", "--output-dir", str(a)]) == 0
    assert main(SYN + ["--epochs", "1", "--output-dir", str(b), "--init-from", str(a / "model.safetensors"),
                       "--lr", "1e-9"]) == 0
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert all(torch.allclose(wa[k], wb[k], atol=1e-5) for k in wa)
    assert [r["step"] for r in metrics(b) if r["kind"] == "epoch"] == [32]  # fresh step count
