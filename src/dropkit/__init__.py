"""dropkit: every dropout technique for PyTorch, on one reproducible counter-based mask engine.

Layout, lowest first: :mod:`dropkit.engine` (Philox bits, streams and keys, numerics, reference
masks and backend), :mod:`dropkit.kernels` (the Backend protocol, fused CPU/CUDA kernels and the
choice between them), :mod:`dropkit.ops` (the custom ops and their autograd),
:mod:`dropkit.functional` (pure ops), :mod:`dropkit.nn` (modules),
:mod:`dropkit.schedules` (dropout-rate schedules), :mod:`dropkit.mc` (Monte Carlo dropout),
:mod:`dropkit.metrics` (uncertainty and calibration metrics),
:mod:`dropkit.experiments` (demos and reproductions).
"""

from dropkit import diagnostics as diagnostics
from dropkit import functional as functional
from dropkit import mc as mc
from dropkit import metrics as metrics
from dropkit import nn as nn
from dropkit import schedules as schedules
from dropkit._version import __version__ as __version__
from dropkit.engine.checkpoint import UnmanagedRecomputeError as UnmanagedRecomputeError
from dropkit.engine.checkpoint import checkpoint as checkpoint
from dropkit.engine.checkpoint import checkpoint_context as checkpoint_context
from dropkit.engine.numerics import realised_drop_probability as realised_drop_probability
from dropkit.engine.streams import clone_masks as clone_masks
from dropkit.engine.streams import element_key as element_key
from dropkit.engine.streams import initial_seed as initial_seed
from dropkit.engine.streams import make_key as make_key
from dropkit.engine.streams import manual_seed as manual_seed
from dropkit.engine.streams import masks_shared_across_ranks as masks_shared_across_ranks
from dropkit.engine.streams import share_masks_across_ranks as share_masks_across_ranks
from dropkit.interop.convert import ConversionReport as ConversionReport
from dropkit.interop.convert import convert as convert
from dropkit.interop.convert import revert as revert
from dropkit.interop.export import aoti_compile_and_package as aoti_compile_and_package
from dropkit.interop.export import export as export
from dropkit.kernels import use_reference_engine as use_reference_engine
from dropkit.mc.mode import mc_dropout as mc_dropout
from dropkit.mc.sampling import mc_predict as mc_predict

__all__ = [
    "ConversionReport",
    "UnmanagedRecomputeError",
    "__version__",
    "aoti_compile_and_package",
    "checkpoint",
    "checkpoint_context",
    "clone_masks",
    "convert",
    "diagnostics",
    "element_key",
    "export",
    "functional",
    "initial_seed",
    "make_key",
    "manual_seed",
    "mc",
    "mc_dropout",
    "mc_predict",
    "masks_shared_across_ranks",
    "metrics",
    "nn",
    "realised_drop_probability",
    "revert",
    "schedules",
    "share_masks_across_ranks",
    "use_reference_engine",
]
