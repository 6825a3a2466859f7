"""python -m disttrain.predict: image files through the training preprocessing, same answers as the model."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from conftest import PY, run, write_idx

from disttrain import evaluate
from disttrain.predict import main as predict_main
from disttrain.train import main as train_main

PIL = pytest.importorskip("PIL.Image")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny Fashion-MNIST-format run (linear model) and its test images as PNG files."""
    base = tmp_path_factory.mktemp("predict")
    data = base / "data"
    write_idx(data / "FashionMNIST" / "raw")
    rundir = base / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DISTTRAIN_OFFLINE", "1")
        assert train_main(["--dataset", "fashion_mnist", "--data-dir", str(data), "--model", "linear",
                           "--epochs", "2", "--batch-size", "32", "--lr", "0.01", "--no-progress",
                           "--output-dir", str(rundir)]) == 0
    from safetensors.torch import load_file

    test = load_file(str(data / "disttrain-cache" / "fashion_mnist-test.safetensors"))
    pngs = base / "png"
    pngs.mkdir()
    files = []
    for i, img in enumerate(test["x"]):  # uint8 [1, 28, 28]
        f = pngs / f"test_{i:03d}.png"
        PIL.fromarray(img[0].numpy(), mode="L").save(f)
        files.append(f)
    return {"run": rundir, "data": data, "x": test["x"], "y": test["y"], "files": files, "base": base}


def _reference_probs(rundir, x: torch.Tensor) -> torch.Tensor:
    """The trained model on the eval tensors, normalised as the training data is (written out here on purpose)."""
    from safetensors.torch import load_file

    from disttrain.data import DataSpec
    from disttrain.models import build_model

    meta = json.loads((rundir / "model.json").read_text())
    spec = DataSpec(**meta["spec"])
    net = build_model(meta["model"], meta["model_kwargs"], spec)
    net.load_state_dict(load_file(str(rundir / "model.safetensors")))
    net.eval()
    mean, std = torch.tensor(spec.mean).view(1, -1, 1, 1), torch.tensor(spec.std).view(1, -1, 1, 1)
    with torch.inference_mode():
        return torch.softmax(net((x.float() / 255 - mean) / std), dim=1)


def test_predict_matches_model_and_evaluate(trained, tmp_path, capsys):
    out = tmp_path / "pred.json"
    files = [str(f) for f in trained["files"]]
    assert predict_main(["--checkpoint", str(trained["run"]), *files, "--json", str(out), "--top-k", "3"]) == 0
    preds = json.loads(out.read_text())["predictions"]
    assert [p["file"] for p in preds] == files
    ref = _reference_probs(trained["run"], trained["x"])
    classes = json.loads((trained["run"] / "model.json").read_text())["spec"]["classes"]
    for p, r in zip(preds, ref):
        assert p["index"] == int(r.argmax()) and p["class"] == classes[p["index"]]
        assert p["probability"] == pytest.approx(float(r.max()), abs=1e-5)
        assert len(p["top_k"]) == 3 and p["top_k"][0]["index"] == p["index"]
        assert [t["probability"] for t in p["top_k"]] == sorted((t["probability"] for t in p["top_k"]), reverse=True)
    # the same answers as disttrain.evaluate: accuracy over the whole test set from the PNG files
    res = evaluate.run_evaluate(evaluate._parser().parse_args(["--checkpoint", str(trained["run"])]))
    acc = sum(p["index"] == int(y) for p, y in zip(preds, trained["y"])) / len(preds)
    assert acc == pytest.approx(res["eval_accuracy"], abs=1e-12)
    stdout = capsys.readouterr().out.splitlines()
    assert len(stdout) == len(files) and classes[preds[0]["index"]] in stdout[0]


def test_predict_converts_channels_and_resizes(trained, tmp_path):
    """RGB images become the model's 1-channel input (grey RGB converts back exactly); other sizes are resized."""
    grey = PIL.open(trained["files"][0])
    rgb = tmp_path / "rgb.png"
    grey.convert("RGB").save(rgb)
    big = tmp_path / "big_rgb.png"
    grey.convert("RGB").resize((56, 56), PIL.Resampling.NEAREST).save(big)
    jpg = tmp_path / "photo.jpg"
    grey.convert("RGB").save(jpg, quality=95)
    out = tmp_path / "p.json"
    assert predict_main(["--checkpoint", str(trained["run"] / "model.safetensors"), str(trained["files"][0]),
                         str(rgb), str(big), str(jpg), "--json", str(out)]) == 0
    preds = json.loads(out.read_text())["predictions"]
    assert preds[1]["index"] == preds[0]["index"] and preds[1]["probability"] == preds[0]["probability"]
    assert preds[2]["index"] == preds[0]["index"]  # a 2x upscale, resized back down (bilinear, antialiased)
    assert 0 <= preds[3]["index"] < 10


def test_predict_checkpoint_dir_and_errors(trained, tmp_path, capsys):
    step = sorted((trained["run"] / "checkpoints").glob("step_*"))[-1]
    assert predict_main(["--checkpoint", str(step), str(trained["files"][1])]) == 0
    capsys.readouterr()
    bad = tmp_path / "not_an_image.png"
    bad.write_text("hello")
    assert predict_main(["--checkpoint", str(trained["run"]), str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a readable image" in err[0], err
    assert predict_main(["--checkpoint", str(tmp_path / "nothing"), str(trained["files"][0])]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_predict_imports_plugin_model_only_when_trusted(tmp_path, fmnist_dir, monkeypatch, capsys):
    (tmp_path / "dt_predict_plugin.py").write_text(
        "import torch.nn as nn\nimport os\n"
        "def build():\n    return nn.Sequential(nn.Flatten(), nn.Linear(784, 10))\n"
        "open(os.path.join(os.path.dirname(__file__), 'imported.txt'), 'a').write('x')\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    rundir = tmp_path / "run"
    assert train_main(["--dataset", "fashion_mnist", "--data-dir", str(fmnist_dir), "--model",
                       "dt_predict_plugin:build", "--epochs", "1", "--no-progress", "--output-dir", str(rundir)]) == 0
    sys.modules.pop("dt_predict_plugin", None)
    (tmp_path / "imported.txt").unlink()
    png = tmp_path / "x.png"
    PIL.new("L", (28, 28)).save(png)
    capsys.readouterr()
    assert predict_main(["--checkpoint", str(rundir), str(png)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--trust-plugins" in err[0], err
    assert not (tmp_path / "imported.txt").exists()
    assert predict_main(["--checkpoint", str(rundir), str(png), "--trust-plugins"]) == 0
    assert (tmp_path / "imported.txt").exists()


def test_predict_cli(trained):
    p = run([PY, "-m", "disttrain.predict", "--checkpoint", str(trained["run"]), str(trained["files"][0]),
             "--top-k", "2"], timeout=120)
    assert p.returncode == 0, p.stderr
    line = p.stdout.strip().splitlines()[-1]
    assert line.startswith(str(trained["files"][0])) and line.count("(") == 1
