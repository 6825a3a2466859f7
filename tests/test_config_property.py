"""Issue 7: property tests over the config parser. Whatever keys and values a user writes (the real keys,
arbitrary values), `parse_config` / `load_yaml` either give a valid Config or raise UsageError, which
`main` turns into one line and exit 2. Nothing else may escape."""

from __future__ import annotations

import math
import os
import tempfile

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from disttrain.config import FIELDS, Config, load_yaml, parse_config, validate
from disttrain.errors import UsageError

KEYS = sorted(k for k in FIELDS if k not in ("config", "output_dir", "init_from", "resume"))

scalars = st.one_of(
    st.none(), st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(["nan", "NaN", "inf", "-inf", "Infinity", "1e309", "1e-3", "0", "-1", "2", "1.5", "true",
                     "no", "null", "none", "auto", "", " ", "adam", "cosine", "mse", "fp16", "bf16",
                     "{}", "{bad", '{"a": 1}', "[1]", "x:y", "mod:fn", "9" * 40, "١٢", "ℕ", "é", "\u0000"]),
    st.text(max_size=12),
)
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                          st.dictionaries(st.text(max_size=5), inner, max_size=3)),
                      max_leaves=6)
mappings = st.dictionaries(st.sampled_from(KEYS), values, max_size=6)
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _check_ok(cfg: Config) -> None:
    assert isinstance(cfg, Config)
    validate(cfg)  # idempotent: a parsed config is valid
    for name in ("lr", "momentum", "weight_decay", "val_fraction", "label_smoothing"):
        assert math.isfinite(getattr(cfg, name))
    assert cfg.batch_size > 0 and cfg.epochs > 0 and cfg.grad_accum > 0


def _flag_value(v) -> str:
    if isinstance(v, (dict, list)):
        import json

        return json.dumps(v)
    return str(v)


@SETTINGS
@given(mappings)
def test_flags_parse_or_usage_error(mapping):
    argv = []
    for k, v in mapping.items():
        argv += [f"--{k.replace('_', '-')}", _flag_value(v)]
    try:
        cfg = parse_config(argv)
    except UsageError as e:
        assert str(e).strip()
        return
    _check_ok(cfg)


@SETTINGS
@given(st.lists(st.one_of(st.sampled_from([f"--{k.replace('_', '-')}" for k in KEYS] + ["--no-progress", "--",
                                                                                      "-h", "--x", "-"]),
                          st.text(max_size=8)), max_size=6))
def test_raw_argv_never_crashes(argv):
    argv = [a for a in argv if a not in ("-h", "--help")]  # --help exits 0 by design
    _parses_or_refuses(argv)


def _parses_or_refuses(argv: list[str]) -> None:
    """The property: a valid Config, or a UsageError (one line, exit 2); nothing else."""
    try:
        cfg = parse_config(argv)
    except UsageError:
        return
    _check_ok(cfg)


@SETTINGS
@given(st.one_of(mappings, st.dictionaries(st.one_of(st.text(max_size=6), st.integers()), values, max_size=3),
                 values))
def test_yaml_file_parses_or_usage_error(doc):
    fd, path = tempfile.mkstemp(suffix=".yaml")
    try:
        with os.fdopen(fd, "w") as f:
            yaml.safe_dump(doc, f, allow_unicode=True)
        try:
            data = load_yaml(path)
        except UsageError:
            return
        assert isinstance(data, dict)
        _parses_or_refuses(["--config", path])
    finally:
        os.unlink(path)


@SETTINGS
@given(st.binary(max_size=64) | st.text(max_size=64))
def test_yaml_garbage_bytes(blob):
    fd, path = tempfile.mkstemp(suffix=".yaml")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(blob if isinstance(blob, bytes) else blob.encode("utf-8", "surrogatepass"))
        _parses_or_refuses(["--config", path])
    finally:
        os.unlink(path)
