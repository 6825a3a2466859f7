"""state.py: what a checkpoint holds, and resuming the way users resume (saved config, run directory,
dry run, metrics that read as one run, extending a finished run)."""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import bitwise_equal, records, weights

from disttrain.train import main

ARGS = ["--dataset", "plugins_for_tests:indexed_data", "--model", "plugins_for_tests:dropout_mlp", "--no-progress",
        "--batch-size", "16", "--dataset-kwargs", '{"n_train": 150}', "--save-every-steps", "3",
        "--keep-last", "100"]


def killed_copy(run, step: int, dest):
    """`run` as a kill -9 right after its step-`step` checkpoint would have left it."""
    shutil.copytree(run, dest)
    for d in (dest / "checkpoints").iterdir():
        if d.name == "best" or d.name.startswith("step_") and int(d.name[5:]) > step:
            shutil.rmtree(d)
    for name in ("model.safetensors", "status.json", "summary.json"):
        (dest / name).unlink(missing_ok=True)
    return dest


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """2 epochs of 10 steps, a one-cycle schedule, step lines every 4 steps, checkpoints every 3."""
    out = tmp_path_factory.mktemp("ref") / "run"
    assert main(ARGS + ["--epochs", "2", "--scheduler", "onecycle", "--log-every", "4", "--output-dir", str(out)]) == 0
    return out


def test_resume_auto_continues_with_the_saved_config(tmp_path, reference, capsys):
    out = killed_copy(reference, 6, tmp_path / "run")
    capsys.readouterr()
    assert main(["--resume", "auto", "--output-dir", str(out)]) == 0  # no other flag: R's own settings
    stdout = capsys.readouterr().out
    assert f"resume: continuing {out} with its saved config" in stdout and "no setting changed" in stdout
    assert "resumed from" in stdout and "step_00000006" in stdout
    assert "mixed precision no (the resumed run's setting)" in stdout  # not "(--mixed-precision)": no flag given
    assert bitwise_equal(weights(out), weights(reference))  # 2 epochs, one-cycle over 20 steps, as saved
    assert [r["step"] for r in records(out) if r["kind"] == "epoch"] == [10, 20]
    # an explicit flag changes only its key, and one line says so
    out2 = killed_copy(reference, 6, tmp_path / "run2")
    assert main(["--resume", "auto", "--output-dir", str(out2), "--epochs", "3", "--log-every", "5"]) == 0
    assert "changed: epochs: 2 -> 3, log_every: 4 -> 5" in capsys.readouterr().out
    assert [r["step"] for r in records(out2) if r["kind"] == "epoch"] == [10, 20, 30]


def test_resume_auto_without_output_dir_is_an_error(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(ARGS + ["--resume", "auto"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--resume auto needs --output-dir" in err
    assert list(tmp_path.iterdir()) == []


def test_resume_path_continues_in_its_run_dir_or_starts_one_that_reads_as_one_run(tmp_path, reference, capsys):
    out = killed_copy(reference, 9, tmp_path / "run")
    assert main(["--resume", str(out / "checkpoints" / "step_00000009")]) == 0  # continues in `out`
    assert bitwise_equal(weights(out), weights(reference))
    src = killed_copy(reference, 9, tmp_path / "src")
    other = tmp_path / "other"
    assert main(["--resume", str(src / "checkpoints" / "step_00000009"), "--output-dir", str(other)]) == 0
    assert bitwise_equal(weights(other), weights(reference))
    lines = [r for r in records(other) if r["kind"] != "resume"]
    ref = records(reference)
    assert [(r["kind"], r["step"]) for r in lines] == [(r["kind"], r["step"]) for r in ref]
    assert not (src / "model.safetensors").exists()  # the source run is left as it was


def test_dry_run_says_whether_and_where_it_would_resume(tmp_path, reference, capsys):
    out = killed_copy(reference, 6, tmp_path / "run")
    capsys.readouterr()
    assert main(["--resume", "auto", "--output-dir", str(out), "--dry-run"]) == 0
    assert f"would resume from {out / 'checkpoints' / 'step_00000006'} at step 6" in capsys.readouterr().out
    assert main(ARGS + ["--resume", "auto", "--output-dir", str(tmp_path / "new"), "--dry-run"]) == 0
    assert "would start fresh" in capsys.readouterr().out


def test_metrics_across_a_resume_read_like_one_run(tmp_path, reference):
    out = killed_copy(reference, 6, tmp_path / "run")
    saved = json.loads((out / "checkpoints" / "step_00000006" / "state.json").read_text())["position"]
    assert saved["epoch_train_s"] > 0  # the epoch's training time so far is part of the position
    assert main(["--resume", "auto", "--output-dir", str(out)]) == 0
    got, ref = records(out), records(reference)
    # the first step line after the resume (step 8) covers steps 5-8, as in the uninterrupted run
    step8 = [next(r for r in rs if r["kind"] == "step" and r["step"] == 8) for rs in (got, ref)]
    assert step8[0]["train_loss"] == step8[1]["train_loss"]
    epoch1 = next(r for r in got if r["kind"] == "epoch")
    # samples/s of the epoch that holds the resume: its 150 samples over all of its training time
    assert epoch1["samples_per_sec"] <= 150 / saved["epoch_train_s"]
    assert epoch1["elapsed_s"] >= saved["elapsed_s"]


def test_extending_a_finished_run_with_more_steps_is_bitwise(tmp_path):
    """Dropout and evaluation data that draws random numbers (noisy_data: read in this process)."""
    args = ["--dataset", "plugins_for_tests:noisy_data", "--model", "plugins_for_tests:dropout_mlp", "--no-progress",
            "--batch-size", "16", "--dataset-kwargs", '{"n_train": 150}', "--num-workers", "0", "--epochs", "3"]
    long, short = tmp_path / "long", tmp_path / "short"
    assert main(args + ["--max-steps", "16", "--output-dir", str(long)]) == 0
    assert main(args + ["--max-steps", "7", "--output-dir", str(short)]) == 0
    assert main(["--resume", "auto", "--output-dir", str(short), "--max-steps", "16"]) == 0
    assert bitwise_equal(weights(short), weights(long))
