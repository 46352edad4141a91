"""bnexporter: find dying BatchNorm + ReLU channels in training checkpoints."""

__version__ = "0.1.0"
