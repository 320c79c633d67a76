"""nsa-lab: an experiment platform for Native Sparse Attention."""

__version__ = "0.1.0"
