"""Issue 7: the catalogue of bad input. Every case exits 2 with exactly one line on stderr,
`disttrain: error: ...`, naming the bad value and what is expected, with no traceback, and without
touching an existing run directory (or creating one).

Most cases run in-process through `disttrain.train.main` (fast). The messages each case prints are
collected; `DISTTRAIN_CATALOGUE=path pytest tests/test_bad_input.py` writes them as a markdown table
(that is how the catalogue in docs/failures.md was produced).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
import torch
from conftest import install_plugin, reset_accelerate, write_idx

from disttrain import train

PLUGIN_SRC = '''
import torch
from torch import nn
from torch.utils.data import TensorDataset

def raises(**kw):
    raise RuntimeError("factory exploded")

def not_a_module(**kw):
    return "a string"

def three_outputs(**kw):          # 3 classes for 10-class data
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 3))

def wrong_input(**kw):            # expects 10 features, gets 28x28 images
    return nn.Linear(10, 10)

def two_outputs(**kw):            # regression with 1 target per sample, model gives 2
    return nn.Linear(1, 2)

def returns_tuple(**kw):
    return nn.Linear(1, 1), nn.Linear(1, 1)

def data_raises(data_dir, **kw):
    raise ValueError("no such shard")

def data_wrong_type(data_dir, **kw):
    return [1, 2, 3]

def data_empty(data_dir, **kw):
    return TensorDataset(torch.zeros(0, 4), torch.zeros(0, dtype=torch.long)), None

def data_negative_labels(data_dir, **kw):
    return TensorDataset(torch.zeros(8, 4), torch.full((8,), -1)), None

class _Dicts(torch.utils.data.Dataset):
    def __len__(self):
        return 8
    def __getitem__(self, i):
        return {"pixels": torch.zeros(4), "label": 0}

def data_dict_wrong_keys(data_dir, **kw):
    return _Dicts(), None

def data_triples(data_dir, **kw):
    return TensorDataset(torch.zeros(8, 4), torch.zeros(8, dtype=torch.long), torch.zeros(8)), None
'''
PLUGIN = "dt_badinput_plugins"


@dataclass
class Case:
    id: str
    argv: list[str]  # {data}, {out}, {tmp}, {run}, {ckpt}, {cfg} are filled in
    expect: list[str]  # substrings of the message: the bad value and what is expected
    out: str = "existing"  # "existing": the output dir is a finished run (and --overwrite is added)
    prepare: Callable[[Path], None] | None = None  # makes files under tmp_path
    base: bool = True  # prepend the base flags
    skip: str | None = None
    extra: dict = field(default_factory=dict)


def _yaml(text: str) -> Callable[[Path], None]:
    def make(tmp: Path) -> None:
        (tmp / "cfg.yaml").write_text(text)
    return make


def _truncate_idx(tmp: Path) -> None:
    raw = tmp / "bad_data" / "FashionMNIST" / "raw"
    write_idx(raw)
    f = raw / "train-images-idx3-ubyte"
    f.write_bytes(f.read_bytes()[:1000])


def _empty_dir(tmp: Path) -> None:
    (tmp / "empty_data").mkdir()


def _a_file(tmp: Path) -> None:
    (tmp / "a_file").write_text("not a directory\n")


def _corrupt_ckpt(tmp: Path) -> None:
    ck = sorted((tmp / "run" / "checkpoints").glob("step_*"))[-1]
    f = ck / "model.safetensors"
    b = bytearray(f.read_bytes())
    b[-1] ^= 0xFF
    f.write_bytes(bytes(b))


def _corrupt_all(tmp: Path) -> None:
    for ck in (tmp / "run" / "checkpoints").glob("step_*"):
        (ck / "manifest.json").write_text("{not json")


def _ro_mount(tmp: Path) -> None:
    src, dst = tmp / "ro_src", tmp / "ro"
    src.mkdir()
    dst.mkdir()
    r = subprocess.run(["mount", "--bind", str(src), str(dst)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot bind-mount (needs root and CAP_SYS_ADMIN): {r.stderr.decode().strip()}")
    r = subprocess.run(["mount", "-o", "remount,bind,ro", str(dst)], capture_output=True)
    if r.returncode != 0:
        subprocess.run(["umount", str(dst)])
        pytest.skip(f"cannot remount read-only: {r.stderr.decode().strip()}")


BASE = ["--dataset", "fashion_mnist", "--data-dir", "{data}", "--model", "linear", "--epochs", "1",
        "--batch-size", "64", "--no-progress", "--output-dir", "{out}"]
P = PLUGIN
CASES = [
    # ---- wrong types on the command line
    Case("lr-not-a-number", ["--lr", "abc"], ["--lr", "'abc'", "number"]),
    Case("lr-nan", ["--lr", "nan"], ["--lr", "'nan'", "finite number"]),
    Case("lr-inf", ["--lr", "inf"], ["--lr", "'inf'", "finite number"]),
    Case("lr-negative", ["--lr", "-0.1"], ["--lr", "-0.1", "> 0"]),
    Case("epochs-float", ["--epochs", "1.5"], ["--epochs", "'1.5'", "integer"]),
    Case("batch-size-zero", ["--batch-size", "0"], ["--batch-size", "0", "> 0"]),
    Case("grad-accum-negative", ["--grad-accum", "-1"], ["--grad-accum", "-1", "> 0"]),
    Case("seed-negative", ["--seed", "-1"], ["--seed", "-1", ">= 0"]),
    Case("seed-huge", ["--seed", str(2**70)], ["--seed", str(2**70), "2**32"]),
    Case("max-steps-zero", ["--max-steps", "0"], ["--max-steps", "0", "> 0"]),
    Case("model-kwargs-bad-json", ["--model-kwargs", "{bad"], ["--model-kwargs", "'{bad'", "JSON object"]),
    Case("dataset-kwargs-list", ["--dataset-kwargs", "[1, 2]"], ["--dataset-kwargs", "[1, 2]", "JSON object"]),
    Case("model-kwargs-unknown-arg", ["--model-kwargs", '{"depth": 3}'], ["--model linear", "depth", "TypeError"]),
    Case("unknown-flag", ["--learning-rate", "0.1"], ["--learning-rate"]),
    Case("flag-missing-value", ["--lr"], ["--lr", "expected one argument"]),
    Case("bool-flag-with-value", ["--overwrite=yes"], ["--overwrite", "yes"]),
    # ---- YAML
    Case("yaml-list-for-float", ["--config", "{tmp}/cfg.yaml"], ["'lr'", "[1]", "number"],
         prepare=_yaml("lr: [1]\n")),
    Case("yaml-bool-for-int", ["--config", "{tmp}/cfg.yaml"], ["'epochs'", "True", "integer"],
         prepare=_yaml("epochs: true\n")),
    Case("yaml-int-for-bool", ["--config", "{tmp}/cfg.yaml"], ["'overwrite'", "3", "true or false"],
         prepare=_yaml("overwrite: 3\n")),
    Case("yaml-string-for-mapping", ["--config", "{tmp}/cfg.yaml"], ["'model_kwargs'", "'wide'", "JSON object"],
         prepare=_yaml("model_kwargs: wide\n")),
    Case("yaml-unknown-key", ["--config", "{tmp}/cfg.yaml"], ["learning_rate", "unknown key"],
         prepare=_yaml("learning_rate: 0.1\n")),
    Case("yaml-kebab-key", ["--config", "{tmp}/cfg.yaml"], ["batch-size", "unknown key"],
         prepare=_yaml("batch-size: 32\n")),
    Case("yaml-not-a-mapping", ["--config", "{tmp}/cfg.yaml"], ["cfg.yaml", "mapping", "list"],
         prepare=_yaml("- lr\n- 0.1\n")),
    Case("yaml-malformed", ["--config", "{tmp}/cfg.yaml"], ["cfg.yaml", "not valid YAML"],
         prepare=_yaml("lr: [1\nepochs: 2\n")),
    Case("yaml-python-object", ["--config", "{tmp}/cfg.yaml"], ["cfg.yaml", "not valid YAML"],
         prepare=_yaml("lr: !!python/object/apply:os.system ['touch pwned']\n")),
    Case("config-missing", ["--config", "{tmp}/nope.yaml"], ["nope.yaml", "no such file"]),
    Case("config-is-dir", ["--config", "{tmp}"], ["--config", "not a file", "YAML file"]),
    # ---- choices and names
    Case("mixed-precision-fp16-on-cpu", ["--mixed-precision", "fp16"], ["fp16", "GPU", "bf16 or no"],
         skip="CUDA is available: fp16 is valid here" if torch.cuda.is_available() else None),
    Case("mixed-precision-unknown", ["--mixed-precision", "fp8"], ["'fp8'", "no, bf16, fp16"]),
    Case("unknown-dataset", ["--dataset", "imagenet"], ["'imagenet'", "fashion_mnist", "module:function"]),
    Case("unknown-model", ["--model", "vgg"], ["'vgg'", "cnn", "module:function"]),
    Case("unknown-optimizer", ["--optimizer", "lamb"], ["'lamb'", "sgd, adam, adamw"]),
    Case("unknown-loss", ["--loss", "hinge"], ["'hinge'", "cross_entropy"]),
    Case("unknown-scheduler", ["--scheduler", "linear"], ["'linear'", "constant, cosine"]),
    Case("plugin-module-missing", ["--model", "no_such_module_xyz:build"], ["no_such_module_xyz", "cannot import"]),
    Case("plugin-function-missing", ["--model", f"{P}:nothing_here"], [f"{P}:nothing_here", "no callable"]),
    Case("plugin-bad-syntax", ["--model", "not a plugin"], ["'not a plugin'", "module:function"]),
    # ---- out of range or conflicting
    Case("warmup-longer-than-run", ["--warmup-steps", "100"], ["--warmup-steps 100", "shorter than the run", "4"]),
    Case("keep-last-zero", ["--keep-last", "0"], ["--keep-last", "0", "> 0"]),
    Case("val-fraction-too-big", ["--val-fraction", "1.5"], ["--val-fraction", "1.5", "[0, 1)"]),
    Case("val-fraction-leaves-nothing", ["--val-fraction", "0.999"], ["--val-fraction 0.999", "leaves"]),
    Case("label-smoothing-with-mse", ["--label-smoothing", "0.1", "--loss", "mse"],
         ["--label-smoothing 0.1", "cross_entropy", "mse"]),
    Case("momentum-with-adam", ["--momentum", "0.9"], ["--momentum 0.9", "sgd"]),
    Case("nesterov-with-adam", ["--nesterov"], ["--nesterov", "sgd", "momentum"]),
    Case("scheduler-kwargs-wrong-key", ["--scheduler", "cosine", "--scheduler-kwargs", '{"gamma": 0.5}'],
         ["gamma", "cosine", "min_lr_ratio"]),
    Case("resume-path-with-overwrite", ["--resume", "{run}", "--overwrite"], ["--resume", "--overwrite"], out="fresh"),
    Case("resume-auto-with-overwrite", ["--resume", "auto", "--overwrite"], ["--resume auto", "--overwrite"]),
    Case("resume-missing-path", ["--resume", "{tmp}/no_such_ckpt"], ["no_such_ckpt", "no such checkpoint"],
         out="fresh"),
    Case("resume-corrupted-checkpoint", ["--resume", "{ckpt}"], ["model.safetensors", "checksum mismatch"],
         out="fresh", prepare=_corrupt_ckpt),
    Case("resume-auto-all-bad", ["--resume", "auto", "--output-dir", "{run}"], ["every checkpoint", "bad"],
         out="none", prepare=_corrupt_all),
    Case("resume-none-existing-run", ["--output-dir", "{run}"], ["already holds a run", "--resume auto", "--overwrite"],
         out="none"),
    Case("resume-auto-without-output-dir", ["--dataset", "fashion_mnist", "--data-dir", "{data}", "--model", "linear",
                                            "--resume", "auto"], ["--resume auto needs --output-dir"], base=False),
    Case("init-from-missing", ["--init-from", "{tmp}/nothing.safetensors"], ["nothing.safetensors", "no such file"]),
    # ---- output directory
    Case("output-dir-is-a-file", ["--output-dir", "{tmp}/a_file"], ["a_file", "not a directory"],
         out="none", prepare=_a_file),
    Case("output-dir-parent-is-a-file", ["--output-dir", "{tmp}/a_file/run"], ["a_file", "not writable"],
         out="none", prepare=_a_file),
    Case("output-dir-read-only", ["--output-dir", "{tmp}/ro/run"], ["ro", "not writable"],
         out="none", prepare=_ro_mount, skip=None if os.geteuid() == 0 else "needs root to bind-mount read-only"),
    # ---- data
    Case("truncated-idx", ["--data-dir", "{tmp}/bad_data"], ["fashion_mnist", "bad_data", "unreadable"],
         prepare=_truncate_idx),
    Case("dataset-not-found", ["--dataset", "mnist", "--data-dir", "{tmp}/empty_data"],
         ["--dataset mnist", "not found", "empty_data"], prepare=_empty_dir),
    Case("dataset-factory-raises", ["--dataset", f"{P}:data_raises", "--model", "mlp"],
         [f"{P}:data_raises", "ValueError", "no such shard"]),
    Case("dataset-factory-wrong-type", ["--dataset", f"{P}:data_wrong_type"],
         [f"{P}:data_wrong_type", "(train_dataset, eval_dataset or None)", "list"]),
    Case("dataset-empty", ["--dataset", f"{P}:data_empty"], [f"{P}:data_empty", "empty"]),
    Case("dataset-dict-items-wrong-keys", ["--dataset", f"{P}:data_dict_wrong_keys", "--model", "mlp"],
         ["['label', 'pixels']", "input key of", "'image'"]),
    Case("dataset-items-not-pairs", ["--dataset", f"{P}:data_triples", "--model", "mlp"],
         ["(input, target) pairs", "tuple of length 3"]),
    Case("dataset-negative-labels", ["--dataset", f"{P}:data_negative_labels"], ["-1", "0..C-1"]),
    Case("float-targets-cross-entropy", ["--dataset", "synthetic_regression", "--loss", "cross_entropy"],
         ["cross_entropy", "integer class targets", "floating point"]),
    Case("int-targets-mse", ["--dataset", "synthetic_classification", "--loss", "mse"],
         ["--loss mse", "integer class targets", "cross_entropy"]),
    # ---- model plug-ins and model/data fit
    Case("model-factory-raises", ["--model", f"{P}:raises"], [f"{P}:raises", "RuntimeError", "factory exploded"]),
    Case("model-factory-wrong-type", ["--model", f"{P}:not_a_module"], [f"{P}:not_a_module", "torch.nn.Module", "str"]),
    Case("model-factory-tuple", ["--model", f"{P}:returns_tuple"], ["torch.nn.Module", "tuple"]),
    Case("model-too-few-classes", ["--model", f"{P}:three_outputs"], ["3 classes", "10"]),
    Case("model-rejects-input", ["--model", f"{P}:wrong_input"], ["[64, 1, 28, 28]", "does not accept"]),
    Case("model-output-shape-regression", ["--dataset", "synthetic_regression", "--model", f"{P}:two_outputs"],
         ["[64, 2]", "[64, 1]", "does not fit"]),
    Case("cnn-on-vectors", ["--dataset", "synthetic_regression", "--model", "cnn"],
         ["--model cnn", "image inputs", "[1]"]),
]


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory) -> Path:
    """A real finished run (config, metrics, checkpoints, model), made once, copied per test."""
    root = tmp_path_factory.mktemp("finished")
    data = root / "data"
    write_idx(data / "FashionMNIST" / "raw")
    out = root / "run"
    old = os.environ.get("DISTTRAIN_OFFLINE")
    os.environ["DISTTRAIN_OFFLINE"] = "1"
    try:
        code = train.main(["--dataset", "fashion_mnist", "--data-dir", str(data), "--model", "linear",
                           "--epochs", "1", "--batch-size", "64", "--save-every-steps", "2", "--no-progress",
                           "--output-dir", str(out)])
    finally:
        if old is None:
            os.environ.pop("DISTTRAIN_OFFLINE", None)
        else:
            os.environ["DISTTRAIN_OFFLINE"] = old
        _reset_accelerate()
    assert code == 0
    assert sorted(p.name for p in (out / "checkpoints").glob("step_*"))
    return out


_reset_accelerate = reset_accelerate


@pytest.fixture
def plugins(tmp_path, monkeypatch):
    yield from install_plugin(tmp_path, monkeypatch, PLUGIN, PLUGIN_SRC)


def snapshot(root: Path) -> dict[str, tuple]:
    """Every file and directory under root: name -> (kind, mtime_ns, sha256)."""
    out: dict[str, tuple] = {}
    if not root.exists():
        return out
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        st = p.lstat()
        if p.is_dir():
            out[rel] = ("dir", st.st_mtime_ns, None)
        else:
            out[rel] = ("file", st.st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
    return out


MESSAGES: dict[str, str] = {}


@pytest.fixture(scope="session", autouse=True)
def _write_catalogue():
    yield
    target = os.environ.get("DISTTRAIN_CATALOGUE")
    if target and MESSAGES:
        lines = ["| case | message (stderr, exit code 2) |", "|---|---|"]
        for c in CASES:
            if c.id in MESSAGES:
                lines.append(f"| `{c.id}` | `{MESSAGES[c.id].replace('|', '&#124;')}` |")
        Path(target).write_text("\n".join(lines) + "\n")


def _fill(s: str, m: dict[str, str]) -> str:
    for k, v in m.items():
        s = s.replace("{" + k + "}", v)
    return s


# --------------------------------------------------------------------------- the test


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, tmp_path, fmnist_dir, finished_run, plugins, capsys, monkeypatch):
    if case.skip:
        pytest.skip(case.skip)
    monkeypatch.chdir(tmp_path)  # a stray relative path would land here, not in the repo
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)  # copy2 keeps mtimes
    ckpt = sorted((run / "checkpoints").glob("step_*"))[-1]
    if case.prepare:
        case.prepare(tmp_path)
    try:
        out = {"existing": run, "fresh": tmp_path / "fresh_out", "none": tmp_path / "unused"}[case.out]
        m = {"data": str(fmnist_dir), "out": str(out), "tmp": str(tmp_path), "run": str(run), "ckpt": str(ckpt)}
        argv = [_fill(a, m) for a in (BASE if case.base else [])] + [_fill(a, m) for a in case.argv]
        if case.out == "existing" and "--overwrite" not in argv and "--resume" not in argv:
            argv.append("--overwrite")  # the dangerous form: a valid run would delete the old one first
        before_tmp = set(os.listdir(tmp_path))
        before_run = snapshot(run)
        a_file = (tmp_path / "a_file").read_bytes() if (tmp_path / "a_file").exists() else None
        capsys.readouterr()

        code = train.main(argv)

        cap = capsys.readouterr()
        err = cap.err
        lines = err.splitlines()
        assert code == 2, f"exit {code}, stderr:\n{err}"
        assert len(lines) == 1, f"expected one line, got:\n{err}"
        msg = lines[0]
        assert msg.startswith("disttrain: error: "), msg
        assert "Traceback" not in err + cap.out
        for s in case.expect:
            assert s in msg, f"{s!r} not in {msg!r}"
        MESSAGES[case.id] = msg.replace(str(tmp_path), "$TMP")
        # nothing written: the existing run is untouched and no output dir appeared
        assert snapshot(run) == before_run
        assert not (tmp_path / "fresh_out").exists()
        assert not (tmp_path / "unused").exists()
        assert not (tmp_path / "runs").exists()
        assert set(os.listdir(tmp_path)) == before_tmp
        if a_file is not None:
            assert (tmp_path / "a_file").read_bytes() == a_file
        assert not (tmp_path / "pwned").exists()
    finally:
        if (tmp_path / "ro").exists():
            subprocess.run(["umount", str(tmp_path / "ro")], capture_output=True)


def test_catalogue_is_big_enough():
    assert len(CASES) >= 30
    assert len({c.id for c in CASES}) == len(CASES)


def test_one_line_under_python_m(tmp_path, fmnist_dir):
    """The same through a real `python -m disttrain.train` process: exit 2, one line, nothing else."""
    from conftest import run as run_cmd, train_cmd

    r = run_cmd(train_cmd() + ["--data-dir", str(fmnist_dir), "--lr", "abc", "--output-dir", str(tmp_path / "o")],
                timeout=120)
    assert r.returncode == 2, r.stderr
    assert r.stderr.splitlines() == ["disttrain: error: --lr must be a number, got 'abc'"]
    assert not (tmp_path / "o").exists()
