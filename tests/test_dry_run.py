"""--dry-run: prints the plan (parameters, global batch, steps per epoch) and writes nothing to the output dir."""

from __future__ import annotations

import re

from disttrain.train import main


def test_dry_run_writes_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the default output dir (runs/...) is relative to the current directory
    out_dir = tmp_path / "out" / "run"
    args = ["--dataset", "synthetic_classification", "--model", "mlp", "--batch-size", "32", "--grad-accum", "2",
            "--epochs", "3", "--log-with", "tensorboard", "--dry-run"]
    assert main([*args, "--output-dir", str(out_dir)]) == 0
    assert not (tmp_path / "out").exists()
    out = capsys.readouterr().out
    assert re.search(r"mlp with [\d,]+ parameters", out), out
    assert "global batch 64" in out
    assert "32 steps/epoch" in out and "96 optimizer steps" in out  # 2048 samples / 64
    assert "nothing written" in out
    assert main(args) == 0  # default output dir
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_dry_run_leaves_an_existing_run_alone(tmp_path, fmnist_dir, capsys):
    run = tmp_path / "run"
    common = ["--dataset", "fashion_mnist", "--data-dir", str(fmnist_dir), "--model", "linear", "--epochs", "1",
              "--no-progress", "--output-dir", str(run)]
    assert main(common) == 0
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*")}
    capsys.readouterr()
    assert main([*common, "--epochs", "2", "--resume", "auto", "--dry-run"]) == 0
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*")} == before
    assert "nothing written" in capsys.readouterr().out
