"""Experiment tracking: MLflow runs, their artifacts and figures."""
