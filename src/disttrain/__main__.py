"""`python -m disttrain`: what the commands are (each has its own --help)."""

from __future__ import annotations

import sys

USAGE = """usage: python -m disttrain.<command> [FLAGS]   (python -m disttrain.<command> --help for its flags)

commands:
  train      train a model: python -m disttrain.train --dataset imagefolder:DIR --model cnn --epochs 5
             (the same module under accelerate launch / torchrun for several processes)
  launch     validated multi-process launch: python -m disttrain.launch [accelerate options] -- [train flags]
  evaluate   evaluate a trained model: python -m disttrain.evaluate --checkpoint RUN [--dataset ...]
  predict    predict for images, folders or tables: python -m disttrain.predict --checkpoint RUN INPUT...
  plot       curves of runs as PNG: python -m disttrain.plot RUN [RUN...]
  bench      the speed benchmark: python -m disttrain.bench

README.md has the two-command start, "Train on your own data", and the flag table.
"""


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    print(USAGE, end="", file=sys.stdout if not args or args[0] in ("-h", "--help", "help") else sys.stderr)
    return 0 if not args or args[0] in ("-h", "--help", "help") else 2


if __name__ == "__main__":
    sys.exit(main())
