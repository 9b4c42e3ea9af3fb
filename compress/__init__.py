"""compress: compress a trained model for an edge target and report honestly how it runs there."""

__version__ = "0.1.0"
