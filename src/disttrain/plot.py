"""`python -m disttrain.plot RUN_DIR [RUN_DIR ...] [--out DIR] [--x epoch|elapsed]`: PNG figures from metrics.jsonl.

Figures (one run, or several overlaid with the run directory names in the legend):
  loss.png        train (solid) and eval/val (dashed/dotted) loss per epoch
  loss_steps.png  train loss at every step line, eval loss at epoch ends (markers)
  accuracy.png    eval/val accuracy per epoch (classification runs only)
  lr.png          learning rate per optimizer step
  throughput.png  training samples/s per step line
  overview.png    the first four in one 2x2 figure
With `--x elapsed` the per-epoch figures use wall time since the start of the run (time-to-accuracy curves)
and are named *_elapsed.png. Loss axes are logarithmic when the plotted losses span more than 1.5 decades.
Written into RUN_DIR/plots/ (the first run's with several runs) unless --out says otherwise.
matplotlib is the optional extra `plot`: pip install 'disttrain[plot]'.
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from disttrain.errors import EXIT_USAGE, UsageError, cut
from disttrain.metrics import read_metrics
from disttrain.safe_io import check_entry, write_atomic

LOG_DECADES = 1.5  # log-scale a loss axis when max/min exceeds 10**1.5
SPLITS = (("train", "-"), ("val", ":"), ("eval", "--"))


@dataclass
class RunCurves:
    name: str
    path: Path
    epochs: list[dict[str, Any]]
    steps: list[dict[str, Any]]


def load_run(path: str | Path) -> RunCurves:
    p = Path(path)
    metrics = p / "metrics.jsonl" if p.is_dir() else p
    if not (metrics.exists() or metrics.is_symlink()):
        raise UsageError(f"{path}: no metrics.jsonl there (expected a run directory)")
    try:
        recs = read_metrics(metrics)  # bounded, regular file only; UsageError naming the line
    except OSError as e:
        raise UsageError(f"{metrics}: unreadable ({e.strerror})") from None
    run_dir = metrics.parent
    epochs = [r for r in recs if r.get("kind") == "epoch"]
    steps = [r for r in recs if r.get("kind") == "step"]
    if not epochs and not steps:
        raise UsageError(f"{metrics}: no step or epoch lines yet")
    return RunCurves(run_dir.resolve().name or str(run_dir), run_dir, epochs, steps)


def _unique_names(runs: list[RunCurves]) -> None:
    """Legend labels: the run directory names, with parent folders added until they differ."""
    depth = 1
    while len({r.name for r in runs}) < len(runs) and depth < 6:
        depth += 1
        for r in runs:
            parts = r.path.resolve().parts
            r.name = "/".join(parts[-depth:])


def _series(rows: list[dict[str, Any]], x: str, y: str) -> tuple[list[float], list[float]]:
    pts = [(r[x], r[y]) for r in rows if isinstance(r.get(y), (int, float)) and isinstance(r.get(x), (int, float))
           and math.isfinite(r[y])]
    return [a for a, _ in pts], [b for _, b in pts]


def _log_if_wide(ax: Any, values: list[float]) -> None:
    pos = [v for v in values if v > 0]
    if pos and max(pos) / min(pos) > 10 ** LOG_DECADES:
        if len(pos) < len(values):  # exact zeros (a perfectly fit toy problem): keep them visible
            ax.set_yscale("symlog", linthresh=min(pos))
        else:
            ax.set_yscale("log")


def _x_label(x: str) -> str:
    return {"epoch": "epoch", "elapsed_s": "elapsed time (s)", "step": "optimizer step"}[x]


def _color(i: int) -> str:
    return f"C{i % 10}"


def _label(run: RunCurves, what: str, several: bool) -> str:
    return f"{run.name}: {what}" if several else what


def plot_loss_epochs(ax: Any, runs: list[RunCurves], x: str) -> bool:
    several, values, drawn = len(runs) > 1, [], False
    for i, run in enumerate(runs):
        for split, style in SPLITS:
            xs, ys = _series(run.epochs, x, f"{split}_loss")
            if ys:
                ax.plot(xs, ys, style, marker="o", ms=3, color=_color(i), label=_label(run, f"{split} loss", several))
                values += ys
                drawn = True
    ax.set_title("Loss per epoch" if x == "epoch" else "Loss vs elapsed time")
    ax.set_xlabel(_x_label(x))
    ax.set_ylabel("loss")
    _log_if_wide(ax, values)
    return drawn


def plot_loss_steps(ax: Any, runs: list[RunCurves]) -> bool:
    several, values, drawn = len(runs) > 1, [], False
    for i, run in enumerate(runs):
        xs, ys = _series(run.steps, "step", "train_loss")
        what = "train loss (step lines)"
        if not ys:  # no step lines (fewer steps than --log-every): the epoch means at the epochs' last steps
            (xs, ys), what = _series(run.epochs, "step", "train_loss"), "train loss (epoch means)"
        if ys:
            ax.plot(xs, ys, "-", lw=1, color=_color(i), label=_label(run, what, several))
            values += ys
            drawn = True
        for split, marker in (("val", "s"), ("eval", "o")):
            xs, ys = _series(run.epochs, "step", f"{split}_loss")
            if ys:
                ax.plot(xs, ys, "--", marker=marker, ms=5, color=_color(i),
                        label=_label(run, f"{split} loss (epoch ends)", several))
                values += ys
                drawn = True
    ax.set_title("Loss per optimizer step")
    ax.set_xlabel(_x_label("step"))
    ax.set_ylabel("loss")
    _log_if_wide(ax, values)
    return drawn


def plot_accuracy(ax: Any, runs: list[RunCurves], x: str) -> bool:
    several, drawn = len(runs) > 1, False
    for i, run in enumerate(runs):
        for split, style in (("val", ":"), ("eval", "-")):
            xs, ys = _series(run.epochs, x, f"{split}_accuracy")
            if ys:
                ax.plot(xs, ys, style, marker="o", ms=3, color=_color(i),
                        label=_label(run, f"{split} accuracy", several))
                drawn = True
    ax.set_title("Accuracy per epoch" if x == "epoch" else "Accuracy vs elapsed time (time to accuracy)")
    ax.set_xlabel(_x_label(x))
    ax.set_ylabel("accuracy")
    return drawn


def _per_step(run: RunCurves, key: str) -> tuple[list[float], list[float]]:
    """Step lines, or the epoch lines when a run logged no step lines (short epochs, large --log-every)."""
    xs, ys = _series(run.steps, "step", key)
    return (xs, ys) if ys else _series(run.epochs, "step", key)


def plot_lr(ax: Any, runs: list[RunCurves]) -> bool:
    drawn, values = False, []
    for i, run in enumerate(runs):
        xs, ys = _per_step(run, "lr")
        if ys:
            ax.plot(xs, ys, "-", color=_color(i), label=run.name)
            values += ys
            drawn = True
    ax.set_title("Learning rate")
    ax.set_xlabel(_x_label("step"))
    ax.set_ylabel("learning rate")
    _log_if_wide(ax, values)
    return drawn


def plot_throughput(ax: Any, runs: list[RunCurves]) -> bool:
    drawn = False
    for i, run in enumerate(runs):
        xs, ys = _per_step(run, "samples_per_sec")
        if ys:
            ax.plot(xs, ys, "-", color=_color(i), label=run.name)
            drawn = True
    ax.set_title("Training throughput")
    ax.set_xlabel(_x_label("step"))
    ax.set_ylabel("samples/s (all ranks)")
    ax.set_ylim(bottom=0)
    return drawn


def _finish_axes(ax: Any) -> None:
    from matplotlib.ticker import MaxNLocator

    if ax.get_xlabel() in ("epoch", "optimizer step"):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if ax.get_yscale() == "linear":
        ax.ticklabel_format(axis="y", useOffset=False)
    ax.grid(True, which="major", alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="small")


def make_plots(run_dirs: list[str | Path], out: str | Path | None = None, x: str = "epoch") -> list[Path]:
    """Write the figures; returns the paths written."""
    if importlib.util.find_spec("matplotlib") is None:
        raise UsageError("matplotlib is not installed; pip install 'disttrain[plot]'")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [load_run(p) for p in run_dirs]
    _unique_names(runs)
    xkey = {"epoch": "epoch", "elapsed": "elapsed_s"}[x]
    sfx = "" if x == "epoch" else "_elapsed"
    out_dir = Path(out) if out is not None else runs[0].path / "plots"
    if not check_entry(out_dir, "dir"):  # (a link or a file there is refused, never written through)
        try:
            out_dir.mkdir(parents=True)
        except OSError as e:
            raise UsageError(f"--out {out_dir}: cannot create it ({e.strerror})") from None
    title = runs[0].name if len(runs) == 1 else f"{len(runs)} runs"
    figures: list[tuple[str, Any]] = [
        (f"loss{sfx}.png", lambda ax: plot_loss_epochs(ax, runs, xkey)),
        ("loss_steps.png", lambda ax: plot_loss_steps(ax, runs)),
        (f"accuracy{sfx}.png", lambda ax: plot_accuracy(ax, runs, xkey)),
        ("lr.png", lambda ax: plot_lr(ax, runs)),
        ("throughput.png", lambda ax: plot_throughput(ax, runs)),
    ]
    written: list[Path] = []
    for name, draw in figures:
        fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
        if draw(ax):
            _finish_axes(ax)
            fig.suptitle(title, fontsize="small", color="0.4")
            fig.tight_layout()
            _save(fig, out_dir / name)
            written.append(out_dir / name)
        plt.close(fig)
    fig, axes = plt.subplots(2, 2, figsize=(12, 8), dpi=100)
    drawn = [draw(ax) for (_, draw), ax in zip(figures[:4], axes.flat)]
    for ax, ok in zip(axes.flat, drawn):
        if ok:
            _finish_axes(ax)
        else:
            ax.set_axis_off()
            ax.text(0.5, 0.5, "no data (regression run?)" if ax is axes.flat[2] else "no data",
                    ha="center", va="center", transform=ax.transAxes, color="0.5")
    fig.suptitle(title)
    fig.tight_layout()
    _save(fig, out_dir / f"overview{sfx}.png")
    plt.close(fig)
    written.append(out_dir / f"overview{sfx}.png")
    return written


def _save(fig: Any, path: Path) -> None:
    """A PNG written atomically, never through a link (safe_io.write_atomic)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    write_atomic(path, buf.getvalue())


def _parser() -> argparse.ArgumentParser:
    from disttrain.config import _Parser

    p = _Parser(prog="python -m disttrain.plot", allow_abbrev=False,
                description="Plot training curves from one or more run directories (metrics.jsonl).")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories; several are overlaid")
    p.add_argument("--out", help="output folder (default: <first run>/plots)")
    p.add_argument("--x", choices=("epoch", "elapsed"), default="epoch",
                   help="x axis of the per-epoch figures: epoch number or elapsed wall time (default epoch)")
    return p


def main(argv: list[str] | None = None) -> int:
    try:
        args = _parser().parse_args(argv)
        written = make_plots(args.runs, args.out, args.x)
    except UsageError as e:
        print(f"disttrain.plot: error: {cut(e)}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as e:
        print(f"disttrain.plot: error: cannot write the figures: {cut(e)}", file=sys.stderr)
        return 1
    for p in written:
        print(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
