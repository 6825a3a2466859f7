"""metrics.jsonl (main process only) and the console step line."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from disttrain.safe_io import (MAX_LINE, MAX_METRICS, UnsafeInput, check_entry, loads_json, open_append, read_bytes,
                               write_atomic)


class MetricsLog:
    """Append-only JSON lines. On resume the lines written after the checkpoint are dropped, so after
    any number of resumes the file reads like one uninterrupted run (plus one "resume" line each). The
    "restart" lines among them are kept: each records a failure that happened, even one whose attempt died
    before its first checkpoint."""

    def __init__(self, path: Path, enabled: bool, tracker: Any = None):
        self.path, self.enabled, self.tracker = path, enabled, tracker
        self._f: Any = None
        self._n = 0  # lines in the file

    def open(self, keep_lines: int, source: Path | None = None) -> None:
        """Keep the first `keep_lines` lines (of `source`, another run's log, when given) and append;
        atomically, never through a link, reading at most safe_io.MAX_METRICS bytes."""
        if not self.enabled:
            return
        src = source if source is not None else self.path
        raw = read_bytes(src, MAX_METRICS) if check_entry(src, "file") else b""
        lines = raw.splitlines(keepends=True)
        kept = [ln for ln in lines[keep_lines:] if _kind(ln) == "restart"] if source is None else []
        lines = lines[:keep_lines] + kept
        write_atomic(self.path, b"".join(ln if ln.endswith(b"\n") else ln + b"\n" for ln in lines))
        self._f = open_append(self.path)
        self._n = len(lines)

    def lines(self) -> int:
        """Lines written so far (stored in each checkpoint)."""
        return self._n if self._f is not None else 0

    def write(self, record: dict[str, Any]) -> None:
        if self._f is not None:
            self._f.write(json.dumps(record) + "\n")
            self._f.flush()
            self._n += 1
        if self.tracker is not None and record["kind"] in ("step", "epoch"):
            values = {f"{record['kind']}/{k}": v for k, v in record.items()
                      if isinstance(v, (int, float)) and k not in ("step", "epoch") and math.isfinite(v)}
            self.tracker.log(values, step=record["step"])

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


def _kind(line: str) -> Any:
    try:
        return json.loads(line).get("kind")
    except (ValueError, AttributeError):  # a line cut short by a kill
        return None


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """Every record of a metrics.jsonl (bounded: safe_io.MAX_METRICS bytes, MAX_LINE per line, each a JSON
    object nested at most MAX_DEPTH deep). UnsafeInput (a UsageError) naming the file and line otherwise."""
    if not (path.exists() or path.is_symlink()):
        return []
    out = []
    for i, ln in enumerate(read_bytes(path, MAX_METRICS).splitlines(), 1):
        if not ln.strip():
            continue
        if len(ln) > MAX_LINE:
            raise UnsafeInput(f"{path}: line {i} is longer than {MAX_LINE:,} bytes")
        rec = loads_json(ln, f"{path} line {i}")
        if not isinstance(rec, dict):
            raise UnsafeInput(f"{path} line {i}: expected a JSON object, got {type(rec).__name__}")
        out.append(rec)
    return out


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
