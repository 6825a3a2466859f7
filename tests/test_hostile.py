"""Issue 14: hostile and careless inputs (the threat model is docs/security.md).

The table crafts each kind in a temporary directory (links, FIFOs, re-signed manifests, bombs, aliased YAML,
foreign files) and runs the command in-process. Every case asserts: the exit code, exactly one line on
stderr (no traceback), the reason in it, and that every file in the temporary directory (the finished run
included, and the files a link points to) is byte-for-byte unchanged, with nothing added. Memory bombs run
under a lowered soft RLIMIT_AS, so a regression fails the test instead of exhausting the machine.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import resource
import shutil
import signal
import stat
import struct
import threading
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch
from conftest import reset_accelerate, write_idx
from safetensors.torch import load_file, save_file

from disttrain import checkpoint as ckpt
from disttrain import evaluate, launch, plot, predict, safe_io, train
from disttrain.errors import cut

BASE = ["--dataset", "fashion_mnist", "--model", "linear", "--batch-size", "64", "--no-progress"]


# --------------------------------------------------------------------------- a finished run, made once


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished 1-epoch run with checkpoints at steps 2 and 4 (and best/), and its data."""
    root = tmp_path_factory.mktemp("finished")
    write_idx(root / "data" / "FashionMNIST" / "raw")
    mp = pytest.MonkeyPatch()
    mp.setenv("DISTTRAIN_OFFLINE", "1")
    try:
        code = train.main(BASE + ["--data-dir", str(root / "data"), "--epochs", "1", "--save-every-steps", "2",
                                  "--output-dir", str(root / "run")])
    finally:
        mp.undo()
        reset_accelerate()
    assert code == 0
    return root


@pytest.fixture
def world(tmp_path, finished) -> Path:
    """tmp_path/{data, run (a copy of the finished run), victim.txt (a file of the user's)}."""
    shutil.copytree(finished / "data", tmp_path / "data")
    shutil.copytree(finished / "run", tmp_path / "run", symlinks=True)
    (tmp_path / "victim.txt").write_text("the user's own file\n")
    return tmp_path


def snapshot(root: Path) -> dict[str, str]:
    """Every entry under root: links by target, files by SHA-256, others by kind."""
    out = {}
    for p in sorted(root.rglob("*")):
        st = os.lstat(p)
        rel = str(p.relative_to(root))
        if stat.S_ISLNK(st.st_mode):
            out[rel] = "link -> " + os.readlink(p)
        elif stat.S_ISREG(st.st_mode):
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
        else:
            out[rel] = "dir" if stat.S_ISDIR(st.st_mode) else f"mode {st.st_mode:o}"
    return out


def step(w: Path, n: int = 4) -> Path:
    return w / "run" / "checkpoints" / f"step_{n:08d}"


def resign(d: Path, name: str, data: bytes) -> None:
    """Replace a checkpoint file and rewrite the manifest to match (what anyone who can write it can do)."""
    (d / name).write_bytes(data)
    mf = json.loads((d / "manifest.json").read_text())
    mf["files"][name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (d / "manifest.json").write_text(json.dumps(mf))


def edit_json(d: Path, name: str, fn: Callable[[dict], object]) -> None:
    obj = json.loads((d / name).read_text())
    obj = fn(obj) or obj
    resign(d, name, json.dumps(obj).encode())


def edit_tensors(d: Path, name: str, fn: Callable[[dict], None]) -> None:
    t = load_file(str(d / name))
    fn(t)
    tmp = d.parent.parent.parent / "t.safetensors"
    save_file(t, str(tmp))
    resign(d, name, tmp.read_bytes())
    tmp.unlink()


def fifo(p: Path) -> None:
    os.mkfifo(p)


def png(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height (its pixel data is a few bytes)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0")) + chunk(b"IEND", b"")


def good_png(p: Path) -> None:
    from PIL import Image

    Image.new("L", (28, 28), 0).save(p)


BILLION_LAUGHS = "\n".join(["a: &a [x, x, x, x, x, x, x, x, x]"] + [
    f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}]"
    for i in range(8)])


