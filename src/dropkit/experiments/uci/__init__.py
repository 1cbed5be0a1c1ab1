"""The UCI regression benchmark of MC dropout (Gal & Ghahramani 2016), grid-search protocol.

* :mod:`~dropkit.experiments.uci.data`: the benchmark's directory layouts (``<name>/data.txt`` or,
  as the published repository, ``<name>/data/data.txt``) and exact splits;
* :mod:`~dropkit.experiments.uci.model`: many networks trained as one vectorized model;
* :mod:`~dropkit.experiments.uci.protocol`: grid, selection, retraining, scoring;
* :mod:`~dropkit.experiments.uci.report`: per-split JSON, CSV/JSON/Markdown summaries;
* :mod:`~dropkit.experiments.uci.concrete`: beyond the protocol, concrete dropout (learned rates);
* :mod:`~dropkit.experiments.uci.cli`: ``dropkit uci --data DIR --output OUT``, also
  ``python -m dropkit.experiments.uci.cli`` (``main(argv)`` and ``build_parser()`` live there,
  imported on demand).
"""

from dropkit.experiments.uci.data import UCIDataset as UCIDataset
from dropkit.experiments.uci.data import load_dataset as load_dataset
from dropkit.experiments.uci.data import regenerate_splits as regenerate_splits
from dropkit.experiments.uci.protocol import ProtocolConfig as ProtocolConfig
from dropkit.experiments.uci.protocol import run_splits as run_splits

__all__ = ["ProtocolConfig", "UCIDataset", "load_dataset", "regenerate_splits", "run_splits"]
