"""Models and data people actually bring (issue 13): tied weights, unused and frozen parameters, dropout on
several ranks, odd dataset sizes, random DataLoader workers, batch norm, views, torch.compile, dicts."""

from __future__ import annotations

import json
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


# --------------------------------------------------------------------------- kinds 3, 4, 5, 6: ranks, epochs, workers


def recorded(folder, rank=0):
    """[(index, feature-1 value)], [draw] of a ValuesRecording run."""
    items, draws = [], []
    for ln in (folder / f"rank{rank}.txt").read_text().splitlines():
        body, draw = ln.split("|")
        items += [(int(i), float(v)) for i, v in (p.split(":") for p in body.split(","))]
        draws.append(float(draw))
    return items, draws


NOISY = ["--dataset", "plugins_for_tests:noisy_data", "--model", "plugins_for_tests:values_recording",
         "--no-progress", "--epochs", "2", "--optimizer", "sgd", "--lr", "0.05", "--momentum", "0.9",
         "--dataset-kwargs", '{"n_train": 97, "n_eval": 20}', "--num-workers", "2"]


@pytest.mark.slow
def test_exact_epoch_and_seeded_worker_draws_on_any_world_size(tmp_path, monkeypatch):
    """97 samples: 1 x 32 == 2 x 16 == 1 x 16 x grad-accum 2 (the last step holds 1 sample: rank 1 has none),
    every sample once per epoch, each sample's random augmentation a function of (seed, epoch, sample) in
    loader workers, per-rank training draws a function of (seed, rank); kill -9 mid-epoch + resume is bitwise."""
    from conftest import train_cmd

    runs = {}
    for name, extra in (("a", ["--batch-size", "32"]), ("c", ["--batch-size", "16", "--grad-accum", "2"]),
                        ("s1", ["--batch-size", "32", "--seed", "1", "--max-steps", "2"])):
        rec = tmp_path / f"rec_{name}"
        rec.mkdir()
        monkeypatch.setenv("DISTTRAIN_TEST_RECORD", str(rec))
        assert main(NOISY + extra + ["--output-dir", str(tmp_path / name), "--save-every-steps", "3"]) == 0
        runs[name] = rec
    rec_b = tmp_path / "rec_b"
    rec_b.mkdir()
    p = run(train_cmd(2, "accelerate") + NOISY + ["--batch-size", "16", "--num-workers", "1", "--output-dir",
                                                  str(tmp_path / "b")], env=env(DISTTRAIN_TEST_RECORD=str(rec_b)))
    assert p.returncode == 0, p.stderr[-3000:]
    wa, wb, wc = (weights(tmp_path / d) for d in "abc")
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-5
    assert max((wa[k] - wc[k]).abs().max().item() for k in wa) < 1e-5
    (ia, da), (ic, _) = recorded(runs["a"]), recorded(runs["c"])
    (ib0, db0), (ib1, db1) = recorded(rec_b, 0), recorded(rec_b, 1)
    for items in (ia, ib0 + ib1, ic):  # kind 4: 2 epochs, each sample exactly once per epoch, no padding
        assert sorted(i for i, _ in items) == sorted(list(range(97)) * 2)
    # kinds 5 and 6: a sample's draw depends on (seed, epoch, sample) only: the same on any world size and
    # in any worker, new each epoch, new for another seed
    assert sorted(ia) == sorted(ib0 + ib1) == sorted(ic)
    by_index = {}
    for i, v in ia:
        by_index.setdefault(i, set()).add(v)
    assert all(len(v) == 2 for v in by_index.values())  # another draw in epoch 2
    s1 = dict(recorded(runs["s1"])[0])
    assert all(v not in by_index[i] for i, v in s1.items())
    # kind 3: training draws differ per rank, are a function of (seed, rank), and of the seed
    assert len(db0) == 8 and len(db1) == 6  # rank 1 has no sample in each epoch's last step: no forward in
    assert db0[:6] != db1                     # train mode there (the placeholder runs in eval mode)
    assert da == db0  # rank 0's stream does not depend on the world size
    assert recorded(runs["s1"])[1] != da[:2]
    # kind 5: kill -9 mid-epoch 2 (after the step-6 checkpoint), resume with workers: bitwise run a
    out = tmp_path / "killed"
    p = run([PY, "-m", "disttrain.train", *NOISY, "--batch-size", "32", "--output-dir", str(out),
             "--save-every-steps", "3"], env=env(DISTTRAIN_FAULT="after-rename:6"))
    assert p.returncode == -signal.SIGKILL, p.stderr[-2000:]
    monkeypatch.delenv("DISTTRAIN_TEST_RECORD")
    assert main(NOISY + ["--batch-size", "32", "--output-dir", str(out), "--save-every-steps", "3",
                         "--resume", "auto"]) == 0
    assert bitwise_equal(weights(out), wa)


# --------------------------------------------------------------------------- kind 2: unused and frozen parameters