def yaml_cfg(body: str) -> Callable[[Path], None]:
    def make(w: Path) -> None:
        (w / "cfg.yaml").write_text(body)
    return make


# --------------------------------------------------------------------------- the table


@dataclass
class Case:
    id: str
    kind: str  # links | overwrite | not-a-run | corrupt | schema | bomb | yaml | cli
    cmd: str  # train | evaluate | predict | plot | launch
    argv: list[str]  # {w} is the world directory
    expect: str  # a substring of the one stderr line
    prepare: Callable[[Path], None] | None = None
    code: int = 2
    memory: bool = False  # run under a lowered RLIMIT_AS
    stdout: str | None = None  # a substring stdout must hold (predict still predicts the readable files)


TRAIN_RUN = BASE + ["--data-dir", "{w}/data", "--epochs", "2", "--output-dir", "{w}/run"]
FRESH = BASE + ["--data-dir", "{w}/data", "--epochs", "1"]


def _link(name: str, target: str = "victim.txt") -> Callable[[Path], None]:
    def make(w: Path) -> None:
        p = w / "run" / name
        if p.exists():
            p.unlink()
        p.symlink_to(w / target)
    return make


def _checkpoints_link(w: Path) -> None:
    elsewhere = w / "elsewhere"
    (elsewhere / ".tmp-keep").mkdir(parents=True)
    (elsewhere / ".old-keep.txt").write_text("keep me")
    shutil.move(w / "run" / "checkpoints", w / "moved-checkpoints")
    (w / "run" / "checkpoints").symlink_to(elsewhere)


def _step_link(w: Path) -> None:
    shutil.copytree(step(w), w / "planted", symlinks=True)
    (w / "run" / "checkpoints" / "step_00000099").symlink_to(w / "planted")


def _nested_manifest(w: Path) -> None:
    (step(w) / "manifest.json").write_text("[" * 1000 + "]" * 1000)


def _zero_manifest(w: Path) -> None:
    (step(w) / "manifest.json").unlink()
    (step(w) / "manifest.json").symlink_to("/dev/zero")


def _fifo_manifest(w: Path) -> None:
    (step(w) / "manifest.json").unlink()
    fifo(step(w) / "manifest.json")


def _meta(fn: Callable[[dict], object]) -> Callable[[Path], None]:
    def make(w: Path) -> None:
        meta = json.loads((w / "run" / "model.json").read_text())
        out = fn(meta)
        (w / "run" / "model.json").write_text(json.dumps(meta if out is None else out))
    return make


def _state(fn: Callable[[dict], object]) -> Callable[[Path], None]:
    return lambda w: edit_json(step(w), "state.json", fn)


def _foreign_in(sub: str) -> Callable[[Path], None]:
    def make(w: Path) -> None:
        (w / "run" / sub).mkdir(exist_ok=True)
        (w / "run" / sub / "notes.txt").write_text("mine")
    return make


def _other_run(w: Path) -> None:
    shutil.copytree(w / "run", w / "other", symlinks=True)


def _user_dir(w: Path) -> None:
    (w / "mine").mkdir()
    (w / "mine" / "config.yaml").write_text("my: own\n")
    (w / "mine" / "status.json").write_text("{}")


def _pickle_weights(w: Path) -> None:
    (w / "weights").mkdir()
    (w / "weights" / "model.safetensors").write_bytes(pickle.dumps({"w": [1.0]}, protocol=4))


def _home(w: Path) -> None:
    (w / "home").mkdir()
    (w / "home" / ".bashrc").write_text("# mine\n")


