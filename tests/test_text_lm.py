"""Issue 16: the language-model workload. text:PATH data, the GPT model, per-token loss, perplexity, generation,
tied weights through checkpoint/resume/evaluate/generate, and multi-process equivalence."""

from __future__ import annotations

import json
import math
import random
import signal
from collections import Counter
from pathlib import Path

import pytest
import torch
from conftest import PY, env, run, train_cmd
from safetensors.torch import load_file

from disttrain.config import Config
from disttrain.data.base import DataSpec
from disttrain.data.text import UNK, decode, encode, load_text
from disttrain.errors import UsageError
from disttrain.evaluate import main as evaluate_main
from disttrain.generate import generate, main as generate_main
from disttrain.models import build_model
from disttrain.models.gpt import GPT
from disttrain.optim import build_loss, build_optimizer
from disttrain.train import main

WORDS = ("the king queen lord lady sword crown castle fair foul night day love war speak hence thou art "
         "good my noble what say you").split()


def write_text(path: Path, n_words: int = 3000, seed: int = 0) -> str:
    """Verse-like text with structure a small model learns fast (spellings, spaces, line breaks)."""
    rng = random.Random(seed)
    lines, line, length = [], [], rng.randint(4, 8)
    for _ in range(n_words):
        line.append(rng.choice(WORDS))
        if len(line) == length:
            lines.append(" ".join(line).capitalize() + rng.choice([",", ".", "!", "?"]))
            line, length = [], rng.randint(4, 8)
    text = "\n".join(lines) + "\n"
    path.write_text(text)
    return text


class _Acc:  # the few Accelerator members load_text uses, for tests of the data alone
    is_local_main_process = True

    def local_main_process_first(self):
        import contextlib

        return contextlib.nullcontext()


def text_cfg(tmp_path: Path, src: Path, **kw) -> Config:
    return Config(dataset=f"text:{src}", data_dir=str(tmp_path / "data"), **kw)


