"""disttrain: the plain PyTorch training loop under HuggingFace Accelerate, exact on any world size."""

import os as _os

from disttrain import hardware as _hardware

# OpenMP reads its wait policy when `import torch` loads it: idle threads must sleep, not spin, or a busy
# neighbour on a shared machine slows every step many times over (disttrain/hardware.py; a user's own
# OMP_WAIT_POLICY / GOMP_SPINCOUNT / KMP_BLOCKTIME is kept). Launched workers inherit it.
_hardware.configure_openmp(_os.environ)

__version__ = "0.1.0"
