"""Dropout layers as ``torch.nn.Module`` s; each is a thin stateful shell over :mod:`dropkit.functional`."""

from dropkit.nn.alpha import AlphaDropout as AlphaDropout
from dropkit.nn.alpha import FeatureAlphaDropout as FeatureAlphaDropout
from dropkit.nn.concrete import ConcreteDropout as ConcreteDropout
from dropkit.nn.concrete import concrete_regularizers as concrete_regularizers
from dropkit.nn.dropblock import DropBlock1d as DropBlock1d
from dropkit.nn.dropblock import DropBlock2d as DropBlock2d
from dropkit.nn.dropblock import DropBlock3d as DropBlock3d
from dropkit.nn.dropout import Dropout as Dropout
from dropkit.nn.dropout import Dropout1d as Dropout1d
from dropkit.nn.dropout import Dropout2d as Dropout2d
from dropkit.nn.dropout import Dropout3d as Dropout3d
from dropkit.nn.droppath import DropPath as DropPath
from dropkit.nn.droppath import LayerDrop as LayerDrop
from dropkit.nn.droppath import StochasticDepth as StochasticDepth
from dropkit.nn.fused import BiasDropoutAdd as BiasDropoutAdd
from dropkit.nn.gaussian import GaussianDropout as GaussianDropout
from dropkit.nn.gaussian import GaussianNoise as GaussianNoise

__all__ = [
    "AlphaDropout",
    "BiasDropoutAdd",
    "ConcreteDropout",
    "DropBlock1d",
    "DropBlock2d",
    "DropBlock3d",
    "DropPath",
    "Dropout",
    "Dropout1d",
    "Dropout2d",
    "Dropout3d",
    "FeatureAlphaDropout",
    "GaussianDropout",
    "GaussianNoise",
    "LayerDrop",
    "StochasticDepth",
    "concrete_regularizers",
]