def records(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


# --------------------------------------------------------------------------- data


def test_windows_split_by_position_vocab_from_train_and_cache(tmp_path):
    src = tmp_path / "corpus.txt"
    text = "abcabcabd" * 20 + "xyz"  # 'x', 'y', 'z' appear only at the end: validation only
    src.write_text(text)
    cfg = text_cfg(tmp_path, src, block_size=8, val_fraction=0.1)
    train, val, spec = load_text(cfg, _Acc())
    n_val = round(len(text + "\n") * 0.1)
    n_train = len(text) + 1 - n_val
    assert spec.vocab == sorted(set(text[:n_train])) + [UNK]  # training characters, U+FFFD for the unseen
    assert spec.input_shape == spec.target_shape == [8] and spec.num_outputs == len(spec.vocab)
    assert len(train) == (n_train - 1 - 8) // 8 + 1 and len(val) == (n_val - 1 - 8) // 8 + 1
    x, y = train[2]
    assert decode(x, spec.vocab) == text[16:24] and decode(y, spec.vocab) == text[17:25]  # targets shifted by one
    vx, _ = val[0]
    assert decode(vx, spec.vocab) == (text + "\n")[n_train:n_train + 8].replace("x", UNK).replace("y", UNK) \
        .replace("z", UNK)
    cache = list((tmp_path / "data" / "disttrain-cache").glob("text-*.safetensors"))
    assert len(cache) == 1 and load_file(str(cache[0]))["train"].dtype == torch.uint8  # encoded once, 1 byte/char
    again = load_text(cfg, _Acc())
    assert torch.equal(again[0].x, train.x) and again[2].vocab == spec.vocab
    src.write_text(text + "more")  # the cache follows the file
    load_text(cfg, _Acc())
    assert len(list((tmp_path / "data" / "disttrain-cache").glob("text-*.safetensors"))) == 2


def test_folder_corpus_skips_links_and_hidden_files_and_refuses_bad_input(tmp_path):
    d = tmp_path / "corpus"
    (d / "sub").mkdir(parents=True)
    (d / "b.txt").write_text("bbbb")
    (d / "sub" / "a.txt").write_text("aaaa\n")
    (d / ".hidden").write_text("hidden")
    (d / "link.txt").symlink_to(d / "b.txt")
    train, _, spec = load_text(text_cfg(tmp_path, d, block_size=2), _Acc())
    assert decode(train.x.flatten(), spec.vocab) == "bbbb\naaa"  # sorted by path, each file ends in a newline
    (d / "bad.bin").write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(UsageError, match="bad.bin is not UTF-8"):
        load_text(text_cfg(tmp_path, d, block_size=2), _Acc())
    with pytest.raises(UsageError, match="fewer than --block-size 64"):
        load_text(text_cfg(tmp_path, d / "b.txt", block_size=64), _Acc())
    with pytest.raises(UsageError, match="stride"):
        load_text(text_cfg(tmp_path, d / "b.txt", block_size=2, dataset_kwargs={"stride": 0}), _Acc())


def test_bad_text_flags_exit_2_before_writing(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["--dataset", f"text:{tmp_path / 'nope'}", "--model", "gpt", "--output-dir", str(out)]) == 2
    assert "no such file or directory" in capsys.readouterr().err
    assert main(["--dataset", f"text:{tmp_path}", "--block-size", "0", "--output-dir", str(out)]) == 2
    assert not out.exists()


# --------------------------------------------------------------------------- model, loss, optimizer


def test_gpt_is_causal_tied_and_initialised_like_gpt2():
    torch.manual_seed(0)
    m = GPT(vocab_size=11, block_size=16, n_layer=3, n_head=2, n_embd=32)
    sd = m.state_dict()
    assert "wte.weight" in sd and not any("lm_head" in k for k in sd)  # one tensor: the tie is structural
    x = torch.randint(0, 11, (2, 16))
    out = m(x)
    assert out.shape == (2, 16, 11)
    with torch.no_grad():  # the output head is the embedding: changing wte changes the logits accordingly
        h = m.ln_f(m.blocks[-1](m.blocks[-2](m.blocks[0](m.wte(x) + m.wpe(torch.arange(16))))))
        assert torch.allclose(out, h @ m.wte.weight.T, atol=1e-5)
    x2 = x.clone()
    x2[:, 10:] = (x2[:, 10:] + 1) % 11  # changing the future leaves earlier positions' logits unchanged
    assert torch.allclose(m(x2)[:, :10], out[:, :10], atol=1e-6) and not torch.allclose(m(x2)[:, 10:], out[:, 10:])
    proj = torch.cat([b.attn.c_proj.weight.flatten() for b in m.blocks])
    fc = torch.cat([b.mlp.c_fc.weight.flatten() for b in m.blocks])
    assert proj.std().item() == pytest.approx(0.02 / math.sqrt(2 * 3), rel=0.1)
    assert fc.std().item() == pytest.approx(0.02, rel=0.1)
    with pytest.raises(UsageError, match="multiple of n_head"):
        GPT(11, 16, n_head=3, n_embd=32)
    with pytest.raises(UsageError, match="token windows"):
        build_model("gpt", {}, DataSpec("classification", [1, 28, 28], 10))


def test_weight_decay_on_matrices_only():
    m = build_model("gpt", {"n_layer": 1, "n_embd": 16, "n_head": 2, "bias": True},
                    DataSpec("classification", [8], 5, [8], vocab=list("abcde")))
    opt = build_optimizer(Config(optimizer="adamw", weight_decay=0.1), m)
    decay, no_decay = opt.param_groups
    names = {id(p): n for n, p in m.named_parameters()}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert {names[id(p)] for p in decay["params"]} == {n for n, p in m.named_parameters() if p.ndim == 2}
    assert "wte.weight" in {names[id(p)] for p in decay["params"]}  # embeddings (tied head) decay, as nanoGPT
    assert all(p.ndim == 1 for p in no_decay["params"]) and len(no_decay["params"]) > 0  # biases, LayerNorms
    assert len(build_optimizer(Config(optimizer="adamw"), m).param_groups) == 1


def test_sequence_loss_is_the_per_token_mean_for_uneven_windows():
    """The loop weights each window by 1 / windows-in-the-step; with T tokens per window that is exactly the
    per-token mean, whatever the micro-batch split."""
    loss = build_loss(Config(), "classification")
    g = torch.Generator().manual_seed(0)
    out, y = torch.randn(7, 5, 9, generator=g), torch.randint(0, 9, (7, 5), generator=g)
    per_window = loss(out, y)
    assert per_window.shape == (7,)
    token_mean = torch.nn.functional.cross_entropy(out.flatten(0, 1), y.flatten())
    for split in ([7], [4, 3], [1, 1, 5]):  # e.g. uneven micro-batches or ranks
        parts = per_window.split(split)
        assert (sum(p.sum() for p in parts) / 7).item() == pytest.approx(token_mean.item(), rel=1e-6)


def test_encode_decode_round_trip():
    vocab = sorted(set("hello world\n")) + [UNK]
    assert decode(encode("hello\nworld", vocab), vocab) == "hello\nworld"
    assert decode(encode("hellq", vocab), vocab) == "hell" + UNK
    with pytest.raises(UsageError, match="not in the model's vocabulary"):
        encode("q", list("ab"))


# --------------------------------------------------------------------------- end to end, in process


GPT_ARGS = ["--model", "gpt", "--model-kwargs", '{"n_layer": 2, "n_head": 2, "n_embd": 32, "dropout": 0.1}',
            "--block-size", "16", "--val-fraction", "0.1", "--optimizer", "adamw", "--lr", "3e-3",
            "--weight-decay", "0.1", "--scheduler", "cosine", "--warmup-steps", "3", "--max-grad-norm", "1.0",
            "--batch-size", "16", "--log-every", "5", "--no-progress"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("corpus") / "verse.txt"
    write_text(p, 1200)
    return p


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory, corpus):
    """An in-process run: 2 epochs with checkpoints every 10 steps."""
    out = tmp_path_factory.mktemp("lm") / "run"
    args = ["--dataset", f"text:{corpus}", "--data-dir", str(out.parent / "data"), *GPT_ARGS, "--epochs", "2",
            "--save-every-steps", "10", "--ema-decay", "0.9", "--output-dir", str(out)]
    assert main(args) == 0
    return out, args


def test_metrics_perplexity_bits_per_char_tokens_per_sec(lm_run):
    out, _ = lm_run
    recs = records(out)
    steps = [r for r in recs if r["kind"] == "step"]
    ep = [r for r in recs if r["kind"] == "epoch"]
    assert steps and all(r["tokens_per_sec"] == pytest.approx(16 * r["samples_per_sec"]) for r in steps)
    last = ep[-1]
    assert last["val_perplexity"] == pytest.approx(math.exp(last["val_loss"]))
    assert last["val_bits_per_char"] == pytest.approx(last["val_loss"] / math.log(2))
    assert ep[-1]["val_loss"] < ep[0]["val_loss"] < math.log(len(json.loads((out / "model.json").read_text())
                                                                   ["spec"]["vocab"]))


def test_evaluate_and_generate_load_the_tied_model(lm_run, capsys, tmp_path):
    out, _ = lm_run
    last = [r for r in records(out) if r["kind"] == "epoch"][-1]
    res = tmp_path / "e.json"
    assert evaluate_main(["--checkpoint", str(out), "--split", "val", "--json", str(res)]) == 0
    ev = json.loads(res.read_text())
    assert ev["eval_loss"] == pytest.approx(last["val_loss"], rel=1e-6)
    assert ev["eval_perplexity"] == pytest.approx(last["val_perplexity"], rel=1e-6)
    assert "bits/char" in capsys.readouterr().out
    meta = json.loads((out / "model.json").read_text())
    vocab = meta["spec"]["vocab"]
    a = generate(str(out), "The king", max_new_tokens=60, temperature=0.8, top_k=5, seed=3, num_samples=2)
    b = generate(str(out), "The king", max_new_tokens=60, temperature=0.8, top_k=5, seed=3, num_samples=2)
    c = generate(str(out), "The king", max_new_tokens=60, temperature=0.8, top_k=5, seed=4, num_samples=2)
    assert a == b and a != c  # deterministic for a seed
    assert all(s.startswith("The king") and len(s) == 68 and set(s) <= set(vocab) for s in a)
    # the vocabulary round-trips: the decoded text re-encodes to the ids the model produced
    assert decode(encode(a[0], vocab), vocab) == a[0]
    # a checkpoint directory works as well as the run directory
    step = sorted((out / "checkpoints").glob("step_*"))[-1]
    assert generate(str(step), "The", max_new_tokens=5, seed=1) == generate(str(out), "The", max_new_tokens=5, seed=1)
    capsys.readouterr()
    assert generate_main(["--checkpoint", str(out), "--prompt", "Q\u00e9", "--max-new-tokens", "3"]) == 2
    assert "not in the model's vocabulary" in capsys.readouterr().err
    assert generate_main(["--checkpoint", str(out), "--prompt", "The", "--temperature", "0"]) == 2


@pytest.mark.parametrize("point", ["after-rename"])
def test_kill_9_then_resume_is_bitwise_with_tied_weights_and_dropout(lm_run, tmp_path, point):
    """One process killed by SIGKILL right after a checkpoint; the resume ends bitwise equal to the
    uninterrupted run (weights, with the tie; dropout RNG; schedule; metrics)."""
    ref, args = lm_run
    out = tmp_path / "run"
    args = [a if a != str(ref) else str(out) for a in args]
    p = run([PY, "-m", "disttrain.train", *args], env=env(DISTTRAIN_FAULT=f"{point}:20"))
    assert p.returncode == -signal.SIGKILL, p.stderr[-2000:]
    assert main([*args, "--resume", "auto"]) == 0
    last = sorted((ref / "checkpoints").glob("step_*"))[-1].name
    for f in ("model.safetensors", f"checkpoints/{last}/model.safetensors", f"checkpoints/{last}/ema.safetensors"):
        a, b = load_file(str(ref / f)), load_file(str(out / f))  # exported (EMA), raw and EMA weights
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f
    ema, raw = (load_file(str(ref / "checkpoints" / last / f)) for f in ("ema.safetensors", "model.safetensors"))
    assert not torch.equal(ema["wte.weight"], raw["wte.weight"])  # really an average, not the weights
    assert all(torch.equal(ema[k], v) for k, v in load_file(str(ref / "model.safetensors")).items())  # exported
    ra = [r for r in records(ref) if r["kind"] == "epoch"]
    rb = [r for r in records(out) if r["kind"] == "epoch"]
    assert [r["val_loss"] for r in ra] == [r["val_loss"] for r in rb]


def test_eval_every_steps_writes_eval_lines(corpus, tmp_path):
    out = tmp_path / "run"
    assert main(["--dataset", f"text:{corpus}", "--data-dir", str(tmp_path / "data"), *GPT_ARGS, "--epochs", "1",
                 "--eval-every-steps", "4", "--output-dir", str(out)]) == 0
    recs = records(out)
    evals = [r for r in recs if r["kind"] == "eval"]
    steps_per_epoch = [r for r in recs if r["kind"] == "epoch"][0]["step"]
    assert [r["step"] for r in evals] == list(range(4, steps_per_epoch, 4))
    assert all("val_perplexity" in r for r in evals)


# --------------------------------------------------------------------------- real processes


@pytest.mark.slow
def test_one_by_32_equals_two_by_16_equals_16_by_2_on_text(tmp_path, corpus):
    """Uneven windows: 1x32 == 2x16 == 1x16 with 2 accumulation steps, to float tolerance (no dropout)."""
    common = ["--dataset", f"text:{corpus}", "--data-dir", str(tmp_path / "data"), "--model", "gpt",
              "--model-kwargs", '{"n_layer": 1, "n_head": 2, "n_embd": 16}', "--block-size", "16",
              "--val-fraction", "0.1", "--optimizer", "adamw", "--weight-decay", "0.1", "--max-grad-norm", "0.5",
              "--epochs", "2", "--no-progress", "--dataset-kwargs", '{"stride": 13}']
    outs = {}
    for name, prefix, extra in (("a", [PY, "-m", "disttrain.train"], ["--batch-size", "32"]),
                                ("b", train_cmd(2, "accelerate"), ["--batch-size", "16"]),
                                ("c", [PY, "-m", "disttrain.train"], ["--batch-size", "16", "--grad-accum", "2"])):
        outs[name] = tmp_path / name
        p = run(prefix + common + extra + ["--output-dir", str(outs[name])])
        assert p.returncode == 0, p.stderr[-2000:]
    w = {k: load_file(str(v / "model.safetensors")) for k, v in outs.items()}
    for other in ("b", "c"):
        assert max((w["a"][k] - w[other][k]).abs().max().item() for k in w["a"]) < 1e-5
    ep = {k: [r for r in records(v) if r["kind"] == "epoch"] for k, v in outs.items()}
    n_windows = ep["a"][0]["step"]
    assert n_windows * 32 != len(load_text(text_cfg(tmp_path, corpus, block_size=16, val_fraction=0.1,
                                                     dataset_kwargs={"stride": 13}), _Acc())[0])  # uneven
    for other in ("b", "c"):
        assert [r["val_loss"] for r in ep["a"]] == pytest.approx([r["val_loss"] for r in ep[other]], rel=1e-5)
        assert [r["train_loss"] for r in ep["a"]] == pytest.approx([r["train_loss"] for r in ep[other]], rel=1e-5)


@pytest.mark.slow
def test_kill_9_two_processes_resume_bitwise(tmp_path, corpus):
    args = ["--dataset", f"text:{corpus}", "--data-dir", str(tmp_path / "data"), *GPT_ARGS, "--epochs", "1",
            "--batch-size", "8", "--save-every-steps", "10"]
    ref, out = tmp_path / "ref", tmp_path / "out"
    assert run(train_cmd(2, "accelerate") + args + ["--output-dir", str(ref)]).returncode == 0
    p = run(train_cmd(2, "accelerate") + args + ["--output-dir", str(out)], env=env(DISTTRAIN_FAULT="after-rename:20"))
    assert p.returncode != 0 and (out / "checkpoints" / "step_00000020").is_dir()
    p = run(train_cmd(2, "accelerate") + args + ["--output-dir", str(out), "--resume", "auto"])
    assert p.returncode == 0, p.stderr[-2000:]
    a, b = load_file(str(ref / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_tiny_gpt_beats_a_unigram_model(tmp_path):
    """A few hundred steps take the validation loss well below the unigram entropy of the corpus."""
    src = tmp_path / "verse.txt"
    text = write_text(src, 20000, seed=1)
    n_val = round(len(text) * 0.1)
    train, val = text[:len(text) - n_val], text[len(text) - n_val:]
    counts = Counter(train)
    unigram = -sum(math.log(counts[c] / len(train)) for c in val[1:]) / (len(val) - 1)  # nats per character
    out = tmp_path / "run"  # in process: no start-up, no wall-clock limit on a loaded machine
    assert main(["--dataset", f"text:{src}", "--data-dir", str(tmp_path / "data"), *GPT_ARGS, "--epochs", "1",
                 "--max-steps", "250", "--batch-size", "32", "--output-dir", str(out)]) == 0
    val_loss = [r for r in records(out) if r["kind"] == "epoch"][-1]["val_loss"]
    print(f"unigram {unigram:.3f} nats/char, GPT {val_loss:.3f}")
    assert val_loss < unigram - 0.5


# --------------------------------------------------------------------------- EMA, early stopping (any model)


def test_ema_is_the_moving_average_and_applied_restores_the_weights():
    from disttrain.ema import EMA

    m = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    ema = EMA(m, 0.75)
    w0 = m[0].weight.detach().clone()
    with torch.no_grad():
        m[0].weight.add_(1.0)
    m(torch.randn(4, 3))  # BN statistics move; num_batches_tracked (an integer buffer) is copied
    ema.update()
    sd = ema.state_dict()
    assert torch.allclose(sd["0.weight"], 0.75 * w0 + 0.25 * (w0 + 1.0))
    assert sd["1.num_batches_tracked"].item() == 1
    w1 = m[0].weight.detach().clone()
    with ema.applied():
        assert torch.equal(m[0].weight, sd["0.weight"])
    assert torch.equal(m[0].weight, w1)


def test_early_stopping_after_patience_keeps_the_best(tmp_path):
    """lr 1e-30: the weights cannot move in float32, so the validation loss never improves after epoch 1."""
    out = tmp_path / "run"
    args = ["--dataset", "synthetic_regression", "--model", "linear", "--optimizer", "sgd", "--lr", "1e-30",
            "--val-fraction", "0.2", "--epochs", "10", "--batch-size", "64", "--early-stop-patience", "2",
            "--no-progress", "--output-dir", str(out)]
    assert main(args) == 0
    recs = records(out)
    ep = [r for r in recs if r["kind"] == "epoch"]
    assert [r["epoch"] for r in ep] == [1, 2, 3]  # best at 1, then 2 epochs without improvement
    stop = [r for r in recs if r["kind"] == "early_stop"]
    assert len(stop) == 1 and stop[0]["best"]["epoch"] == 1
    assert json.loads((out / "status.json").read_text())["state"] == "completed"
    best = json.loads((out / "checkpoints" / "best" / "best.json").read_text())
    assert best["epoch"] == 1 and best["step"] == ep[0]["step"]
    assert main(args[:-3] + ["--output-dir", str(out), "--resume", "auto"]) == 0  # a stopped run stays stopped
    assert [r["epoch"] for r in records(out) if r["kind"] == "epoch"] == [1, 2, 3]
