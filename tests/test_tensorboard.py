"""--log-with tensorboard: event files under <run>/tensorboard/ that agree with metrics.jsonl."""

from __future__ import annotations

import importlib.util
import json
import math

import pytest

from disttrain.train import main

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

SMALL = ["--dataset", "synthetic_classification", "--dataset-kwargs", '{"n_train": 256, "n_eval": 64}',
         "--model", "linear", "--batch-size", "32", "--log-every", "2", "--no-progress", "--log-with", "tensorboard"]


def _scalars(logdir) -> dict[str, dict[int, float]]:
    ea = EventAccumulator(str(logdir), size_guidance={"scalars": 0})
    ea.Reload()
    return {tag: [(e.step, e.value) for e in ea.Scalars(tag)] for tag in ea.Tags()["scalars"]}


def _metrics(run) -> list[dict]:
    return [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines() if ln.strip()]


def _check_agree(run) -> dict[str, dict[int, float]]:
    tb = _scalars(run / "tensorboard")
    recs = [r for r in _metrics(run) if r["kind"] in ("step", "epoch")]
    for kind in ("step", "epoch"):
        lines = [r for r in recs if r["kind"] == kind]
        assert lines
        for key in lines[0]:
            if key in ("kind", "step", "epoch"):
                continue
            tag = f"{kind}/{key}"
            assert tag in tb, (tag, sorted(tb))
            assert sorted(s for s, _ in tb[tag]) == [r["step"] for r in lines], tag  # one event per line
            for (_, v), r in zip(sorted(tb[tag]), lines):
                assert math.isclose(v, r[key], rel_tol=1e-6, abs_tol=1e-7), (tag, r["step"])
    return tb


def test_tensorboard_events_match_metrics(tmp_path):
    run = tmp_path / "run"
    assert main([*SMALL, "--epochs", "2", "--output-dir", str(run)]) == 0
    assert (run / "tensorboard").is_dir()
    assert list((run / "tensorboard").rglob("events.out.tfevents.*"))
    tb = _check_agree(run)
    for tag in ("step/train_loss", "step/lr", "step/samples_per_sec", "epoch/train_loss", "epoch/eval_loss",
                "epoch/eval_accuracy", "epoch/lr", "epoch/samples_per_sec", "epoch/elapsed_s"):
        assert tag in tb, tag
    assert [s for s, _ in tb["epoch/eval_loss"]] == [8, 16]


def test_tensorboard_resume_purges_orphaned_events(tmp_path):
    """Events logged after the checkpoint a run resumes from are hidden, like the lines in metrics.jsonl."""
    run = tmp_path / "run"
    assert main([*SMALL, "--epochs", "2", "--output-dir", str(run)]) == 0
    first = run / "checkpoints" / "step_00000008"
    assert first.is_dir()
    assert main([*SMALL, "--epochs", "2", "--output-dir", str(run), "--resume", str(first)]) == 0
    tb = _check_agree(run)  # no step logged twice
    assert [s for s, _ in tb["epoch/eval_loss"]] == [8, 16]


def test_tensorboard_missing_is_one_line_error(tmp_path, monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a, **k: None if name == "tensorboard" else real(name, *a, **k))
    run = tmp_path / "run"
    assert main([*SMALL, "--epochs", "1", "--output-dir", str(run)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "tensorboard" in err[0] and "not installed" in err[0], err
    assert not run.exists()
