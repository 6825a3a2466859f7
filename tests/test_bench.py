"""disttrain.bench runs end to end (its figures are measured by hand, never asserted: machines are noisy)."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_lm_benchmark_runs_and_reports_ratios(tmp_path):
    words = ["the", "cat", "sat", "on", "a", "mat", "and", "dog", "ran"]
    rng = random.Random(0)
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "t.txt").write_text(" ".join(rng.choice(words) for _ in range(150_000)))
    out = tmp_path / "bench.json"
    subprocess.run([sys.executable, "-m", "disttrain.bench", "--workload", "lm", "--corpus", str(tmp_path / "corpus"),
                    "--data-dir", str(tmp_path / "data"), "--rounds", "1", "--steps", "60", "--multi-models", "",
                    "--threads", "1", "--json", str(out)], check=True, capture_output=True, text=True, timeout=600)
    res = json.loads(out.read_text())
    ratio = res["median"]["gpt"]["c/b"]
    assert res["rounds"] == 1 and ratio > 0 and ratio == res["median"]["gpt"]["c"] / res["median"]["gpt"]["b"]


def test_bad_malloc_switch_is_one_line_exit_2(tmp_path):
    env = dict(os.environ, DISTTRAIN_MALLOC="off")
    r = subprocess.run([sys.executable, "-m", "disttrain.bench", "--rounds", "0", "--data-dir", str(tmp_path)],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        "disttrain: error: DISTTRAIN_MALLOC='off': expected 0 (leave glibc's allocator alone) or 1"]
