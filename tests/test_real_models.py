"""Models and data people actually bring (issue 13): tied weights, unused and frozen parameters, dropout on
several ranks, odd dataset sizes, random DataLoader workers, batch norm, views, torch.compile, dicts."""

from __future__ import annotations

import json
import shutil
import signal

import pytest
import torch
from conftest import PY, env, run
from safetensors.torch import load_file, load_model

from disttrain import checkpoint as ckpt
from disttrain.train import main


def weights(run_dir):
    return load_file(str(run_dir / "model.safetensors"))


def bitwise_equal(a, b) -> bool:
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


TIED = ["--dataset", "plugins_for_tests:token_data", "--model", "plugins_for_tests:tied_lm", "--no-progress",
        "--batch-size", "8", "--optimizer", "adamw", "--weight-decay", "0.1", "--lr", "0.01",
        "--scheduler", "cosine", "--save-every-steps", "5", "--val-fraction", "0.25"]


# --------------------------------------------------------------------------- kind 1: shared (tied) tensors


def test_tied_weights_save_once_load_tied_and_resume_bitwise(tmp_path):
    from plugins_for_tests import TiedLM

    ref, out = tmp_path / "ref", tmp_path / "out"
    assert main(TIED + ["--epochs", "3", "--output-dir", str(ref)]) == 0
    assert json.loads((ref / "status.json").read_text())["state"] == "completed"
    for f in [ref / "model.safetensors", *(ref / "checkpoints").glob("*/model.safetensors")]:
        stored = load_file(str(f))
        assert ("emb.weight" in stored) != ("head.weight" in stored), f  # the tied tensor is stored once
        net = TiedLM()
        load_model(net, str(f))  # plain safetensors loading restores the tie
        assert net.head.weight is net.emb.weight
    assert (ref / "checkpoints" / "best" / "best.json").is_file()
    # our loaders give every name back, as one tensor: load_state_dict keeps a model tied
    sd = ckpt.load_weights(ref)[0]
    assert sd["head.weight"] is sd["emb.weight"]
    # kill -9 after a mid-run checkpoint, then resume: bitwise the uninterrupted run (ties kept)
    p = run([PY, "-m", "disttrain.train", *TIED, "--epochs", "3", "--output-dir", str(out)],
            env=env(DISTTRAIN_FAULT="after-rename:15"))
    assert p.returncode == -signal.SIGKILL, p.stderr[-2000:]
    assert main(TIED + ["--epochs", "3", "--output-dir", str(out), "--resume", "auto"]) == 0
    assert bitwise_equal(weights(out), weights(ref))
    # --init-from a checkpoint and evaluate the final model
    assert main(TIED + ["--epochs", "1", "--output-dir", str(tmp_path / "init"), "--save-every-steps", "0",
                        "--init-from", str(ref / "checkpoints" / "best")]) == 0
    from disttrain.evaluate import main as evaluate_main

    assert evaluate_main(["--checkpoint", str(ref), "--trust-plugins", "--json", str(tmp_path / "e.json")]) == 0
    final = [json.loads(x) for x in (ref / "metrics.jsonl").read_text().splitlines() if '"epoch"' in x][-1]
    assert json.loads((tmp_path / "e.json").read_text())["eval_loss"] == pytest.approx(final["eval_loss"], rel=1e-6)


def test_shared_block_loads_in_predict(tmp_path, fmnist_dir):
    from disttrain.predict import load_model as predict_load

    out = tmp_path / "run"
    assert main(["--dataset", "fashion_mnist", "--data-dir", str(fmnist_dir), "--model",
                 "plugins_for_tests:shared_block_net", "--epochs", "1", "--no-progress", "--output-dir", str(out)]) == 0
    net, _, _ = predict_load(str(out), trust_plugins=True)
    assert net.block1.weight is net.block2.weight
    assert torch.equal(net.block1.weight.cpu(), weights(out)["block1.weight"])


def test_dedupe_shared_keeps_overlapping_views_as_copies():
    base = torch.arange(12.0)
    tensors = {"a": base, "b": base, "c": base[:6], "d": torch.ones(2)}
    kept, aliases = ckpt.dedupe_shared(tensors)
    assert aliases == {"b": "a"} and set(kept) == {"a", "c", "d"}
    assert kept["c"].untyped_storage().data_ptr() != base.untyped_storage().data_ptr()


# --------------------------------------------------------------------------- kind 9: --compile keys


@pytest.mark.slow
def test_compile_saves_plain_keys_that_resume_init_and_load(tmp_path):
    from plugins_for_tests import TiedLM

    out = tmp_path / "run"
    args = TIED + ["--compile", "--output-dir", str(out)]
    assert main(args + ["--epochs", "1"]) == 0
    files = [out / "model.safetensors", *(out / "checkpoints").glob("step_*/model.safetensors")]
    assert files and all(not any(k.startswith("_orig_mod") for k in load_file(str(f))) for f in files)
    TiedLM().load_state_dict(ckpt.load_weights(out)[0])  # strict, on the plain module
    assert main(args + ["--epochs", "2", "--resume", "auto"]) == 0  # same flags, longer run
    assert main(TIED + ["--epochs", "1", "--output-dir", str(tmp_path / "plain"), "--init-from", str(out)]) == 0
