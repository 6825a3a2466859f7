"""config.py: precedence, strictness, YAML type conversion."""

from __future__ import annotations

import pytest
import yaml

from disttrain.config import Config, config_diff, parse_config, to_yaml
from disttrain.errors import UsageError


def write(tmp_path, data) -> str:
    p = tmp_path / "c.yaml"
    p.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return str(p)


def test_defaults_are_the_plain_loop():
    cfg = parse_config([])
    assert (cfg.dataset, cfg.model, cfg.optimizer, cfg.lr, cfg.scheduler, cfg.warmup_steps) == \
        ("fashion_mnist", "cnn", "adam", 1e-3, "constant", 0)
    assert cfg.momentum == 0 and cfg.weight_decay == 0 and cfg.max_grad_norm is None
    assert cfg.label_smoothing == 0 and cfg.augment == "none"
    assert (cfg.epochs, cfg.batch_size, cfg.eval_batch_size, cfg.grad_accum, cfg.keep_last) == (10, 64, 256, 1, 3)


def test_precedence_defaults_yaml_flags(tmp_path):
    path = write(tmp_path, "lr: 1e-3\nepochs: 3\nbatch_size: 16\n")
    cfg = parse_config(["--config", path, "--epochs", "5"])
    assert cfg.epochs == 5  # flag beats YAML
    assert cfg.batch_size == 16  # YAML beats default
    assert cfg.lr == 1e-3 and isinstance(cfg.lr, float)  # YAML 1.1 reads 1e-3 as a string: converted


def test_yaml_values_take_the_field_type(tmp_path):
    path = write(tmp_path, "lr: 5e-1\nmax_steps: 7.0\nmodel_kwargs: {hidden: 8}\nprogress: false\nmax_grad_norm: null\n")
    cfg = parse_config(["--config", path])
    assert cfg.lr == 0.5 and cfg.max_steps == 7 and cfg.model_kwargs == {"hidden": 8}
    assert cfg.progress is False and cfg.max_grad_norm is None
    with pytest.raises(UsageError, match="got the string '0.5'"):  # quoted: a string, not a number (issue 15)
        parse_config(["--config", write(tmp_path, "lr: '0.5'\n")])


@pytest.mark.parametrize("text,needle", [
    ("learning_rate: 0.1\n", "unknown key(s) learning_rate"),
    ("epochs: three\n", "'epochs'"),
    ("- a\n- b\n", "must be a mapping"),
    ("lr: [1\n", "not valid YAML"),
    ("batch_size: 1.5\n", "'batch_size'"),
])
def test_yaml_is_strict(tmp_path, text, needle):
    with pytest.raises(UsageError, match=None) as e:
        parse_config(["--config", write(tmp_path, text)])
    assert needle in str(e.value)


@pytest.mark.parametrize("argv,needle", [
    (["--lr", "abc"], "--lr must be a number, got 'abc'"),
    (["--epochs", "0"], "--epochs must be > 0, got 0"),
    (["--bogus", "1"], "unrecognized arguments: --bogus"),
    (["--model-kwargs", "{bad"], "--model-kwargs must be a JSON object"),
    (["--optimizer", "lion"], "--optimizer 'lion': unknown"),
    (["--dataset", "nope"], "--dataset 'nope': unknown"),
    (["--config", "/nonexistent.yaml"], "no such file"),
])
def test_bad_flags(argv, needle):
    with pytest.raises(UsageError) as e:
        parse_config(argv)
    assert needle in str(e.value)


def test_boolean_flags_have_no_forms():
    assert parse_config(["--no-progress"]).progress is False
    assert parse_config(["--overwrite"]).overwrite is True


def test_resolved_config_round_trips(tmp_path):
    cfg = parse_config(["--lr", "0.25", "--model-kwargs", '{"hidden": 4}'])
    again = parse_config(["--config", write(tmp_path, to_yaml(cfg))])
    assert again.to_dict() | {"config": None} == cfg.to_dict()


def test_config_diff_ignores_run_length_and_cadence():
    a = Config()
    b = Config(epochs=20, max_steps=5, log_every=1, save_every_steps=3, keep_last=9, lr=0.5)
    assert config_diff(a.to_dict(), b) == ["lr"]
