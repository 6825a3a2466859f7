"""python -m disttrain.plot: PNG figures from metrics.jsonl, one run or several overlaid."""

from __future__ import annotations

import importlib.util
import json

import pytest

from disttrain import plot
from disttrain.train import main as train_main

pytest.importorskip("matplotlib")
Image = pytest.importorskip("PIL.Image")

FIGURES = ["loss.png", "loss_steps.png", "accuracy.png", "lr.png", "throughput.png", "overview.png"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One real tiny run, and a second run directory with a hand-written metrics.jsonl."""
    base = tmp_path_factory.mktemp("plot")
    real = base / "real_run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DISTTRAIN_OFFLINE", "1")
        assert train_main(["--dataset", "synthetic_classification", "--dataset-kwargs",
                           '{"n_train": 256, "n_eval": 64}', "--model", "linear", "--batch-size", "32",
                           "--epochs", "3", "--log-every", "2", "--scheduler", "cosine", "--no-progress",
                           "--output-dir", str(real)]) == 0
    fake = base / "other_run"
    _write_metrics(fake, losses=[2.0, 0.5, 0.01], acc=[0.3, 0.8, 0.99])
    return real, fake


def _write_metrics(d, losses, acc=None):
    d.mkdir(parents=True)
    lines = []
    for e, loss in enumerate(losses, 1):
        for s in range(1, 5):
            lines.append({"kind": "step", "epoch": e, "step": (e - 1) * 4 + s, "train_loss": loss * (1.2 - 0.05 * s),
                          "lr": 0.1, "samples_per_sec": 1000.0})
        rec = {"kind": "epoch", "epoch": e, "step": 4 * e, "train_loss": loss, "eval_loss": loss * 1.1,
               "lr": 0.1, "samples_per_sec": 1000.0, "elapsed_s": 10.0 * e}
        if acc:
            rec["eval_accuracy"] = acc[e - 1]
        lines.append(rec)
    (d / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))


def _check_png(path):
    assert path.is_file() and path.stat().st_size > 0
    with Image.open(path) as im:
        im.load()
        assert im.format == "PNG" and im.size[0] > 100 and im.size[1] > 100


def test_plot_one_run(runs, capsys):
    real, _ = runs
    assert plot.main([str(real)]) == 0
    printed = capsys.readouterr().out.split()
    for name in FIGURES:
        _check_png(real / "plots" / name)
        assert str(real / "plots" / name) in printed


def test_plot_overlay_two_runs(runs, tmp_path):
    real, fake = runs
    out = tmp_path / "cmp"
    assert plot.main([str(real), str(fake), "--out", str(out)]) == 0
    for name in FIGURES:
        _check_png(out / name)
    assert not (fake / "plots").exists()


def test_overlay_legend_names_each_run(runs):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = [plot.load_run(r) for r in runs]
    plot._unique_names(curves)
    fig, ax = plt.subplots()
    assert plot.plot_loss_epochs(ax, curves, "epoch")
    plot._finish_axes(ax)
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    plt.close(fig)
    assert "real_run: train loss" in labels and "other_run: eval loss" in labels
    assert ax.get_title() and ax.get_xlabel() == "epoch" and ax.get_ylabel() == "loss"


def test_log_scale_only_for_wide_losses(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    _write_metrics(tmp_path / "wide", losses=[2.0, 0.2, 0.01])  # > 1.5 decades
    _write_metrics(tmp_path / "narrow", losses=[0.9, 0.7, 0.5])
    for name, scale in (("wide", "log"), ("narrow", "linear")):
        fig, ax = plt.subplots()
        plot.plot_loss_epochs(ax, [plot.load_run(tmp_path / name)], "epoch")
        assert ax.get_yscale() == scale, name
        plt.close(fig)


def test_plot_elapsed_axis_and_regression_run(tmp_path):
    run = tmp_path / "reg"
    _write_metrics(run, losses=[1.0, 0.5, 0.2])  # no accuracy: a regression run
    assert plot.main([str(run), "--x", "elapsed"]) == 0
    names = sorted(p.name for p in (run / "plots").iterdir())
    assert "loss_elapsed.png" in names and "overview_elapsed.png" in names
    assert not any(n.startswith("accuracy") for n in names)
    for n in names:
        _check_png(run / "plots" / n)


def test_plot_errors_are_one_line(tmp_path, monkeypatch, capsys):
    assert plot.main([str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "metrics.jsonl" in err[0]
    _write_metrics(tmp_path / "r", losses=[1.0])
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a, **k: None if name == "matplotlib" else real(name, *a, **k))
    assert plot.main([str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "matplotlib is not installed" in err[0] and "disttrain[plot]" in err[0]
    assert not (tmp_path / "r" / "plots").exists()