@pytest.mark.slow
def test_unused_frozen_and_sometimes_used_parameters_on_two_processes(tmp_path):
    from conftest import train_cmd
    from plugins_for_tests import UnusedHead

    args = ["--dataset", "plugins_for_tests:indexed_data", "--model", "plugins_for_tests:unused_head",
            "--model-kwargs", '{"sometimes": true}', "--no-progress", "--epochs", "2", "--optimizer", "adamw",
            "--weight-decay", "0.1", "--lr", "0.01", "--dataset-kwargs", '{"n_train": 101}']
    p = run(train_cmd(2, "accelerate") + args + ["--batch-size", "16", "--output-dir", str(tmp_path / "two")])
    assert p.returncode == 0, p.stderr[-3000:]
    line = next(ln for ln in p.stdout.splitlines() if ln.startswith("topology:"))
    assert "unused_head.weight" in line and "DDP finds unused parameters every step" in line
    assert main(args + ["--batch-size", "32", "--output-dir", str(tmp_path / "one")]) == 0
    two, one = weights(tmp_path / "two"), weights(tmp_path / "one")
    assert max((two[k] - one[k]).abs().max().item() for k in one) < 1e-5
    torch.manual_seed(0)
    init = UnusedHead(sometimes=True).state_dict()
    for k in ("unused_head.weight", "unused_head.bias", "frozen.weight", "frozen.bias"):
        assert torch.equal(two[k], init[k]) and torch.equal(one[k], init[k])  # no gradient, no weight decay
    assert not torch.equal(two["sometimes.weight"], init["sometimes.weight"])  # trained on the steps it is used
    # used by the pre-flight batch, skipped later: DDP's failure becomes one line naming the flag that fixes it
    used_first = args + ["--model-kwargs", '{"sometimes": true, "phase": 1, "with_unused_head": false}',
                         "--batch-size", "16"]
    p = run(train_cmd(2, "accelerate") + used_first + ["--output-dir", str(tmp_path / "fails")])
    assert p.returncode == 1 and "rerun with --find-unused-parameters" in p.stderr
    p = run(train_cmd(2, "accelerate") + used_first + ["--output-dir", str(tmp_path / "forced"),
                                                       "--find-unused-parameters"])
    assert p.returncode == 0, p.stderr[-3000:]
    assert "DDP finds unused parameters every step (--find-unused-parameters)" in p.stdout


# --------------------------------------------------------------------------- kind 7: the pre-flight leaves no trace


def test_preflight_batch_leaves_no_trace_on_batch_norm(tmp_path):
    from plugins_for_tests import BatchNormFirst, indexed_data

    from disttrain.config import Config
    from disttrain.data import ArrayDataset, Data, DataSpec

    out = tmp_path / "run"
    assert main(["--dataset", "plugins_for_tests:indexed_data", "--model", "plugins_for_tests:batchnorm_first",
                 "--no-progress", "--batch-size", "16", "--max-steps", "4", "--output-dir", str(out)]) == 0
    w = weights(out)
    assert int(w["bn.num_batches_tracked"]) == 4  # one per training forward, none for the pre-flight
    # the running statistics of a plain loop over the same 4 batches (BN sees the raw features only)
    train = ArrayDataset(*indexed_data("")[0].tensors)
    order = Data(Config(batch_size=16), train, None, None, DataSpec("classification", [9], 3), 0, 1,
                 torch.device("cpu")).epoch_windows(0)
    torch.manual_seed(0)
    net = BatchNormFirst().train()
    with torch.no_grad():
        for (idx,), _ in order[:4]:
            net(train.x[idx])
    assert torch.equal(w["bn.running_mean"], net.bn.running_mean)
    assert torch.equal(w["bn.running_var"], net.bn.running_var)


# --------------------------------------------------------------------------- kind 8: channels_last default


def test_channels_last_default_falls_back_for_a_view_flatten_model(tmp_path, fmnist_dir, capsys):
    out = tmp_path / "run"
    assert main(["--dataset", "fashion_mnist", "--data-dir", str(fmnist_dir), "--model",
                 "plugins_for_tests:view_flatten_conv", "--max-steps", "3", "--no-progress", "--output-dir",
                 str(out)]) == 0
    assert "channels_last memory format turned off" in capsys.readouterr().out
    assert json.loads((out / "model.json").read_text())["channels_last"] is False


# --------------------------------------------------------------------------- kind 10: dict-shaped samples


def test_dict_samples_train_and_bad_keys_are_one_line(tmp_path, capsys):
    base = ["--model", "plugins_for_tests:recording", "--no-progress", "--epochs", "1", "--batch-size", "32"]
    assert main(base + ["--dataset", "plugins_for_tests:dict_data", "--output-dir", str(tmp_path / "d")]) == 0
    assert main(base + ["--dataset", "plugins_for_tests:indexed_data", "--output-dir", str(tmp_path / "p")]) == 0
    assert bitwise_equal(weights(tmp_path / "d"), weights(tmp_path / "p"))  # the same samples, as mappings
    for kw in ('{"input_key": "pixels"}', '{"target_key": "class"}'):
        capsys.readouterr()
        assert main(base + ["--dataset", "plugins_for_tests:dict_data", "--dataset-kwargs", kw,
                            "--output-dir", str(tmp_path / "bad")]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "need exactly one input key" in err and "Traceback" not in err
    assert not (tmp_path / "bad").exists()
