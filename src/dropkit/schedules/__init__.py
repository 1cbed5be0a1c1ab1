"""Dropout-rate schedules and their attachment to models."""
