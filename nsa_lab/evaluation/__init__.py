"""Evaluations of trained runs: needle-in-a-haystack retrieval (``nsa-lab eval needle``)."""

from nsa_lab.evaluation.needle import NeedleGrid, evaluate_run, make_grid, run_needle_eval
from nsa_lab.evaluation.results import NeedleResults

__all__ = ["NeedleGrid", "NeedleResults", "evaluate_run", "make_grid", "run_needle_eval"]
