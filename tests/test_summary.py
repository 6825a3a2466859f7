"""summary.json at the end of a run: agrees with metrics.jsonl; bookkeeping and provenance."""

from __future__ import annotations

import json
import socket

import accelerate
import pytest
import torch

import disttrain
from disttrain.train import main

SMALL = ["--dataset", "synthetic_classification", "--dataset-kwargs", '{"n_train": 256, "n_eval": 64}',
         "--model", "linear", "--batch-size", "32", "--no-progress"]


def _lines(run) -> list[dict]:
    return [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines() if ln.strip()]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    run = tmp_path_factory.mktemp("summary") / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DISTTRAIN_OFFLINE", "1")
        assert main([*SMALL, "--epochs", "3", "--lr", "0.05", "--output-dir", str(run)]) == 0
    return run


def test_summary_agrees_with_metrics(trained):
    s = json.loads((trained / "summary.json").read_text())
    epochs = [r for r in _lines(trained) if r["kind"] == "epoch"]
    assert s["final"] == {k: v for k, v in epochs[-1].items() if k != "kind"}
    assert s["steps"] == epochs[-1]["step"] == 24 and s["epochs"] == 3
    assert s["elapsed_s"] == epochs[-1]["elapsed_s"] <= s["finished_elapsed_s"]
    for key, pick in (("eval_loss", min), ("train_loss", min), ("eval_accuracy", max)):
        best = pick(epochs, key=lambda e: e[key])
        assert s["best"][key]["value"] == best[key]
        assert s["best"][key]["value"] == pick(e[key] for e in epochs)
    assert s["best_checkpoint"]["metric"] == "eval_loss"
    assert s["best_checkpoint"]["value"] == s["best"]["eval_loss"]["value"]
    # one epoch line per epoch at a constant batch: the run's rate lies between the epochs' rates
    rates = [e["samples_per_sec"] for e in epochs]
    assert min(rates) <= s["train_samples_per_sec"] <= max(rates)
    assert s["global_batch"] == 32


def test_summary_bookkeeping_and_provenance(trained):
    s = json.loads((trained / "summary.json").read_text())
    assert s["checkpoints"]["written"] == 3 and s["resumes"] == 0
    assert s["checkpoints"]["kept"] == sorted((p.name for p in (trained / "checkpoints").glob("step_*")), reverse=True)
    assert s["model_file"].endswith("model.safetensors")
    p = s["provenance"]
    assert p["disttrain"] == disttrain.__version__ and p["torch"] == torch.__version__
    assert p["accelerate"] == accelerate.__version__
    assert p["world_size"] == 1 and p["hosts"] == [socket.gethostname()] and p["main_host"] == socket.gethostname()
    assert isinstance(p["argv"], list) and isinstance(p["command"], str)
    if p["git"] is not None:
        assert len(p["git"]["commit"]) == 40


def test_summary_after_resume(tmp_path, capsys):
    run = tmp_path / "run"
    assert main([*SMALL, "--epochs", "1", "--output-dir", str(run)]) == 0
    assert main([*SMALL, "--epochs", "2", "--output-dir", str(run), "--resume", "auto"]) == 0
    s = json.loads((run / "summary.json").read_text())
    epochs = [r for r in _lines(run) if r["kind"] == "epoch"]
    assert len(epochs) == 2
    assert s["final"] == {k: v for k, v in epochs[-1].items() if k != "kind"}
    assert s["resumes"] == 1 and s["checkpoints"]["written"] == 2
    out = capsys.readouterr().out
    assert "summary:" in out and "1 resume(s)" in out and str(run / "summary.json") in out
