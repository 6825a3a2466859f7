"""The first hour of a new user: help texts, "did you mean", strict YAML types, the launcher's `--`,
`python -m disttrain`, file modes, and what the console shows."""

from __future__ import annotations

import io
import os
import sys

import pytest
from conftest import PY, install_plugin, run

from disttrain import launch
from disttrain.checkpoint import umask
from disttrain.config import build_parser, parse_config
from disttrain.errors import UsageError
from disttrain.train import main as train_main

SYNTH = ["--dataset", "synthetic_classification", "--model", "mlp", "--no-progress"]


def test_help_lists_choices_and_says_each_default_once():
    text = build_parser().format_help()
    for flag, choices in (("--loss", "{cross_entropy,mse,l1,bce_with_logits}"), ("--optimizer", "{sgd,adam,adamw}"),
                          ("--scheduler", "{constant,cosine,onecycle,step}"), ("--augment", "{none,flip,crop,crop_flip}"),
                          ("--task", "{auto,classification,regression}")):
        assert f"{flag} {choices}" in text, flag
    flat = " ".join(text.split())
    for action in build_parser()._actions:  # no "(default: ...)" twice in one flag's help
        assert (action.help or "").count("default") <= 1, action.option_strings
    assert "default: None" not in flat
    for path in ("imagefolder:DIR", "csv:FILE", "hf:PATH"):
        assert path in flat


@pytest.mark.parametrize("argv, hint", [
    (["--learnig-rate", "0.1"], "--learnig-rate (did you mean --lr?)"),
    (["--learning-rate", "0.1"], "(did you mean --lr?)"),
    (["--epoch", "3"], "(did you mean --epochs?)"),
    (["--batchsize", "3"], "(did you mean --batch-size?)"),
    (["--num-epochs=3"], "(did you mean --epochs?)"),
])
def test_mistyped_flag_gets_did_you_mean(argv, hint):
    with pytest.raises(UsageError, match="did you mean") as e:
        parse_config(argv)
    assert hint in str(e.value)


@pytest.mark.parametrize("doc, words", [
    ("learnig_rate: 0.1\n", "learnig_rate (did you mean lr?)"),
    ("num_epochs: 3\n", "num_epochs (did you mean epochs?)"),
    ("batch_sise: 3\n", "batch_sise (did you mean batch_size?)"),
    ('epochs: "2"\n', "must be an integer, got the string '2'"),
    ("epochs: 2.5\n", "must be an integer, got 2.5"),
    ('lr: "0.1"\n', "must be a number, got the string '0.1'"),
    ('progress: "no"\n', "must be true or false, got the string 'no'"),
])
def test_yaml_near_misses_and_wrong_types_refused(tmp_path, doc, words):
    f = tmp_path / "c.yaml"
    f.write_text(doc)
    with pytest.raises(UsageError) as e:
        parse_config(["--config", str(f)])
    assert words in str(e.value)


def test_yaml_integral_float_and_exponent_accepted(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("epochs: 2.0\nlr: 1e-3\nweight_decay: 5E-4\nmax_steps: null\nprogress: no\n")
    cfg = parse_config(["--config", str(f)])
    assert (cfg.epochs, cfg.lr, cfg.weight_decay, cfg.max_steps, cfg.progress) == (2, 1e-3, 5e-4, None, False)
    assert isinstance(cfg.epochs, int)


def test_launch_help_and_refusal_without_separator(capsys):
    assert launch.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "-- [TRAINING FLAGS]" in out and "accelerate launch --help" in out and "disttrain.train --help" in out
    assert launch.main(["--model", "mlp"]) == 2  # ambiguous: refused, nothing started
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "put `--` between" in err[0] and "-- --model mlp" in err[0], err


def test_python_m_disttrain_prints_usage():
    p = run([PY, "-m", "disttrain"], timeout=60)
    assert p.returncode == 0 and "commands:" in p.stdout
    for cmd in ("train", "launch", "evaluate", "predict", "plot"):
        assert f"python -m disttrain.{cmd}" in p.stdout


def test_written_files_follow_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        assert umask() == 0o027
        out = tmp_path / "run"
        assert train_main([*SYNTH, "--epochs", "1", "--output-dir", str(out)]) == 0
    finally:
        os.umask(old)
    files = [out / "model.safetensors", out / "model.json", out / "config.yaml",
             *sorted((out / "checkpoints").glob("step_*/*.safetensors"))]
    assert len(files) > 4
    for f in files:
        assert f.stat().st_mode & 0o777 == 0o640, f  # 0666 & ~027, like any file the user's programs write


def test_epoch_count_shown_is_what_max_steps_allows(tmp_path, capsys):
    assert train_main([*SYNTH, "--epochs", "5", "--max-steps", "3", "--log-every", "1",
                       "--output-dir", str(tmp_path / "r")]) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("Epoch")]
    assert lines and all(ln.startswith("Epoch [1/1]") for ln in lines), lines


STOPPER = """
import os, signal
import torch.nn as nn

class Stopper(nn.Module):
    def __init__(self):
        super().__init__()
        self.net, self.calls = nn.Sequential(nn.Flatten(), nn.Linear(16, 4)), 0

    def forward(self, x):
        self.calls += 1
        if self.training and self.calls == 4:  # (call 1 is the pre-flight batch check)
            os.kill(os.getpid(), signal.SIGTERM)
        return self.net(x)

def build():
    return Stopper()
"""


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_stop_message_starts_its_own_line_after_the_progress_bar(tmp_path, monkeypatch):
    gen = install_plugin(tmp_path, monkeypatch, "dt_stopper", STOPPER)
    next(gen)
    fake = _Tty()
    monkeypatch.setattr(sys, "stderr", fake)
    code = train_main(["--dataset", "synthetic_classification", "--model", "dt_stopper:build", "--epochs", "1",
                       "--output-dir", str(tmp_path / "r")])
    monkeypatch.undo()
    assert code == 75
    text = fake.getvalue()
    assert "it/s" in text or "step/s" in text or "%|" in text  # the bar was drawn
    line = next(ln for ln in text.split("\n") if "disttrain: stopped by SIGTERM" in ln)
    shown = line.split("\r")[-1]  # what a terminal shows on that line
    assert shown.startswith("disttrain: stopped by SIGTERM"), repr(line)
