"""Interoperation with the PyTorch ecosystem: converting existing models to dropkit layers and
exporting dropkit models with ``torch.export``."""
