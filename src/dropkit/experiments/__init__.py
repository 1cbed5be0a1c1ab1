"""Demos and reproductions of published results live here."""