CASES = [
    # ---- links and entries of the wrong kind inside a run directory
    Case("metrics-tmp-link", "links", "train", TRAIN_RUN + ["--resume", "auto"], "symbolic link",
         _link(".metrics.jsonl.tmp")),
    Case("metrics-link", "links", "train", TRAIN_RUN + ["--resume", "auto"], "symbolic link", _link("metrics.jsonl")),
    Case("lock-link", "links", "train", TRAIN_RUN + ["--resume", "auto"], "symbolic link", _link(".lock")),
    Case("config-link", "links", "train", TRAIN_RUN + ["--resume", "auto"], "symbolic link", _link("config.yaml")),
    Case("status-fifo", "links", "train", TRAIN_RUN + ["--resume", "auto"], "FIFO",
         lambda w: ((w / "run" / "status.json").unlink(), fifo(w / "run" / "status.json"))),
    Case("checkpoints-link", "links", "train", TRAIN_RUN + ["--resume", "auto"], "symbolic link", _checkpoints_link),
    Case("step-dir-link", "links", "train", TRAIN_RUN + ["--resume", "auto"], "symbolic link", _step_link),
    Case("checkpoint-file-link", "links", "evaluate", ["--checkpoint", "{w}/run/checkpoints/step_00000004"],
         "symbolic link", lambda w: ((step(w) / "scheduler.json").unlink(),
                               (step(w) / "scheduler.json").symlink_to(w / "victim.txt"))),
    # ---- --overwrite removes only what disttrain wrote, or nothing
    Case("overwrite-foreign-checkpoints", "overwrite", "train", TRAIN_RUN + ["--overwrite"],
         "did not write (checkpoints/notes.txt)", _foreign_in("checkpoints")),
    Case("overwrite-foreign-tensorboard", "overwrite", "train", TRAIN_RUN + ["--overwrite"],
         "did not write (tensorboard/notes.txt)", _foreign_in("tensorboard")),
    Case("overwrite-foreign-top", "overwrite", "train", TRAIN_RUN + ["--overwrite"], "did not write (notes.txt)",
         lambda w: (w / "run" / "notes.txt").write_text("mine")),
    Case("overwrite-home", "overwrite", "train", FRESH + ["--output-dir", "{w}/home", "--overwrite"],
         "not empty and not a disttrain run", _home),
    # ---- a directory that is not a run; a run that is not this checkpoint's
    Case("not-a-run", "not-a-run", "train", FRESH + ["--output-dir", "{w}/mine"], "not a disttrain run", _user_dir),
    Case("not-a-run-auto", "not-a-run", "train", FRESH + ["--output-dir", "{w}/mine", "--resume", "auto"],
         "not a disttrain run", _user_dir),
    Case("resume-into-other-run", "not-a-run", "train",
         FRESH + ["--epochs", "2", "--output-dir", "{w}/run", "--keep-last", "1", "--resume",
                  "{w}/other/checkpoints/step_00000002"], "belongs to another run", _other_run),
    # ---- corrupt files: detected, bounded, one line
    Case("manifest-nested", "corrupt", "evaluate", ["--checkpoint", "{w}/run/checkpoints/step_00000004"],
         "nested deeper", _nested_manifest),
    Case("manifest-nested-resume", "corrupt", "train",
         FRESH + ["--output-dir", "{w}/new", "--resume", "{w}/run/checkpoints/step_00000004"], "nested deeper",
         _nested_manifest),
    Case("manifest-dev-zero", "corrupt", "evaluate", ["--checkpoint", "{w}/run/checkpoints/step_00000004"],
         "symbolic link", _zero_manifest, memory=True),
    Case("manifest-fifo", "corrupt", "evaluate", ["--checkpoint", "{w}/run/checkpoints/step_00000004"], "FIFO",
         _fifo_manifest),
    Case("manifest-huge", "corrupt", "evaluate", ["--checkpoint", "{w}/run/checkpoints/step_00000004"],
         "more than the 1 MiB", lambda w: (step(w) / "manifest.json").write_text(" " * (2 << 20) + "{}")),
    Case("model-json-not-utf8", "corrupt", "predict", ["--checkpoint", "{w}/run", "{w}/run/config.yaml"],
         "not UTF-8", lambda w: (w / "run" / "model.json").write_bytes(b'{"model": "\xff\xfe"}')),
    Case("model-json-nested", "corrupt", "evaluate", ["--checkpoint", "{w}/run"], "nested deeper",
         lambda w: (w / "run" / "model.json").write_text('{"a":' * 5000 + "1" + "}" * 5000)),
    Case("config-yaml-list", "corrupt", "evaluate", ["--checkpoint", "{w}/run"], "must be a mapping",
         lambda w: (w / "run" / "config.yaml").write_text("- 1\n- 2\n")),
    Case("config-yaml-malformed", "corrupt", "evaluate", ["--checkpoint", "{w}/run"], "not valid YAML",
         lambda w: (w / "run" / "config.yaml").write_text("a: [1, 2\n")),
    Case("metrics-nested", "corrupt", "plot", ["{w}/run", "--out", "{w}/plots"], "nested deeper",
         lambda w: (w / "run" / "metrics.jsonl").write_text("[" * 10000 + "]" * 10000 + "\n")),
    Case("metrics-not-utf8", "corrupt", "plot", ["{w}/run", "--out", "{w}/plots"], "not UTF-8",
         lambda w: (w / "run" / "metrics.jsonl").write_bytes(b'{"kind": "\xff"}\n')),
    Case("init-from-fifo", "corrupt", "train", FRESH + ["--output-dir", "{w}/new", "--init-from", "{w}/f"],
         "is a FIFO", lambda w: fifo(w / "f")),
    Case("init-from-pickle", "corrupt", "train",
         FRESH + ["--output-dir", "{w}/new", "--init-from", "{w}/weights/model.safetensors"],
         "refused to run code", _pickle_weights),
    Case("config-fifo", "corrupt", "train", FRESH + ["--output-dir", "{w}/new", "--config", "{w}/f"],
         "FIFO", lambda w: fifo(w / "f")),
    Case("config-dev-zero", "corrupt", "train", FRESH + ["--output-dir", "{w}/new", "--config", "/dev/zero"],
         "character device", memory=True),
    # ---- contents that verify (re-signed) but are wrong
    Case("state-no-config", "schema", "train", FRESH + ["--output-dir", "{w}/new", "--resume", "{w}/run/checkpoints/step_00000004"],
         "lacks 'config'", _state(lambda s: s.pop("config") and None)),
    Case("state-list", "schema", "train", FRESH + ["--output-dir", "{w}/new", "--resume", "{w}/run/checkpoints/step_00000004"],
         "must be a JSON object", _state(lambda s: [s])),
    Case("state-window-abc", "schema", "train", TRAIN_RUN + ["--resume", "auto", "--save-every-steps", "2"],
         "every checkpoint in", lambda w: [edit_json(step(w, n), "state.json",
                                                       lambda s: s["position"].update(window="abc"))
                                             for n in (2, 4)]),
    Case("state-negative-metrics-lines", "schema", "train",
         FRESH + ["--output-dir", "{w}/new", "--resume", "{w}/run/checkpoints/step_00000004"], "metrics_lines -3",
         _state(lambda s: s["position"].update(metrics_lines=-3))),
    Case("state-config-wrong-type", "schema", "train",
         FRESH + ["--output-dir", "{w}/new", "--resume", "{w}/run/checkpoints/step_00000004"], "'lr'",
         _state(lambda s: s["config"].update(lr="fast"))),
    Case("rng-short", "schema", "train", FRESH + ["--output-dir", "{w}/new", "--resume", "{w}/run/checkpoints/step_00000004"],
         "rank0.torch", lambda w: edit_tensors(step(w), "rng.safetensors",
                                               lambda t: t.update({"rank0.torch": t["rank0.torch"][:10].clone()}))),
    Case("rng-missing", "schema", "train", FRESH + ["--output-dir", "{w}/new", "--resume", "{w}/run/checkpoints/step_00000004"],
         "rank0.python", lambda w: edit_tensors(step(w), "rng.safetensors", lambda t: t.pop("rank0.python"))),
    Case("optimizer-json-malformed", "schema", "train",
         FRESH + ["--output-dir", "{w}/new", "--resume", "{w}/run/checkpoints/step_00000004"], "param_groups",
         lambda w: edit_json(step(w), "optimizer.json", lambda o: o.pop("param_groups"))),
    Case("optimizer-tensor-shape", "schema", "train",
         FRESH + ["--output-dir", "{w}/new", "--resume", "{w}/run/checkpoints/step_00000004"], "has shape [3]",
         lambda w: edit_tensors(step(w), "optimizer.safetensors",
                                lambda t: t.update({"0.exp_avg": torch.zeros(3)}))),
    Case("scheduler-json-list", "schema", "train",
         FRESH + ["--output-dir", "{w}/new", "--resume", "{w}/run/checkpoints/step_00000004"], "scheduler.json",
         lambda w: resign(step(w), "scheduler.json", b"[1, 2]")),
    Case("model-weights-shape", "schema", "train",
         FRESH + ["--output-dir", "{w}/new", "--resume", "{w}/run/checkpoints/step_00000004"], "shape mismatch",
         lambda w: edit_tensors(step(w), "model.safetensors", lambda t: t.update({"1.bias": torch.zeros(7)}))),
    Case("model-json-extra-key", "schema", "predict", ["--checkpoint", "{w}/run", "{w}/img.png"], "unknown keys ['x']",
         _meta(lambda m: m.update(x=1))),
    Case("model-json-missing-key", "schema", "evaluate", ["--checkpoint", "{w}/run"], "missing keys ['spec']",
         _meta(lambda m: m.pop("spec") and None)),
    Case("model-json-bad-shape", "schema", "predict", ["--checkpoint", "{w}/run", "{w}/img.png"], "input_shape",
         _meta(lambda m: m["spec"].update(input_shape=[1, -28, 28]))),
    # ---- bombs: bounded before anything is allocated
    Case("model-json-wide-mlp", "bomb", "predict", ["--checkpoint", "{w}/run", "{w}/img.png"], "parameters",
         _meta(lambda m: m.update(model="mlp", model_kwargs={"hidden": 2_000_000})), memory=True),
    Case("model-json-huge-input", "bomb", "predict", ["--checkpoint", "{w}/run", "{w}/img.png"], "values per sample",
         _meta(lambda m: m["spec"].update(input_shape=[1, 20000, 20000])), memory=True),
    Case("png-claims-20000x20000", "bomb", "predict", ["--checkpoint", "{w}/run", "{w}/bomb.png"], "decompression bomb",
         lambda w: (w / "bomb.png").write_bytes(png(20000, 20000)), memory=True),
    Case("config-wide-mlp", "bomb", "train", FRESH + ["--output-dir", "{w}/new", "--model", "mlp",
                                                     "--model-kwargs", '{"hidden": 2000000}'], "parameters", memory=True),
    Case("kwargs-too-large", "bomb", "train", FRESH + ["--output-dir", "{w}/new", "--model-kwargs",
                                                     json.dumps({"k": "x" * 70000})], "bytes of JSON"),
    # ---- YAML
    Case("yaml-billion-laughs-model", "yaml", "train", FRESH + ["--output-dir", "{w}/new", "--config", "{w}/cfg.yaml"],
         "aliases", yaml_cfg("model_kwargs:\n  " + BILLION_LAUGHS.replace("\n", "\n  ") + "\n"), memory=True),
    Case("yaml-billion-laughs-dataset", "yaml", "train", FRESH + ["--output-dir", "{w}/new", "--config", "{w}/cfg.yaml"],
         "aliases", yaml_cfg("dataset_kwargs:\n  " + BILLION_LAUGHS.replace("\n", "\n  ") + "\n"), memory=True),
    Case("yaml-duplicate-key", "yaml", "train", FRESH + ["--output-dir", "{w}/new", "--config", "{w}/cfg.yaml"],
         "duplicate key 'lr'", yaml_cfg("lr: 0.1\nlr: 0.2\n")),
    Case("yaml-5000-digits", "yaml", "train", FRESH + ["--output-dir", "{w}/new", "--config", "{w}/cfg.yaml"],
         "'epochs' in --config", yaml_cfg("epochs: " + "9" * 5000 + "\n")),
    Case("yaml-dist-timeout-1e14", "yaml", "train", FRESH + ["--output-dir", "{w}/new", "--config", "{w}/cfg.yaml"],
         "--dist-timeout must be at most", yaml_cfg("dist_timeout: 1.0e+14\n")),
    Case("yaml-nested", "yaml", "train", FRESH + ["--output-dir", "{w}/new", "--config", "{w}/cfg.yaml"],
         "nested deeper", yaml_cfg("model_kwargs: " + "[" * 200 + "]" * 200 + "\n")),
    Case("step-size-fraction", "cli", "train", FRESH + ["--output-dir", "{w}/new", "--scheduler", "step",
                                                       "--scheduler-kwargs", '{"step_size": 0.5}'], "step_size"),
    Case("flag-5000-digits", "cli", "train", FRESH + ["--output-dir", "{w}/new", "--epochs", "9" * 5000],
         "must be an integer"),
    Case("launch-bad-flag", "cli", "launch", ["--", *FRESH, "--output-dir", "{w}/new", "--dist-timeout", "99999999"],
         "--dist-timeout"),
    # ---- every command: one line, exit 2
    Case("predict-json-missing-dir", "cli", "predict", ["--checkpoint", "{w}/run", "{w}/img.png", "--json",
                                                        "{w}/nowhere/p.json"], "does not exist"),
    Case("evaluate-json-missing-dir", "cli", "evaluate", ["--checkpoint", "{w}/run", "--json", "{w}/nowhere/e.json"],
         "does not exist"),
    Case("predict-one-unreadable", "cli", "predict", ["--checkpoint", "{w}/run", "{w}/img.png", "{w}/f", "{w}/img2.png"],
         "f: is a FIFO", lambda w: fifo(w / "f"), stdout="img2.png"),
    Case("plot-no-run", "cli", "plot", ["{w}/nothing"], "no metrics.jsonl"),
]
COMMANDS = {"train": train.main, "evaluate": evaluate.main, "predict": predict.main, "plot": plot.main,
            "launch": launch.main}


