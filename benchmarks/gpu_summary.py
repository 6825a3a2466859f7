"""Summarise a gpu_check.sh run: OUT/gpu_check.json and OUT/summary.md (printed too).

    python benchmarks/gpu_summary.py OUT TESTS_RC BENCH_RC WALL_S

Exit status 0 if the GPU tests passed and the benchmark ran, else 1.
"""

from __future__ import annotations

import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import torch


def device_info() -> dict:
    p = torch.cuda.get_device_properties(0)
    return {"name": p.name, "capability": f"{p.major}.{p.minor}", "memory_gib": round(p.total_memory / 2**30, 1),
            "bf16_native": torch.cuda.is_bf16_supported(including_emulation=False), "torch": torch.__version__,
            "cuda": torch.version.cuda, "count": torch.cuda.device_count()}


def tests(xml: Path) -> dict:
    """Counts and the names of failed tests from pytest's JUnit XML (absent: the run did not finish)."""
    if not xml.is_file() or xml.stat().st_size > 16 << 20:
        return {"finished": False}
    root = ET.parse(xml).getroot()
    cases = list(root.iter("testcase"))
    failed = [f"{c.get('classname')}::{c.get('name')}" for c in cases
              if c.find("failure") is not None or c.find("error") is not None]
    skipped = [f"{c.get('classname')}::{c.get('name')}" for c in cases if c.find("skipped") is not None]
    return {"finished": True, "total": len(cases), "failed": failed, "skipped": skipped,
            "passed": len(cases) - len(failed) - len(skipped)}


def main(argv: list[str]) -> int:
    out, tests_rc, bench_rc, wall = Path(argv[0]), int(argv[1]), int(argv[2]), int(argv[3])
    t = tests(out / "gpu_tests.xml")
    bench_file = out / "bench.json"
    bench = json.loads(bench_file.read_text()) if bench_file.is_file() and bench_file.stat().st_size < 16 << 20 else None
    ok = tests_rc == 0 and bench_rc == 0 and bench is not None
    lm_file = out / "bench_lm.json"  # the GPT's tokens/s (absent: no corpus, or it ran out of time)
    lm = json.loads(lm_file.read_text()) if lm_file.is_file() and lm_file.stat().st_size < 16 << 20 else None
    report = {"ok": ok, "wall_s": wall, "device": device_info(), "tests_exit": tests_rc, "tests": t,
              "bench_exit": bench_rc, "bench": bench,
              "gpt_tokens_per_sec": lm["median"].get("gpt") if lm else None}
    (out / "gpu_check.json").write_text(json.dumps(report, indent=1))
    d = report["device"]
    lines = [f"# GPU check: {'OK' if ok else 'FAILED'} in {wall} s",
             "", f"Device: {d['name']} (compute capability {d['capability']}, {d['memory_gib']} GiB, native bf16 "
             f"{'yes' if d['bf16_native'] else 'no'}), torch {d['torch']}, CUDA {d['cuda']}", ""]
    if t.get("finished"):
        lines.append(f"GPU tests (`pytest -m gpu`): {t['passed']} passed, {len(t['failed'])} failed, "
                     f"{len(t['skipped'])} skipped (exit {tests_rc})")
        lines += [f"- FAILED {n}" for n in t["failed"]] + [f"- skipped {n}" for n in t["skipped"]]
    else:
        lines.append(f"GPU tests: did not finish (exit {tests_rc}; 124 = the 5-minute limit); see gpu_tests.log")
    lines.append("")
    if bench:
        med = bench["median"]
        models = list(med)
        lines += [f"Benchmark on {bench['device']} (medians of {bench['rounds']} rounds, {bench['steps']} timed steps, "
                  f"batch {bench['batch_size']}; samples/s, ratios are medians of per-round ratios):", "",
                  "| | " + " | ".join(models) + " |", "|---|" + "---|" * len(models)]
        for k, label in (("a", "a tutorial loop"), ("b", "b bare loop"), ("c", "c disttrain"), ("c/a", "c/a"),
                         ("c/b", "c/b")):
            lines.append(f"| {label} | " + " | ".join(f"{med[m].get(k, float('nan')):.2f}" for m in models) + " |")
    else:
        lines.append(f"Benchmark: no result (exit {bench_rc}; 124 = the time limit); see bench.log")
    gpt = report["gpt_tokens_per_sec"]
    lines += ["", f"GPT tokens/s (batch {lm['batch_size']} x block 64, {lm['steps']} timed steps): hand loop "
              f"{gpt['b']:.0f}, disttrain {gpt['c']:.0f}, disttrain / hand loop {gpt['c/b']:.2f}" if gpt else
              "GPT tokens/s: no result (see bench_lm.log)"]
    text = "\n".join(lines) + "\n"
    (out / "summary.md").write_text(text)
    print(text, end="")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
