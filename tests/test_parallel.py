"""parallel.py: FSDP2 beside DDP. Same results on any world size, sharded pickle-free checkpoints that resume
bitwise after kill -9 and on other world sizes / the other strategy, and the Accelerate FSDP-on-CPU trap."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import LAUNCH, PY, env, free_port, run, train_cmd, ACCELERATE
from safetensors import safe_open
from safetensors.torch import load_file

from disttrain import checkpoint as ckpt
from disttrain.train import main

# AdamW + warmup + cosine + clipping + accumulation; no dropout (per-rank RNG streams differ across sizes)
EQ = ["--dataset", "plugins_for_tests:indexed_data", "--model", "mlp", "--model-kwargs", '{"hidden": 32}',
      "--no-progress", "--epochs", "3", "--optimizer", "adamw", "--weight-decay", "0.05", "--lr", "0.01",
      "--scheduler", "cosine", "--warmup-steps", "3", "--max-grad-norm", "0.5", "--grad-accum", "2",
      "--save-every-steps", "4", "--dataset-kwargs", '{"n_train": 320}']
GLOBAL = 32  # samples per micro-batch over all ranks (x grad-accum 2 = global batch 64)


def launch(nproc: int, config: str | None = None) -> list[str]:
    if config is None:
        return train_cmd(nproc, "accelerate") if nproc > 1 else [PY, "-m", "disttrain.train"]
    return [ACCELERATE, "launch", "--config_file", str(LAUNCH / config), "--num_processes", str(nproc),
            "--main_process_port", str(free_port()), "-m", "disttrain.train"]


def train(out, nproc: int, *extra: str, config: str | None = None, **env_extra: str):
    return run(launch(nproc, config) + EQ + ["--batch-size", str(GLOBAL // nproc), "--output-dir", str(out), *extra],
               env=env(**env_extra))


def weights(run_dir):
    return load_file(str(run_dir / "model.safetensors"))


def max_diff(a, b) -> float:
    assert set(a) == set(b)
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def refs(tmp_path_factory):
    """Uninterrupted runs: FSDP2 on 2 processes (asked for by the FSDP launch config alone: the trap),
    DDP on 2 processes, and one process."""
    root = tmp_path_factory.mktemp("refs")
    out = {}
    for name, nproc, config in (("fsdp", 2, "fsdp.yaml"), ("ddp", 2, None), ("one", 1, None)):
        p = train(root / name, nproc, config=config)
        assert p.returncode == 0, p.stderr[-3000:]
        out[name] = (root / name, p.stdout)
    return out


@pytest.mark.slow
def test_fsdp_matches_ddp_and_one_process_with_sharded_pickle_free_checkpoints(refs):
    fsdp, stdout = refs["fsdp"]
    # the FSDP launch config on CPU shards (Accelerate alone would have trained DDP and said nothing)
    assert "sharding fsdp2 (2 ranks, ~" in stdout and "gradients averaged by shared memory reduce-scatter" in stdout
    assert "sharding none" in refs["ddp"][1]
    a = weights(fsdp)  # the export: full, unsharded, plain safetensors
    assert max_diff(a, weights(refs["ddp"][0])) < 1e-5
    assert max_diff(a, weights(refs["one"][0])) < 1e-5
    # each rank held about half of every sharded tensor: one file per rank, dim-0 shards
    step = fsdp / "checkpoints" / "step_00000012"
    files = sorted((step / "shards").iterdir())
    assert [f.name for f in files] == ["shard-00001-model-00001-of-00001.safetensors",
                                       "shard-00002-model-00001-of-00001.safetensors"]
    total = sum(v.numel() for v in a.values())
    for f in files:
        with safe_open(str(f), "pt") as s:
            held = sum(s.get_slice(k).get_shape()[0] * max(1, _prod(s.get_slice(k).get_shape()[1:]))
                       for k in s.keys() if k.startswith("model."))
        assert 0.4 * total <= held <= 0.6 * total, (f.name, held, total)
    assert ckpt.verify(step) is None
    manifest = json.loads((step / "manifest.json").read_text())
    assert {"shards/" + f.name for f in files} <= set(manifest["files"]) and "model.safetensors" not in manifest["files"]
    # no pickle anywhere: every file is safetensors (8-byte header length + JSON) or JSON
    for run_dir, _ in refs.values():
        for f in (run_dir / "checkpoints").rglob("*"):
            if f.is_file():
                _assert_not_pickle(f)


def _prod(xs) -> int:
    n = 1
    for x in xs:
        n *= x
    return n


def _assert_not_pickle(f) -> None:
    raw = f.read_bytes()
    assert not raw.startswith(b"PK\x03\x04"), f"{f}: a zip (torch.save) archive"
    assert not raw.startswith(b"\x80"), f"{f}: a pickle (protocol opcode)"
    if f.suffix == ".json":
        json.loads(raw)
    else:
        assert f.suffix == ".safetensors", f
        n = int.from_bytes(raw[:8], "little")
        header = json.loads(raw[8:8 + n])
        dtypes = {v["dtype"] for k, v in header.items() if k != "__metadata__"}
        assert dtypes <= {"F32", "F64", "I64", "BF16", "F16", "I32", "U8", "BOOL"}, (f, dtypes)


@pytest.mark.slow
def test_fsdp_resumes_on_other_world_sizes_and_as_ddp(refs, tmp_path):
    """Killed at step 8: FSDP 2 -> 1 process, FSDP 2 -> DDP 2, and 1 process -> FSDP 2, all within 1e-6."""
    ref = weights(refs["fsdp"][0])
    killed = tmp_path / "fsdp2"
    p = train(killed, 2, "--sharding", "fsdp", DISTTRAIN_FAULT="after-rename:8")
    assert p.returncode != 0 and (killed / "checkpoints" / "step_00000008" / "shards").is_dir()
    to_ddp = tmp_path / "to_ddp"
    shutil.copytree(killed, to_ddp)
    # 2 -> 1 in this process (an unsharded model reads the shards whole)
    assert main(EQ + ["--batch-size", str(GLOBAL), "--output-dir", str(killed), "--resume", "auto"]) == 0
    assert max_diff(weights(killed), ref) < 1e-6
    p = train(to_ddp, 2, "--sharding", "none", "--resume", "auto")
    assert p.returncode == 0, p.stderr[-3000:]
    assert "resumed from" in p.stdout and max_diff(weights(to_ddp), ref) < 1e-6
    one = tmp_path / "one"
    p = train(one, 1, DISTTRAIN_FAULT="after-rename:8")
    assert p.returncode != 0 and (one / "checkpoints" / "step_00000008" / "model.safetensors").is_file()
    p = train(one, 2, "--sharding", "fsdp", "--resume", "auto")
    assert p.returncode == 0, p.stderr[-3000:]
    assert "sharding fsdp2" in p.stdout and max_diff(weights(one), ref) < 1e-6


KILL = ["--dataset", "plugins_for_tests:indexed_data", "--model", "mlp", "--model-kwargs", '{"dropout": 0.2}',
        "--no-progress", "--epochs", "2", "--batch-size", "16", "--optimizer", "adamw", "--scheduler", "cosine",
        "--warmup-steps", "2", "--grad-accum", "2", "--save-every-steps", "3", "--dataset-kwargs", '{"n_train": 320}',
        "--sharding", "fsdp"]


@pytest.mark.slow
def test_fsdp_kill_dash_nine_at_fixed_points_resumes_bitwise(tmp_path):
    """SIGKILL inside saves (every rank after writing its shards; the main process before and after the rename),
    resume each time: the result is bitwise the uninterrupted run's (dropout: per-rank RNG restored)."""
    ref, out = tmp_path / "ref", tmp_path / "out"
    assert run(train_cmd(2, "accelerate") + KILL + ["--output-dir", str(ref)]).returncode == 0
    for point in ("wrote-shards:3", "before-rename:6", "after-rename:9"):
        p = run(train_cmd(2, "accelerate") + KILL + ["--output-dir", str(out), "--resume", "auto"],
                env=env(DISTTRAIN_FAULT=point))
        assert p.returncode != 0, point
    p = run(train_cmd(2, "accelerate") + KILL + ["--output-dir", str(out), "--resume", "auto"])
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.count("resumed from") == 1 and "step 9" in p.stdout
    a, b = weights(out), weights(ref)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_sharding_none_under_an_fsdp_launch_config_is_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    out = tmp_path / "run"
    assert main(EQ + ["--batch-size", "16", "--output-dir", str(out), "--sharding", "none"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "ACCELERATE_USE_FSDP=true" in err[0] and not out.exists()


@pytest.mark.parametrize("extra, words", [(["--mixed-precision", "fp16"], "fp16"),
                                          (["--sync-batchnorm"], "--sync-batchnorm")])
def test_impossible_fsdp_combinations_are_refused(tmp_path, capsys, extra, words):
    out = tmp_path / "run"
    assert main(EQ + ["--batch-size", "16", "--output-dir", str(out), "--sharding", "fsdp", *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and words in err[0] and not out.exists()


def test_fsdp_units_are_modulelist_children_and_resnet_stages():
    import torchvision
    from torch import nn

    from disttrain.parallel import fsdp_blocks, tied_aliases

    class GPTLike(nn.Module):
        def __init__(self):
            super().__init__()
            self.wte = nn.Embedding(10, 4)
            self.h = nn.ModuleList(nn.Linear(4, 4) for _ in range(3))
            self.lm_head = nn.Linear(4, 10, bias=False)
            self.lm_head.weight = self.wte.weight

    g = GPTLike()
    assert fsdp_blocks(g) == list(g.h)
    assert tied_aliases(g) == {"lm_head.weight": "wte.weight"}
    r = torchvision.models.resnet18(weights=None)
    assert fsdp_blocks(r) == [r.layer1, r.layer2, r.layer3, r.layer4]
    assert fsdp_blocks(nn.Sequential(nn.Linear(2, 2), nn.ReLU())) == []


def test_sharding_follows_the_launch_config(monkeypatch):
    from disttrain.config import parse_config
    from disttrain.parallel import reshard_after_forward, resolve_sharding

    assert resolve_sharding(parse_config([])) == "none"
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_RESHARD_AFTER_FORWARD", "false")
    cfg = parse_config([])
    assert resolve_sharding(cfg) == "fsdp" and reshard_after_forward(cfg) is False
    assert reshard_after_forward(parse_config(["--fsdp-reshard-after-forward"])) is True


@pytest.mark.slow
def test_gpt_with_tied_embeddings_and_ema_under_fsdp(tmp_path):
    """The GPT (tied input/output embedding, one FSDP unit per block) with --ema-decay: FSDP on 2 processes
    matches 1 process (the exported average and the raw weights); killed at step 8, it resumes bitwise as FSDP
    on 2 processes and within 1e-6 on 1 process; evaluate and generate read the sharded checkpoint."""
    from test_text_lm import write_text

    from disttrain.evaluate import main as evaluate_main
    from disttrain.generate import generate

    corpus = tmp_path / "verse.txt"
    write_text(corpus, 800)
    args = ["--dataset", f"text:{corpus}", "--data-dir", str(tmp_path / "data"), "--model", "gpt",
            "--model-kwargs", '{"n_layer": 2, "n_head": 2, "n_embd": 16, "dropout": 0.0}', "--block-size", "16",
            "--val-fraction", "0.1", "--optimizer", "adamw", "--weight-decay", "0.1", "--max-grad-norm", "0.5",
            "--scheduler", "cosine", "--warmup-steps", "2", "--ema-decay", "0.9", "--epochs", "2", "--no-progress",
            "--save-every-steps", "4"]

    def go(out, nproc, *extra, **env_extra):
        cmd = launch(nproc) + args + ["--batch-size", str(16 // nproc), "--output-dir", str(out), *extra]
        return run(cmd + (["--sharding", "fsdp"] if nproc > 1 else []), env=env(**env_extra))

    one, fsdp, killed = tmp_path / "one", tmp_path / "fsdp", tmp_path / "killed"
    for out, nproc in ((one, 1), (fsdp, 2)):
        p = go(out, nproc)
        assert p.returncode == 0, p.stderr[-3000:]
    assert "sharding fsdp2 (2 ranks" in p.stdout
    ref = weights(fsdp)  # the exported average, gathered whole
    assert "wte.weight" in ref and max_diff(ref, weights(one)) < 1e-5
    last = sorted((fsdp / "checkpoints").glob("step_*"))[-1]
    assert (last / "shards").is_dir() and not (last / "ema.safetensors").exists()
    raw = ckpt.read_shards_full(ckpt.load_checkpoint(last))
    assert not torch.equal(raw["ema.wte.weight"], raw["model.wte.weight"])  # an average, not the weights
    assert torch.equal(raw["ema.wte.weight"], ref["wte.weight"])
    p = go(killed, 2, DISTTRAIN_FAULT="after-rename:8")
    assert p.returncode != 0 and (killed / "checkpoints" / "step_00000008" / "shards").is_dir()
    to_one = tmp_path / "to_one"
    shutil.copytree(killed, to_one)
    p = go(killed, 2, "--resume", "auto")
    assert p.returncode == 0, p.stderr[-3000:]
    a = weights(killed)
    assert all(torch.equal(a[k], ref[k]) for k in ref)  # same world size: bitwise
    p = go(to_one, 1, "--resume", "auto")
    assert p.returncode == 0, p.stderr[-3000:]
    assert max_diff(weights(to_one), ref) < 1e-6
    res = tmp_path / "e.json"
    assert evaluate_main(["--checkpoint", str(last), "--split", "val", "--json", str(res)]) == 0
    final = [json.loads(s) for s in (fsdp / "metrics.jsonl").read_text().splitlines()][-1]
    assert json.loads(res.read_text())["eval_loss"] == pytest.approx(final["val_loss"], rel=1e-6)
    assert generate(str(last), "The", max_new_tokens=8, seed=1) == generate(str(fsdp), "The", max_new_tokens=8, seed=1)


@pytest.mark.slow
def test_fsdp_resumes_from_two_ranks_on_three(tmp_path):
    """Killed at step 4 on 2 FSDP ranks, resumed on 3 (DCP reshards the dim-0 shards, now uneven) at the same
    global batch (2 x 24 = 3 x 16): within 1e-6 of the uninterrupted 2-rank run."""
    def go(out, nproc, *extra, **env_extra):
        cmd = launch(nproc) + EQ + ["--batch-size", str(48 // nproc), "--output-dir", str(out), "--sharding", "fsdp"]
        return run(cmd + list(extra), env=env(**env_extra))

    ref, out = tmp_path / "ref", tmp_path / "out"
    p = go(ref, 2)
    assert p.returncode == 0, p.stderr[-3000:]
    p = go(out, 2, DISTTRAIN_FAULT="after-rename:4")
    assert p.returncode != 0 and (out / "checkpoints" / "step_00000004" / "shards").is_dir()
    p = go(out, 3, "--resume", "auto")
    assert p.returncode == 0, p.stderr[-3000:]
    assert "sharding fsdp2 (3 ranks" in p.stdout and "resumed from" in p.stdout
    assert max_diff(weights(out), weights(ref)) < 1e-6


@pytest.mark.slow
def test_conv_nets_shard_with_channels_last_turned_off(tmp_path, fmnist_dir):
    """A conv net under FSDP (channels_last is disttrain's default for them, but FSDP2 takes contiguous
    parameters only): it trains, says so in one note, and matches one process (lenet: no batch norm, whose
    statistics are per process)."""
    args = ["--data-dir", str(fmnist_dir), "--model", "lenet", "--epochs", "1", "--max-steps", "4", "--no-progress",
            "--optimizer", "adamw"]
    one, fsdp = tmp_path / "one", tmp_path / "fsdp"
    p = run(launch(1) + args + ["--batch-size", "32", "--output-dir", str(one)], env=env())
    assert p.returncode == 0, p.stderr[-3000:]
    p = run(launch(2) + args + ["--batch-size", "16", "--output-dir", str(fsdp), "--sharding", "fsdp"], env=env())
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.count("channels_last memory format is off under --sharding fsdp") == 1
    assert json.loads((fsdp / "model.json").read_text())["channels_last"] is False
    assert max_diff(weights(fsdp), weights(one)) < 1e-5


def test_fsdp_refuses_a_scalar_parameter_in_one_line(tmp_path):
    """fully_shard cannot shard a 0-dim parameter: one line, exit 2, nothing written (2 real processes)."""
    import os

    (tmp_path / "plugins").mkdir()
    (tmp_path / "plugins" / "scalar_plugin.py").write_text("""
import torch
from torch import nn

class Scaled(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 3)
        self.scale = nn.Parameter(torch.tensor(1.0))

    def forward(self, x):
        return self.fc(x) * self.scale

def scaled(**kw):
    return Scaled()
""")
    out = tmp_path / "run"
    path = os.pathsep.join([str(tmp_path / "plugins"), os.environ.get("PYTHONPATH", "")])
    cmd = [PY, "-m", "disttrain.launch", "--config_file", str(LAUNCH / "cpu-multi.yaml"), "--num_processes", "2",
           "--main_process_port", str(free_port()), "--"]  # the launcher that turns a refusal into exit 2
    p = run(cmd + EQ + ["--batch-size", "16", "--output-dir", str(out), "--sharding", "fsdp", "--model",
                        "scalar_plugin:scaled", "--model-kwargs", "{}"], env=env(PYTHONPATH=path))
    assert p.returncode == 2, p.stderr[-3000:]
    last = p.stderr.strip().splitlines()[-1]  # the launcher repeats the worker's refusal as the last line
    assert last.startswith("disttrain: error: --sharding fsdp: parameter 'scale' is a scalar") and not out.exists()


def test_launch_refuses_impossible_fsdp_combinations_before_starting(tmp_path):
    out = tmp_path / "run"
    p = run([PY, "-m", "disttrain.launch", "--num_processes", "2", "--", *EQ, "--batch-size", "16",
             "--output-dir", str(out), "--sharding", "fsdp", "--mixed-precision", "fp16"], env=env())
    assert p.returncode == 2 and p.stderr.strip().count("\n") == 0 and "fp16" in p.stderr and not out.exists()
