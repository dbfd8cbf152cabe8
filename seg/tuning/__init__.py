"""Tuning and tracking: MLflow bookkeeping, search spaces, Ray Tune searches, retraining, reports.

Unlike the core (``seg``), these modules import ray, optuna and mlflow; only scripts and
the tuning layer itself import them.
"""