def _fill(argv: list[str], w: Path) -> list[str]:
    return [a.replace("{w}", str(w)) for a in argv]


def _memory_cap(extra: int = 3 << 30) -> tuple[int, int]:
    """Lower the soft address-space limit to what this process maps now + `extra`; returns the old limits."""
    old = resource.getrlimit(resource.RLIMIT_AS)
    size = int(next(ln.split()[1] for ln in Path("/proc/self/status").read_text().splitlines()
                    if ln.startswith("VmSize:"))) * 1024
    resource.setrlimit(resource.RLIMIT_AS, (size + extra, old[1]))
    return old


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_hostile(case: Case, world: Path, capsys, monkeypatch):
    if case.id == "overwrite-home":
        monkeypatch.setenv("HOME", str(world / "home"))
    good_png(world / "img.png")
    good_png(world / "img2.png")
    if case.prepare is not None:
        case.prepare(world)
    before = snapshot(world)
    capsys.readouterr()
    old = _memory_cap() if case.memory else None
    try:
        code = COMMANDS[case.cmd](_fill(case.argv, world))
    finally:
        if old is not None:
            resource.setrlimit(resource.RLIMIT_AS, old)
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert code == case.code, (code, err)
    assert len(lines) == 1, lines
    assert "Traceback" not in err
    assert case.expect in lines[0], lines[0]
    assert lines[0].startswith(("disttrain: error: ", "disttrain.evaluate: error: ", "disttrain.predict: error: ",
                                "disttrain.plot: error: ")), lines[0]
    if case.stdout is not None:
        assert case.stdout in out
    assert snapshot(world) == before, "a file changed, appeared or vanished"


