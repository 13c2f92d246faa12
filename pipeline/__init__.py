"""DCGAN on MNIST as a reproducible, experiment-tracked pipeline."""

__version__ = "0.1.0"
