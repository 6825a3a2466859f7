"""disttrain: the plain PyTorch training loop under HuggingFace Accelerate, exact on any world size."""

__version__ = "0.1.0"