# --------------------------------------------------------------------------- detected and skipped


def test_resume_auto_skips_a_crafted_newest_checkpoint(world, capsys):
    """A nested-bracket manifest (or any bad checkpoint) is skipped by --resume auto; the older one is used."""
    _nested_manifest(world)
    capsys.readouterr()
    code = train.main(_fill(TRAIN_RUN, world) + ["--resume", "auto"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 0
    assert len(err) == 1 and "skipping bad checkpoint" in err[0] and "nested deeper" in err[0], err
    assert json.loads((world / "run" / "checkpoints" / "step_00000008" / "state.json").read_text())["position"]["step"] == 8


def test_overwrite_that_cannot_finish_removes_nothing(world, capsys, monkeypatch):
    """A rename that fails half-way (a read-only checkpoints/) puts back what was moved: nothing is lost."""
    before = snapshot(world)
    real = os.rename

    def rename(a, b):
        if Path(a).name == "summary.json":
            raise PermissionError(13, "Permission denied", str(a))
        return real(a, b)

    monkeypatch.setattr(ckpt.os, "rename", rename)
    code = train.main(_fill(TRAIN_RUN, world) + ["--overwrite"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "nothing was removed" in err[0], err
    after = snapshot(world)
    # the refused run still took its marker and lock note; every file of the old run is there, unchanged
    assert {k: v for k, v in before.items() if k != "run/.lock"} == \
        {k: v for k, v in after.items() if k != "run/.lock" and not k.startswith("run/.disttrain-trash")}


def test_overwrite_removes_only_ours_and_keeps_running(world, capsys):
    (world / "run" / "plots").mkdir()
    (world / "run" / "plots" / "loss.png").write_bytes(b"png")
    code = train.main(_fill(TRAIN_RUN, world) + ["--overwrite", "--epochs", "1"])
    assert code == 0
    assert sorted(p.name for p in (world / "run" / "checkpoints").iterdir()) == ["best", "step_00000004"]
    assert not (world / "run" / "plots").exists()
    assert (world / "victim.txt").read_text() == "the user's own file\n"


def test_overwrite_refuses_a_filesystem_root(tmp_path):
    run = ckpt.RunDir("/")
    with pytest.raises(ckpt.UsageError, match="root or the home directory"):
        run.clear()


def test_refused_fresh_run_leaves_no_directory(tmp_path, finished, capsys):
    """A run refused after it took the lock (bad data) removes the lock file and folder it created."""
    code = train.main(["--dataset", "synthetic_classification", "--val-fraction", "0.99999", "--model",
                       "linear", "--output-dir", str(tmp_path / "new")])
    assert code == 2, capsys.readouterr().err
    assert not (tmp_path / "new").exists()


def test_dry_run_writes_nothing(tmp_path, finished, capsys):
    code = train.main(BASE + ["--data-dir", str(finished / "data"), "--output-dir", str(tmp_path / "new"), "--dry-run"])
    assert code == 0
    assert not (tmp_path / "new").exists()


# --------------------------------------------------------------------------- the writing side


def test_write_atomic_never_writes_through_links(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("keep")
    (tmp_path / "target").symlink_to(victim)
    with pytest.raises(safe_io.UnsafeInput, match="symbolic link"):
        safe_io.write_atomic(tmp_path / "target", b"x")
    (tmp_path / f".t.tmp{os.getpid()}").symlink_to(victim)  # a planted temporary name
    with pytest.raises(safe_io.UnsafeInput, match="symbolic link"):
        safe_io.write_atomic(tmp_path / "t", b"x")
    with pytest.raises(safe_io.UnsafeInput, match="symbolic link"):
        safe_io.open_append(tmp_path / "target")
    assert victim.read_text() == "keep"


def test_yaml_budget_and_duplicates():
    assert safe_io.loads_yaml("a: &x [1, 2]\nb: *x\n", "t") == {"a": [1, 2], "b": [1, 2]}
    with pytest.raises(safe_io.UnsafeInput, match="aliases"):
        safe_io.loads_yaml(BILLION_LAUGHS, "t")
    with pytest.raises(safe_io.UnsafeInput, match="duplicate key"):
        safe_io.loads_yaml("a:\n  b: 1\n  b: 2\n", "t")
    with pytest.raises(safe_io.UnsafeInput, match="not valid YAML"):
        safe_io.loads_yaml("!!python/object:os.system {}", "t")


def test_long_errors_keep_the_reason():
    msg = "checkpoint " + "/very/long/path" * 100 + ": refused to run code from it"
    line = cut(msg)
    assert len(line) <= 600 and line.startswith("checkpoint /very") and line.endswith("refused to run code from it")


def test_disk_full_while_exporting_the_final_model(tmp_path, finished, capsys, monkeypatch):
    import safetensors.torch as st

    from safetensors import SafetensorError

    real = st.save_file

    def save_file(tensors, filename, metadata=None):
        if Path(filename).name.startswith(".model.safetensors.tmp"):
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        return real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(st, "save_file", save_file)
    out = tmp_path / "run"
    code = train.main(BASE + ["--data-dir", str(finished / "data"), "--epochs", "1", "--output-dir", str(out)])
    err = [ln for ln in capsys.readouterr().err.strip().splitlines()]
    assert code == 1
    assert len(err) == 1 and "cannot export the final model" in err[0] and "ENOSPC" in err[0], err
    status = json.loads((out / "status.json").read_text())
    assert status["state"] == "failed" and status["exit_code"] == 1
    assert not list(out.glob(".model.safetensors.tmp*"))


def test_two_sigints_before_the_handler_runs_count_as_two(monkeypatch):
    """The main thread blocked while another thread delivers two SIGINTs: Python runs its handler once,
    the count must still be two (exit 130)."""
    from disttrain.distributed import StopSignal

    exits = []

    def fake_exit(code):
        exits.append(code)
        raise SystemExit(code)

    monkeypatch.setattr(os, "_exit", fake_exit)
    stop = StopSignal()
    with pytest.raises(SystemExit), stop:
        sender = threading.Thread(target=lambda: (os.kill(os.getpid(), signal.SIGINT),
                                                  os.kill(os.getpid(), signal.SIGINT)))
        sender.start()
        sender.join()
        for _ in range(1000):  # the handler runs at the next bytecode boundaries
            pass
    assert exits == [130]


# --------------------------------------------------------------------------- real processes


@pytest.mark.slow
def test_two_fresh_runs_on_one_directory(tmp_path, finished):
    """Lock first, then decide: of two runs started together one trains, the other exits 2 and writes nothing."""
    import subprocess

    from conftest import env, PY

    out = tmp_path / "run"
    cmd = [PY, "-m", "disttrain.train", *BASE, "--data-dir", str(finished / "data"), "--epochs", "1",
           "--output-dir", str(out)]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env())
             for _ in range(2)]
    results = [(p.wait(timeout=300), p.communicate()[1]) for p in procs]
    codes = sorted(c for c, _ in results)
    assert codes == [0, 2], results
    loser = next(e for c, e in results if c == 2).strip().splitlines()
    assert len(loser) == 1 and ("already holds a run" in loser[0] or "another live run" in loser[0]), loser
    assert len([ln for ln in (out / "metrics.jsonl").read_text().splitlines() if '"epoch"' in ln]) == 1


@pytest.mark.slow
def test_launcher_ends_with_the_trainers_refusal(tmp_path):
    """A trainer that refuses its input after the launcher's own check: the launcher's last line is that
    refusal, and its exit code is 2."""
    import subprocess

    from conftest import LAUNCH, PY, env

    cmd = [PY, "-m", "disttrain.launch", "--config_file", str(LAUNCH / "cpu.yaml"), "--", "--dataset",
           "synthetic_classification", "--val-fraction", "0.99999", "--model", "linear",
           "--output-dir", str(tmp_path / "run")]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env())
    last = p.stderr.strip().splitlines()[-1]
    assert p.returncode == 2, p.stderr
    assert last.startswith("disttrain: error: ") and "--val-fraction" in last, p.stderr
    assert not (tmp_path / "run").exists()
