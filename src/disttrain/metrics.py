"""metrics.jsonl (main process only) and the console step line."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any


class MetricsLog:
    """Append-only JSON lines. On resume the lines written after the checkpoint are dropped, so after
    any number of resumes the file reads like one uninterrupted run (plus one "resume" line each)."""

    def __init__(self, path: Path, enabled: bool, tracker: Any = None):
        self.path, self.enabled, self.tracker = path, enabled, tracker
        self._f: Any = None

    def open(self, keep_lines: int) -> None:
        if not self.enabled:
            return
        lines = self.path.read_text().splitlines(keepends=True) if self.path.exists() else []
        lines = [ln if ln.endswith("\n") else ln + "\n" for ln in lines[:keep_lines]]
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text("".join(lines))
        os.replace(tmp, self.path)
        self._f = open(self.path, "a")

    def lines(self) -> int:
        """Lines written so far (stored in each checkpoint)."""
        if not self.enabled or not self.path.exists():
            return 0
        with open(self.path, "rb") as f:
            return sum(1 for _ in f)

    def write(self, record: dict[str, Any]) -> None:
        if self._f is not None:
            self._f.write(json.dumps(record) + "\n")
            self._f.flush()
        if self.tracker is not None and record["kind"] in ("step", "epoch"):
            values = {f"{record['kind']}/{k}": v for k, v in record.items()
                      if isinstance(v, (int, float)) and k not in ("step", "epoch") and math.isfinite(v)}
            self.tracker.log(values, step=record["step"])

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


def read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]


def step_line(epoch: int, epochs: int, step_in_epoch: int, steps_per_epoch: int, loss: float, lr: float,
              samples_per_sec: float, data_wait: float, tokens_per_sec: float | None = None) -> str:
    tokens = f" {tokens_per_sec:.0f} tokens/s" if tokens_per_sec is not None else ""
    return (f"Epoch [{epoch}/{epochs}] Step [{step_in_epoch}/{steps_per_epoch}] loss {loss:.4f} lr {lr:.3g} "
            f"{samples_per_sec:.0f} samples/s{tokens} data-wait {100 * data_wait:.0f}%")


def epoch_line(rec: dict[str, Any], epochs: int) -> str:
    parts = [f"Epoch [{rec['epoch']}/{epochs}] done: step {rec['step']}", f"train_loss {rec['train_loss']:.4f}"]
    for k in ("val_loss", "val_accuracy", "val_perplexity", "val_bits_per_char", "eval_loss", "eval_accuracy",
              "eval_perplexity", "eval_bits_per_char"):
        if k in rec:
            parts.append(f"{k} {rec[k]:.4f}")
    tokens = f", {rec['tokens_per_sec']:.0f} tokens/s" if "tokens_per_sec" in rec else ""
    parts.append(f"{rec['samples_per_sec']:.0f} samples/s{tokens}, {rec['elapsed_s']:.1f} s")
    return ", ".join(parts)
