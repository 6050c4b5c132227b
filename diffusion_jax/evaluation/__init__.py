"""Evaluation: FID, Inception Score, sFID, precision/recall and NLL in bits/dim."""
