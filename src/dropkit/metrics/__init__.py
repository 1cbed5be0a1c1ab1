"""Uncertainty and calibration metrics for Monte Carlo samples (classification and regression)."""
